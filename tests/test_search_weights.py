"""A sweep whose VGG16 weights cannot be had fails once, in the driver, before Ray or any trial
starts and before the run folder looks like a sweep to resume (no network needed: the download is
replaced by the offline failure)."""
from __future__ import annotations

import pytest

from cxr_datasets import CxrError


def _offline(*_args, **_kwargs):
    raise OSError("URL fetch failure: [Errno -3] Temporary failure in name resolution")


def test_offline_imagenet_fails_before_the_sweep_starts(tmp_path, monkeypatch):
    import keras

    from cxr_search import tuner
    from cxr_search.config import SearchConfig
    from cxr_search.run import run_search

    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))  # no cached weights file
    monkeypatch.setattr(keras.utils, "get_file", _offline)
    monkeypatch.setattr(tuner, "connect", lambda address: pytest.fail("Ray must not start"))
    cfg = SearchConfig(prepared=str(tmp_path / "prepared"), out=str(tmp_path / "run"), weights="imagenet")

    with pytest.raises(CxrError, match="cannot download the ImageNet VGG16 weights.*--weights none"):
        run_search(cfg)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_missing_weights_file_fails_before_the_sweep_starts(tmp_path, monkeypatch):
    from cxr_search import tuner
    from cxr_search.config import SearchConfig

    monkeypatch.setattr(tuner, "connect", lambda address: pytest.fail("Ray must not start"))
    cfg = SearchConfig(prepared=str(tmp_path / "prepared"), out=str(tmp_path / "run"),
                       weights=str(tmp_path / "missing.weights.h5"))

    with pytest.raises(CxrError, match="VGG16 weights file not found"):
        tuner.run_sweep(cfg)


@pytest.mark.parametrize("words", ["none", "NONE", " null ", ""])
def test_every_spelling_of_no_weights_means_random_init_in_a_search_config(words, tmp_path):
    """Normalised in SearchConfig itself, so the API, a saved config.json and the CLI agree."""
    from cxr_search.config import SearchConfig

    cfg = SearchConfig(prepared=str(tmp_path), out=str(tmp_path / "run"), weights=words)
    assert cfg.weights is None
