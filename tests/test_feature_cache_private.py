"""The frozen-feature cache (and JAX's compile cache) on a shared /tmp: a per-user folder made
with mode 0700, refused when someone else could have planted it, and no cache file followed
through a link."""
from __future__ import annotations

import os
import stat
import tempfile

import numpy as np
import pytest

from cxr_datasets.errors import CxrError
from cxr_search.trainable import _node_local as node_local


@pytest.fixture
def tmpdir_env(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_the_default_cache_folder_is_this_users_and_private(tmpdir_env):
    path = node_local("cxr-tune-features")
    assert path == str(tmpdir_env / f"cxr-tune-features-{os.getuid()}")
    info = os.lstat(path)
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700 and info.st_uid == os.getuid()
    assert node_local("cxr-tune-features") == path  # the next trial reuses it


@pytest.mark.parametrize("planted", ["open_folder", "link_to_folder", "file"])
def test_a_folder_someone_else_could_have_planted_is_refused_in_one_line(tmpdir_env, planted):
    path = tmpdir_env / f"cxr-tune-features-{os.getuid()}"
    if planted == "open_folder":
        path.mkdir()
        path.chmod(0o777)
    elif planted == "link_to_folder":
        target = tmpdir_env / "theirs"
        target.mkdir(mode=0o700)
        path.symlink_to(target)
    else:
        path.write_text("x")
    with pytest.raises(CxrError, match="not a private folder") as info:
        node_local("cxr-tune-features")
    assert "\n" not in str(info.value)


def test_a_cache_file_that_is_a_link_is_not_followed(tmp_path):
    from cxr_model.config import ModelConfig
    from cxr_model.features import FeatureCache

    cache = FeatureCache(tmp_path / "cache")
    cfg = ModelConfig(image_size=32, weights=None, head_units=(8,), aug_strength=0.0)
    images = np.zeros((2, 32, 32), np.uint8)
    key = cache.key(cfg, images)
    (tmp_path / "cache").mkdir(mode=0o700)
    theirs = tmp_path / "theirs.npy"
    np.save(theirs, np.ones((2, 1, 1, 512), np.float32))
    (tmp_path / "cache" / f"{key}.npy").symlink_to(theirs)
    with pytest.raises(CxrError, match="not a regular file"):
        cache.features(cfg, images)
    assert cache.computed == 0


def test_the_cache_computes_once_and_writes_private_files(tmp_path):
    from cxr_model.config import ModelConfig
    from cxr_model.features import FeatureCache

    cfg = ModelConfig(image_size=32, weights=None, head_units=(8,), aug_strength=0.0)
    images = np.random.default_rng(0).integers(0, 255, (3, 32, 32), dtype=np.uint8)
    first = FeatureCache(tmp_path / "cache").features(cfg, images)
    again = FeatureCache(tmp_path / "cache")
    np.testing.assert_array_equal(again.features(cfg, images), first)
    assert again.computed == 0
    (file,) = (tmp_path / "cache").glob("*.npy")
    assert stat.S_IMODE(file.stat().st_mode) & 0o077 == 0
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700
