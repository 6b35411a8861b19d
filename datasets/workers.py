"""The bodies of `cxr prepare`'s two Ray Data passes: hash a batch of files; decode a batch.

Plain functions over Arrow tables (decode.py hands them to `Dataset.map_batches`), importing only
what a worker needs: numpy, pyarrow, Pillow and the image module. The reading and decoding rules
are `image.py`'s, the ones `cxr predict` and `cxr serve` apply: regular files only, each read up to
`image.MAX_FILE_BYTES`, Pillow limited to JPEG/PNG, DICOM bounded before its pixel data.

- `hash_batch` (pass 1) reads each file and hashes it; nothing is decoded. A file that cannot be
  read comes back with its `reason` and the node that tried it. The driver decides duplicates and
  the patient splits from these rows and the discovery records: every file is seen before any
  row is final.
- `decode_batch` (pass 2) reads the accepted rows' files again, checks they still have the hash
  of pass 1, decodes, converts to grayscale and resizes (`image.preprocess_bytes`), and returns
  the shard rows with their pixels, which the shard writer (raydata.ShardSink) writes in the
  same task. A file rejected here is dropped from the stream and its reason is written to a
  small JSON file under the output's staging folder (`rejected`), named by the batch (an empty
  list when none is): the stream then carries only shard rows, and a retried batch rewrites the
  same file.
"""
from __future__ import annotations

import hashlib
import json
import socket

import pyarrow as pa

from .errors import ImageRejected
from .image import preprocess_bytes, read_file_bytes

# What pass 1 returns per file (an Arrow table; decode.HashColumns stores it by `idx`): the raw
# 32-byte digest, not its 64-character hex (the driver keeps one per file: 32 bytes, no object).
HASH_SCHEMA = pa.schema([("idx", pa.int64()), ("reason", pa.string()),
                         ("sha256", pa.binary(32)), ("node", pa.string())])
# What pass 2 adds to its input's shard columns for each accepted row.
DECODED_FIELDS = [("image", pa.binary()), ("orig_width", pa.int32()), ("orig_height", pa.int32()),
                  ("orig_mode", pa.string())]


def hash_batch(batch: pa.Table, fs=None) -> pa.Table:
    """Pass 1 over a batch with columns `idx`, `path`: each file's sha256, or why it cannot be read
    (`fs`: None for local paths, else the pyarrow file system of a URI source)."""
    node = node_ip()
    reasons: list[str | None] = []
    hashes: list[bytes | None] = []
    for path in batch.column("path").to_pylist():
        try:
            hashes.append(hashlib.sha256(read_file_bytes(path, fs)).digest())
            reasons.append(None)
        except ImageRejected as exc:
            hashes.append(None)
            reasons.append(exc.reason)
        except Exception as exc:  # a bug or a library surprise must not lose the other files
            hashes.append(None)
            reasons.append(f"unexpected error: {type(exc).__name__}: {exc}"[:300])
    return pa.table([batch.column("idx"), pa.array(reasons, pa.string()),
                     pa.array(hashes, pa.binary(32)), pa.array([node] * batch.num_rows, pa.string())],
                    schema=HASH_SCHEMA)


def decode_batch(batch: pa.Table, fs, image_size: int, resize: str, max_pixels: int, min_size: int,
                 rejected) -> pa.Table:
    """Pass 2 over a batch of shard rows (`pos`, `path` and the shard columns but the decoded
    ones): the accepted rows, without `path`, with `image` (raw uint8 [S, S] bytes) and the
    original size and mode. `rejected`: the storage.Location of the folder where a batch with
    rejected files writes `<first pos>.json`: [{"pos", "reason", "node"}, ...]."""
    keep: list[int] = []
    images: list[bytes] = []
    widths: list[int] = []
    heights: list[int] = []
    modes: list[str] = []
    failures: list[dict] = []
    paths = batch.column("path").to_pylist()
    expected = batch.column("source_sha256").to_pylist()
    positions = batch.column("pos").to_pylist()
    for row, (path, sha) in enumerate(zip(paths, expected)):
        try:
            data = read_file_bytes(path, fs)
            if hashlib.sha256(data).hexdigest() != sha:
                raise ImageRejected("changed while prepare ran (its sha256 differs from the first pass)")
            image, info = preprocess_bytes(data, image_size, resize, name=path,
                                           max_pixels=max_pixels, min_size=min_size)
        except ImageRejected as exc:
            failures.append({"pos": positions[row], "reason": exc.reason})
            continue
        except Exception as exc:  # a bug or a library surprise must not lose the other files
            failures.append({"pos": positions[row],
                             "reason": f"unexpected error: {type(exc).__name__}: {exc}"[:300]})
            continue
        keep.append(row)
        images.append(image.tobytes())
        widths.append(info["orig_width"])
        heights.append(info["orig_height"])
        modes.append(info["orig_mode"])
    if failures:
        node = node_ip()
        for failure in failures:
            failure["node"] = node
    # Written for every batch, [] when none failed: a retried batch then replaces what an
    # earlier attempt of it found (a file it could not read on a node since lost).
    rejected.child(f"{positions[0]:012d}.json").write_bytes(json.dumps(failures).encode())
    out = batch.drop_columns(["path"]).take(pa.array(keep, pa.int64()))
    for (name, kind), values in zip(DECODED_FIELDS, (images, widths, heights, modes)):
        out = out.append_column(pa.field(name, kind), pa.array(values, kind))
    return out


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
