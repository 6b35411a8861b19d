"""Label-file archives (datasets/labels.py): the readers as pure functions on the fixtures of
tests/data/archives/ (written by its make_fixtures.py), and one `cxr prepare --labels` end to end."""
from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cxr_datasets.errors import CxrError
from cxr_datasets.labels import detect_format, read_labels
from cxr_datasets.splits import check_splits

ARCHIVES = Path(__file__).parent / "data" / "archives"


def labels_of(found) -> dict:
    return {f.rel_path: ("PNEUMONIA" if f.label else "NORMAL", f.patient_id, f.official_split)
            for f in found.files}


def test_formats_are_detected_from_the_header():
    assert detect_format(ARCHIVES / "csv/labels.csv") == "csv"
    assert detect_format(ARCHIVES / "rsna/stage_2_train_labels.csv") == "rsna"
    assert detect_format(ARCHIVES / "nih/Data_Entry_2017_v2020.csv") == "nih"
    assert detect_format(ARCHIVES / "chexpert/CheXpert-v1.0-small/train.csv") == "chexpert"
    with pytest.raises(CxrError, match="unknown label file header"):
        detect_format(ARCHIVES / "nih/test_list.txt")


def test_generic_csv_rows_labels_patients_splits():
    found = read_labels(ARCHIVES / "csv", "labels.csv")
    got = labels_of(found)
    assert len(got) == 12 and found.layout == "official"
    assert got["images/img00.png"] == ("NORMAL", "p0", "train")
    assert got["images/img03.png"] == ("PNEUMONIA", "p1", "val")  # label "1"
    assert got["images/img02.png"][0] == "NORMAL"  # label "0"
    assert Counter(s for _, _, s in got.values()) == {"train": 4, "val": 4, "test": 4}
    info = found.labels
    assert info["format"] == "csv"
    assert info["missing_images"] == {"count": 1, "examples": ["14: images/missing.png"]}
    assert info["unlabelled_images"] == {"count": 1, "examples": ["images/unlabelled.png"]}
    escaped = info["excluded"]["path escapes SOURCE (absolute or ..)"]
    assert escaped["count"] == 2
    assert sorted(r["path"] for r in found.rejected) == ["../outside.png", "/etc/abs.png"]
    assert info["rules"]["label=NORMAL"]["rows"] == 7 and info["rules"]["label=PNEUMONIA"]["rows"] == 6


def test_generic_csv_without_test_rows_is_split_randomly(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ARCHIVES / "csv/images", src / "images")
    (src / "l.csv").write_text("path,label\n" + "".join(
        f"images/img{i:02d}.png,{i % 2}\n" for i in range(12)))
    found = read_labels(src, src / "l.csv")
    assert found.layout == "flat" and not found.labels["splits_from_label_file"]
    assert all(f.patient_id == f"file:{f.rel_path}" for f in found.files)
    assert "each image its own patient" in found.labels["patient_rule"]


def test_generic_csv_unknown_label_names_the_row(tmp_path):
    (tmp_path / "l.csv").write_text("path,label\na.png,NORMAL\nb.png,maybe\n")
    with pytest.raises(CxrError, match=r"l.csv:3: unknown label 'maybe'"):
        read_labels(tmp_path, tmp_path / "l.csv")


def test_only_an_empty_or_one_class_train_is_an_error():
    table = pd.DataFrame({"label": [0, 1, 0, 1, 0], "split": ["train", "train", "val", "test", "test"],
                          "patient_id": list("abcde")})
    warnings = check_splits(table, "random", source_has_test=False)
    assert len(warnings) == 1 and "no PNEUMONIA images in the val split" in warnings[0]
    with pytest.raises(CxrError, match="no PNEUMONIA images in the train split"):
        check_splits(table.assign(label=[0, 0, 0, 1, 0]), "random", source_has_test=False)


