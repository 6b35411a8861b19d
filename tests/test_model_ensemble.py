"""`ensemble_model`: K full models -> one portable graph whose output is the mean of theirs; one
VGG16 base when the members share its weights (a frozen base), K bases otherwise."""
from __future__ import annotations

import numpy as np
import pytest

from cxr_model import ModelConfig, build_model


def _members(cfg: ModelConfig, seeds):
    members = []
    for i, seed in enumerate(seeds):
        model = build_model(cfg, seed=seed)
        head = model.get_layer("head")
        head.set_weights([w + 0.1 * i for w in head.get_weights()])  # folds differ in their heads
        members.append(model)
    return members


@pytest.mark.timeout(300)
@pytest.mark.parametrize("trainable_blocks, seeds, bases", [(0, (0, 0, 0), 1), (1, (0, 1), 2)],
                         ids=["frozen_shared_base", "fine_tuned_own_bases"])
def test_the_ensemble_is_the_mean_of_its_members_and_saves_portably(tmp_path, trainable_blocks, seeds, bases):
    import keras

    from cxr_model.model import ensemble_model, inference_model

    cfg = ModelConfig(image_size=32, weights=None, head_units=(8,), aug_strength=0.0,
                      trainable_blocks=trainable_blocks)
    members = _members(cfg, seeds)
    graph = ensemble_model(members)
    assert sum(layer.name.startswith("vgg16") for layer in graph.layers) == bases
    assert inference_model(graph) is graph  # the exporter takes it as it is
    x = np.random.default_rng(0).integers(0, 255, (6, 32, 32, 1), dtype=np.uint8)
    mean = np.mean([inference_model(m).predict(x, verbose=0) for m in members], axis=0)
    np.testing.assert_allclose(graph.predict(x, verbose=0), mean, atol=1e-5, rtol=0)
    graph.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras", safe_mode=True, compile=False)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), mean, atol=1e-5, rtol=0)


@pytest.mark.timeout(300)
def test_gradcam_explains_a_shared_base_ensemble_and_refuses_separate_bases_in_one_line():
    from cxr_datasets.errors import CxrError
    from cxr_model.gradcam import gradcam_heatmaps
    from cxr_model.model import ensemble_model

    x = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 1), dtype=np.uint8)
    frozen = ModelConfig(image_size=32, weights=None, head_units=(8,), aug_strength=0.0)
    assert gradcam_heatmaps(ensemble_model(_members(frozen, (0, 0))), x).shape == (2, 2, 2)
    tuned = ModelConfig(image_size=32, weights=None, head_units=(8,), aug_strength=0.0, trainable_blocks=1)
    with pytest.raises(CxrError, match="ensemble of 2 fine-tuned"):
        gradcam_heatmaps(ensemble_model(_members(tuned, (0, 1))), x)
