"""The one image path (`read_gray`, `resize_gray`, `preprocess_file`): every mode to 8-bit gray,
DICOM display scaling, resize modes, JPEG draft mode, and each unusable file rejected with a reason.
No Ray here: these are the functions the Ray tasks and `cxr predict` call."""
from __future__ import annotations

import io
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
from cxr_datasets import ImageRejected, preprocess_file, read_gray, resize_gray

REAL_SIZES = {  # from tests/data/README.md
    "NORMAL/NORMAL2-IM-0736-0001.jpeg": (1432, 1184, "L"),
    "PNEUMONIA/person1763_bacteria_4606.jpeg": (483, 178, "RGB"),
    "PNEUMONIA/person471_virus_968.jpeg": (831, 603, "RGB"),
    "PNEUMONIA/person661_bacteria_2553.jpeg": (864, 480, "L"),
}


def gradient(height=120, width=160) -> np.ndarray:
    return np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_datasets_is_this_repo_not_hugging_face(repo_root):
    assert Path(cxr_datasets.__file__).resolve().is_relative_to(repo_root)
    assert cxr_datasets.CLASS_NAMES == ("NORMAL", "PNEUMONIA")


def test_importing_datasets_loads_no_tensorflow_ray_or_plotting(repo_root):
    """TensorFlow is for --format tfrecord only; Ray and matplotlib load when prepare runs."""
    code = ("import sys, cxr_datasets; heavy = {'tensorflow', 'keras', 'ray', 'matplotlib', 'seaborn'};"
            "print(sorted(heavy & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True,
                            text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("rel", sorted(REAL_SIZES))
def test_real_samples_decode_with_original_size_and_mode(samples_dir, rel):
    gray, meta = read_gray(samples_dir / "train" / rel)
    width, height, mode = REAL_SIZES[rel]
    assert gray.dtype == np.uint8 and gray.shape == (height, width)
    assert meta == {"orig_width": width, "orig_height": height, "orig_mode": mode}


def test_wide_real_image_is_letterboxed_not_stretched(samples_dir):
    path = samples_dir / "train" / "PNEUMONIA" / "person1763_bacteria_4606.jpeg"  # 483 x 178
    out = preprocess_file(path, image_size=64)
    content_rows = np.flatnonzero(out.max(axis=1) > 0)
    assert out.shape == (64, 64)
    assert 20 <= len(content_rows) <= 26  # 64 * 178 / 483 = 23.6 rows of image, the rest black
    assert out[:15].max() == 0 and out[-15:].max() == 0


def test_draft_mode_matches_full_decode_at_target_size(samples_dir):
    path = samples_dir / "train" / "NORMAL" / "NORMAL2-IM-0727-0001.jpeg"  # 1672 x 1432
    drafted = preprocess_file(path, image_size=64)
    full = resize_gray(read_gray(path)[0], 64)
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 2.0


def test_rgb_jpeg_gives_its_luminance(samples_dir):
    path = samples_dir / "train" / "PNEUMONIA" / "person666_virus_1251.jpeg"
    gray, meta = read_gray(path)
    expected = np.asarray(Image.open(path).convert("L"))
    assert meta["orig_mode"] == "RGB"
    assert np.abs(gray.astype(int) - expected.astype(int)).max() <= 1


@pytest.mark.parametrize("mode", ["RGB", "CMYK", "P", "LA", "RGBA", "1", "I;16"])
def test_every_pillow_mode_becomes_8_bit_gray(mode):
    base = Image.fromarray(gradient())
    image = base.convert(mode)
    gray, meta = read_gray(png_bytes(image) if mode != "CMYK" else _jpeg(image))
    assert gray.dtype == np.uint8 and gray.shape == (120, 160)
    assert meta["orig_mode"] == mode
    if mode not in ("1", "P"):  # palette and bilevel are lossy by construction
        assert np.abs(gray.astype(int) - gradient().astype(int)).mean() < 3


def test_sixteen_bit_png_uses_its_real_range_instead_of_clipping():
    twelve_bit = (np.linspace(0, 4095, 160)[None, :] * np.ones((120, 1))).astype(np.uint16)
    gray, meta = read_gray(png_bytes(Image.fromarray(twelve_bit)))
    assert meta["orig_mode"].startswith("I;16")
    assert gray.min() == 0 and gray.max() == 255  # convert("L") would give 255 almost everywhere
    assert np.all(np.diff(gray[0].astype(int)) >= 0)


def test_transparent_pixels_become_black():
    rgba = np.zeros((80, 80, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:, :40, 3] = 255  # left half opaque, right half fully transparent
    gray, _ = read_gray(png_bytes(Image.fromarray(rgba, "RGBA")))
    assert gray[:, :40].min() >= 199 and gray[:, 40:].max() == 0


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


# --- DICOM ---------------------------------------------------------------------------------------

def ramp12(height=100, width=128) -> np.ndarray:
    return (np.linspace(0, 4095, width)[None, :] * np.ones((height, 1))).astype(np.uint16)


def test_dicom_without_window_spans_full_range(tmp_path):
    gray, meta = read_gray(write_dicom(tmp_path / "a.dcm", ramp12()))
    assert gray.shape == (100, 128) and gray[0, 0] == 0 and gray[0, -1] == 255
    assert meta["orig_mode"] == "DICOM MONOCHROME2 12-bit"


def test_dicom_window_clips_outside_the_window(tmp_path):
    gray, _ = read_gray(write_dicom(tmp_path / "w.dcm", ramp12(), window=(1024, 1024)))
    values = ramp12()[0].astype(float)
    assert np.all(gray[0][values <= 512] == 0) and np.all(gray[0][values >= 1536] == 255)
    middle = gray[0][(values > 700) & (values < 1300)]
    assert 0 < middle.min() < middle.max() < 255


def test_dicom_rescale_applies_before_the_window(tmp_path):
    # Stored 0..4095 with slope 2, intercept -1000: the window 3000 +- 500 is stored 1750..2250.
    path = write_dicom(tmp_path / "r.dcm", ramp12(), window=(3000, 1000), slope=2.0, intercept=-1000)
    gray, _ = read_gray(path)
    stored = ramp12()[0].astype(float)
    assert np.all(gray[0][stored < 1700] == 0) and np.all(gray[0][stored > 2300] == 255)


def test_dicom_monochrome1_is_inverted(tmp_path):
    mono2, _ = read_gray(write_dicom(tmp_path / "m2.dcm", ramp12()))
    mono1, _ = read_gray(write_dicom(tmp_path / "m1.dcm", ramp12(), photometric="MONOCHROME1"))
    assert np.array_equal(mono1.astype(int), 255 - mono2.astype(int))


# --- resize --------------------------------------------------------------------------------------

def test_resize_modes():
    wide = np.full((100, 200), 200, np.uint8)
    pad = resize_gray(wide, 40)  # the default
    assert pad.shape == (40, 40) and pad[:9].max() == 0 and pad[31:].max() == 0 and pad[20].min() > 0
    assert resize_gray(wide, 40, "crop").min() > 0  # fills the square, cuts the sides
    assert resize_gray(wide, 40, "squash").min() > 0
    with pytest.raises(ValueError):
        resize_gray(wide, 40, "stretch")


def test_crop_keeps_the_centre():
    image = np.zeros((100, 300), np.uint8)
    image[:, 100:200] = 255  # the centre third
    assert resize_gray(image, 50, "crop").min() > 200  # (filter ringing at the very edge)


# --- unusable files ------------------------------------------------------------------------------

def bomb_png(width=100_000, height=100_000) -> bytes:
    """A valid 1x1 PNG whose header claims a huge size: what decompression bombs do."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _truncated(tmp_path):
    data = _jpeg(Image.fromarray(gradient(400, 400)).convert("RGB"))
    return data[: len(data) // 2]


def _unreadable_link(path: Path) -> None:
    path.symlink_to(path.parent / "does-not-exist.jpeg")  # tests run as root: chmod 000 can't block


BAD_FILES = {
    "truncated.jpeg": ("truncated", lambda p, t: p.write_bytes(_truncated(t))),
    "text.jpeg": ("not an image", lambda p, t: p.write_text("this is not a JPEG\n")),
    "empty.jpeg": ("empty", lambda p, t: p.write_bytes(b"")),
    "folder.jpeg": ("not a regular file", lambda p, t: p.mkdir()),
    "broken-link.jpeg": ("unreadable", lambda p, t: _unreadable_link(p)),
    "bomb.png": ("decompression bomb", lambda p, t: p.write_bytes(bomb_png())),
    "tiny.png": ("too small", lambda p, t: p.write_bytes(png_bytes(Image.new("L", (40, 300))))),
    "not-dicom.dcm": ("DICOM", lambda p, t: p.write_bytes(b"\0" * 200)),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_unusable_file_is_rejected_with_its_reason(tmp_path, name):
    expected, make = BAD_FILES[name]
    path = tmp_path / name
    make(path, tmp_path)
    with pytest.raises(ImageRejected) as info:
        preprocess_file(path, image_size=32)
    assert expected.lower() in info.value.reason.lower()


def test_pixel_limit_is_configurable(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png_bytes(Image.new("L", (300, 200))))
    assert preprocess_file(path, 32).shape == (32, 32)
    with pytest.raises(ImageRejected, match="decompression bomb"):
        preprocess_file(path, 32, max_pixels=50_000)


def test_a_file_is_read_whole_and_a_stream_past_the_cap_is_cut_at_cap_plus_one():
    """`_read_to_end` asks for the file's size (+1) and reads on if the file grew since its
    fstat: a pipe (size 0 by fstat) stands in for a file that grew."""
    import os

    from cxr_datasets.image import _read_to_end

    payload = bytes(range(256)) * 12  # 3 KiB
    for size, cap, expected in [(len(payload), 10_000, payload), (0, 10_000, payload),
                                (0, 1000, payload[:1001])]:
        read, write = os.pipe()
        try:
            os.write(write, payload)
            os.close(write)
            assert _read_to_end(read, size, cap) == expected
        finally:
            os.close(read)


def test_a_regular_file_over_the_cap_is_rejected_and_one_at_the_cap_is_read(tmp_path):
    from cxr_datasets.image import _read_local

    path = tmp_path / "big.jpeg"
    path.write_bytes(b"x" * 2048)
    assert _read_local(path, max_bytes=2048) == b"x" * 2048
    with pytest.raises(ImageRejected, match="file too large"):
        _read_local(path, max_bytes=2047)
    with pytest.raises(ImageRejected, match="not a regular file|directory"):
        _read_local(tmp_path, max_bytes=2048)
