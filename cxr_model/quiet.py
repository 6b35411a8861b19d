"""TensorFlow without its start-up noise: the lines its native code prints while it is imported
and while it initialises its devices, before absl's logging exists (so TF_CPP_MIN_LOG_LEVEL does
not reach them): "All log messages before absl::InitializeLog()", oneDNN and CPU-feature notes,
"Could not find cuda drivers", and on a machine without a GPU "failed call to cuInit ... CUDA
error". A user with a problem needs none of them; every other line is passed on.

Our own code because nothing upstream does it: TensorFlow offers no switch for these lines. Only
those two steps are captured (stderr's file descriptor points at a temporary file meanwhile, and
what is kept is written back right after); `TF_CPP_MIN_LOG_LEVEL=0` or `1` turns the filter off.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import tempfile

NOISE = re.compile(
    rb"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|[IWE]\d{4} [\d:.]+ +\d+ (port|cudart_stub|cpu_feature_guard|cuda_platform|cuda_executor|cuda_dnn"
    rb"|cuda_fft|cuda_blas|gpu_device|cuda_diagnostics)\.cc:\d+\]"
    rb"|To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.)")


def init_tensorflow_quietly() -> None:
    """Import TensorFlow and initialise its devices, its start-up noise dropped. Does nothing when
    TensorFlow is imported already, when Keras runs on another backend, or when the user asked for
    TensorFlow's info logs."""
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL") in ("0", "1"):
        return
    drop_retracing_warnings()
    if "tensorflow" in sys.modules or os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # cuInit happens here, not at import
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().splitlines(keepends=True) if not NOISE.match(line)]
            if kept:
                os.write(2, b"".join(kept))


def _not_retracing(record: logging.LogRecord) -> bool:
    return "triggered tf.function retracing" not in record.getMessage()


def drop_retracing_warnings() -> None:
    """TensorFlow's "N out of the last M calls to <function> triggered tf.function retracing"
    warning dropped: a reused trial worker builds a new model for every trial, so it fires from the
    fifth trial on, and there is nothing to fix. Its other warnings pass."""
    logger = logging.getLogger("tensorflow")  # the logger tf.get_logger() returns
    if _not_retracing not in logger.filters:
        logger.addFilter(_not_retracing)
