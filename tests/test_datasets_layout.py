"""Discovery (layouts, mirror copies, junk), patient ids and the split rules, on file names and
metadata only: no decoding, no Ray."""
from __future__ import annotations

import pandas as pd
import pytest

from cxr_datasets import CxrError, patient_id
from cxr_datasets.discover import discover, patient_id_rules
from cxr_datasets.splits import assign_splits, check_splits, drop_duplicates, drop_test_patients_from_train


def touch(root, *rels, content=b"x"):
    for rel in rels:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)


@pytest.mark.parametrize("name, expected", [
    ("person1763_bacteria_4606.jpeg", "person1763_bacteria"),
    ("person1763_bacteria_12.jpeg", "person1763_bacteria"),  # same patient whatever the running index
    ("person1763_virus_12.jpeg", "person1763_virus"),  # person numbers count per diagnosis type
    ("PERSON7_Bacteria_1.JPG", "person7_bacteria"),
    ("IM-0206-0001.jpeg", "IM-0206"),
    ("NORMAL2-IM-0736-0001.jpeg", "NORMAL2-IM-0736"),
    ("NORMAL2-IM-0246-0001-0002.jpeg", "NORMAL2-IM-0246"),
    ("IM-42-3.png", "IM-0042"),
    ("BACTERIA-1351146-0002.jpeg", "patient1351146"),  # the Mendeley release's names
    ("VIRUS-1351146-0001.jpeg", "patient1351146"),  # same patient, whatever the diagnosis word
    ("NORMAL-0745902-0001.jpeg", "patient745902"),
    ("scan_0001.jpeg", None),
    ("person_x_bacteria.jpeg", None),
])
def test_patient_ids_from_file_names(name, expected):
    assert patient_id(name) == expected


def test_real_sample_names_parse(samples_dir):
    found = discover(samples_dir)
    assert found.layout == "official" and len(found.files) == 10
    assert all(f.patient_from_name for f in found.files)
    assert {f.patient_id for f in found.files} >= {"NORMAL2-IM-0736", "IM-0206", "person1763_bacteria"}
    assert {f.label for f in found.files if "PNEUMONIA" in f.rel_path} == {1}
    assert {f.label for f in found.files if "/NORMAL/" in f.rel_path} == {0}


def test_real_kaggle_names_share_no_patient_between_train_and_test(tmp_path):
    """The real split's 5,840 file names (tests/data/kaggle_chest_xray_names.csv): no patient is in
    both train and test, so the leakage rule drops nothing from train."""
    import csv
    from pathlib import Path

    names = Path(__file__).parent / "data" / "kaggle_chest_xray_names.csv"
    with names.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 5840
    table = pd.DataFrame({
        "rel_path": [f"{r['split']}/{r['label']}/{r['file']}" for r in rows],
        "label": [0 if r["label"] == "NORMAL" else 1 for r in rows],
        "official_split": [r["split"] for r in rows],
        "patient_id": [patient_id(r["file"]) for r in rows],
    })
    assert table["patient_id"].notna().all()  # every real name follows a known scheme
    train = set(table.loc[table["official_split"] == "train", "patient_id"])
    test = set(table.loc[table["official_split"] == "test", "patient_id"])
    assert len(train & test) == 0
    kept, overlap = drop_test_patients_from_train(table)
    assert len(kept) == len(table) and overlap["images_removed_from_train"] == 0
    # The evidence in datasets/discover.py: the bare person number would be in both splits.
    bare = table["patient_id"].str.replace(r"_(bacteria|virus)$", "", regex=True)
    assert len(set(bare[table["official_split"] == "train"]) & set(bare[table["official_split"] == "test"])) == 170
    typed = table[table["patient_id"].str.startswith("person")]["patient_id"]
    both = typed.str.extract(r"person(\d+)_(\w+)").groupby(0)[1].nunique()
    assert int((both > 1).sum()) > 800  # one child per number would mean hundreds with both diagnoses


def test_patient_id_rules_say_which_are_guesses():
    rules = patient_id_rules(["person1_virus_2.jpeg", "IM-0001-0001.jpeg", "BACTERIA-1-0001.jpeg",
                              "x.png", "person3_bacteria_4.jpeg"])
    assert set(rules) == {"kaggle_person", "kaggle_im", "mendeley", "unknown"}
    assert rules["kaggle_person"]["status"] == "checked" and rules["kaggle_person"]["files"] == 2
    assert rules["mendeley"]["status"] == "guess" and rules["unknown"]["status"] == "guess"


