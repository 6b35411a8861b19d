"""The sweep's train + val data, loaded once into Ray's object store by a Ray task.

The driver holds a `SharedData`: an object reference and the image size, no pixels. Loaded on the
driver and handed to `tune.with_parameters`, the arrays would sit in the driver's memory twice (its
own copy and the object-store copy it writes, both counted in its RSS): at 200,000 images of 64 px
~1.5 GB for ~0.75 GB of pixels. A task that returns them leaves them in the object store once; the
worker that loaded them frees its copy when it returns. Every trial maps the arrays read-only
(zero-copy numpy views), as with an object the driver put. The driver maps them too, when it needs
them: the best trial's export reads val (threshold selection), with `--cv` the pool's out-of-fold
images, and `RUN/folds.csv` the pool's patient ids and folds.

A lost node that held the arrays is no loss: the driver owns the reference, so Ray re-runs the
task (lineage reconstruction) when a trial asks for them again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cxr_search.config import SearchConfig


@dataclass(frozen=True)
class SharedData:
    ref: Any  # ray.ObjectRef of a cxr_model.Data, or with --cv of a cxr_search.folds.CVPool
    image_size: int

    def get(self):
        """The data (numpy arrays mapped read-only from the object store, not copied)."""
        import ray

        return ray.get(self.ref)


def sweep_data(cfg: SearchConfig) -> SharedData:
    """Train + val of `cfg.prepared` in the object store; raises the loader's own error (a damaged
    shard, a missing manifest: one line) as it is, not wrapped in Ray's traceback. Ray must be
    connected (search.tuner.connect)."""
    import ray
    from ray.exceptions import RayTaskError

    # Two returns: the driver waits on the small one (under Ray Client, getting the data itself
    # would copy every pixel to the client).
    refs: Any = ray.remote(_load).options(name="cxr-load-sweep-data", num_returns=2).remote(cfg)
    size_ref, ref = refs  # num_returns=2: one ObjectRef each (Ray's stubs type one)
    try:
        image_size = ray.get(size_ref)
    except RayTaskError as exc:
        raise exc.cause from None
    return SharedData(ref, image_size=int(image_size))


def _load(cfg: SearchConfig):
    """(image size, what the trials train on: a `cxr_model.Data`, or with --cv a `CVPool` with
    each image's fold). The test split stays on disk."""
    if cfg.cv:
        from cxr_search.folds import load_pool

        data = load_pool(cfg.prepared, k=cfg.cv, seed=cfg.seed)
    else:
        from cxr_model import Data

        data = Data.from_prepared(cfg.prepared)
    return data.image_size, data


def share(data) -> SharedData:
    """Data that is already in this process (a benchmark's arrays), put into the object store."""
    import ray

    return SharedData(ray.put(data), image_size=int(data.image_size))
