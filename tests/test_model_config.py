"""ModelConfig / TrainConfig: JSON round trips and clear errors for bad values."""
import json

import pytest

from cxr_model import ModelConfig, TrainConfig


def test_json_round_trip_keeps_every_field():
    cfg = TrainConfig(model=ModelConfig(image_size=64, weights=None, trainable_blocks=2,
                                        head_pooling="avg", head_units=(512, 128), dropout=0.1,
                                        aug_strength=0.5, hflip=True),
                      lr=3e-4, batch_size=16, epochs=4, seed=7, patience=2, use_feature_cache=False)
    text = json.dumps(cfg.to_dict())
    back = TrainConfig.from_dict(json.loads(text))
    assert back == cfg
    assert isinstance(back.model.head_units, tuple)


def test_defaults_and_weights_spelling():
    assert TrainConfig().model == ModelConfig()
    assert ModelConfig(weights="none").weights is None  # the CLI's spelling of "no weights"
    assert ModelConfig(weights="None").weights is None
    assert ModelConfig(head_units=[64, 32]).head_units == (64, 32)


def test_feature_cache_condition():
    assert ModelConfig(trainable_blocks=0, aug_strength=0.0).base_is_fixed
    assert not ModelConfig(trainable_blocks=1, aug_strength=0.0).base_is_fixed
    assert not ModelConfig(trainable_blocks=0, aug_strength=0.1).base_is_fixed
    assert not ModelConfig(trainable_blocks=0, aug_strength=0.0, hflip=True).base_is_fixed


@pytest.mark.parametrize("kwargs, fragment", [
    ({"image_size": 16}, "image_size"),
    ({"trainable_blocks": 6}, "trainable_blocks"),
    ({"head_pooling": "max"}, "head_pooling"),
    ({"head_units": (0,)}, "head_units"),
    ({"dropout": 1.0}, "dropout"),
    ({"aug_strength": 1.5}, "aug_strength"),
    ({"hflip": "yes"}, "hflip"),
])
def test_model_config_rejects_bad_values(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("kwargs, fragment", [
    ({"lr": 0.0}, "lr"), ({"batch_size": 0}, "batch_size"), ({"epochs": 0}, "epochs"),
    ({"patience": 0}, "patience"), ({"seed": -1}, "seed"), ({"lr": float("nan")}, "lr"),
])
def test_train_config_rejects_bad_values(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        TrainConfig(**kwargs)


def test_unknown_fields_fail_loudly():
    with pytest.raises(ValueError, match="droupout"):
        ModelConfig.from_dict({"droupout": 0.1})
    with pytest.raises(ValueError, match="learning_rate"):
        TrainConfig.from_dict({"learning_rate": 0.1})


def test_configs_are_frozen():
    with pytest.raises(Exception):
        ModelConfig().dropout = 0.5
