"""cxr-tune's data stage: chest X-ray folder -> patient-split, verified shards (Ray Data).

    import datasets
    datasets.synth("data/synth", n=600)                        # a synthetic Kaggle-layout folder
    datasets.prepare("data/synth", "runs/prepared")            # -> manifest dict
    x, y, meta = datasets.load("runs/prepared", "train")       # uint8 [N, S, S, 1], int64 [N]
    x1 = datasets.preprocess_file("chest.jpeg", image_size=224)  # what `cxr predict` applies

This package is named like Hugging Face's `datasets`; that library is deliberately not a
dependency, and a test checks that `import datasets` finds this folder.
"""
from .config import CLASS_NAMES, SPLITS, PrepareConfig
from .discover import patient_id
from .errors import CxrError, ImageRejected
from .image import preprocess_bytes, preprocess_file, read_gray, resize_gray
from .pipeline import prepare
from .shards import load, manifest_hash, read_manifest, tfrecord_feature_spec
from .synth import SynthConfig, synth

__all__ = [
    "CLASS_NAMES", "SPLITS", "PrepareConfig", "CxrError", "ImageRejected",
    "read_gray", "resize_gray", "preprocess_file", "preprocess_bytes", "patient_id",
    "synth", "SynthConfig", "prepare", "load", "read_manifest", "manifest_hash", "tfrecord_feature_spec",
]
