"""A trial's weights.npz holds the weights training changes; the frozen base is rebuilt from the
trial's config and seed and checked by its sha256 (search/checkpoint.py)."""
from __future__ import annotations

import numpy as np
import pytest

from cxr_datasets.errors import CxrError

pytestmark = pytest.mark.timeout(300)


def _trained(cfg, seed):
    """A model built as a trial builds it, with its trainable weights moved as training would."""
    from cxr_model.model import build_model

    model = build_model(cfg, seed=seed)
    rng = np.random.default_rng(1)
    model.set_weights([w + rng.normal(0, 0.1, w.shape).astype(w.dtype) if v.trainable else w
                       for v, w in zip(model.weights, model.get_weights())])
    return model


@pytest.mark.parametrize("blocks", [0, 1])
def test_a_checkpoint_restores_every_weight_and_stores_only_what_training_changed(tmp_path, blocks):
    from cxr_model.config import ModelConfig
    from cxr_model.model import build_model
    from cxr_search.checkpoint import load_weights, save_weights

    cfg = ModelConfig(image_size=32, weights=None, head_units=(8,), trainable_blocks=blocks)
    trained = _trained(cfg, seed=3)
    path = tmp_path / "weights.npz"
    save_weights(trained, path)
    restored = build_model(cfg, seed=3)
    load_weights(restored, path)
    for want, got in zip(trained.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(got, want)
    every = sum(w.nbytes for w in trained.get_weights())
    changed = sum(w.nbytes for v, w in zip(trained.weights, trained.get_weights()) if v.trainable)
    assert path.stat().st_size < changed + 64 * 1024 < every  # block 5 fine-tuned: ~28 of ~59 MB


def test_a_base_that_is_not_the_trials_is_refused_and_an_older_checkpoint_still_loads(tmp_path):
    from cxr_model.config import ModelConfig
    from cxr_model.model import build_model
    from cxr_search.checkpoint import load_weights, save_weights

    cfg = ModelConfig(image_size=32, weights=None, head_units=(8,))
    trained = _trained(cfg, seed=3)
    save_weights(trained, tmp_path / "weights.npz")
    with pytest.raises(CxrError, match="frozen weights of the model built to load it"):
        load_weights(build_model(cfg, seed=4), tmp_path / "weights.npz")  # another random base
    np.savez(tmp_path / "old.npz", *trained.get_weights())  # every weight, as before 2026-12-04
    restored = build_model(cfg, seed=4)
    load_weights(restored, tmp_path / "old.npz")
    for want, got in zip(trained.get_weights(), restored.get_weights()):
        np.testing.assert_array_equal(got, want)
