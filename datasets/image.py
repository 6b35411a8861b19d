"""The one image path: file bytes -> single-channel uint8 -> square `image_size` array.

`cxr prepare` (in Ray tasks) and `cxr predict` both call these functions, so a deployed model sees
new images preprocessed exactly as its training images were.

    from cxr_datasets import preprocess_file
    x = preprocess_file("chest.jpeg", image_size=224, resize="pad")   # uint8 [224, 224]

Every way an input can be unusable raises `ImageRejected` with a short `reason` (the manifest and
the summary list it); nothing here lets a bad file crash a whole job.
"""
from __future__ import annotations

import io
import os
import re
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .config import PrepareConfig
from .errors import ImageRejected, first_line

_DEFAULTS = PrepareConfig()
_RESAMPLE = Image.Resampling.LANCZOS  # sharpest of Pillow's antialiasing filters
_REDUCING_GAP = 3.0  # box-reduce first when shrinking >3x: several times faster, no visible loss
_ALPHA_MODES = ("RGBA", "LA", "PA", "La", "RGBa")
_HIGH_DEPTH_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


_NOT_A_FILE = "not a regular file (a directory with an image name)"
MAX_FILE_BYTES = 256 * 1024 * 1024  # no input file is read past this (a 64 MP 16-bit image is 128 MiB raw)
# The formats the project reads (DICOM goes through pydicom, whose JPEG handler opens Pillow itself).
PILLOW_FORMATS = ("JPEG", "PNG")
_DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR: pydicom would inflate it whole, unbounded


def read_file_bytes(path: str | os.PathLike, fs=None) -> bytes:
    """The file's content, or `ImageRejected` saying why it cannot be read (never a raw OSError).
    `fs`: the pyarrow file system of a URI source to read `path` from; None: a local path."""
    data = _read_local(Path(path)) if fs is None else _read_fs(fs, str(path))
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    return data


def _read_local(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """Regular files only, at most `max_bytes`: O_NONBLOCK so that opening a FIFO cannot hang, then
    fstat on the open descriptor (no race with a swapped path) before a single byte is read."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            info = os.fstat(fd)
            if stat.S_ISDIR(info.st_mode):
                raise ImageRejected(_NOT_A_FILE)
            if not stat.S_ISREG(info.st_mode):
                raise ImageRejected(not_regular_reason(info.st_mode))
            data = _read_to_end(fd, info.st_size, max_bytes)
        finally:
            os.close(fd)
        if len(data) > max_bytes:
            raise ImageRejected(f"file too large: over {max_bytes // (1024 * 1024)} MiB")
        return data
    except FileNotFoundError:
        reason = "unreadable: broken link" if path.is_symlink() else "unreadable: file not found"
        raise ImageRejected(reason) from None
    except PermissionError:
        raise ImageRejected("unreadable: permission denied") from None
    except OSError as exc:
        raise ImageRejected(f"unreadable: {exc.strerror or exc}") from None


def not_regular_reason(mode: int) -> str:
    """Why a file of this `st_mode`, neither a regular file nor a folder, is not read (what reading
    it says, and what discovery says of it from its stat)."""
    kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if (
        stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) else "a socket or special file"
    return f"not a regular file ({kind})"


def _read_to_end(fd: int, size: int, max_bytes: int) -> bytes:
    """At most `max_bytes + 1` bytes of `fd`, asked for as the file's size (+1, to see that it
    ended): one read and no buffer larger than the file. A buffered read of `max_bytes + 1`
    allocated 256 MiB for every file and was ~a quarter of a decode worker's time (py-spy). A file
    that grew since its fstat is read on, a MiB at a time, up to the cap."""
    parts: list[bytes] = []
    total, want = 0, min(size, max_bytes) + 1
    while total <= max_bytes:
        chunk = os.read(fd, min(want, max_bytes + 1 - total))
        if not chunk:
            break
        parts.append(chunk)
        total += len(chunk)
        want = 2**20
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _read_fs(fs, path: str) -> bytes:
    """A file of a pyarrow file system (its own words for what went wrong)."""
    try:
        with fs.open_input_stream(path) as stream:
            data = stream.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES:
            raise ImageRejected(f"file too large: over {MAX_FILE_BYTES // (1024 * 1024)} MiB")
        return data
    except FileNotFoundError:
        raise ImageRejected("unreadable: file not found") from None
    except PermissionError:
        raise ImageRejected("unreadable: permission denied") from None
    except IsADirectoryError:
        raise ImageRejected(_NOT_A_FILE) from None
    except OSError as exc:
        text = str(exc).strip().splitlines()
        if "directory" in (text[0].lower() if text else ""):
            raise ImageRejected(_NOT_A_FILE) from None
        raise ImageRejected(f"unreadable: {text[0] if text else type(exc).__name__}"[:200]) from None


def read_gray(
    path_or_bytes: str | os.PathLike | bytes,
    draft_size: int | None = None,
    *,
    max_pixels: int = _DEFAULTS.max_pixels,
    min_size: int = _DEFAULTS.min_size,
) -> tuple[np.ndarray, dict]:
    """Decode one image (JPEG, PNG, DICOM, anything Pillow reads) to 8-bit grayscale [H, W].

    `draft_size`: the side the image will be resized to. JPEGs are then decoded straight at 1/2,
    1/4 or 1/8 scale (in the DCT domain), the strongest reduction that still covers
    draft_size x draft_size: ~2x faster per core on the real data, nothing lost at that size.
    Returns (array, {"orig_width", "orig_height", "orig_mode"}) describing the file, not the draft.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data, name = bytes(path_or_bytes), ""
    else:
        data, name = read_file_bytes(path_or_bytes), str(path_or_bytes)
    return _decode_gray(data, name, draft_size, max_pixels=max_pixels, min_size=min_size)


