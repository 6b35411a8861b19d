"""The bodies of `cxr prepare`'s Ray tasks: decode a chunk of files; write one shard.

Plain functions (decode.py wraps them in `ray.remote`), importing only what a task needs, so a
fresh worker process is ready quickly: numpy, Pillow and the image module for decoding; pandas
and pyarrow only once a shard is written.

Decoded pixels never pass through the driver. `decode_chunk` returns two objects: the metadata of
its files (small; the driver collects it for the duplicate and split rules) and one uint8 array of
the accepted images, which stays in Ray's object store on the node that decoded it (spilled to
disk by Ray when the store is full). `write_shard` receives the arrays its rows come from and
writes its shard straight to OUT.
"""
from __future__ import annotations

import hashlib
import socket

import numpy as np

from .errors import ImageRejected
from .image import preprocess_bytes, read_file_bytes

# The metadata a decode task returns for its files: a dict of these columns (lists, one entry per
# file, in the order of its items) plus "node", the one address of the node that ran it
# (`decode_task`). Columns, not one tuple per file: the driver copies them straight into its
# per-file arrays.
META_COLUMNS = ("idx", "reason", "sha256", "orig_width", "orig_height", "orig_mode", "pos")


def decode_chunk(items: list[tuple[int, str]], fs, image_size: int, resize: str, max_pixels: int,
                 min_size: int) -> tuple[dict, np.ndarray]:
    """(metadata columns, uint8 [accepted, S*S]) for (idx, path) items. `fs`: None for local
    paths, else the pyarrow file system of a URI source. Every failure becomes its file's
    `reason`; a rejected file has `orig_*` -1 (None for the mode) and `pos` -1."""
    meta: dict = {name: [] for name in META_COLUMNS}
    images: list = []
    for idx, path in items:
        sha = reason = None
        try:
            data = read_file_bytes(path, fs)
            sha = hashlib.sha256(data).hexdigest()
            image, info = preprocess_bytes(data, image_size, resize, name=path,
                                           max_pixels=max_pixels, min_size=min_size)
        except ImageRejected as exc:
            reason = exc.reason
        except Exception as exc:  # a bug or a library surprise must not lose the other files
            reason = f"unexpected error: {type(exc).__name__}: {exc}"[:300]
        if reason is None:
            row = (sha, info["orig_width"], info["orig_height"], info["orig_mode"], len(images))
            images.append(image.reshape(-1))
        else:
            row = (sha, -1, -1, None, -1)
        for name, value in zip(META_COLUMNS, (int(idx), reason, *row)):
            meta[name].append(value)
    pixels = np.stack(images) if images else np.empty((0, image_size * image_size), np.uint8)
    return meta, pixels


def decode_task(*args) -> tuple[dict, np.ndarray]:
    """`decode_chunk` as a Ray task: its metadata also names the node that decoded the files."""
    meta, pixels = decode_chunk(*args)
    meta["node"] = node_ip()
    return meta, pixels


def write_shard(rows, out, rel_path: str, split: str, fmt: str, *chunks: np.ndarray) -> dict:
    """Write one shard of `rows` (PARQUET_SCHEMA columns but `image`, plus `_chunk`: index into
    `chunks`, `_pos`: row in that array) to `out` (a storage.Location); its manifest entry."""
    from .shards import parquet_bytes, shard_entry, tfrecord_bytes

    images = [chunks[c][p].tobytes() for c, p in zip(rows["_chunk"], rows["_pos"])]
    table = rows.drop(columns=["_chunk", "_pos"]).assign(image=images)
    data = parquet_bytes(table) if fmt == "parquet" else tfrecord_bytes(table)
    out.child(rel_path).write_bytes(data)
    return shard_entry(rel_path, split, len(table), fmt, data)


def pick_images(positions: list[int], chunk: np.ndarray) -> list[bytes]:
    """A few images of one decoded chunk, as bytes (the EDA's sample grid)."""
    return [chunk[p].tobytes() for p in positions]


def node_ip() -> str:
    """The address of the node this runs on (what Ray calls it), for rejections."""
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001  outside Ray, or an older API: the host's own address
        try:
            return socket.gethostbyname(socket.gethostname())
        except OSError:
            return "unknown"
