"""Shard files and the manifest: writing them (`prepare`) and loading them back (`load`).

Layout of a prepared folder:
    OUT/manifest.json                      what happened to every file; shard checksums
    OUT/<split>/part-00000.parquet         split in train, val, test; at most `rows_per_shard` rows each
    OUT/<split>/part-00000.tfrecord        with --format tfrecord|both
    OUT/eda/*.png, OUT/eda/summary.md

    images, labels, meta = cxr_datasets.load("runs/prepared", "train")   # verified against the manifest
    images, labels, meta = cxr_datasets.load("s3://bucket/prepared", "train")  # any pyarrow.fs URI

A prepared folder is read through `storage.Location` wherever it lives: a local folder with the
OS's own reads (no extra copy), a URI (s3://, gs://, file://, ...) through its pyarrow file system.
Either way the manifest's sha256 of every shard is checked before a byte of it is used, and
`manifest_hash` is the same for a folder and its copy in a bucket.

Parquet `image` column: the raw uint8 pixels of the [S, S] image (row-major), with `height` and
`width` beside it. Not PNG: every trial loads whole splits into memory, and raw bytes become a numpy
array with no decode at all (PNG would cost ~1 ms per image per load); Parquet's zstd compression
still keeps the files about PNG-sized on disk. TFRecords hold PNG bytes instead, because that is
what `tf.io.decode_png` in plain tf.data code expects.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .config import SPLITS
from .errors import CxrError
from .storage import Location

MANIFEST = "manifest.json"
PARQUET_SCHEMA = pa.schema([
    ("image", pa.binary()),  # raw uint8 [height, width], row-major
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("label", pa.int64()),  # 0 NORMAL, 1 PNEUMONIA
    ("label_name", pa.string()),
    ("patient_id", pa.string()),
    ("split", pa.string()),
    ("source_path", pa.string()),  # relative to the manifest's `source`
    ("source_sha256", pa.string()),
    ("orig_width", pa.int32()),
    ("orig_height", pa.int32()),
    ("orig_mode", pa.string()),
])
META_COLUMNS = [f.name for f in PARQUET_SCHEMA if f.name != "image"]


# --- writing -------------------------------------------------------------------------------------

def write_tfrecord_shards(rows: pd.DataFrame, split: str, out: str | os.PathLike,
                          rows_per_shard: int) -> list[dict]:
    """`rows` as OUT/<split>/part-NNNNN.tfrecord (what `cxr prepare --format tfrecord` writes,
    without Ray: for tests and tools); returns the manifest entries in shard order."""
    folder = Location.of(out)
    entries = []
    for number, start in enumerate(range(0, len(rows), rows_per_shard)):
        chunk = rows.iloc[start:start + rows_per_shard]
        rel_path = f"{split}/part-{number:05d}.tfrecord"
        data = tfrecord_bytes(chunk)
        folder.child(split).mkdir()
        folder.child(rel_path).write_bytes(data)
        entries.append(shard_entry(rel_path, split, len(chunk), "tfrecord", data))
    return entries


def parquet_bytes(chunk: pd.DataFrame) -> bytes:
    """One Parquet shard (PARQUET_SCHEMA columns of `chunk`) as bytes: the writer hashes exactly
    what it stores, on any file system."""
    # No pandas metadata: readers get the Arrow types above, not the writer's pandas dtypes.
    return parquet_table_bytes(pa.Table.from_pandas(chunk[PARQUET_SCHEMA.names], schema=PARQUET_SCHEMA,
                                                    preserve_index=False))


def parquet_table_bytes(table: pa.Table) -> bytes:
    """One Parquet shard of an Arrow table with PARQUET_SCHEMA (what `cxr prepare`'s shard writer
    calls): no schema metadata, zstd, one row group; the same rows give the same bytes. The pixel
    column gets neither a dictionary (every image differs: Parquet hashed each one before giving
    up on it) nor min/max statistics (no reader prunes on pixels): half the writer's time."""
    table = table.replace_schema_metadata()
    sink = pa.BufferOutputStream()
    others = [name for name in table.column_names if name != "image"]
    pq.write_table(table, sink, compression="zstd", use_dictionary=others, write_statistics=others)
    return sink.getvalue().to_pybytes()