def test_a_true_overlap_is_still_removed_from_train():
    table = pd.DataFrame({
        "rel_path": ["train/P/person5_virus_1.jpeg", "train/P/person5_bacteria_2.jpeg",
                     "test/P/person5_virus_9.jpeg"],
        "label": [1, 1, 1], "official_split": ["train", "train", "test"]})
    table["patient_id"] = table["rel_path"].map(patient_id)
    kept, overlap = drop_test_patients_from_train(table)
    assert overlap == {"patients": 1, "images_removed_from_train": 1,
                       "paths": ["train/P/person5_virus_1.jpeg"]}
    assert kept["rel_path"].tolist() == ["train/P/person5_bacteria_2.jpeg", "test/P/person5_virus_9.jpeg"]


def test_kaggle_zip_layout_counts_each_image_once_and_skips_junk(tmp_path):
    files = ["train/NORMAL/IM-0001-0001.jpeg", "train/PNEUMONIA/person1_bacteria_1.jpeg",
             "test/NORMAL/IM-0002-0001.jpeg", "val/PNEUMONIA/person2_virus_2.jpeg"]
    touch(tmp_path, *[f"chest_xray/{f}" for f in files])
    touch(tmp_path, *[f"chest_xray/chest_xray/{f}" for f in files])  # the zip's nested copy
    touch(tmp_path, "__MACOSX/chest_xray/train/NORMAL/._IM-0001-0001.jpeg",
          "chest_xray/train/NORMAL/._IM-0001-0001.jpeg", "chest_xray/.DS_Store",
          "chest_xray/train/.hidden/IM-0009-0001.jpeg", "chest_xray/README.txt")
    found = discover(tmp_path)
    assert sorted(f.rel_path for f in found.files) == sorted(f"chest_xray/{f}" for f in files)
    assert found.mirror_copies_skipped == 4 and found.mirror_roots == ["chest_xray/chest_xray"]
    assert found.rejected == [] and found.ignored_files == 3  # ._*, .DS_Store, README.txt
    assert {f.official_split for f in found.files} == {"train", "test", "val"}


def test_sibling_folders_with_equal_names_are_different_images(tmp_path):
    touch(tmp_path, "site1/NORMAL/001.png", "site2/NORMAL/001.png", "site1/PNEUMONIA/002.png")
    found = discover(tmp_path)
    assert found.layout == "flat" and len(found.files) == 3 and found.mirror_copies_skipped == 0
    assert len({f.patient_id for f in found.files}) == 3  # unparsed names: one patient each
    assert found.summary()["patients_not_from_name"] == 3


def test_class_folders_only_and_case_insensitive(tmp_path):
    touch(tmp_path, "Normal/IM-0001-0001.jpeg", "pneumonia/person1_bacteria_1.jpeg")
    found = discover(tmp_path)
    assert found.layout == "flat" and sorted(f.label for f in found.files) == [0, 1]
    assert all(f.official_split is None for f in found.files)


def test_unknown_label_folder_and_stray_files_are_rejected(tmp_path):
    touch(tmp_path, "train/NORMAL/IM-0001-0001.jpeg", "train/COVID/x.jpeg", "y.jpeg",
          "NORMAL/IM-0003-0001.jpeg")
    found = discover(tmp_path)
    reasons = {r["path"]: r["reason"] for r in found.rejected}
    assert "unknown label folder 'COVID'" in reasons["train/COVID/x.jpeg"]
    assert "not in a label folder" in reasons["y.jpeg"]
    assert "outside the train/val/test folders" in reasons["NORMAL/IM-0003-0001.jpeg"]
    assert [f.rel_path for f in found.files] == ["train/NORMAL/IM-0001-0001.jpeg"]


def test_missing_source_and_no_images_are_one_line_errors(tmp_path):
    with pytest.raises(CxrError, match="not found"):
        discover(tmp_path / "nope")
    touch(tmp_path, "notes.txt")
    with pytest.raises(CxrError, match="no images"):
        discover(tmp_path)


# --- split rules ---------------------------------------------------------------------------------

