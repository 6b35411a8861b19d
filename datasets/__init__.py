"""cxr-tune's data stage: chest X-ray folder -> patient-split, verified shards (Ray tasks).

    import cxr_datasets
    cxr_datasets.synth("data/synth", n=600)                        # a synthetic Kaggle-layout folder
    cxr_datasets.prepare("data/synth", "runs/prepared")            # -> manifest dict
    x, y, meta = cxr_datasets.load("runs/prepared", "train")       # uint8 [N, S, S, 1], int64 [N]
    x1 = cxr_datasets.preprocess_file("chest.jpeg", image_size=224)  # what `cxr predict` applies

The folder is `datasets/`; it installs as `cxr_datasets` (pyproject.toml's package-dir), so it
never shadows Hugging Face's `datasets` in an environment that has both (tests/test_install_names.py).

Names from the heavy modules (pandas, pyarrow, Ray, Pillow) are imported on first use (PEP 562),
so `from cxr_datasets.errors import CxrError` in every `cxr` command costs nothing. `synth` is bound
eagerly: the function shares its module's name, and binding it now keeps `cxr_datasets.synth` the
function even after `from cxr_datasets.synth import SynthConfig` has loaded the module.
"""
import importlib
from typing import TYPE_CHECKING

from .config import CLASS_NAMES, SPLITS, PrepareConfig
from .discover import patient_id
from .errors import CxrError, ImageRejected
from .synth import SynthConfig, synth

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and editors (never run)
    from .image import preprocess_bytes, preprocess_file, read_gray, resize_gray
    from .prepare_dataset import prepare
    from .shards import load, manifest_hash, read_manifest, tfrecord_feature_spec

# name -> the submodule that defines it
_EXPORTS = {
    "preprocess_bytes": "image", "preprocess_file": "image", "read_gray": "image",
    "resize_gray": "image",
    "prepare": "prepare_dataset",
    "load": "shards", "manifest_hash": "shards", "read_manifest": "shards",
    "tfrecord_feature_spec": "shards",
}
__all__ = sorted([*_EXPORTS, "CLASS_NAMES", "SPLITS", "PrepareConfig", "CxrError", "ImageRejected",
                  "patient_id", "synth", "SynthConfig"])


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cxr_datasets' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
