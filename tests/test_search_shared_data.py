"""The sweep's data is loaded by a Ray task into the object store: the driver holds a reference,
never the pixels (search/shared_data.py)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]


def _cfg(prepared, tmp_path, cv=0):
    from cxr_search.config import SearchConfig

    return SearchConfig(prepared=str(prepared), out=str(tmp_path / "run"), trials=1, cv=cv, seed=0)


@pytest.mark.parametrize("cv", [0, 3])
def test_the_driver_never_loads_the_pixels_and_the_trials_see_the_loaded_arrays(
        prepared_small, ray_session, tmp_path, monkeypatch, cv):
    import cxr_datasets
    import cxr_datasets.shards
    from cxr_search.shared_data import SharedData, sweep_data

    x_train, y_train, _ = cxr_datasets.load(prepared_small, "train")
    x_val, y_val, _ = cxr_datasets.load(prepared_small, "val")

    def loaded_here(*args, **kwargs):
        raise AssertionError("the driver loaded the shards itself")

    # Only this (driver) process is patched: the Ray task's worker imports the real loader.
    monkeypatch.setattr(cxr_datasets.shards, "load", loaded_here)
    monkeypatch.setattr(cxr_datasets, "load", loaded_here)
    shared = sweep_data(_cfg(prepared_small, tmp_path, cv))
    assert isinstance(shared, SharedData) and shared.image_size == x_train.shape[1]
    data = shared.get()
    if cv:
        assert np.array_equal(data.x, np.concatenate([x_train, x_val]))
        assert np.array_equal(data.y, np.concatenate([y_train, y_val]))
        assert sorted(set(data.fold.tolist())) == [0, 1, 2]
        pixels = data.x
    else:
        assert np.array_equal(data.x_train, x_train) and np.array_equal(data.y_train, y_train)
        assert np.array_equal(data.x_val, x_val) and np.array_equal(data.y_val, y_val)
        pixels = data.x_train
    # mapped from the object store (read-only), not a private copy
    assert not pixels.flags.writeable


def test_a_damaged_shard_is_the_loaders_one_line_not_a_ray_traceback(prepared_small, ray_session, tmp_path):
    from ray.exceptions import RayTaskError

    from cxr_datasets.errors import CxrError
    from cxr_search.shared_data import sweep_data

    copy = tmp_path / "prepared"
    shutil.copytree(prepared_small, copy)
    shard = copy / "val" / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(CxrError) as info:
        sweep_data(_cfg(copy, tmp_path))
    assert not isinstance(info.value, RayTaskError)
    assert str(info.value).startswith(f"damaged shard {shard}: its sha256 does not match")
    assert "\n" not in str(info.value)
