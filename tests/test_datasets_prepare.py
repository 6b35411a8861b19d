"""`prepare` end to end on a messy Kaggle-like folder: synthetic images, the real samples, the zip's
nested copy, macOS junk, broken files, duplicates, a DICOM and a 16-bit PNG. Then: what the shards,
the manifest, `load` and TFRecords say about it. One Ray instance for the session (`ray_session`)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from dicom_util import write_dicom
from PIL import Image

import cxr_datasets
from cxr_datasets import CLASS_NAMES, CxrError

SIZE = 32
BAD = {  # file placed in train/PNEUMONIA -> expected words of its rejection reason
    "truncated.jpeg": "truncated",
    "text.jpeg": "not an image",
    "empty.jpeg": "empty",
    "folder.jpeg": "not a regular file",
    "broken-link.jpeg": "unreadable",
    "bomb.png": "decompression bomb",
    "tiny.png": "too small",
}


# --- the messy source ----------------------------------------------------------------------------

def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _bomb_png() -> bytes:
    data = bytearray(_png(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", 100_000, 100_000)  # the header claims 10 gigapixels
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _write_bad_files(folder: Path, good_jpeg: Path) -> None:
    data = good_jpeg.read_bytes()
    (folder / "truncated.jpeg").write_bytes(data[: len(data) // 2])
    (folder / "text.jpeg").write_text("not an image\n")
    (folder / "empty.jpeg").write_bytes(b"")
    (folder / "folder.jpeg").mkdir()
    (folder / "broken-link.jpeg").symlink_to(folder / "gone.jpeg")  # root ignores chmod 000
    (folder / "bomb.png").write_bytes(_bomb_png())
    (folder / "tiny.png").write_bytes(_png(Image.new("L", (40, 200), 90)))


@pytest.fixture(scope="module")
def messy(synth_source, samples_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("messy")
    kaggle = root / "chest_xray"
    shutil.copytree(synth_source / "chest_xray", kaggle)
    shutil.copytree(synth_source / "chest_xray", kaggle / "chest_xray")  # the zip's nested copy
    for path in samples_dir.glob("train/*/*.jpeg"):  # the real originals, with their real names
        shutil.copy(path, kaggle / "train" / path.parent.name / path.name)
    junk = root / "__MACOSX" / "chest_xray" / "train" / "NORMAL"
    junk.mkdir(parents=True)
    (junk / "._IM-0001-0001.jpeg").write_bytes(b"\0\5\26\7")
    (kaggle / "train" / "NORMAL" / "._IM-0002-0001.jpeg").write_bytes(b"\0\5\26\7")
    pneumonia = kaggle / "train" / "PNEUMONIA"
    _write_bad_files(pneumonia, next(pneumonia.glob("person*.jpeg")))
    (kaggle / "train" / "COVID").mkdir()
    shutil.copy(next(pneumonia.glob("person*.jpeg")), kaggle / "train" / "COVID" / "c1.jpeg")
    # Duplicates: a test image again in train under another name; a train image twice in train.
    test_image = sorted((kaggle / "test" / "NORMAL").glob("*.jpeg"))[0]
    shutil.copy(test_image, kaggle / "train" / "NORMAL" / "IM-0900-0001.jpeg")
    train_image = sorted((kaggle / "train" / "NORMAL").glob("IM-*.jpeg"))[0]
    shutil.copy(train_image, kaggle / "train" / "NORMAL" / "IM-0901-0001.jpeg")
    # Other encodings, and a name that follows no scheme (its own patient).
    write_dicom(kaggle / "train" / "NORMAL" / "IM-0950-0001.dcm",
                (np.arange(200 * 260) % 4096).reshape(200, 260), photometric="MONOCHROME1", modality=None)
    ramp = (np.linspace(0, 4095, 300)[None, :] * np.ones((240, 1))).astype(np.uint16)
    Image.fromarray(ramp).save(kaggle / "train" / "NORMAL" / "IM-0951-0001.png")
    shutil.copy(sorted(pneumonia.glob("person*.jpeg"))[-1], pneumonia / "scan_0001.jpeg")
    (kaggle / "train" / "PNEUMONIA" / "scan_0001.jpeg").write_bytes(
        _reencoded(pneumonia / "scan_0001.jpeg"))  # same picture, different bytes: not a duplicate
    return root


def _reencoded(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).convert("L").save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def prepared(messy, ray_session, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("out") / "prepared"
    cxr_datasets.prepare(messy, out, image_size=SIZE, rows_per_shard=40, format="both", seed=0)
    return out


@pytest.fixture(scope="module")
def manifest(prepared) -> dict:
    return cxr_datasets.read_manifest(prepared)


@pytest.fixture(scope="module")
def loaded(prepared) -> dict:
    return {split: cxr_datasets.load(prepared, split) for split in cxr_datasets.SPLITS}


# --- what the manifest says ----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_is_rejected_with_reason_and_the_job_goes_on(manifest, name):
    reasons = {r["path"]: r["reason"] for r in manifest["rejected"]}
    assert BAD[name] in reasons[f"chest_xray/train/PNEUMONIA/{name}"].lower()


def test_unknown_label_folder_is_rejected(manifest):
    reasons = {r["path"]: r["reason"] for r in manifest["rejected"]}
    assert "unknown label folder 'COVID'" in reasons["chest_xray/train/COVID/c1.jpeg"]
    assert len(manifest["rejected"]) == len(BAD) + 1  # nothing else, no junk, no mirror copies


def test_nested_copy_and_junk_are_not_counted(manifest, synth_source):
    n_synth = len(list(synth_source.rglob("*.jpeg")))
    assert manifest["discovery"]["mirror_copies_skipped"] == n_synth
    assert manifest["discovery"]["mirror_roots"] == ["chest_xray/chest_xray"]
    # synth + 10 real + 2 duplicates + dcm + png + scan_0001, minus the two removed duplicates
    assert sum(sum(c.values()) for c in manifest["counts"].values()) == n_synth + 10 + 5 - 2


def test_duplicates_cross_split_removed_from_train_within_train_one_kept(manifest):
    removed = {d["path"]: d for d in manifest["duplicates"]}
    assert set(removed) == {"chest_xray/train/NORMAL/IM-0900-0001.jpeg",
                            "chest_xray/train/NORMAL/IM-0901-0001.jpeg"}
    assert removed["chest_xray/train/NORMAL/IM-0900-0001.jpeg"]["duplicate_of"].startswith(
        "chest_xray/test/NORMAL/")
    assert all(d["action"] == "removed" for d in manifest["duplicates"])


def test_counts_patients_and_class_weights(manifest, loaded):
    for split, (images, labels, meta) in loaded.items():
        assert {name: int((labels == i).sum()) for i, name in enumerate(CLASS_NAMES)} == \
            manifest["counts"][split]
        assert meta["patient_id"].nunique() == manifest["patients"][split]
    train = manifest["counts"]["train"]
    n = sum(train.values())
    assert manifest["class_weights"] == pytest.approx(
        {"0": n / (2 * train["NORMAL"]), "1": n / (2 * train["PNEUMONIA"])}, rel=1e-5)
    assert manifest["patients_not_from_name"] == 1
    assert manifest["options"]["image_size"] == SIZE and manifest["split_used"] == "official"
    assert manifest["images_per_s"] > 0 and manifest["elapsed_s"] > 0
    assert {"ray", "pillow", "pyarrow", "tensorflow"} <= set(manifest["versions"])


def test_shards_are_listed_with_checksums(prepared, manifest, loaded):
    parquet = [s for s in manifest["shards"] if s["format"] == "parquet"]
    train = [s["path"] for s in parquet if s["split"] == "train"]
    assert len(train) >= 2  # at most 40 rows per shard
    assert train == [f"train/part-{k:05d}.parquet" for k in range(len(train))]
    # Shard k holds the accepted files of the split's rows 40k..40k+39 (in path order): 40 but
    # where a file failed to decode (the fixture's corrupt files sit in train), never more.
    rows = [s["rows"] for s in parquet if s["split"] == "train"]
    assert all(0 < r <= 40 for r in rows) and 40 in rows
    assert 0 < sum(40 - r for r in rows[:-1]) <= len(manifest["rejected"])
    paths = list(loaded["train"][2]["source_path"])  # the shards' rows, read in shard order
    assert paths == sorted(paths)
    for shard in manifest["shards"]:
        path = prepared / shard["path"]
        assert path.stat().st_size == shard["bytes"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
    assert cxr_datasets.manifest_hash(prepared) == \
        hashlib.sha256((prepared / "manifest.json").read_bytes()).hexdigest()


# --- splits, labels, pixels ----------------------------------------------------------------------

def test_no_patient_in_two_splits(loaded):
    patients = {split: set(meta["patient_id"]) for split, (_, _, meta) in loaded.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]


def test_official_test_split_is_kept_exactly(loaded, messy):
    official = {p.relative_to(messy).as_posix() for p in (messy / "chest_xray" / "test").rglob("*.jpeg")}
    assert set(loaded["test"][2]["source_path"]) == official


def test_labels_follow_the_folders(loaded):
    for _, labels, meta in loaded.values():
        folder = meta["source_path"].str.split("/").str[-2]
        assert (folder == meta["label_name"]).all()
        assert (meta["label_name"] == [CLASS_NAMES[i] for i in labels]).all()


def test_normal_numbering_schemes_stay_distinct_patients(loaded):
    ids = set().union(*(set(meta["patient_id"]) for _, _, meta in loaded.values()))
    numbers = {i.split("-")[-1] for i in ids if i.startswith("IM-")}
    assert numbers & {i.split("-")[-1] for i in ids if i.startswith("NORMAL2-IM-")}


def test_shard_pixels_equal_the_predict_preprocessing(loaded, messy):
    images, _, meta = loaded["train"]
    assert images.shape == (len(meta), SIZE, SIZE, 1) and images.dtype == np.uint8
    for row in [0, len(meta) // 2, len(meta) - 1]:
        source = messy / meta["source_path"].iloc[row]
        assert np.array_equal(images[row, ..., 0], cxr_datasets.preprocess_file(source, SIZE))


def test_real_rgb_and_other_modes_arrive_as_gray(loaded):
    import pandas as pd

    meta = pd.concat([m for _, _, m in loaded.values()], ignore_index=True)
    modes = dict(zip(meta["source_path"].str.split("/").str[-1], meta["orig_mode"]))
    assert modes["person471_virus_968.jpeg"] == "RGB"
    assert modes["IM-0950-0001.dcm"] == "DICOM MONOCHROME1 12-bit"
    assert modes["IM-0951-0001.png"].startswith("I;16")
    sizes = meta.set_index(meta["source_path"].str.split("/").str[-1])
    assert tuple(sizes.loc["person1763_bacteria_4606.jpeg", ["orig_width", "orig_height"]]) == (483, 178)


def test_tfrecords_read_back_with_plain_tf_data(prepared, manifest, loaded):
    import tensorflow as tf

    files = [str(prepared / s["path"]) for s in manifest["shards"]
             if s["split"] == "val" and s["format"] == "tfrecord"]
    spec = cxr_datasets.tfrecord_feature_spec()
    dataset = tf.data.TFRecordDataset(files).map(lambda r: tf.io.parse_single_example(r, spec))
    records = list(dataset.as_numpy_iterator())
    images, labels, meta = loaded["val"]
    assert [r["label"] for r in records] == labels.tolist()
    assert [r["patient_id"].decode() for r in records] == meta["patient_id"].tolist()
    decoded = np.stack([tf.io.decode_png(r["image"], channels=1).numpy() for r in records])
    assert np.array_equal(decoded, images)


TFRECORD_DIGEST = """
import hashlib, pandas as pd
from cxr_datasets.shards import tfrecord_bytes
rows = pd.DataFrame({"image": [bytes(range(64))] * 3, "height": [8] * 3, "width": [8] * 3,
                     "label": [0, 1, 1], "label_name": ["NORMAL", "PNEUMONIA", "PNEUMONIA"],
                     "patient_id": ["a", "b", "c"], "source_path": ["1.jpeg", "2.jpeg", "3.jpeg"]})
