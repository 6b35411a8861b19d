"""`cxr synth OUT`: a synthetic chest-X-ray-like data set in the Kaggle layout, for demos and tests.

    cxr synth data/synth --n 600 --seed 0          # ~15 s; then: cxr prepare data/synth runs/prepared
    cxr_datasets.synth("data/synth", n=600, seed=0)    # -> Path("data/synth")

Writes OUT/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg with what makes the real set
tricky: ~1:3 NORMAL:PNEUMONIA; sizes from a few hundred to ~2,000 px, never square, NORMAL larger
on average; ~5% RGB files; Kermany-style names (person<PID>_<bacteria|virus>_<n>, IM-<PID>-<seq>,
NORMAL2-IM-<PID>-<seq>, the same digits in both NORMAL schemes for different people), several
images for some patients, every patient in one split.

What separates the classes: PNEUMONIA images carry patchy opacities inside the lung fields, large
enough to stay visible at 32 px. What does not: each image's mean and contrast are drawn
independently of its class, and aspect ratios come from one distribution for both classes (with
letterbox padding the aspect ratio would otherwise show through the black bars), so a classifier
on global intensity or shape is near chance while a small CNN learns the task.

Speed: the anatomy is drawn at a small size from smooth analytic shapes, upsampled with Pillow and
given film grain from one shared tile, so JPEG encoding dominates (~25 ms per image).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .config import CLASS_NAMES
from .errors import CxrError


@dataclass(frozen=True)
class SynthConfig:
    normal_share: float = 0.27  # NORMAL share of the real set: 1,583 of 5,856
    test_share: float = 0.15  # of each class's images, by patient (the real test is 11%)
    val_patients: int = 1  # per class: the official val is tiny (8 + 8 images)
    rgb_share: float = 0.05  # the real set has a few hundred RGB JPEGs among 5,856
    base_height: int = 128  # drawing resolution; detail beyond it is grain only
    normal_height: tuple[int, int] = (800, 1500)  # NORMAL images are larger on average...
    pneumonia_height: tuple[int, int] = (300, 1000)  # ...than PNEUMONIA ones, as in the real set
    aspect: tuple[float, float] = (1.1, 1.7)  # width / height, the same for both classes
    max_side: int = 2200  # "a few hundred to ~2,000 px"
    images_per_patient: tuple[float, ...] = (0.6, 0.25, 0.15)  # P(1), P(2), P(3) images
    jpeg_quality: int = 90


def synth(out_dir: str | os.PathLike, n: int = 600, seed: int = 0,
          config: SynthConfig | None = None) -> Path:
    """Write `n` synthetic images under out_dir/chest_xray/ and return out_dir.

    `config` changes sizes and shares (bench/prepare.py asks for 1-3 MP images)."""
    if n < 40:
        raise CxrError(f"n must be at least 40 so that every split gets both classes; got {n}")
    out_dir = Path(out_dir)
    root = out_dir / "chest_xray"
    if root.exists() and any(root.rglob("*.jpeg")):
        raise CxrError(f"{root} already holds images; choose an empty OUT")
    cfg = config or SynthConfig()
    rng = np.random.default_rng(seed)
    grain = _grain_tile(rng)
    for label, count in enumerate(_class_counts(n, cfg)):
        for item in _plan_class(label, count, cfg, rng):
            path = root / item["split"] / CLASS_NAMES[label] / item["name"]
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_image(path, item, label, cfg, rng, grain)
    return out_dir


def _class_counts(n: int, cfg: SynthConfig) -> tuple[int, int]:
    normal = round(n * cfg.normal_share)
    return normal, n - normal


# --- names, patients and splits ------------------------------------------------------------------

def _plan_class(label: int, count: int, cfg: SynthConfig, rng: np.random.Generator) -> list[dict]:
    """One dict per image: file name, split, and the patient's anatomy (shared by their images)."""
    patients = _patients(count, cfg, rng)
    splits = _patient_splits(patients, cfg, rng)
    names = _pneumonia_names if label == 1 else _normal_names
    items = []
    for patient_no, (sizes, split) in enumerate(zip(patients, splits)):
        anatomy = _anatomy(rng)
        for name in names(patient_no, sizes, rng):
            items.append({"name": name, "split": split, "anatomy": anatomy})
    return items


