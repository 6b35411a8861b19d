"""cxr_model: the VGG16 transfer-learning model, its input pipeline, one `fit`, evaluation, export.

    from cxr_model import Data, ModelConfig, TrainConfig, fit, evaluate, choose_threshold, export
    data = Data.from_prepared("runs/prepared")
    history = fit(TrainConfig(model=ModelConfig(head_units=(256,)), epochs=10), data)
    model = history.model                      # raw uint8 [S, S, 1] in, softmax [2] out

Names are imported on first use (PEP 562), so `cxr --help`, `cxr synth` and `cxr prepare` do not pay
for loading Keras and TensorFlow. Importing `cxr_model.model` registers the custom layers
(XrayAugment, VGGPreprocess, ClassAUC) that `keras.saving.load_model(path, safe_mode=True)` needs;
`cxr_model.load_model` does that for you.
"""
import importlib
from typing import TYPE_CHECKING

# Light modules (no Keras at import), imported eagerly: the functions `evaluate` and `export`
# share their modules' names, and binding them now keeps `cxr_model.evaluate` the function even
# after `from cxr_model.evaluate import ...` has loaded the module.
from .config import ModelConfig, TrainConfig
from .evaluate import choose_threshold, evaluate
from .export import export, load_model

if TYPE_CHECKING:  # what the lazy names below are, for type checkers and editors (never run)
    from .augment import AUG_MAX, XrayAugment, augmentation_layer
    from .data import BatchStream, Data, tfrecord_dataset
    from .features import FeatureCache
    from .model import (
        ClassAUC,
        VGGPreprocess,
        build_base,
        build_head,
        build_model,
        compile_model,
        feature_extractor,
        inference_model,
        predict_proba,
    )
    from .train import fit

# name -> the submodule that defines it
_EXPORTS = {
    "AUG_MAX": "augment", "XrayAugment": "augment", "augmentation_layer": "augment",
    "BatchStream": "data", "Data": "data", "tfrecord_dataset": "data",
    "FeatureCache": "features",
    "ClassAUC": "model", "VGGPreprocess": "model", "build_base": "model", "build_head": "model",
    "build_model": "model", "compile_model": "model", "feature_extractor": "model",
    "inference_model": "model",
    "predict_proba": "model",
    "fit": "train",
}
__all__ = sorted([*_EXPORTS, "ModelConfig", "TrainConfig", "choose_threshold", "evaluate",
                  "export", "load_model"])


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'cxr_model' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
