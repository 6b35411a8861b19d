"""saved_model/ and model.onnx of an inference graph, on the TensorFlow backend.

`cxr_model.export` runs this module in a child Python with KERAS_BACKEND=tensorflow, whatever the
backend of the process that trained the model:

    KERAS_BACKEND=tensorflow python -I -m cxr_model.export_formats FOLDER [saved_model] [onnx]

which loads FOLDER/model.keras with plain Keras (safe mode, no compile state, nothing of the
project but this module) and writes the formats named (both when none is) beside it. A child process: the conversion's
memory (several GB for a 224 px VGG16) goes back to the system when it exits.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
ONNX_FILE = "model.onnx"


def export_formats(graph, folder, formats=("saved_model", "onnx")) -> None:
    """saved_model/ and/or model.onnx of a Keras model on the TensorFlow backend."""
    folder = Path(folder)
    if "saved_model" in formats:
        graph.export(str(folder / SAVED_MODEL_DIR), format="tf_saved_model", verbose=False)
    if "onnx" in formats:
        with warnings.catch_warnings():  # tf2onnx pokes at numpy attributes that numpy 2 deprecates
            warnings.simplefilter("ignore", FutureWarning)
            graph.export(str(folder / ONNX_FILE), format="onnx", verbose=False)


def main(argv: list[str]) -> int:
    import keras

    folder, *formats = argv
    graph = keras.saving.load_model(str(Path(folder) / MODEL_FILE), safe_mode=True, compile=False)
    export_formats(graph, folder, formats or ("saved_model", "onnx"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