print(hashlib.sha256(tfrecord_bytes(rows)).hexdigest())
"""


def test_tfrecord_shards_are_the_same_bytes_in_every_process():
    """Protobuf writes tf.train.Features' map in an order of its own that changes from process to
    process (three runs gave three digests) unless it serialises deterministically; identical
    rows must give an identical shard, or the manifest hash differs between identical runs."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    digests = {subprocess.run([sys.executable, "-c", TFRECORD_DIGEST], capture_output=True,
                              text=True, timeout=120, env=env, check=True).stdout.split()[-1]
               for _ in range(3)}
    assert len(digests) == 1, digests


def test_eda_plots_and_summary(prepared):
    eda = prepared / "eda"
    for name in ("class_balance.png", "sizes.png", "modes.png", "samples.png"):
        with Image.open(eda / name) as image:
            assert image.size[0] > 300
    summary = (eda / "summary.md").read_text()
    assert "truncated.jpeg" in summary and "| test |" in summary


def test_damaged_shard_is_named(prepared, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    shard = copy / "val" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CxrError, match="damaged shard .*val/part-00000.parquet"):
        cxr_datasets.load(copy, "val")
    shard.unlink()
    with pytest.raises(CxrError, match="shard missing"):
        cxr_datasets.load(copy, "val")