def tfrecord_bytes(chunk: pd.DataFrame) -> bytes:
    """One TFRecord shard as bytes (TensorFlow's writer needs a path: a private temporary file)."""

    import tensorflow as tf

    with tempfile.TemporaryDirectory(prefix="cxr-tfrecord-") as tmp:
        path = os.path.join(tmp, "part.tfrecord")
        with tf.io.TFRecordWriter(path) as writer:
            for row in chunk.itertuples(index=False):
                # deterministic: protobuf writes the feature map in an order that differs from
                # process to process otherwise, and identical inputs must give identical shards
                # (the manifest hash and a sweep's resume check depend on it)
                writer.write(_example(tf, row).SerializeToString(deterministic=True))
        with open(path, "rb") as handle:
            return handle.read()


def shard_entry(rel_path: str, split: str, rows: int, fmt: str, data: bytes) -> dict:
    """The manifest's record of one shard."""
    return {"path": rel_path, "split": split, "format": fmt, "rows": rows, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest()}


def tfrecord_feature_spec() -> dict:
    """The parsing spec for `tf.io.parse_single_example` (import TensorFlow before calling)."""
    import tensorflow as tf

    return {
        "image": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "label_name": tf.io.FixedLenFeature([], tf.string),
        "patient_id": tf.io.FixedLenFeature([], tf.string),
        "source_path": tf.io.FixedLenFeature([], tf.string),
        "height": tf.io.FixedLenFeature([], tf.int64),
        "width": tf.io.FixedLenFeature([], tf.int64),
    }


def write_manifest(out, manifest: dict) -> None:
    """OUT/manifest.json; `out` is a folder or a `storage.Location`."""
    text = json.dumps(manifest, indent=2) + "\n"
    Location.of(out).child(MANIFEST).write_bytes(text.encode())


def _example(tf, row):
    pixels = np.frombuffer(row.image, dtype=np.uint8).reshape(row.height, row.width)
    feature = {
        "image": _bytes_feature(tf, _png_bytes(pixels)),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(row.label)])),
        "label_name": _bytes_feature(tf, row.label_name.encode()),
        "patient_id": _bytes_feature(tf, row.patient_id.encode()),
        "source_path": _bytes_feature(tf, row.source_path.encode()),
        "height": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(row.height)])),
        "width": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(row.width)])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature))


def _bytes_feature(tf, value: bytes):
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _png_bytes(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)  # lossless; level 1: fast
    return buffer.getvalue()


# --- reading -------------------------------------------------------------------------------------
# A prepared folder is a local path or any pyarrow.fs URI (s3://, gs://, file://): every read goes
# through one `storage.Location`, so both are the same code (plain paths use the OS's own reads).

def read_manifest(prepared_dir: str | os.PathLike | Location) -> dict:
    """The manifest of a prepared folder (a path or URI); CxrError if the folder is not one."""
    prepared = Location.of(prepared_dir)
    try:
        return json.loads(_manifest_bytes(prepared))
    except ValueError as exc:
        raise CxrError(f"cannot read {prepared.child(MANIFEST)}: {exc}") from None


def manifest_totals(manifest: dict) -> tuple[int, int, int]:
    """(accepted, rejected, duplicates removed): the numbers every summary of a manifest starts with."""
    accepted = sum(sum(c.values()) for c in manifest["counts"].values())
    removed = sum(d["action"] == "removed" for d in manifest["duplicates"])
    return accepted, len(manifest["rejected"]), removed


def manifest_hash(prepared_dir: str | os.PathLike | Location) -> str:
    """sha256 of manifest.json: names one exact prepared data set (model cards record it); a
    folder and its copy at a URI have the same hash."""
    return hashlib.sha256(_manifest_bytes(Location.of(prepared_dir))).hexdigest()


def _manifest_bytes(prepared: Location) -> bytes:
    return prepared.child(MANIFEST).read_file(
        MANIFEST, missing=f"not a prepared folder (no {MANIFEST}): {prepared}; run `cxr prepare` first")


