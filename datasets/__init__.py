"""cxr-tune's data stage: chest X-ray folder -> patient-split, verified shards (Ray tasks).

    import datasets
    datasets.synth("data/synth", n=600)                        # a synthetic Kaggle-layout folder
    datasets.prepare("data/synth", "runs/prepared")            # -> manifest dict
    x, y, meta = datasets.load("runs/prepared", "train")       # uint8 [N, S, S, 1], int64 [N]
    x1 = datasets.preprocess_file("chest.jpeg", image_size=224)  # what `cxr predict` applies

This package is named like Hugging Face's `datasets`; that library is deliberately not a
dependency, and a test checks that `import datasets` finds this folder.

Names from the heavy modules (pandas, pyarrow, Ray, Pillow) are imported on first use (PEP 562),
so `from datasets.errors import CxrError` in every `cxr` command costs nothing. `synth` is bound
eagerly: the function shares its module's name, and binding it now keeps `datasets.synth` the
function even after `from datasets.synth import SynthConfig` has loaded the module.
"""
import importlib

from .config import CLASS_NAMES, SPLITS, PrepareConfig
from .discover import patient_id
from .errors import CxrError, ImageRejected
from .synth import SynthConfig, synth

# name -> the submodule that defines it
_EXPORTS = {
    "preprocess_bytes": "image", "preprocess_file": "image", "read_gray": "image",
    "resize_gray": "image",
    "prepare": "pipeline",
    "load": "shards", "manifest_hash": "shards", "read_manifest": "shards",
    "tfrecord_feature_spec": "shards",
}
__all__ = sorted([*_EXPORTS, "CLASS_NAMES", "SPLITS", "PrepareConfig", "CxrError", "ImageRejected",
                  "patient_id", "synth", "SynthConfig"])


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'datasets' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