# --- other sources, errors, output handling ------------------------------------------------------

def test_real_samples_with_random_split(samples_dir, ray_session, tmp_path):
    manifest = cxr_datasets.prepare(samples_dir, tmp_path / "p", image_size=SIZE, split="random",
                                val_fraction=0.25, test_fraction=0.25, verbose=False)
    assert manifest["split_used"] == "random" and manifest["rejected"] == []
    assert sum(sum(c.values()) for c in manifest["counts"].values()) == 10
    assert all(n >= 1 for counts in manifest["counts"].values() for n in counts.values())


def test_source_without_test_split_is_an_error(samples_dir, tmp_path):
    with pytest.raises(CxrError, match="no test/ folder"):
        cxr_datasets.prepare(samples_dir, tmp_path / "p", image_size=SIZE, verbose=False)
    assert not (tmp_path / "p").exists()


def test_missing_source_or_class_is_one_line(tmp_path, synth_source, ray_session):
    with pytest.raises(CxrError, match="source folder not found"):
        cxr_datasets.prepare(tmp_path / "missing", tmp_path / "out", verbose=False)
    only_normal = tmp_path / "only_normal"
    shutil.copytree(synth_source / "chest_xray" / "train" / "NORMAL", only_normal / "NORMAL")
    with pytest.raises(CxrError) as info:
        cxr_datasets.prepare(only_normal, tmp_path / "out", image_size=SIZE, verbose=False)
    assert "no PNEUMONIA images" in str(info.value) and "\n" not in str(info.value)