def load(prepared_dir: str | os.PathLike | Location, split: str, verify: bool = True):
    """(images uint8 [N, S, S, 1], labels int64 [N], meta DataFrame) of one split.

    `prepared_dir`: a local folder or a pyarrow.fs URI (s3://bucket/prepared, file:///data/p).
    With `verify`, each shard's sha256 is checked against the manifest first: a damaged or swapped
    shard is a CxrError naming it, never silently wrong training data.
    """
    if split not in SPLITS:
        raise CxrError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    prepared = Location.of(prepared_dir)  # once: a URI's file system is resolved once per load
    manifest = read_manifest(prepared)
    shards = _parquet_shards(manifest, split, prepared)
    size = int(manifest["options"]["image_size"])
    # One array for the split, filled shard by shard: the loader holds the split's pixels once plus
    # one shard (at 200,000 images of 64 px, 0.8 GB and ~4 MB), not every shard's table and then
    # their concatenation (twice the pixels at its peak).
    images = np.empty((sum(int(s["rows"]) for s in shards), size, size, 1), np.uint8)
    metas, at = [], 0
    for shard in shards:
        table = _read_shard(prepared, shard, verify)
        rows = table.num_rows  # the manifest's count: _read_shard checked it
        images[at:at + rows] = _image_array(table.column("image"), size).reshape(rows, size, size, 1)
        at += rows
        metas.append(table.select(META_COLUMNS))
        del table
    meta = pa.concat_tables(metas).to_pandas()  # _parquet_shards found at least one shard
    labels = meta["label"].to_numpy(dtype=np.int64)
    return images, labels, meta


def _parquet_shards(manifest: dict, split: str, prepared: Location) -> list[dict]:
    shards = [s for s in manifest.get("shards", [])
              if s["split"] == split and s.get("format", "parquet") == "parquet"]
    if not shards:
        fmt = manifest.get("options", {}).get("format")
        hint = " (prepared with --format tfrecord: re-run with --format parquet or both)" \
            if fmt == "tfrecord" else ""
        raise CxrError(f"no Parquet shards for split {split!r} in {prepared}{hint}")
    return shards


def _read_shard(prepared: Location, shard: dict, verify: bool) -> pa.Table:
    path = prepared.child(shard["path"])
    if verify:  # read once: hash the bytes, then parse the same bytes
        data = path.read_file("shard", missing=f"shard missing: {path}; re-run `cxr prepare`")
        actual = hashlib.sha256(data).hexdigest()
        if actual != shard["sha256"]:
            raise CxrError(f"damaged shard {path}: its sha256 does not match the manifest "
                           f"({actual[:12]}... != {shard['sha256'][:12]}...); re-run `cxr prepare`")
        source, filesystem = pa.BufferReader(data), None
    else:
        if path.kind() != "file":
            raise CxrError(f"shard missing: {path}; re-run `cxr prepare`")
        source, filesystem = path.path, path.fs
    try:
        table = pq.read_table(source, filesystem=filesystem)
    except (OSError, pa.ArrowException) as exc:
        raise CxrError(f"damaged shard {path}: {exc}") from None
    if table.num_rows != shard["rows"]:
        raise CxrError(f"damaged shard {path}: {table.num_rows} rows, manifest says {shard['rows']}")
    return table


def _image_array(column: pa.ChunkedArray, size: int) -> np.ndarray:
    """All images of a binary column as one uint8 array, without a Python loop over rows."""
    parts = []
    for chunk in column.chunks:
        if not len(chunk):
            continue
        # A binary column is an offsets buffer (one more than rows) and one data buffer.
        wide = pa.types.is_large_binary(chunk.type)
        offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64 if wide else np.int32)
        offsets = offsets[chunk.offset:chunk.offset + len(chunk) + 1]
        if not np.all(np.diff(offsets) == size * size):
            raise CxrError(f"shard images are not all {size}x{size}: the manifest and shards disagree")
        data = np.frombuffer(chunk.buffers()[2], dtype=np.uint8)
        parts.append(data[offsets[0]:offsets[-1]])
    return np.concatenate(parts) if parts else np.empty(0, np.uint8)