def metadata(n_patients=40, per_patient=2, test_patients=8, normal_every=4) -> pd.DataFrame:
    """A Kaggle-like table: patient p has `per_patient` images, NORMAL for every 4th patient."""
    rows = []
    for p in range(n_patients):
        label = 0 if p % normal_every == 0 else 1
        split = "test" if p < test_patients else ("val" if p == test_patients else "train")
        for i in range(per_patient):
            rows.append({"rel_path": f"{split}/{label}/p{p}_{i}.jpeg", "label": label,
                         "official_split": split, "patient_id": f"P{p}", "sha256": f"{p}-{i}"})
    return pd.DataFrame(rows)


def test_official_split_keeps_test_and_carves_val_by_patient_per_class():
    table = metadata()
    splits = assign_splits(table, "official", val_fraction=0.2, test_fraction=0.15, seed=0)
    assert splits[table["official_split"] == "test"].eq("test").all()  # untouched
    assert not splits[table["official_split"] != "test"].eq("test").any()
    assert table.groupby("patient_id").apply(lambda g: splits[g.index].nunique()).eq(1).all()
    val = table[splits == "val"]
    assert set(val["label"]) == {0, 1}  # stratified
    train_patients = table[table["official_split"] != "test"].groupby("label")["patient_id"].nunique()
    assert val.groupby("label")["patient_id"].nunique().to_dict() == {
        label: round(0.2 * n) for label, n in train_patients.items()}


def test_a_zero_fraction_gives_that_split_no_patients():
    table = metadata(n_patients=60).assign(official_split=None)
    splits = assign_splits(table, "random", val_fraction=0.0, test_fraction=0.2, seed=0)
    assert not splits.eq("val").any()
    assert splits.eq("test").any() and splits.eq("train").any()


def test_splits_are_seeded():
    table = metadata()
    first = assign_splits(table, "official", 0.2, 0.15, seed=0)
    assert first.equals(assign_splits(table, "official", 0.2, 0.15, seed=0))
    assert not first.equals(assign_splits(table, "official", 0.2, 0.15, seed=1))


def test_random_split_is_patient_grouped_and_stratified():
    table = metadata(n_patients=60).assign(official_split=None)
    splits = assign_splits(table, "random", val_fraction=0.2, test_fraction=0.2, seed=3)
    for split in ("train", "val", "test"):
        assert set(table.loc[splits == split, "label"]) == {0, 1}
    by_patient = table.assign(split=splits).groupby("patient_id")["split"].nunique()
    assert by_patient.eq(1).all()
    assert splits.eq("test").sum() == 2 * (round(0.2 * 15) + round(0.2 * 45))


def test_duplicate_of_a_test_image_is_removed_from_train_never_from_test():
    table = metadata()
    test_row = table[table["official_split"] == "test"].iloc[0]
    train_rows = table.index[table["official_split"] == "train"][:2]
    table.loc[train_rows, "sha256"] = test_row["sha256"]  # two train copies of a test image
    kept, report = drop_duplicates(table, official=True)
    assert test_row["rel_path"] in set(kept["rel_path"])
    assert not set(table.loc[train_rows, "rel_path"]) & set(kept["rel_path"])
    assert {r["duplicate_of"] for r in report} == {test_row["rel_path"]}
    assert all(r["action"] == "removed" for r in report)


def test_duplicates_within_train_keep_one_copy():
    table = metadata()
    rows = table.index[table["official_split"] == "train"][:3]
    table.loc[rows, "sha256"] = "same"
    kept, report = drop_duplicates(table, official=True)
    assert len(table) - len(kept) == 2 and len(report) == 2
    assert (kept["sha256"] == "same").sum() == 1


def test_test_patients_are_removed_from_train():
    table = metadata()
    leak = table.index[table["official_split"] == "train"][0]
    table.loc[leak, "patient_id"] = "P0"  # P0 is a test patient
    kept, overlap = drop_test_patients_from_train(table)
    assert leak not in kept.index and overlap["patients"] == 1
    assert overlap["images_removed_from_train"] == 1


def test_a_class_missing_from_val_is_reported_not_an_error():
    table = metadata()  # its official val is one NORMAL patient
    warnings = check_splits(table.assign(split=table["official_split"]), "official", True)
    assert any("no PNEUMONIA images in the val split" in w for w in warnings)
    with pytest.raises(CxrError, match="no test/ folder"):
        check_splits(table.assign(split=table["official_split"]), "official", source_has_test=False)
