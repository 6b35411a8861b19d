"""cxr-tune installs beside Hugging Face's `datasets` without shadowing it, or being shadowed.

The repo's folders are `datasets/`, `cxr_model/`, `search/`; they install as `cxr_datasets`,
`cxr_model`, `cxr_search` (pyproject.toml's package-dir). A stand-in for Hugging Face's package is
put first on the path of a child Python that runs outside the repo, as a user's would.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _stand_in(tmp_path: Path, body: str) -> dict[str, str]:
    fake = tmp_path / "site" / "datasets"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(body)
    return {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site")}


def test_an_installed_hugging_face_datasets_and_cxr_tune_both_import(repo_root, tmp_path):
    env = _stand_in(tmp_path, "HUGGING_FACE = True\n")
    code = ("import datasets, cxr_datasets, cxr_model, cxr_search.main\n"
            "assert datasets.HUGGING_FACE, datasets.__file__\n"
            "print(cxr_datasets.__file__); print(cxr_search.main.__file__)\n"
            "cxr_search.main.build_parser().parse_args(['prepare', 'a', 'b'])\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    ours, cli = done.stdout.split()
    assert Path(ours).resolve() == repo_root / "datasets" / "__init__.py"
    assert Path(cli).resolve() == repo_root / "search" / "main.py"


def test_the_cxr_command_runs_beside_hugging_face_datasets(tmp_path):
    env = _stand_in(tmp_path, "raise ImportError('the wrong datasets was imported')\n")
    cxr = Path(sys.executable).with_name("cxr")
    done = subprocess.run([str(cxr), "synth", str(tmp_path / "synth"), "--n", "40"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len([p for p in (tmp_path / "synth").rglob("*") if p.suffix in (".jpeg", ".png")]) == 40