def _patients(count: int, cfg: SynthConfig, rng: np.random.Generator) -> list[int]:
    """Images per patient, summing to `count`."""
    sizes: list = []
    while sum(sizes) < count:
        sizes.append(int(rng.choice(len(cfg.images_per_patient), p=cfg.images_per_patient)) + 1)
    sizes[-1] -= sum(sizes) - count
    return [s for s in sizes if s > 0]


def _patient_splits(patients: list[int], cfg: SynthConfig, rng: np.random.Generator) -> list[str]:
    """Per patient: test until it holds ~test_share of the images, then `val_patients` patients
    for val, train for the rest."""
    order = rng.permutation(len(patients))
    splits = ["train"] * len(patients)
    in_test = 0
    for index in order:
        if in_test < cfg.test_share * sum(patients):
            splits[index] = "test"
            in_test += patients[index]
    for index in [i for i in order if splits[i] == "train"][:cfg.val_patients]:
        splits[index] = "val"
    return splits


# Patient numbers are drawn from a shared counter with gaps, as in the real data set.
def _pneumonia_names(patient_no: int, images: int, rng: np.random.Generator) -> list[str]:
    pid = 1 + patient_no * 2 + int(rng.integers(0, 2))
    kind = "virus" if rng.random() < 0.35 else "bacteria"
    first = 1 + patient_no * 4  # a running index over the data set, not per patient
    return [f"person{pid}_{kind}_{first + i}.jpeg" for i in range(images)]


def _normal_names(patient_no: int, images: int, rng: np.random.Generator) -> list[str]:
    # Both schemes draw from the same number range, so IM-0042 and NORMAL2-IM-0042 both occur:
    # two different patients that only the prefix tells apart.
    prefix = "NORMAL2-IM" if patient_no % 2 else "IM"
    pid = 1 + patient_no // 2
    return [f"{prefix}-{pid:04d}-{seq:04d}.jpeg" for seq in range(1, images + 1)]


# --- drawing -------------------------------------------------------------------------------------

def _anatomy(rng: np.random.Generator) -> dict:
    """A patient's build: where the body, lungs and heart are (in units of image height)."""
    return {
        "body_w": rng.uniform(0.44, 0.52), "lung_x": rng.uniform(0.18, 0.22),
        "lung_y": rng.uniform(0.44, 0.49), "lung_a": rng.uniform(0.13, 0.16),
        "lung_b": rng.uniform(0.27, 0.31), "heart": rng.uniform(0.11, 0.14),
        "rib_freq": rng.uniform(8.0, 10.0),
    }


def _write_image(path: Path, item: dict, label: int, cfg: SynthConfig,
                 rng: np.random.Generator, grain: np.ndarray) -> None:
    width, height = _image_size(label, cfg, rng)
    base_h = cfg.base_height
    base_w = max(8, round(base_h * width / height))
    pixels = _draw(base_h, base_w, item["anatomy"], label == 1, rng)
    small = Image.fromarray(_normalise(pixels, rng))
    big = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    big = np.clip(big + _grain(grain, height, width, rng), 0, 255).astype(np.uint8)
    image = Image.fromarray(big)
    if rng.random() < cfg.rgb_share:
        image = image.convert("RGB")
    image.save(path, format="JPEG", quality=cfg.jpeg_quality)


def _image_size(label: int, cfg: SynthConfig, rng: np.random.Generator) -> tuple[int, int]:
    low, high = cfg.pneumonia_height if label == 1 else cfg.normal_height
    height = rng.uniform(low, high)
    width = height * rng.uniform(*cfg.aspect)
    scale = min(1.0, cfg.max_side / width)
    return round(width * scale), round(height * scale)


