"""What a new user sees first: `cxr --version`, per-epoch progress of `cxr train` (and --quiet),
`cxr evaluate --json`, and `cxr predict` failing clearly when no input could be read."""
from __future__ import annotations

import json
import re

import pytest

from cxr_search.main import main

TRAIN = ["--weights", "none", "--head-units", "8", "--aug-strength", "0", "--batch-size", "16", "--n-boot", "50"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert re.fullmatch(r"cxr \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_train_shows_each_epoch_and_evaluate_prints_json(prepared_small, tmp_path, capsys):
    out = tmp_path / "model"
    assert main(["train", str(prepared_small), "--out", str(out), "--epochs", "3", "--patience", "3",
                 "--formats", "keras", *TRAIN]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert len(lines) == 3, err
    pattern = r"epoch (\d)/3  loss \d+\.\d{4}  val_auc (\d\.\d{4}|nan)  \d+\.\d s(  ETA <= \d+ s)?"
    for number, line in enumerate(lines, 1):
        match = re.fullmatch(pattern, line)
        assert match and int(match.group(1)) == number, line
        assert ("ETA" in line) == (number < 3)
    card = json.loads((out / "model_card.json").read_text())

    assert main(["evaluate", str(out), str(prepared_small), "--split", "test", "--n-boot", "50", "--json"]) == 0
    # the whole of stdout is one strict JSON document: no NaN or Infinity (e.g. the ROC curve's
    # first threshold), which Python reads but other JSON parsers refuse
    result = json.loads(capsys.readouterr().out, parse_constant=lambda name: pytest.fail(name))
    test = result["test"]
    assert test["n"] == card["metrics"]["test"]["n"]
    assert test["roc_auc"]["value"] == pytest.approx(card["metrics"]["test"]["roc_auc"]["value"])
    assert {"value", "ci_low", "ci_high"} <= set(test["sensitivity"]) and "confusion_matrix" in test

    # predict: when not one input can be read, the table is still written and the exit code says so
    bad = tmp_path / "incoming"
    bad.mkdir()
    (bad / "empty.jpeg").write_bytes(b"")
    (bad / "text.png").write_text("not an image")
    csv = tmp_path / "preds.csv"
    assert main(["predict", str(out), str(bad), "--out", str(csv)]) == 2
    assert "none of the 2 input file(s) could be read" in capsys.readouterr().err
    assert csv.read_text().splitlines()[0] == "path,p_pneumonia,label,threshold,error"
    assert len(csv.read_text().splitlines()) == 3


def test_train_quiet_prints_no_progress(prepared_small, tmp_path, capsys):
    assert main(["train", str(prepared_small), "--out", str(tmp_path / "m"), "--epochs", "1", "--quiet", "--formats", "keras",
                 *TRAIN]) == 0
    captured = capsys.readouterr()
    assert "epoch 1/1" not in captured.err and "roc_auc" in captured.out
