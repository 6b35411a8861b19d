"""A tampered export is refused at load: predict, evaluate and serve check model.keras against the
sha256 in model_card.json, and `--no-verify` is the one way round it."""
from __future__ import annotations

import shutil

import pytest

from cxr_datasets.errors import CxrError


@pytest.fixture(scope="module")
def tampered(exported_64, tmp_path_factory):
    """A copy of the 64-px export whose model.keras is another model's file (other weights)."""
    from cxr_model import ModelConfig, build_model

    folder = tmp_path_factory.mktemp("tampered") / "model"
    shutil.copytree(exported_64, folder)
    other = build_model(ModelConfig(image_size=64, weights=None, head_units=(8,), aug_strength=0.1), seed=1)
    other.save(folder / "model.keras")
    return folder


def _hashes(folder):
    import json

    from cxr_model.export import sha256_file

    return json.loads((folder / "model_card.json").read_text())["model_sha256"], sha256_file(folder / "model.keras")


def test_load_model_refuses_a_swapped_model_file_naming_both_hashes(tampered):
    from cxr_model.export import load_model

    card_hash, file_hash = _hashes(tampered)
    assert card_hash != file_hash
    with pytest.raises(CxrError) as err:
        load_model(tampered)
    message = str(err.value)
    assert card_hash in message and file_hash in message and "--no-verify" in message
    assert "\n" not in message
    model, card = load_model(tampered, verify=False)  # knowingly edited
    assert card["model_sha256"] == card_hash and model is not None


def test_load_model_accepts_the_untouched_export(exported_64):
    from cxr_model.export import load_model

    model, card = load_model(exported_64)
    assert model is not None and card["model_sha256"] == _hashes(exported_64)[1]


def test_cxr_predict_refuses_then_accepts_with_no_verify(tampered, samples_dir, tmp_path, capsys):
    from cxr_search.main import main

    image = next(samples_dir.rglob("*.jpeg"))
    assert main(["predict", str(tampered), str(image), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "cxr: error:" in err and "is not the model its card describes" in err
    out = tmp_path / "preds.csv"
    assert main(["predict", str(tampered), str(image), "--quiet", "--no-verify", "--out", str(out)]) == 0
    assert out.read_text().count("\n") == 2


def test_cxr_evaluate_refuses_a_swapped_model(tampered, prepared_small, capsys):
    from cxr_search.main import main

    assert main(["evaluate", str(tampered), str(prepared_small)]) == 2
    assert "is not the model its card describes" in capsys.readouterr().err


def test_serve_checks_the_export_before_ray_starts(tampered, monkeypatch):
    from cxr_model import serve

    def no_ray(*_a, **_k):
        raise AssertionError("Ray must not start for a tampered export")

    import ray

    monkeypatch.setattr(ray, "init", no_ray)
    with pytest.raises(CxrError, match="is not the model its card describes"):
        serve.start(serve.ServeConfig(model_dir=str(tampered)))
    serve.check_export(serve.ServeConfig(model_dir=str(tampered), verify=False))  # --no-verify: accepted
