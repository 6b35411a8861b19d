"""`cxr prepare SOURCE OUT`: a chest X-ray folder -> verified, patient-split, sharded data set.

    cxr prepare data/chest_xray runs/prepared --image-size 224
    cxr_datasets.prepare("data/chest_xray", "runs/prepared", image_size=224)   # returns the manifest
    cxr prepare rsna runs/rsna --labels rsna/stage_2_train_labels.csv   # a label file: docs/ARCHIVES.md

    cxr prepare s3://bucket/chest_xray s3://bucket/prepared         # any pyarrow.fs URI

Steps: discover files (labels, official splits, patients) -> pass 1 on Ray Data: read and hash
every file (no decode) -> drop exact duplicates and test-patient leakage -> patient-grouped,
stratified splits -> pass 2 on Ray Data, streaming: one task per shard reads, decodes,
grayscales, resizes and writes it (Parquet and/or TFRecord) -> EDA plots, manifest.json
(decode.py). The rules see every file before any row is final; the driver holds metadata only,
and decoded pixels never enter the object store.

A Ray instance that prepare started for itself shuts down in the background once the shards are
written, while the EDA plots are drawn and the manifest is written (the manifest's
`ray_stop_wait` is whatever of the shut-down was left to wait for).

Everything is written to a hidden folder beside OUT and renamed into place at the end, so an
interrupted run never leaves a half-written OUT (a killed run, or one interrupted twice while its
writer threads finish, may leave `.OUT.partial-*` behind, which is safe to delete).
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import functools
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from . import splits as split_rules
from .config import CLASS_NAMES, SCHEMA_VERSION, SPLITS, PrepareConfig, label_names
from .decode import HashColumns, LocalRay, Written, hash_files, write_pass
from .discover import Discovery, FilePaths, discover, patient_id_rules
from .eda import sample_rows, write_eda
from .errors import ConfigError, CxrError
from .shards import MANIFEST, manifest_totals, write_manifest
from .storage import Location, list_files
from .versions import package_versions


def prepare(source: str | os.PathLike, out: str | os.PathLike, cfg: PrepareConfig | None = None, *,
            overwrite: bool = False, verbose: bool = True, **options) -> dict:
    """Prepare `source` into `out` and return the manifest (also written to OUT/manifest.json).

    Settings: a `PrepareConfig`, or its fields as keywords (`prepare(src, out, image_size=64,
    seed=0)`), not both; the dataclass is the one list of them and of their defaults."""
    if options:
        if cfg is not None:
            raise ConfigError("give prepare() a PrepareConfig or its fields as keywords, not both")
        unknown = set(options) - {f.name for f in dataclasses.fields(PrepareConfig)}
        if unknown:
            raise ConfigError(f"unknown prepare option(s): {', '.join(sorted(unknown))} "
                              "(the fields of PrepareConfig)")
        if options.get("labels") is not None:
            options["labels"] = str(options["labels"])
        cfg = PrepareConfig(**options)
    return run(source, out, cfg or PrepareConfig(), overwrite=overwrite, verbose=verbose)


def run(source: str | os.PathLike, out: str | os.PathLike, cfg: PrepareConfig,
        overwrite: bool = False, verbose: bool = True) -> dict:
    """`prepare` with a ready-made config (what the CLI calls). SOURCE and OUT: folders or
    pyarrow.fs URIs (s3://, gs://, file://, ...)."""
    clock = StageClock()
    src, dst = Location.of(source), Location.of(out)
    check_output(src, dst, overwrite)
    with clock("discover"):
        found = _discover(src, cfg)
    _say(verbose, f"found {len(found.files)} images under {src} ({found.layout} layout, "
                  f"{found.mirror_copies_skipped} nested copies skipped, "
                  f"{len(found.rejected)} files rejected)")
    local_ray = LocalRay(cfg.num_cpus)
    fs = None if src.local else src.fs
    try:
        with clock("ray_start"):
            local_ray.start()
        with staging(dst) as tmp:
            with clock("hash"):
                table, hashes = _hash(found, cfg, tmp, fs, verbose)
            facts = _discovery_facts(found)
            # The table holds the same strings: the per-file records go (~80 bytes a file).
            found.files.clear()
            with clock("select"):
                candidates, report = _select(table, hashes, found.layout, cfg)
            with clock("decode_and_write"):
                paths = FilePaths(found.base, table["rel_path"].to_numpy())
                written = write_pass(candidates, paths, hashes, tmp, cfg, fs=fs,
                                     sample_positions=sample_rows(candidates, cfg.seed).index,
                                     verbose=verbose)
            local_ray.stop()  # Ray's work is done: its shut-down overlaps with the EDA
            accepted, samples = _apply_decode(table, candidates, written, found.layout, report,
                                              cfg.image_size)
            manifest = _manifest(src, cfg, facts, table, accepted, report)
            manifest["shards"] = written.shards
            n_files = len(table)
            del table, hashes, paths, found, candidates  # the per-file lists the EDA needs no more
            with clock("eda"):
                _write_eda(accepted, samples, tmp, manifest)
            with clock("ray_stop_wait"):
                local_ray.join()
            manifest.update(_timing(n_files, clock))
            write_manifest(tmp, manifest)
    finally:
        local_ray.stop()
        local_ray.join()
    if verbose:
        print(summary_line(manifest, dst), flush=True)
        _say(verbose, f"details: {dst.child(MANIFEST)}, plots and summary: {dst.child('eda')}/")
    return manifest


def _discover(source: Location, cfg: PrepareConfig) -> Discovery:
    """The folder layout, or the archive's label file (`--labels`, local SOURCE only)."""
    if cfg.labels is None:
        return discover(source, follow_links=cfg.follow_links)
    if not source.local:
        raise CxrError(f"--labels needs a local SOURCE folder, got {source}")
    from .labels import read_labels  # only for label files

    return read_labels(source.local, cfg.labels, cfg.labels_format, negatives=cfg.negatives,
                       uncertain=cfg.uncertain, views=cfg.views, follow_links=cfg.follow_links)


class StageClock:
    """Wall time per named stage, plus the total since creation (the manifest's `stage_s`). After
    each stage the memory its temporaries freed goes back to the OS (`release_freed_memory`)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        began = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(time.perf_counter() - began, 3)
            release_freed_memory()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def release_freed_memory() -> None:
    """Return the heap pages that freed objects left behind to the OS (glibc's `malloc_trim`).

    glibc keeps freed heap memory resident for reuse, and once a large array has been freed it
    serves arrays of up to that size from the heap instead of giving each its own mapping (a
    per-file column is 1.6 MB at 200,000 files), so without this the driver's resident memory
    keeps every stage's temporaries: measured at 200,000 files, the peak before the EDA fell by
    ~40 MB. Dask's workers trim for the same reason. A no-op where the C library has no
    malloc_trim (macOS, musl)."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is not None:
        trim(0)


@functools.cache
def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def summary_line(manifest: dict, out: str | os.PathLike | Location) -> str:
    """One line: accepted, rejected, duplicates (and test-patient leaks) removed, time, rate."""
    accepted, rejected, removed = manifest_totals(manifest)
    overlap = manifest.get("patient_overlap") or {}
    leaked = overlap.get("images_removed_from_train", 0)
    leak_note = f", {leaked} train images of test patients removed" if leaked else ""
    return (f"prepared {out}: {accepted} accepted, {rejected} rejected, "
            f"{removed} duplicates removed{leak_note}, {manifest['elapsed_s']:.1f} s, "
            f"{manifest['images_per_s']:.0f} img/s")


def check_output(source: Location, out: Location, overwrite: bool) -> None:
    """Refuse to clobber: an existing OUT needs --overwrite and must look like a prepared folder."""
    if source.is_inside(out):
        raise CxrError(f"output {out} would contain the source {source}; choose another OUT")
    if out.is_inside(source):
        raise CxrError(f"output {out} is inside the source {source}; its files would be read as "
                       "input next time: choose an OUT outside SOURCE")
    kind = out.kind()
    if kind == "missing":
        return
    if not overwrite:
        raise CxrError(f"output {out} already exists; pass --overwrite to replace it")
    if kind != "dir" or (out.child(MANIFEST).kind() != "file" and list_files(out)):
        raise CxrError(f"refusing to replace {out}: it is not a prepared folder (no {MANIFEST})")


@contextlib.contextmanager
def staging(out: Location) -> Iterator[Location]:
    """A hidden sibling folder that becomes OUT only if the block finishes without an error
    (a rename: atomic on a local or shared file system; on an object store a copy, after which
    OUT is complete or absent, never mixed)."""
    tmp = out.sibling(f".{out.name}.partial-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        tmp.remove_tree()
        raise
    old = out.sibling(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    if out.kind() != "missing":
        out.fs.move(out.path, old.path)  # OUT is briefly absent, never half-written
    out.fs.move(tmp.path, out.path)
    old.remove_tree()


def _hash(found: Discovery, cfg: PrepareConfig, work: Location, fs,
          verbose: bool) -> tuple[pd.DataFrame, HashColumns]:
    """File metadata joined with pass 1's results: one row per discovered file (its index is the
    file's number), and every file's sha256 apart (`HashColumns`). The file columns hold the very
    strings of `found.files` (object columns: no second copy of every path and patient id)."""
    hashes = hash_files(found.paths(), cfg, work, fs=fs, verbose=verbose)
    table = hashes.table()
    for name, dtype in FILE_COLUMNS.items():
        table[name] = pd.Series([getattr(f, name) for f in found.files], dtype=dtype)
    return table, hashes


# The SourceFile fields the rules and the manifest read, and their column types.
FILE_COLUMNS = {"rel_path": object, "label": "int64", "official_split": object,
                "patient_id": object, "patient_from_name": bool}


def _discovery_facts(found: Discovery) -> dict:
    """What the manifest says of discovery, taken before its per-file records are dropped."""
    return {"discovery": found.summary(), "rejected": found.rejected, "labels": found.labels,
            "patient_id_rule": (found.labels["patient_rule"] if found.labels else
                                patient_id_rules(f.rel_path for f in found.files))}


def _select(table: pd.DataFrame, hashes: HashColumns, layout: str,
            cfg: PrepareConfig) -> tuple[pd.DataFrame, dict]:
    """Readable, de-duplicated rows with their split (pass 2 decodes them); and what the rules
    removed."""
    mode = "official" if (cfg.split == "official" and layout == "official") else "random"
    check_rejections(table, layout)
    # Only the columns the rules read: each rule's copy of the rows is then ~50 bytes a file.
    usable = table.loc[table["reason"].isna(), [*FILE_COLUMNS, "content"]]
    usable, duplicates = split_rules.drop_duplicates(usable, official=mode == "official",
                                                     key="content", key_text=hashes.hex)
    overlap = None
    if mode == "official":
        usable, overlap = split_rules.drop_test_patients_from_train(usable)
    usable = usable.assign(split=split_rules.assign_splits(
        usable, mode, cfg.val_fraction, cfg.test_fraction, cfg.seed))
    has_test = bool((usable["official_split"] == "test").any())
    warnings = split_rules.check_splits(usable, mode, source_has_test=has_test)
    rows = _shard_rows(usable)
    return rows, {"mode": mode, "duplicates": duplicates, "patient_overlap": overlap,
                  "split_warnings": warnings}


UNREADABLE_HINT = "SOURCE must be on storage that every node sees: a shared file system or s3://"


def check_rejections(table: pd.DataFrame, layout: str) -> None:
    """One clear line when every file of a split (or of a flat source) was rejected: saying why,
    and where the files were unreadable, which node could not read them."""
    groups = table.groupby("official_split") if layout == "official" else [("", table)]
    for split, rows in groups:
        if not len(rows) or rows["reason"].isna().any():
            continue
        what = f"all {len(rows)} {split + ' ' if split else ''}images"
        unreadable = rows["reason"].str.startswith("unreadable")
        if unreadable.all():
            nodes = ", ".join(sorted(set(rows["node"])))
            raise CxrError(f"{what} were unreadable on node {nodes} (e.g. {rows['rel_path'].iloc[0]}: "
                           f"{rows['reason'].iloc[0]}): {UNREADABLE_HINT}")
        common = rows["reason"].value_counts().index[0]
        example = rows.loc[rows["reason"] == common, "rel_path"].iloc[0]
        raise CxrError(f"{what} were rejected ({rows['reason'].nunique()} reasons; most often "
                       f"'{common}', e.g. {example}); the manifest of a run lists each file")


# What the driver keeps of each row that pass 2 decodes: `file`, the row's index in the discovery's
# files (its path, its sha256). The shard columns that follow from these (the label's name, the
# hex sha256, the prepared size) are made a batch at a time (decode._input_batch), not kept.
ROW_COLUMNS = ["source_path", "label", "patient_id", "split", "patient_from_name", "file"]


def _shard_rows(usable: pd.DataFrame) -> pd.DataFrame:
    """The rows pass 2 decodes (ROW_COLUMNS: `rel_path` renamed, not copied), sorted by split
    and path; the columns no later step reads are dropped before the sort copies the rest."""
    rows = usable.rename(columns={"rel_path": "source_path"}).assign(
        file=usable.index.to_numpy())[ROW_COLUMNS]
    # Two stable sorts (path, then split) rather than sort_values on both: pandas sorts several
    # string keys through Arrow-backed categories, which leaves megabytes in Arrow's allocator.
    by_path = np.argsort(rows["source_path"].to_numpy(), kind="stable")
    split_rank = rows["split"].map(SPLITS.index).to_numpy()[by_path]
    return rows.take(by_path[np.argsort(split_rank, kind="stable")]).reset_index(drop=True)


def _apply_decode(table: pd.DataFrame, candidates: pd.DataFrame, written: Written, layout: str,
                  report: dict, image_size: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pass 2's results folded into the driver's tables: the files it rejected get their reason
    and node (the manifest lists them; a split of which nothing decoded is an error, as one that
    nothing could read), the accepted rows their original size and mode and their label's name.
    Returns the accepted rows (the shards' rows, in shard order) and the EDA's sample rows with
    their pixels."""
    if written.rejected:
        files = candidates["file"].to_numpy()[[r["pos"] for r in written.rejected]]
        table.loc[files, "reason"] = [r["reason"] for r in written.rejected]
        table.loc[files, "node"] = [r["node"] for r in written.rejected]
        check_rejections(table, layout)
    # Set in place, not `assign`: every copy of the rows is ~0.15 KB a file more at the peak. With
    # no file rejected here (the usual case) the accepted rows are the candidates themselves.
    accepted = candidates if len(written.pos) == len(candidates) else \
        candidates.take(written.pos).reset_index(drop=True)
    accepted["label_name"] = pd.Series(label_names(accepted["label"].to_numpy()),
                                       index=accepted.index, dtype=object)
    accepted["orig_width"] = written.orig_width
    accepted["orig_height"] = written.orig_height
    accepted["orig_mode"] = pd.Series(written.orig_mode, index=accepted.index)
    if written.rejected:
        has_test = bool((accepted["split"] == "test").any())  # the official test, in that mode
        report["split_warnings"] = split_rules.check_splits(accepted, report["mode"],
                                                            source_has_test=has_test)
    picked = sorted(written.samples)
    samples = candidates.take(picked).assign(
        image=[written.samples[p] for p in picked], height=image_size, width=image_size,
        label_name=label_names(candidates["label"].to_numpy()[picked]))
    return accepted, samples


def _write_eda(rows: pd.DataFrame, samples: pd.DataFrame, out: Location, manifest: dict) -> None:
    """The EDA plots and summary, under OUT/eda/ (drawn in a local temporary folder and copied
    for a URI OUT)."""
    with contextlib.ExitStack() as cleanup:
        eda_dir = out.local / "eda" if out.local else \
            Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="cxr-eda-")))
        written = write_eda(eda_dir, rows, manifest, samples)
        if not out.local:
            out.child("eda").mkdir()
            for name in written:
                out.child("eda", name).write_bytes((eda_dir / name).read_bytes())


def _manifest(source: Location, cfg: PrepareConfig, facts: dict, table: pd.DataFrame,
              rows: pd.DataFrame, report: dict) -> dict:
    """Everything but `shards` (added once they are written) and the timing. `facts`:
    `_discovery_facts`."""
    counts = split_rules.split_counts(rows)
    rejected = facts["rejected"] + [
        {"path": r.rel_path, "reason": r.reason, "node": r.node}
        for r in table[table["reason"].notna()].itertuples()
    ]
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": str(source),
        "options": cfg.to_dict(),
        "split_used": report["mode"],
        "counts": counts,
        "patients": split_rules.patients_per_split(rows),
        "class_weights": split_rules.class_weights(counts),
        "class_names": list(CLASS_NAMES),
        "image": {"height": cfg.image_size, "width": cfg.image_size, "channels": 1,
                  "dtype": "uint8", "encoding": "raw row-major bytes"},
        "discovery": facts["discovery"],
        "patients_not_from_name": int((~rows["patient_from_name"]).sum()),
        "patient_id_rule": facts["patient_id_rule"],
        "labels": facts["labels"],
        "split_warnings": report["split_warnings"],
        "rejected": sorted(rejected, key=lambda r: r["path"]),
        "duplicates": report["duplicates"],
        "patient_overlap": report["patient_overlap"],
        "shards": [],
        "versions": _versions(cfg),
    }


def _timing(n_files: int, clock: StageClock) -> dict:
    elapsed = clock.elapsed()
    return {"elapsed_s": round(elapsed, 3), "images_per_s": round(n_files / max(elapsed, 1e-9), 1),
            "stage_s": dict(clock.seconds)}


def _versions(cfg: PrepareConfig) -> dict:
    """Installed versions of what shaped the output (decoders, writers), for the manifest."""

    packages = ["cxr-tune", "ray", "pillow", "numpy", "pandas", "pyarrow", "pydicom"]
    return package_versions(packages + ([] if cfg.format == "parquet" else ["tensorflow"]))


def _say(verbose: bool, message: str) -> None:
    if verbose:
        print(message, file=sys.stderr, flush=True)