def resize_gray(gray: np.ndarray, image_size: int, resize: str = "pad") -> np.ndarray:
    """Square uint8 [S, S] from uint8 [H, W].

    pad: scale the long side to S and letterbox with black (keeps the aspect ratio: the real NORMAL
    images are larger and wider, and squashing would leak that into the anatomy's shape);
    crop: scale the short side to S and cut the centre; squash: stretch to S x S.
    """
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise ValueError(f"expected a uint8 [H, W] array, got {gray.dtype} {gray.shape}")
    height, width = gray.shape
    size = int(image_size)
    image = Image.fromarray(gray)
    if resize == "squash":
        return _to_array(_resized(image, size, size))
    if resize == "pad":
        scale = size / max(width, height)
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
        canvas = Image.new("L", (size, size), 0)
        canvas.paste(_resized(image, new_w, new_h), ((size - new_w) // 2, (size - new_h) // 2))
        return _to_array(canvas)
    if resize == "crop":
        scale = size / min(width, height)
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return _to_array(_resized(image, new_w, new_h).crop((left, top, left + size, top + size)))
    raise ValueError(f"resize must be pad, crop or squash; got {resize!r}")


def preprocess_bytes(
    data: bytes,
    image_size: int = _DEFAULTS.image_size,
    resize: str = _DEFAULTS.resize,
    *,
    name: str = "",
    max_pixels: int = _DEFAULTS.max_pixels,
    min_size: int = _DEFAULTS.min_size,
) -> tuple[np.ndarray, dict]:
    """`read_gray` + `resize_gray` on file content already in memory (`name` only hints at DICOM):
    (uint8 [S, S], {"orig_width", "orig_height", "orig_mode"})."""
    gray, meta = _decode_gray(data, name, image_size, max_pixels=max_pixels, min_size=min_size)
    return resize_gray(gray, image_size, resize), meta


def preprocess_file(
    path: str | os.PathLike,
    image_size: int = _DEFAULTS.image_size,
    resize: str = _DEFAULTS.resize,
    *,
    max_pixels: int = _DEFAULTS.max_pixels,
    min_size: int = _DEFAULTS.min_size,
) -> np.ndarray:
    """The preprocessing `cxr prepare` applies, for one file: uint8 [S, S]; raises `ImageRejected`."""
    data = read_file_bytes(path)
    return preprocess_bytes(
        data, image_size, resize, name=str(path), max_pixels=max_pixels, min_size=min_size
    )[0]


def _decode_gray(data: bytes, name: str, draft_size: int | None, *, max_pixels: int, min_size: int):
    if not data:
        raise ImageRejected("empty file (0 bytes)")
    if _is_dicom(data, name):
        return _read_dicom(data, max_pixels=max_pixels, min_size=min_size)
    return _read_pillow(data, draft_size, max_pixels=max_pixels, min_size=min_size)


# --- Pillow --------------------------------------------------------------------------------------

def _read_pillow(data: bytes, draft_size: int | None, *, max_pixels: int, min_size: int):
    image = _open(data)
    width, height = image.size
    _check_size(width, height, max_pixels=max_pixels, min_size=min_size)
    meta = {"orig_width": width, "orig_height": height, "orig_mode": image.mode}
    if draft_size and image.format == "JPEG":
        # Draft mode "L" also skips the chroma planes of colour JPEGs: luma is what convert("L") keeps.
        image.draft("L", (int(draft_size), int(draft_size)))
    try:
        image.load()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, EOFError... for bad data
        raise ImageRejected(_decode_failure(exc, image.format)) from None
    return _gray_array(image), meta


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():  # Pillow warns above 89 MP; `max_pixels` is our limit
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=list(PILLOW_FORMATS))
    except UnidentifiedImageError:
        raise ImageRejected(
            f"not an image (unrecognised file content; {', '.join(PILLOW_FORMATS)} or DICOM are read)"
        ) from None
    except Image.DecompressionBombError as exc:  # over Pillow's hard limit, before ours is checked
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(pixels.group(1)) / 1e6:.0f} MP" if pixels else "size"
        raise ImageRejected(f"decompression bomb: {size} exceeds Pillow's hard limit") from None
    except Exception as exc:  # a header so broken Pillow cannot even identify the size
        raise ImageRejected(f"corrupt image header: {first_line(exc)}") from None