def _draw(h: int, w: int, anatomy: dict, pneumonia: bool, rng: np.random.Generator) -> np.ndarray:
    """Float image in [0, 1]: torso, lungs with ribs, heart, spine, clavicles; opacities for
    pneumonia. Positions jitter per image (patients are never placed identically)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    x = (x - w / 2) / h + rng.normal(0, 0.02)  # centred, in units of height
    y = y / h + rng.normal(0, 0.015)
    a = anatomy
    body = _ellipse(x, y, 0.0, 0.68, a["body_w"], 0.75, soft=0.03, power=3.0)  # square shoulders
    # Lungs are wider at the base: scale x by the height within the lung.
    taper = 0.75 + 0.35 * np.clip((y - a["lung_y"]) / a["lung_b"] + 0.5, 0, 1.2)
    lungs = np.maximum(
        _ellipse(x / taper, y, -a["lung_x"], a["lung_y"], a["lung_a"], a["lung_b"], soft=0.02),
        _ellipse(x / taper, y, a["lung_x"], a["lung_y"], a["lung_a"], a["lung_b"], soft=0.02))
    heart = _ellipse(x, y, 0.06, a["lung_y"] + 0.2, a["heart"] * 1.1, a["heart"], soft=0.03)
    spine = _ellipse(x, y, 0.0, 0.55, 0.03, 0.7, soft=0.01)
    clavicles = np.exp(-((y - 0.14 - 0.25 * np.abs(x)) / 0.012) ** 2) * (np.abs(x) < 0.3)
    ribs = np.exp(-np.sin(np.pi * (a["rib_freq"] * y - 2.5 * x ** 2)) ** 2 / 0.08)
    lung_field = lungs * (1 - heart)
    image = 0.05 + 0.55 * body
    image -= 0.36 * lung_field
    image += 0.08 * lung_field * ribs + 0.1 * spine + 0.08 * heart + 0.1 * clavicles * body
    image += 0.04 * _smooth_noise(h, w, 8, rng) * body
    if pneumonia:
        image += _opacities(x, y, lung_field, rng)
    return image


def _opacities(x, y, lung_field, rng: np.random.Generator) -> np.ndarray:
    """2-4 patchy consolidations inside the lungs, each a fair part of a lung, so that they stay
    visible at 32 px; filled in the middle (a plateau), ragged at the edge."""
    h, w = lung_field.shape
    inside = np.argwhere(lung_field > 0.9)
    total = np.zeros_like(lung_field)
    for _ in range(int(rng.integers(2, 5))):
        cy, cx = inside[rng.integers(len(inside))]
        radius = rng.uniform(0.07, 0.12)
        blob = np.exp(-((x - x[cy, cx]) ** 2 + (y - y[cy, cx]) ** 2) / (2 * radius ** 2))
        patchy = np.clip(1.8 * blob - 0.35 + 0.35 * _smooth_noise(h, w, 14, rng), 0, 1)
        total = np.maximum(total, patchy)
    return rng.uniform(0.35, 0.5) * total * lung_field


def _ellipse(x, y, cx, cy, ax, ay, soft: float, power: float = 2.0) -> np.ndarray:
    """1 inside, 0 outside, a smooth edge `soft` wide (real anatomy has no hard edges); a `power`
    above 2 squares off the sides."""
    distance = (np.abs((x - cx) / ax) ** power + np.abs((y - cy) / ay) ** 2) ** (1 / power) - 1.0
    return 1.0 / (1.0 + np.exp(np.clip(distance * min(ax, ay) / soft * 4.0, -30, 30)))


def _smooth_noise(h: int, w: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth random field in [-1, 1]: a coarse grid upsampled bicubically."""
    grid = rng.uniform(-1, 1, size=(cells, max(2, round(cells * w / h)))).astype(np.float32)
    field = Image.fromarray(grid, mode="F").resize((w, h), Image.Resampling.BICUBIC)
    return np.clip(np.asarray(field), -1, 1)


def _normalise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Impose a mean and contrast drawn independently of the class (exposure varies per film)."""
    mean, std = rng.uniform(0.30, 0.46), rng.uniform(0.16, 0.22)
    image = (image - image.mean()) / max(float(image.std()), 1e-6) * std + mean
    return np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)


def _grain_tile(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    return rng.normal(0, 3.0, size=(size, size)).astype(np.int16)


def _grain(tile: np.ndarray, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Film grain at full resolution from a shared tile at a random offset: cheap, not periodic-looking
    at the sizes the model sees."""
    size = tile.shape[0]
    reps = (height // size + 2, width // size + 2)
    oy, ox = rng.integers(0, size, size=2)
    return np.tile(tile, reps)[oy:oy + height, ox:ox + width]