def test_existing_output_is_refused_then_replaced_atomically(prepared, synth_source, ray_session,
                                                             tmp_path, monkeypatch):
    out = tmp_path / "prepared"
    shutil.copytree(prepared, out)
    with pytest.raises(CxrError, match="already exists"):
        cxr_datasets.prepare(synth_source, out, image_size=SIZE, verbose=False)
    before = cxr_datasets.manifest_hash(out)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("cxr_datasets.prepare_dataset.write_eda", crash)
    with pytest.raises(RuntimeError):
        cxr_datasets.prepare(synth_source, out, image_size=SIZE, overwrite=True, verbose=False)
    assert cxr_datasets.manifest_hash(out) == before  # the old OUT is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]  # no partial folder left
    monkeypatch.undo()
    manifest = cxr_datasets.prepare(synth_source, out, image_size=SIZE, overwrite=True, verbose=False)
    assert manifest["rejected"] == [] and cxr_datasets.manifest_hash(out) != before


def test_overwrite_refuses_a_folder_that_is_not_a_prepared_one(synth_source, tmp_path):
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(CxrError, match="not a prepared folder"):
        cxr_datasets.prepare(synth_source, precious, overwrite=True, verbose=False)
    assert (precious / "thesis.tex").exists()


def test_cli_prepare_and_error_exit(synth_source, ray_session, tmp_path, capsys):
    from cxr_search.main import main

    out = tmp_path / "cli"
    assert main(["prepare", str(synth_source), str(out), "--image-size", "32", "--quiet",
                 "--resize", "crop", "--seed", "3"]) == 0
    assert "accepted" in capsys.readouterr().out
    options = json.loads((out / "manifest.json").read_text())["options"]
    assert options["resize"] == "crop" and options["seed"] == 3
    assert main(["prepare", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cxr: error: source folder not found") and err.count("\n") == 1


@pytest.mark.slow  # make test-slow: the own-Ray test that compares outputs also checks Ray is stopped
def test_a_ray_started_by_prepare_is_shut_down_before_it_returns(synth_source, tmp_path):
    """Without a running Ray, `prepare` starts one and stops it (in the background, overlapped with
    the writing): when `prepare` returns, Ray is down and a second `prepare` can start it again.
    In a subprocess, because this test session keeps its own Ray instance."""
    code = (
        "import sys, ray, cxr_datasets\n"
        "for name in ('a', 'b'):\n"
        "    m = cxr_datasets.prepare(sys.argv[1], sys.argv[2] + name, image_size=32, num_cpus=1,\n"
        "                         verbose=False)\n"
        "    assert not ray.is_initialized(), 'Ray still up after prepare returned'\n"
        "    assert m['stage_s']['ray_start'] > 0.2, m['stage_s']  # it did start one\n"
        "print('ok', sorted(m['stage_s']))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", code, str(synth_source), str(tmp_path / "out-")],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok" in done.stdout and "ray_stop_wait" in done.stdout
    for name in ("a", "b"):
        assert cxr_datasets.load(tmp_path / f"out-{name}", "train")[0].shape[1:] == (32, 32, 1)


OWN_RAY_RUN = """
import json, sys, cxr_datasets
import ray, psutil  # Ray ships psutil (ray/thirdparty_files), on sys.path once ray is imported
source, out = sys.argv[1], sys.argv[2]
m = cxr_datasets.prepare(source, out, image_size=%d, rows_per_shard=40, format="parquet", seed=0,
                         verbose=False, num_cpus=2)
left = [p.name() for p in psutil.Process().children(recursive=True) if p.is_running()]
print(json.dumps({"manifest": m, "left": left}))
""" % SIZE


def test_a_prepare_that_starts_its_own_ray_gives_the_same_output_and_stops_it(messy, manifest, tmp_path):
    """A `prepare` that starts a Ray of its own writes shards byte for byte those of a run that
    joined a running Ray (the `prepared` fixture), with the same rejections, duplicates and
    splits, and none of Ray's processes is left when it returns."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", OWN_RAY_RUN, str(messy), str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    got = result["manifest"]
    parquet = [s for s in manifest["shards"] if s["format"] == "parquet"]
    assert got["shards"] == parquet
    for key in ("counts", "patients", "rejected", "duplicates", "patient_overlap", "discovery"):
        assert got[key] == manifest[key], key
    assert result["left"] == [], f"Ray processes still running: {result['left']}"


def test_a_failed_background_shutdown_is_a_warning_not_lost(monkeypatch, capsys):
    import ray

    from cxr_datasets.decode import LocalRay

    def broken_shutdown(*args, **kwargs):
        raise RuntimeError("raylet already gone\nsecond line")

    monkeypatch.setattr(ray, "shutdown", broken_shutdown)
    local = LocalRay()
    local.started = True  # as if start() had started it (no Ray is touched: shutdown is patched)
    local.stop()
    local.join()
    err = capsys.readouterr().err
    assert "Ray's shut-down failed (RuntimeError: raylet already gone)" in err
    assert err.count("\n") == 1 and "ray stop" in err
    local.join()  # a second join is a no-op


def test_num_cpus_is_dropped_when_ray_joins_a_cluster_it_found(monkeypatch):
    """No RAY_ADDRESS, but Ray finds a `ray start --head` cluster on the machine and refuses
    num_cpus: prepare joins it like any cluster instead of failing."""
    import ray

    from cxr_datasets.decode import LocalRay

    calls, cluster = [], {"found": True}

    def fake_init(num_cpus=None, **kwargs):
        calls.append(num_cpus)
        if cluster["found"] and num_cpus is not None:
            raise ValueError("When connecting to an existing cluster, num_cpus and num_gpus must "
                             "not be provided.")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    local = LocalRay(num_cpus=2)
    local.start()
    assert calls == [2, None] and local.started
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    calls.clear()
    LocalRay(num_cpus=2).start()
    assert calls == [None]  # joining through RAY_ADDRESS: never asks for CPUs
    monkeypatch.setenv("RAY_ADDRESS", "local")
    cluster["found"] = False
    calls.clear()
    LocalRay(num_cpus=2).start()
    assert calls == [2]  # "local" starts one
