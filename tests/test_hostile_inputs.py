"""Hostile inputs (issue 17, parts 1-2): every file is decided quickly and with bounded memory,
and no single file can fail or hang `cxr prepare`. All files are made here, small on disk."""
from __future__ import annotations

import io
import os
import shutil
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from dicom_util import write_dicom
from PIL import Image

import cxr_datasets
from cxr_datasets import ImageRejected, preprocess_bytes, preprocess_file
from cxr_datasets.discover import discover


def _deflated_bomb(path: Path, side: int = 8192) -> Path:
    """A zero 16-bit image saved Deflated: 128 MiB of pixels in ~130 KB (~1000:1)."""
    import pydicom
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    write_dicom(path, np.zeros((8, 8), np.uint16))
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(side * side * 2)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


def _multi_frame(path: Path, frames: int = 4, side: int = 128) -> Path:
    import pydicom

    write_dicom(path, np.zeros((side, side), np.uint16))
    ds = pydicom.dcmread(path)
    stack = np.stack([np.full((side, side), 100 * (i + 1), np.uint16) for i in range(frames)])
    ds.NumberOfFrames = frames
    ds.PixelData = stack.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.timeout(60)
def test_deflated_dicom_bomb_is_rejected_fast_without_inflating(tmp_path):
    path = _deflated_bomb(tmp_path / "bomb.dcm")
    assert path.stat().st_size < 2_000_000
    data = path.read_bytes()
    tracemalloc.start()
    started = time.monotonic()
    with pytest.raises(ImageRejected) as info:
        preprocess_bytes(data, 64, name="bomb.dcm")  # predict's and serve's decode path
    elapsed = time.monotonic() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "deflated" in info.value.reason.lower()
    assert elapsed < 5 and peak < 20_000_000, (elapsed, peak)


@pytest.mark.timeout(60)
def test_multi_frame_dicom_decodes_the_first_frame_only(tmp_path, monkeypatch):
    import pydicom.pixels

    path = _multi_frame(tmp_path / "frames.dcm")
    calls = []
    original = pydicom.pixels.pixel_array
    monkeypatch.setattr(pydicom.pixels, "pixel_array",
                        lambda *a, **k: calls.append(k.get("index")) or original(*a, **k))
    out = preprocess_file(path, image_size=64)
    assert out.shape == (64, 64)
    assert calls == [0]  # one frame asked for, never the whole stack


@pytest.mark.timeout(60)
def test_dicom_size_is_checked_before_pixel_data_is_read(tmp_path):
    import pydicom

    path = write_dicom(tmp_path / "big.dcm", np.zeros((64, 64), np.uint16))
    ds = pydicom.dcmread(path)
    ds.Rows = ds.Columns = 30_000  # 900 MP claimed, 8 KB of pixel data present
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(ImageRejected, match="decompression bomb"):
        preprocess_file(path, image_size=64)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("display", ["window", "rescale_and_window", "monochrome1_full_range"])