def test_rsna_class_rules_and_negatives():
    found = read_labels(ARCHIVES / "rsna", ARCHIVES / "rsna/stage_2_train_labels.csv")
    got = labels_of(found)
    assert len(got) == 8 and found.layout == "flat"
    assert Counter(v[0] for v in got.values()) == {"PNEUMONIA": 4, "NORMAL": 4}
    assert got["stage_2_train_images/rsna-00.dcm"] == ("PNEUMONIA", "rsna-00", None)
    info = found.labels
    assert info["rules"]["class=Lung Opacity"]["rows"] == 4  # one per patient, not per box
    excluded = info["excluded"]["class 'No Lung Opacity / Not Normal' (neither; --negatives all: NORMAL)"]
    assert excluded["count"] == 4  # rsna-08..11 (rsna-11 has no image either)
    assert info["unlabelled_images"]["count"] == 0
    everything = read_labels(ARCHIVES / "rsna", ARCHIVES / "rsna/stage_2_train_labels.csv", negatives="all")
    assert Counter(v[0] for v in labels_of(everything).values()) == {"PNEUMONIA": 4, "NORMAL": 7}
    assert everything.labels["missing_images"]["count"] == 1  # rsna-11 has no .dcm


def test_rsna_without_class_file_uses_target(tmp_path):
    shutil.copytree(ARCHIVES / "rsna", tmp_path / "rsna")
    (tmp_path / "rsna/stage_2_detailed_class_info.csv").unlink()
    found = read_labels(tmp_path / "rsna", tmp_path / "rsna/stage_2_train_labels.csv")
    assert Counter(v[0] for v in labels_of(found).values()) == {"PNEUMONIA": 4, "NORMAL": 7}
    assert "Target 1 -> PNEUMONIA" in found.labels["note"]


def test_rsna_jpeg_baseline_dicoms_decode():
    from cxr_datasets.image import read_gray

    path = ARCHIVES / "rsna/stage_2_train_images/rsna-00.dcm"
    import pydicom
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    gray = read_gray(path)
    gray = gray[0] if isinstance(gray, tuple) else gray
    assert gray.shape == (64, 64) and gray.dtype == np.uint8


def test_nih_findings_patients_official_lists():
    found = read_labels(ARCHIVES / "nih", ARCHIVES / "nih/Data_Entry_2017_v2020.csv")
    got = labels_of(found)
    assert found.layout == "official" and len(got) == 9
    assert got["images_001/images/00000001_001.png"] == ("PNEUMONIA", "1", "train")  # Atelectasis|Pneumonia
    assert got["images_002/images/00000006_000.png"] == ("NORMAL", "6", "test")
    assert Counter(v[0] for v in got.values()) == {"PNEUMONIA": 4, "NORMAL": 5}
    assert Counter(v[2] for v in got.values()) == {"train": 6, "test": 3}
    assert found.labels["excluded"]["other findings, no Pneumonia (--negatives all: NORMAL)"]["count"] == 3
    assert found.labels["unlabelled_images"]["count"] == 0  # excluded rows are labelled, not unlabelled
    assert len(labels_of(read_labels(ARCHIVES / "nih", ARCHIVES / "nih/Data_Entry_2017_v2020.csv",
                                     negatives="all"))) == 12


def test_nih_without_lists_is_flat(tmp_path):
    shutil.copytree(ARCHIVES / "nih", tmp_path / "nih")
    (tmp_path / "nih/test_list.txt").unlink()
    (tmp_path / "nih/train_val_list.txt").unlink()
    found = read_labels(tmp_path / "nih", tmp_path / "nih/Data_Entry_2017_v2020.csv")
    assert found.layout == "flat" and len(found.files) == 9


@pytest.mark.parametrize("source", ["chexpert", "chexpert/CheXpert-v1.0-small"])
def test_chexpert_rules_and_path_prefix(source):
    found = read_labels(ARCHIVES / source, ARCHIVES / "chexpert/CheXpert-v1.0-small/train.csv")
    got = labels_of(found)
    prefix = "CheXpert-v1.0-small/" if source == "chexpert" else ""
    assert got[f"{prefix}train/patient00001/study1/view1_frontal.jpg"] == ("PNEUMONIA", "patient00001", "train")
    assert got[f"{prefix}valid/patient64542/study1/view1_frontal.jpg"] == ("NORMAL", "patient64542", "test")
    assert len(got) == 6 and found.layout == "official"  # 4 train + 2 valid
    ex = found.labels["excluded"]
    assert ex["lateral view (--views all: included)"]["count"] == 2
    assert ex["Pneumonia uncertain (-1.0), U-Ignore"]["count"] == 1
    assert ex["neither Pneumonia 1.0 nor No Finding 1.0 (--negatives all: NORMAL)"]["count"] == 3
    assert found.labels["unlabelled_images"]["count"] == 0


