"""`cxr demo` end to end (synthetic data -> prepare -> search -> test -> export -> report)."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_demo_reaches_the_target_test_auc_in_minutes(tmp_path, capsys):
    from cxr_search.demo import MARKER, TARGET_TEST_AUC
    from cxr_search.main import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed and str(out / "best") in printed
    summary = json.loads((out / MARKER).read_text())
    assert summary["test_auc"] >= TARGET_TEST_AUC
    assert summary["elapsed_s"] < 600
    assert main(["demo", "--out", str(out)]) == 2  # refuses to overwrite without --overwrite


def test_demo_refuses_to_delete_a_folder_it_did_not_make(tmp_path):
    from cxr_search.main import main

    (tmp_path / "precious.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path), "--overwrite"]) == 2
    assert (tmp_path / "precious.txt").is_file()