def test_16_bit_dicom_is_windowed_without_a_float64_copy(tmp_path, display):
    """A 6000x6000 16-bit DICOM (72 MB of pixels): modality rescale, window and inversion cost the
    pixels, the uint8 result and a block, not float64 copies of the whole image (288 MB each)."""
    side = 6000
    pixels = np.tile((np.arange(side) * 4095 // (side - 1)).astype(np.uint16), (side, 1))  # 12-bit ramp
    kwargs = {"window": dict(window=(2048, 4096)), "rescale_and_window": dict(slope=2.0, intercept=-1024.0,
              window=(1024, 4096)), "monochrome1_full_range": dict(photometric="MONOCHROME1")}[display]
    path = write_dicom(tmp_path / "big.dcm", pixels, **kwargs)
    data = path.read_bytes()
    del pixels
    tracemalloc.start()
    try:
        gray, meta = preprocess_bytes(data, 64, name="big.dcm", max_pixels=50_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert gray.shape == (64, 64) and meta["orig_width"] == side
    ramp = gray[32].astype(int)  # a left-to-right ramp: dark to bright (or bright to dark, inverted)
    assert abs(ramp[-1] - ramp[0]) > 100 and len(set(np.sign(np.diff(ramp[::8])).tolist()) - {0}) == 1
    # pydicom's decoded pixels (72 MB, plus its own copy of the pixel bytes) + the uint8 result
    # (36 MB) + one block: the float64 path needed several 288 MB arrays
    assert peak < 2.5 * side * side * 2 + 50_000_000, peak


@pytest.mark.timeout(120)
def test_16_bit_png_is_decoded_without_a_float64_copy(tmp_path):
    side = 8000
    buffer = io.BytesIO()
    Image.new("I;16", (side, side), 1000).save(buffer, format="PNG")
    data = buffer.getvalue()
    assert len(data) < 2_000_000
    tracemalloc.start()
    try:
        gray, meta = preprocess_bytes(data, 64, name="big16.png")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert gray.shape == (64, 64) and meta["orig_width"] == side
    # 16-bit pixels (128 MB) + the uint8 result (64 MB) + blocks; the float64 path needed 512 MB more.
    assert peak < 2.2 * side * side * 2 + 50_000_000, peak


def test_pillow_reads_only_the_project_formats(tmp_path):
    buffer = io.BytesIO()
    Image.new("L", (100, 100), 50).save(buffer, format="GIF")
    with pytest.raises(ImageRejected, match="not an image"):
        preprocess_bytes(buffer.getvalue(), 64, name="x.jpeg")


@pytest.mark.timeout(60)
def test_jpeg_baseline_dicom_still_decodes(tmp_path):
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    pixels = (np.arange(128 * 128) % 200).reshape(128, 128).astype(np.uint8)
    jpeg = io.BytesIO()
    Image.fromarray(pixels).save(jpeg, format="JPEG", quality=95)
    path = write_dicom(tmp_path / "jpeg.dcm", np.zeros((128, 128), np.uint16))
    ds = pydicom.dcmread(path)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.save_as(path, enforce_file_format=True)
    out = preprocess_file(path, image_size=64)
    assert out.shape == (64, 64) and out.max() > out.min()


@pytest.mark.timeout(20)
def test_fifo_and_device_are_rejected_without_blocking(tmp_path):
    fifo = tmp_path / "x.jpeg"
    os.mkfifo(fifo)
    with pytest.raises(ImageRejected, match="FIFO"):
        preprocess_file(fifo, image_size=64)
    with pytest.raises(ImageRejected, match="device"):
        preprocess_file("/dev/zero", image_size=64)


def _hostile_source(root: Path, synth_source: Path) -> Path:
    shutil.copytree(synth_source / "chest_xray", root / "chest_xray")
    normal = root / "chest_xray" / "train" / "NORMAL"
    os.mkfifo(normal / "fifo.jpeg")
    os.symlink("/dev/zero", normal / "zero.jpeg")
    fd = os.open(os.fsencode(normal) + b"/bad\xff.jpeg", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, next(normal.glob("*.jpeg")).read_bytes())
    os.close(fd)
    _deflated_bomb(normal / "bomb.dcm", side=4096)
    return root


@pytest.mark.timeout(30)
def test_discovery_rejects_special_files_and_bad_names_with_reasons(tmp_path, synth_source):
    source = _hostile_source(tmp_path / "src", synth_source)
    reasons = {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in discover(source).rejected}
    assert "FIFO" in reasons["fifo.jpeg"]
    assert "outside SOURCE" in reasons["zero.jpeg"]
    assert "UTF-8" in reasons["bad\\xff.jpeg"] and "626164ff" in reasons["bad\\xff.jpeg"]


@pytest.mark.timeout(30)
def test_a_link_out_of_source_is_read_only_with_follow_links(tmp_path, synth_source):
    source = tmp_path / "src"
    shutil.copytree(synth_source / "chest_xray", source / "chest_xray")
    outside = tmp_path / "elsewhere.jpeg"
    outside.write_bytes(next((synth_source / "chest_xray" / "train" / "NORMAL").glob("*.jpeg")).read_bytes())
    normal = source / "chest_xray" / "train" / "NORMAL"
    os.symlink(outside, normal / "linked.jpeg")
    os.symlink("/dev/zero", normal / "zero.jpeg")

    def found(**kwargs):
        found = discover(source, **kwargs)
        return ({f.rel_path.rsplit("/", 1)[-1] for f in found.files},
                {r["path"].rsplit("/", 1)[-1]: r["reason"] for r in found.rejected})

    files, rejected = found()
    assert "linked.jpeg" not in files and "--follow-links" in rejected["linked.jpeg"]
    files, rejected = found(follow_links=True)
    assert "linked.jpeg" in files and "linked.jpeg" not in rejected
    assert "a device" in rejected["zero.jpeg"]  # followed, and still not a regular file


@pytest.mark.timeout(30)
def test_a_labelled_archive_rejects_special_files_by_the_same_rule(tmp_path, synth_source):
    from cxr_datasets.labels import read_labels

    source = tmp_path / "archive"
    images = sorted((synth_source / "chest_xray" / "train").rglob("*.jpeg"))[:12]
    (source / "images").mkdir(parents=True)
    rows = ["path,label"]
    for i, image in enumerate(images):
        shutil.copy(image, source / "images" / f"{i}.jpeg")
        rows.append(f"images/{i}.jpeg,{i % 2}")
    os.mkfifo(source / "images" / "fifo.jpeg")
    os.symlink("/dev/zero", source / "images" / "zero.jpeg")
    fd = os.open(os.fsencode(source) + b"/images/bad\xff.jpeg", os.O_WRONLY | os.O_CREAT, 0o644)
    os.close(fd)
    (source / "images" / "folder.jpeg").mkdir()  # a folder with an image name, labelled
    rows += ["images/fifo.jpeg,1", "images/zero.jpeg,0", "images/folder.jpeg,1"]
    (source / "labels.csv").write_text("\n".join(rows) + "\n")
    found = read_labels(source, "labels.csv")
    # the folder is found, as folder discovery finds it: reading it in pass 1 gives its reason
    assert sorted(f.rel_path for f in found.files) == sorted(
        [f"images/{i}.jpeg" for i in range(len(images))] + ["images/folder.jpeg"])
    assert found.labels["missing_images"]["count"] == 0
    reasons = {r["path"]: r["reason"] for r in found.rejected}
    assert "FIFO" in reasons["images/fifo.jpeg"] and "outside SOURCE" in reasons["images/zero.jpeg"]
    assert reasons["images/bad\\xff.jpeg"] == "file name is not valid UTF-8 (name bytes 626164ff2e6a706567)"


@pytest.mark.timeout(240)
def test_prepare_finishes_on_a_hostile_source(tmp_path, synth_source, ray_session):
    source = _hostile_source(tmp_path / "src", synth_source)
    out = tmp_path / "out"
    cxr_datasets.prepare(source, out, image_size=32, seed=0)
    rejected = {r["path"].rsplit("/", 1)[-1]: r["reason"]
                for r in cxr_datasets.read_manifest(out)["rejected"]}
    assert {"fifo.jpeg", "zero.jpeg", "bad\\xff.jpeg", "bomb.dcm"} <= set(rejected), rejected
    assert "deflated" in rejected["bomb.dcm"].lower()


@pytest.mark.timeout(300)
def test_cxr_predict_out_writes_a_name_that_is_not_utf8(exported_64, samples_dir, tmp_path):
    import pandas as pd

    from cxr_search.main import main

    folder = tmp_path / "incoming"
    folder.mkdir()
    good = sorted(samples_dir.glob("*/*/*.jpeg"))[0]
    fd = os.open(os.fsencode(folder) + b"/bad\xff.jpeg", os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, good.read_bytes())
    os.close(fd)
    out_csv = tmp_path / "preds.csv"
    assert main(["predict", str(exported_64), str(folder), "--out", str(out_csv), "--quiet"]) == 0
    table = pd.read_csv(out_csv)
    assert table["path"].iloc[0].endswith("bad\\xff.jpeg")
    assert table["path_bytes_hex"].iloc[0].endswith(b"bad\xff.jpeg".hex())
    assert table["error"].isna().all()
