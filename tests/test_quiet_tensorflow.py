"""TensorFlow's start-up noise is dropped in `cxr` commands and trials, other stderr lines kept."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from cxr_model.quiet import NOISE

SCRIPT = ("import sys; from cxr_model.quiet import init_tensorflow_quietly; init_tensorflow_quietly(); "
          "import tensorflow as tf; tf.constant(1) + 1; print('after start-up', file=sys.stderr)")
NOISY = ("absl::InitializeLog", "cuInit", "cpu_feature_guard", "cudart_stub", "oneDNN custom operations")


def _stderr(level: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["KERAS_BACKEND"] = "tensorflow"
    if level is not None:
        env["TF_CPP_MIN_LOG_LEVEL"] = level
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


@pytest.mark.timeout(300)
def test_tensorflow_starts_without_its_native_noise():
    loud = _stderr("0")  # the user asked for TensorFlow's logs: nothing is filtered
    if not any(word in loud for word in NOISY):
        pytest.skip("this TensorFlow build prints no start-up noise")
    quiet = _stderr(None)
    assert "after start-up" in quiet
    assert not [line for line in quiet.splitlines() if any(word in line for word in NOISY)], quiet


def test_the_filter_drops_only_the_known_start_up_lines():
    dropped = [
        b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
        b"I0000 00:00:1796225180.411299   31206 port.cc:153] oneDNN custom operations are on.\n",
        b"E0000 00:00:1796225183.891925   31206 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n",
        b"To enable the following instructions: AVX2 FMA, in other operations, rebuild TensorFlow with the "
        b"appropriate compiler flags.\n",
    ]
    kept = [b"E0000 00:00:1796225183.891925   31206 op_kernel.cc:1830] OP_REQUIRES failed: OOM\n",
            b"Traceback (most recent call last):\n", b"cxr: error: something the user must see\n"]
    assert all(NOISE.match(line) for line in dropped)
    assert not any(NOISE.match(line) for line in kept)


def test_tensorflows_retracing_warning_is_dropped_and_its_other_warnings_pass(caplog):
    import logging

    from cxr_model.quiet import drop_retracing_warnings

    drop_retracing_warnings()
    drop_retracing_warnings()  # once is enough: no second filter
    logger = logging.getLogger("tensorflow")
    assert len(logger.filters) == len(set(map(id, logger.filters)))
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        logger.warning("5 out of the last 11 calls to <function f at 0x7f> triggered tf.function "
                       "retracing. Tracing is expensive ...")
        logger.warning("Compiled the loaded model, but the compiled metrics have yet to be built.")
    assert [r.getMessage() for r in caplog.records] == [
        "Compiled the loaded model, but the compiled metrics have yet to be built."]