def _check_size(width: int, height: int, *, max_pixels: int, min_size: int) -> None:
    if width * height > max_pixels:
        raise ImageRejected(
            f"decompression bomb: {width}x{height} = {width * height / 1e6:.0f} MP "
            f"exceeds the {max_pixels / 1e6:g} MP limit"
        )
    if min(width, height) < min_size:
        raise ImageRejected(f"too small: {width}x{height}, shorter side under {min_size} px")


def _decode_failure(exc: Exception, fmt: str | None) -> str:
    message = first_line(exc)
    if "truncated" in message.lower() or isinstance(exc, EOFError):
        return f"truncated {fmt or 'image'} ({message})"
    return f"corrupt {fmt or 'image'} data ({message})"


def _gray_array(image: Image.Image) -> np.ndarray:
    """8-bit luminance for every Pillow mode; transparency is composited over black."""
    mode = image.mode
    if mode == "L":
        return _to_array(image)
    if mode in _HIGH_DEPTH_MODES:
        return _stretch_to_uint8(np.asarray(image))  # convert("L") would clip 16-bit values at 255
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return _to_array(Image.alpha_composite(black, rgba).convert("L"))
    if mode in ("CMYK", "LAB", "HSV"):
        image = image.convert("RGB")
    return _to_array(image.convert("L"))


def _resized(image: Image.Image, width: int, height: int) -> Image.Image:
    if image.size == (width, height):
        return image
    return image.resize((width, height), _RESAMPLE, reducing_gap=_REDUCING_GAP)