def test_chexpert_valid_csv_alone_is_test():
    found = read_labels(ARCHIVES / "chexpert", ARCHIVES / "chexpert/CheXpert-v1.0-small/valid.csv")
    assert {f.official_split for f in found.files} == {"test"} and len(found.files) == 2


def test_chexpert_path_may_not_leave_the_archive(tmp_path):
    shutil.copytree(ARCHIVES / "chexpert", tmp_path / "c")
    train = tmp_path / "c/CheXpert-v1.0-small/train.csv"
    lines = train.read_text().splitlines()
    lines.append(lines[1].replace("CheXpert-v1.0-small/train/", "CheXpert-v1.0-small/../"))
    train.write_text("\n".join(lines) + "\n")
    found = read_labels(tmp_path / "c", train)
    assert [r["path"] for r in found.rejected] == ["CheXpert-v1.0-small/../patient00001/study1/view1_frontal.jpg"]


@pytest.mark.parametrize("kw,n,pneumonia", [
    ({"uncertain": "ones"}, 7, 4), ({"uncertain": "zeros", "negatives": "all"}, 10, 3),
    ({"views": "all"}, 8, 4), ({"negatives": "all"}, 9, 3)])
def test_chexpert_flags(kw, n, pneumonia):
    found = read_labels(ARCHIVES / "chexpert", ARCHIVES / "chexpert/CheXpert-v1.0-small/train.csv", **kw)
    got = labels_of(found)
    assert len(got) == n and sum(v[0] == "PNEUMONIA" for v in got.values()) == pneumonia


def test_prepare_with_generic_csv_end_to_end(tmp_path, ray_session):
    import cxr_datasets

    manifest = cxr_datasets.prepare(ARCHIVES / "csv", tmp_path / "out", image_size=32,
                                    labels=ARCHIVES / "csv/labels.csv", verbose=False)
    assert manifest["split_used"] == "official"
    assert manifest["counts"]["test"] == {"NORMAL": 2, "PNEUMONIA": 2}
    assert sum(sum(c.values()) for c in manifest["counts"].values()) == 12
    assert manifest["labels"]["format"] == "csv"
    saved = json.loads((tmp_path / "out/manifest.json").read_text())
    assert saved["labels"]["missing_images"]["count"] == 1
    summary = (tmp_path / "out/eda/summary.md").read_text()
    assert "| label column PNEUMONIA or 1 | PNEUMONIA | 6 |" in summary


@pytest.mark.parametrize("archive,label_file,argv,total", [
    ("rsna", "rsna/stage_2_train_labels.csv", [], 8),  # JPEG Baseline DICOMs, decoded in Ray tasks
    ("nih", "nih/Data_Entry_2017_v2020.csv", [], 9),
    ("chexpert", "chexpert/CheXpert-v1.0-small/train.csv", ["--uncertain", "ones"], 7),
])
def test_cxr_prepare_labels_per_archive(tmp_path, ray_session, archive, label_file, argv, total):
    from cxr_search.main import main

    out = tmp_path / "out"
    assert main(["prepare", str(ARCHIVES / archive), str(out), "--labels", str(ARCHIVES / label_file),
                 "--image-size", "32", "--quiet", *argv]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(sum(c.values()) for c in manifest["counts"].values()) == total
    assert not [r for r in manifest["rejected"] if "node" in r]  # every image decoded
    assert manifest["labels"]["format"] == archive
    assert manifest["split_used"] == ("random" if archive == "rsna" else "official")
