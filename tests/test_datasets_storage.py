"""Where the data lives: files a Ray worker cannot read, SOURCE/OUT as pyarrow.fs URIs, and a
prepared folder read back through a URI (what `cxr train|evaluate|search s3://...` do)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

import cxr_datasets
import cxr_datasets.prepare_dataset as pipeline
from cxr_datasets import CxrError

SIZE = 32


def _vanishing(monkeypatch, pattern: str) -> list[Path]:
    """Discovery sees every file; then the files matching `pattern` disappear before the decode
    tasks open them: what a worker node without SOURCE's storage sees. Returns the removed files."""
    real_discover = pipeline.discover
    removed: list[Path] = []

    def discover_then_lose(source, **options):
        found = real_discover(source, **options)
        for path in map(Path, found.paths()):
            if path.match(pattern):
                path.unlink()
                removed.append(path)
        return found

    monkeypatch.setattr(pipeline, "discover", discover_then_lose)
    return removed


def test_a_split_no_worker_can_read_is_one_line_naming_the_node(synth_source, ray_session,
                                                                tmp_path, monkeypatch):
    source = tmp_path / "src"
    shutil.copytree(synth_source, source)
    removed = _vanishing(monkeypatch, "*/test/*/*.jpeg")
    with pytest.raises(CxrError) as info:
        cxr_datasets.prepare(source, tmp_path / "out", image_size=SIZE, verbose=False)
    message = str(info.value)
    node = ray_session.util.get_node_ip_address()
    assert message.startswith(f"all {len(removed)} test images were unreadable on node {node}")
    assert "file not found" in message and "shared file system or s3://" in message
    assert "\n" not in message and "no test/ folder" not in message
    assert not (tmp_path / "out").exists()


def test_an_unreadable_file_is_rejected_with_reason_node_and_path(synth_source, ray_session,
                                                                  tmp_path, monkeypatch):
    source = tmp_path / "src"
    shutil.copytree(synth_source, source)
    removed = _vanishing(monkeypatch, "*/train/PNEUMONIA/person1*.jpeg")
    manifest = cxr_datasets.prepare(source, tmp_path / "out", image_size=SIZE, verbose=False)
    assert removed
    node = ray_session.util.get_node_ip_address()
    rejected = {r["path"]: r for r in manifest["rejected"]}
    for path in removed:
        entry = rejected[path.relative_to(source).as_posix()]
        assert entry["reason"] == "unreadable: file not found" and entry["node"] == node
    n_files = len(list(synth_source.rglob("*.jpeg")))
    accepted = sum(sum(c.values()) for c in manifest["counts"].values())
    assert accepted + len(manifest["rejected"]) == n_files  # nothing lost: accepted or reported


def test_file_uri_source_and_out_give_the_same_shards(synth_source, prepared_small, ray_session,
                                                      tmp_path):
    """The pyarrow.fs path (listing, reading in the tasks, writing shards and the staged rename)
    on file:// URIs: byte-identical shards to the plain-path run, OUT replaced only whole."""
    out_uri = f"file://{tmp_path}/prepared"
    manifest = cxr_datasets.prepare(f"file://{synth_source}", out_uri, image_size=SIZE, seed=0,
                                verbose=False)
    local = cxr_datasets.read_manifest(prepared_small)
    assert manifest["source"] == f"file://{synth_source}"
    assert manifest["counts"] == local["counts"] and manifest["rejected"] == []
    assert [(s["path"], s["sha256"]) for s in manifest["shards"]] == \
        [(s["path"], s["sha256"]) for s in local["shards"]]
    out = tmp_path / "prepared"
    assert json.loads((out / "manifest.json").read_text())["shards"] == manifest["shards"]
    assert sorted(p.name for p in (out / "eda").iterdir()) == sorted(
        p.name for p in (prepared_small / "eda").iterdir())
    x, y, _ = cxr_datasets.load(out, "train")
    assert x.shape == (len(y), SIZE, SIZE, 1)
    with pytest.raises(CxrError, match="already exists"):
        cxr_datasets.prepare(f"file://{synth_source}", out_uri, image_size=SIZE, verbose=False)
    cxr_datasets.prepare(f"file://{synth_source}", out_uri, image_size=SIZE, seed=1, overwrite=True,
                     verbose=False)
    assert cxr_datasets.read_manifest(out)["options"]["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]  # no staging folder left


def test_a_missing_uri_source_is_one_line(tmp_path):
    with pytest.raises(CxrError, match="source folder not found: file://"):
        cxr_datasets.prepare(f"file://{tmp_path}/missing", tmp_path / "out", verbose=False)


# --- a prepared folder read back through a URI ---------------------------------------------------

def test_every_split_loads_from_a_file_uri_byte_for_byte_as_from_the_folder(prepared_small):
    from cxr_datasets.storage import Location

    uri = prepared_small.as_uri()
    assert uri.startswith("file:///") and Location.of(uri).is_uri  # the pyarrow.fs path, not the OS's
    for split in cxr_datasets.SPLITS:
        for verify in (True, False):
            x_uri, y_uri, meta_uri = cxr_datasets.load(uri, split, verify=verify)
            x, y, meta = cxr_datasets.load(prepared_small, split, verify=verify)
            assert len(y) > 0 and x_uri.dtype == x.dtype and x_uri.shape == x.shape
            assert x_uri.tobytes() == x.tobytes() and y_uri.tobytes() == y.tobytes()
            assert meta_uri.equals(meta)
    assert cxr_datasets.read_manifest(uri + "/") == cxr_datasets.read_manifest(prepared_small)
    assert cxr_datasets.manifest_hash(uri) == cxr_datasets.manifest_hash(prepared_small)


def _copy_as_uri(prepared: Path, tmp_path: Path) -> tuple[Path, str]:
    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    return copy, copy.as_uri()


def test_a_damaged_or_missing_shard_behind_a_uri_is_one_line_naming_it(prepared_small, tmp_path):
    copy, uri = _copy_as_uri(prepared_small, tmp_path)
    shard = copy / "val" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: Parquet may still parse it, the checksum may not
    shard.write_bytes(bytes(data))
    with pytest.raises(CxrError) as info:
        cxr_datasets.load(uri, "val")
    message = str(info.value)
    assert message.startswith(f"damaged shard {uri}/val/part-00000.parquet: its sha256 does not match")
    assert "\n" not in message
    cxr_datasets.load(uri, "train")  # the other splits' shards are intact and still load
    shard.unlink()
    for verify in (True, False):
        with pytest.raises(CxrError, match=f"^shard missing: {re.escape(uri)}/val/part-00000.parquet; re-run"):
            cxr_datasets.load(uri, "val", verify=verify)


def test_a_uri_without_a_manifest_or_with_an_unknown_scheme_is_one_line(prepared_small, tmp_path):
    copy, uri = _copy_as_uri(prepared_small, tmp_path)
    (copy / "manifest.json").unlink()
    for read in (lambda where: cxr_datasets.load(where, "train"), cxr_datasets.read_manifest,
                 cxr_datasets.manifest_hash):
        with pytest.raises(CxrError, match=f"^not a prepared folder \\(no manifest.json\\): {re.escape(uri)}; run"):
            read(uri)
    with pytest.raises(CxrError, match="^cannot open nosuch://bucket/prepared: Unrecognized filesystem"):
        cxr_datasets.load("nosuch://bucket/prepared", "train")
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(CxrError, match=f"^cannot read {re.escape(uri)}/manifest.json: "):
        cxr_datasets.read_manifest(uri)