def _to_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.uint8).copy()  # own the memory: Pillow's buffer may be reused


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Map the image's actual range linearly onto 0..255 (12-bit data in 16-bit files stays visible).

    Integers are stretched in place, in row blocks, at their own depth plus one int64 block: never
    a float64 copy of a whole 16-bit image (8000x8000 would be 512 MB)."""
    values = np.asarray(values)
    low, high = values.min(), values.max()
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    if values.dtype.kind not in "iub":
        return _unit_to_uint8((values.astype(np.float32) - np.float32(low)) / np.float32(high - low))
    out = np.empty(values.shape, dtype=np.uint8)
    span, low = int(high) - int(low), int(low)
    step = max(1, (1 << 20) // max(1, values[0].size if values.ndim > 1 else values.size))
    for start in range(0, values.shape[0], step):
        block = values[start:start + step].astype(np.int64) - low
        out[start:start + step] = (block * 255 + span // 2) // span
    return out


def _unit_to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values * 255.0), 0, 255).astype(np.uint8)


# --- DICOM ---------------------------------------------------------------------------------------

def _is_dicom(data: bytes, name: str) -> bool:
    return data[128:132] == b"DICM" or name.lower().endswith(".dcm")


def _read_dicom(data: bytes, *, max_pixels: int, min_size: int) -> tuple[np.ndarray, dict]:
    """What a radiologist's viewer shows: modality rescale, then the file's VOI LUT or window
    (else the full range), MONOCHROME1 inverted so that bone is always bright."""
    import pydicom  # only DICOM sources pay for the import

    # The transfer syntax sits in the file meta group (0002), always at the start of the file and
    # never deflated. pydicom's public read_file_meta_info takes a path only, and dcmread inflates
    # the whole data set before any tag can be seen, so the UID is looked for in the raw meta bytes.
    if _DEFLATED.encode() in data[:4096]:
        raise ImageRejected(
            f"DICOM with Deflated transfer syntax ({_DEFLATED}) is not read: it inflates without bound"
        )
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    except Exception as exc:
        raise ImageRejected(f"corrupt DICOM ({first_line(exc)})") from None
    width, height = int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0)
    if not width or not height:
        raise ImageRejected("DICOM without pixel data (no Rows/Columns)")
    _check_size(width, height, max_pixels=max_pixels, min_size=min_size)
    # One frame is decoded (the first); its decoded bytes are bounded like a 16-bit image's.
    frame_bytes = width * height * int(ds.get("SamplesPerPixel", 1) or 1) * max(
        1, (int(ds.get("BitsAllocated", 8) or 8) + 7) // 8)
    if frame_bytes > 2 * max_pixels:
        raise ImageRejected(
            f"decompression bomb: one DICOM frame of {frame_bytes / 1e6:.0f} MB exceeds the "
            f"{2 * max_pixels / 1e6:g} MB limit"
        )
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise ImageRejected(f"corrupt DICOM ({first_line(exc)})") from None
    if "PixelData" not in ds:
        raise ImageRejected("DICOM without pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    meta = {
        "orig_width": width,
        "orig_height": height,
        "orig_mode": f"DICOM {photometric} {int(ds.get('BitsStored', 8))}-bit",
    }
    try:
        pixels = _dicom_first_frame(ds)
        gray = _dicom_to_uint8(pixels, ds, photometric)
    except ImageRejected:
        raise
    except Exception as exc:  # compressed syntaxes without a decoder, inconsistent headers, ...
        raise ImageRejected(f"cannot decode DICOM pixel data ({first_line(exc)})") from None
    return gray, meta


def _dicom_first_frame(ds) -> np.ndarray:
    """Multi-frame files: only the first frame (the acquisition) is decoded, never all of them."""
    from pydicom.pixels import pixel_array

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        return pixel_array(ds, index=0)
    return ds.pixel_array


def _dicom_to_uint8(pixels: np.ndarray, ds, photometric: str) -> np.ndarray:
    """Pixel values -> uint8 display intensities, in row blocks of about a million pixels: the
    modality LUT, VOI LUT or window and the inversion of MONOCHROME1 are per-pixel, so each block
    goes through them in float64 on its own. The cost beyond the decoded pixels is the uint8
    result plus one block's temporaries, never a float64 copy of the whole image."""
    from pydicom.pixels import apply_modality_lut, apply_voi

    if pixels.ndim == 3:  # colour DICOM (rare for radiographs): luminance, no windowing applies
        def shown(block):
            rgb = block.astype(np.float32)
            return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
        stretch = True
    else:
        voi = "VOILUTSequence" in ds
        window = not voi and "WindowCenter" in ds and "WindowWidth" in ds
        stretch = not (voi or window)
        lut_max = float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1) if voi else 1.0

        def shown(block):
            values = np.asarray(apply_modality_lut(block, ds), dtype=np.float64)
            if voi:
                return np.asarray(apply_voi(values, ds), dtype=np.float64) / lut_max
            return _window(values, ds) if window else values

    step = max(1, (1 << 20) // max(1, int(np.prod(pixels.shape[1:2]))))
    blocks = [slice(start, start + step) for start in range(0, pixels.shape[0], step)]
    low, span = 0.0, 1.0
    if stretch:  # no window in the file: the image's own range, found first
        ranges = [(float(v.min()), float(v.max())) for v in (shown(pixels[b]) for b in blocks)]
        low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
        span = high - low
    out = np.zeros(pixels.shape[:2], dtype=np.uint8)
    if stretch and span <= 0:
        return out
    for rows in blocks:
        unit = np.clip((shown(pixels[rows]) - low) / span, 0.0, 1.0)
        out[rows] = _unit_to_uint8(1.0 - unit if photometric == "MONOCHROME1" else unit)
    return out


def _window(values: np.ndarray, ds) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing straight to [0, 1] (pydicom maps to the stored bit range)."""
    center, width = _first_value(ds.WindowCenter), _first_value(ds.WindowWidth)
    function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / max(width, 1e-6)))
    if function == "LINEAR_EXACT":
        return (values - center) / max(width, 1e-6) + 0.5
    return (values - (center - 0.5)) / max(width - 1.0, 1e-6) + 0.5


def _first_value(element) -> float:
    try:
        return float(element[0])
    except TypeError:  # a single value, not a MultiValue
        return float(element)
