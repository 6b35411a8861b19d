"""Writes the tiny label-file archives under tests/data/archives/ (run from the repository root:
`.venv/bin/python tests/data/archives/make_fixtures.py`). Real headers and quirks, 64x64 images
(the smallest `cxr prepare` accepts by default), a few KB in all. The expected counts in
tests/test_datasets_labels.py follow from the rows written here."""
from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).parent


def pixels(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    return (rng.integers(0, 8, (64, 64)) * 32 + i).astype(np.uint8)  # distinct: no duplicates


def png(path: Path, i: int, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels(i)).convert(mode).save(path)


def jpeg(path: Path, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels(i)).save(path, quality=50)


def jpeg_dicom(path: Path, i: int, patient: str) -> None:
    """MONOCHROME2 8-bit, JPEG Baseline (1.2.840.10008.1.2.4.50) as the RSNA DICOMs are."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit, SecondaryCaptureImageStorage, generate_uid

    buf = io.BytesIO()
    Image.fromarray(pixels(i)).save(buf, format="JPEG", quality=50)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.Modality = patient, "CR"
    ds.Rows, ds.Columns = 64, 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def make_csv(root: Path) -> None:
    rows = ["path,label,patient_id,split"]
    for i in range(12):  # p0..p5, two images each; p4, p5 test
        label = ["NORMAL", "PNEUMONIA", "0", "1"][i % 4]
        split = "test" if i >= 8 else ["train", "val"][i % 2]
        rows.append(f"images/img{i:02d}.png,{label},p{i // 2},{split}")
        png(root / f"images/img{i:02d}.png", i)
    rows += ["images/missing.png,NORMAL,p9,train", "../outside.png,PNEUMONIA,p9,train",
             "/etc/abs.png,NORMAL,p9,train"]
    png(root / "images/unlabelled.png", 99)
    write(root / "labels.csv", "\n".join(rows) + "\n")


def make_rsna(root: Path) -> None:
    # Lung Opacity: r0..r3 (r0, r1 two boxes each); Normal: r4..r7; Not Normal: r8..r10; r11 no image
    labels = ["patientId,x,y,width,height,Target"]
    classes = ["patientId,class"]
    for i in range(12):
        pid = f"rsna-{i:02d}"
        cls = "Lung Opacity" if i < 4 else "Normal" if i < 8 else "No Lung Opacity / Not Normal"
        boxes = 2 if i < 2 else 1
        for b in range(boxes):
            labels.append(f"{pid},{10 + b}.0,20.0,30.0,40.0,1" if cls == "Lung Opacity" else f"{pid},,,,,0")
            classes.append(f"{pid},{cls}")
        if i < 11:
            jpeg_dicom(root / f"stage_2_train_images/{pid}.dcm", 20 + i, pid)
    write(root / "stage_2_train_labels.csv", "\n".join(labels) + "\n")
    write(root / "stage_2_detailed_class_info.csv", "\n".join(classes) + "\n")


def make_nih(root: Path) -> None:
    header = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y]")
    findings = ["Pneumonia", "Atelectasis|Pneumonia", "No Finding", "No Finding", "Effusion",
                "Pneumonia|Infiltration", "No Finding", "Cardiomegaly", "No Finding", "Pneumonia",
                "No Finding", "Mass|Nodule"]
    rows, test = [header], []
    for i, finding in enumerate(findings):  # patients 1..6, two images each; 5 and 6 in test
        patient = i // 2 + 1
        name = f"{patient:08d}_{i % 2:03d}.png"
        rows.append(f"{name},{finding},{i % 2},{patient},{40 + i},M,PA,64,64,0.143,0.143")
        png(root / f"images_{1 + i // 6:03d}/images/{name}", 40 + i, "RGBA" if i == 3 else "L")
        if patient >= 5:
            test.append(name)
    write(root / "Data_Entry_2017_v2020.csv", "\n".join(rows) + "\n")
    write(root / "test_list.txt", "\n".join(test) + "\n")
    write(root / "train_val_list.txt", "\n".join(r.split(",")[0] for r in rows[1:] if r.split(",")[0]
                                                 not in test) + "\n")


def make_chexpert(root: Path) -> None:
    obs = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
           "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
           "Pleural Other", "Fracture", "Support Devices"]
    header = "Path,Sex,Age,Frontal/Lateral,AP/PA," + ",".join(obs)
    arch = root / "CheXpert-v1.0-small"

    def row(split, patient, study, view, frontal, no_finding, pneumonia, i):
        path = f"CheXpert-v1.0-small/{split}/patient{patient:05d}/study{study}/view{view}_{'frontal' if frontal else 'lateral'}.jpg"
        jpeg(root / path, 60 + i)
        values = {o: "" for o in obs}
        values["No Finding"], values["Pneumonia"] = no_finding, pneumonia
        return (f"{path},Female,60,{'Frontal' if frontal else 'Lateral'},{'AP' if frontal else ''},"
                + ",".join(values[o] for o in obs))

    train = [header,
             row("train", 1, 1, 1, True, "", "1.0", 0),    # PNEUMONIA
             row("train", 1, 1, 2, False, "", "1.0", 1),   # lateral
             row("train", 2, 1, 1, True, "1.0", "", 2),    # NORMAL
             row("train", 3, 1, 1, True, "", "-1.0", 3),   # uncertain
             row("train", 4, 1, 1, True, "", "0.0", 4),    # Pneumonia 0.0: --negatives all
             row("train", 5, 1, 1, True, "", "", 5),       # blank: --negatives all
             row("train", 6, 1, 1, True, "1.0", "", 6),    # NORMAL
             row("train", 7, 2, 1, True, "", "1.0", 7)]    # PNEUMONIA
    valid = [header,
             row("valid", 64541, 1, 1, True, "", "1.0", 8),   # PNEUMONIA
             row("valid", 64542, 1, 1, True, "1.0", "0.0", 9),  # NORMAL
             row("valid", 64543, 1, 1, True, "", "0.0", 10),  # --negatives all
             row("valid", 64543, 1, 2, False, "1.0", "", 11)]  # lateral
    write(arch / "train.csv", "\n".join(train) + "\n")
    write(arch / "valid.csv", "\n".join(valid) + "\n")


if __name__ == "__main__":
    for name, make in [("csv", make_csv), ("rsna", make_rsna), ("nih", make_nih), ("chexpert", make_chexpert)]:
        shutil.rmtree(HERE / name, ignore_errors=True)
        make(HERE / name)
    print("written under", HERE)
