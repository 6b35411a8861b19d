"""The frozen-feature cache answers a subset of cached images without computing (`cxr search --cv`:
every fold's parts are subsets of fold 1's two parts), in this process and in another one."""
from __future__ import annotations

import numpy as np
import pytest

from cxr_model.config import ModelConfig

CFG = ModelConfig(image_size=32, weights=None, head_units=(8,), aug_strength=0.0)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).integers(0, 255, (24, 32, 32, 1), dtype=np.uint8)


@pytest.mark.timeout(120)
def test_a_subset_of_cached_arrays_is_gathered_not_computed(images, tmp_path):
    from cxr_model.features import FeatureCache

    cache = FeatureCache(tmp_path / "cache")
    first, second = cache.features(CFG, images[:16]), cache.features(CFG, images[16:])
    assert cache.computed == 2
    pick = np.array([3, 20, 7, 17, 3])  # across both arrays, out of order, one image twice
    subset = cache.features(CFG, images[pick])
    assert cache.computed == 2 and cache.gathered == 1
    expected = np.concatenate([first, second])[pick]
    np.testing.assert_array_equal(subset, expected)

    other_process = FeatureCache(tmp_path / "cache")  # another trial on the node: reads the .rows files
    np.testing.assert_array_equal(other_process.features(CFG, images[pick]), expected)
    assert other_process.computed == 0 and other_process.gathered == 1

    memory_only = FeatureCache()
    memory_only.features(CFG, images[:16])
    memory_only.features(CFG, images[2:9])
    assert memory_only.computed == 1 and memory_only.gathered == 1


@pytest.mark.timeout(120)
def test_an_image_not_cached_is_computed_and_another_base_never_matches(images, tmp_path):
    from cxr_model.features import FeatureCache

    cache = FeatureCache(tmp_path / "cache")
    cache.features(CFG, images[:16])
    changed = images[:4].copy()
    changed[0, 0, 0, 0] ^= 1  # one pixel: another image
    cache.features(CFG, changed)
    assert cache.computed == 2 and cache.gathered == 0
    cache.features(CFG, images[:4], seed=1)  # another random base: its features differ
    assert cache.computed == 3
