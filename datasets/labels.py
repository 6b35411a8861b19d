"""Archives labelled by a file, not by NORMAL/PNEUMONIA folders: `cxr prepare SOURCE OUT --labels FILE`.

Each reader turns one archive's own, unmodified label file into the same `Discovery` that the
folder walk (`discover.discover`) yields, so duplicates, splits, decoding, shards and the manifest
work unchanged. The format is detected from the header (`detect_format`); `--labels-format` forces
one. Formats:
    csv       path,label[,patient_id][,split]: any export (label NORMAL/PNEUMONIA or 0/1)
    rsna      RSNA Pneumonia Detection: stage_2_train_labels.csv (+ stage_2_detailed_class_info.csv)
    nih       NIH ChestX-ray14: Data_Entry_2017[_v2020].csv (+ train_val_list.txt, test_list.txt)
    chexpert  CheXpert v1.0 / v1.0-small: train.csv (+ valid.csv, the test split)
Images are found below SOURCE: by their relative path (csv, chexpert) or by file name anywhere
(rsna, nih). A label row without its image and an image without a label row are counted, with a
few examples, in `Discovery.labels` (the manifest's `labels`), never fatal; a path that escapes
SOURCE is rejected with its row.
"""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import Any

from .config import CLASS_NAMES, SPLITS
from .config import LABEL_FORMATS as FORMATS
from .discover import Discovery, ImageWalk, SourceFile
from .errors import CxrError

EXAMPLES = 5  # examples kept per counted problem in the manifest
_POS, _NEG = CLASS_NAMES.index("PNEUMONIA"), CLASS_NAMES.index("NORMAL")


class _Tally:
    """What the rules did: rows per rule and label, rows excluded per reason, with examples."""

    def __init__(self, fmt: str, label_file: Path):
        self.info: dict[str, Any] = {"format": fmt, "label_file": str(label_file), "rules": {}, "excluded": {},
                     "missing_images": {"count": 0, "examples": []},
                     "unlabelled_images": {"count": 0, "examples": []}}
        self.rejected: list[dict] = []  # the manifest's `rejected`: rows whose path escapes SOURCE
        self.seen: set[str] = set()  # paths and file names of excluded rows: labelled, not "unlabelled"

    def rule(self, rule: str, description: str, label: int | None = None) -> None:
        entry = self.info["rules"].setdefault(rule, {"rule": description, "rows": 0})
        if label is not None:
            entry["label"] = CLASS_NAMES[label]
        entry["rows"] += 1

    def exclude(self, reason: str, example: str, seen: str | None = None) -> None:
        if seen:
            self.seen.add(seen)
        _count(self.info["excluded"].setdefault(reason, {"count": 0, "examples": []}), example)

    def missing(self, example: str) -> None:
        _count(self.info["missing_images"], example)


def _count(entry: dict, example: str) -> None:
    entry["count"] += 1
    if len(entry["examples"]) < EXAMPLES:
        entry["examples"].append(example)


def detect_format(label_file: str | os.PathLike) -> str:
    """The label file's format from its header (one of FORMATS); CxrError if none fits."""
    header = [h.strip() for h in _header(Path(label_file))]
    if header[:2] == ["patientId", "x"] and "Target" in header:
        return "rsna"
    if header[:2] == ["Image Index", "Finding Labels"]:
        return "nih"
    if header[:1] == ["Path"] and "Pneumonia" in header and "No Finding" in header:
        return "chexpert"
    if "path" in header and "label" in header:
        return "csv"
    raise CxrError(f"{label_file}: unknown label file header {','.join(header[:6])!r}; expected "
                   "path,label[,patient_id][,split] or an RSNA/NIH/CheXpert file (--labels-format)")


def read_labels(source: str | os.PathLike, label_file: str | os.PathLike, fmt: str | None = None,
                negatives: str = "default", uncertain: str = "ignore",
                views: str = "frontal", follow_links: bool = False) -> Discovery:
    """The labelled images of a local `source` folder, read from `label_file` (pure: no Ray)."""
    source, label_file = Path(source).absolute(), Path(label_file)  # as found, like discover()
    if not source.is_dir():
        raise CxrError(f"source folder not found: {source}")
    if not label_file.is_absolute() and not label_file.exists():
        label_file = source / label_file
    if not label_file.is_file():
        raise CxrError(f"label file not found: {label_file}")
    fmt = fmt or detect_format(label_file)
    if fmt not in FORMATS:
        raise CxrError(f"labels format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    images = _image_index(source, follow_links)
    tally = _Tally(fmt, label_file)
    tally.rejected.extend(images["unusable"])
    tally.info["negatives"] = negatives
    if fmt == "csv":
        rows = read_csv(source, label_file, images, tally)
    elif fmt == "rsna":
        rows = read_rsna(label_file, images, tally, negatives)
    elif fmt == "nih":
        rows = read_nih(label_file, images, tally, negatives)
    else:
        tally.info.update(uncertain=uncertain, views=views)
        rows = read_chexpert(source, label_file, images, tally, negatives, uncertain, views)
    return _discovery(source, rows, images, tally)


# --- one reader per format: each returns [(rel_path, label, patient_id | None, split | None)] ---

def read_csv(source: Path, label_file: Path, images: dict, tally: _Tally) -> list[tuple]:
    """Generic `path,label[,patient_id][,split]`; label NORMAL/PNEUMONIA (any case) or 0/1."""
    rows = []
    for line, row in _rows(label_file):
        rel = _inside(row.get("path") or "", label_file, line, tally)
        if rel is None:
            continue
        label = _label_value(row.get("label"), label_file, line)
        split = (row.get("split") or "").strip().lower() or None
        if split is not None and split not in SPLITS:
            raise CxrError(f"{label_file}:{line}: unknown split {split!r} (expected train, val or test)")
        patient = (row.get("patient_id") or "").strip() or None
        tally.rule(f"label={CLASS_NAMES[label]}", f"label column {CLASS_NAMES[label]} or {label}", label)
        rows.append((rel, label, patient, split, line))
    tally.info["patient_rule"] = ("patient_id column; rows without one: each image its own patient"
                                  if rows and any(r[2] for r in rows) else
                                  "no patient_id column: each image its own patient")
    return rows


def read_rsna(label_file: Path, images: dict, tally: _Tally, negatives: str) -> list[tuple]:
    """stage_2_train_labels.csv (one row per box) and, beside it, stage_2_detailed_class_info.csv."""
    targets: dict[str, int] = {}
    for line, row in _rows(label_file):
        pid = (row.get("patientId") or "").strip()
        if pid:
            targets[pid] = max(targets.get(pid, 0), _int01(row.get("Target"), label_file, line))
    class_file = label_file.parent / "stage_2_detailed_class_info.csv"
    classes: dict[str, str] = {}
    if class_file.is_file():
        for _, row in _rows(class_file):
            classes.setdefault((row.get("patientId") or "").strip(), (row.get("class") or "").strip())
        tally.info["class_file"] = str(class_file)
    else:
        tally.info["class_file"] = None
        tally.info["note"] = ("stage_2_detailed_class_info.csv not found beside the label file: "
                              "Target 1 -> PNEUMONIA, Target 0 -> NORMAL")
    rows = []
    for pid in sorted(targets):
        if classes:
            cls = classes.get(pid)
            if cls == "Lung Opacity":
                label = _POS
            elif cls == "Normal":
                label = _NEG
            elif cls == "No Lung Opacity / Not Normal" and negatives == "all":
                label = _NEG
            else:
                tally.exclude(f"class {cls!r}" + (" (neither; --negatives all: NORMAL)"
                              if cls == "No Lung Opacity / Not Normal" else ""), pid, f"{pid}.dcm")
                continue
            tally.rule(f"class={cls}", f"class {cls!r}", label)
        else:
            label = _POS if targets[pid] else _NEG
            tally.rule(f"Target={targets[pid]}", f"Target {targets[pid]}", label)
        rows.append((_by_name(images, f"{pid}.dcm"), label, pid, None, pid))
    tally.info["patient_rule"] = "patientId (one image per patient)"
    return rows


def read_nih(label_file: Path, images: dict, tally: _Tally, negatives: str) -> list[tuple]:
    """Data_Entry_2017[_v2020].csv: its header splits into 11 fields on the unquoted commas of
    `OriginalImage[Width,Height]`, as do its rows; only the named first columns are read."""
    split_of: dict[str, str] = {}
    lists = {"train_val_list.txt": "train", "test_list.txt": "test"}
    for name, list_split in lists.items():
        path = label_file.parent / name
        if path.is_file():
            for entry in path.read_text().split():
                split_of[entry.strip()] = list_split
    tally.info["split_lists"] = sorted(n for n in lists if (label_file.parent / n).is_file())
    rows = []
    for line, row in _rows(label_file):
        name = (row.get("Image Index") or "").strip()
        findings = {f.strip() for f in (row.get("Finding Labels") or "").split("|")}
        if "Pneumonia" in findings:
            label, rule = _POS, "Finding Labels contain Pneumonia"
        elif findings == {"No Finding"}:
            label, rule = _NEG, "No Finding"
        elif negatives == "all":
            label, rule = _NEG, "other findings, no Pneumonia (--negatives all)"
        else:
            tally.exclude("other findings, no Pneumonia (--negatives all: NORMAL)", name, name)
            continue
        split = None
        if split_of:
            split = split_of.get(name)
            if split is None:
                tally.exclude("in neither train_val_list.txt nor test_list.txt", name, name)
                continue
        tally.rule(rule, rule, label)
        rows.append((_by_name(images, name), label, (row.get("Patient ID") or "").strip() or None,
                     split, name))
    tally.info["patient_rule"] = "Patient ID column"
    return rows


def read_chexpert(source: Path, label_file: Path, images: dict, tally: _Tally, negatives: str,
                  uncertain: str, views: str) -> list[tuple]:
    """train.csv and, beside it, valid.csv (the test split). `Path` starts with the archive's
    folder (CheXpert-v1.0-small/...): SOURCE may be that folder or the one holding it."""
    files = [(label_file, "test" if label_file.name == "valid.csv" else "train")]
    valid = label_file.parent / "valid.csv"
    if label_file.name != "valid.csv" and valid.is_file():
        files.append((valid, "test"))
    tally.info["files"] = {str(f): s for f, s in files}
    rows = []
    for path, split in files:
        for line, row in _rows(path):
            raw = (row.get("Path") or "").strip()
            first, _, rest = raw.partition("/")
            # SOURCE is the archive folder itself: drop its name from the front of the path
            inside_archive = first == source.name and not (source / first).is_dir()
            rel = _inside(rest if inside_archive else raw, path, line, tally)
            if rel is None:
                continue
            if not inside_archive and rel.split("/")[0] != first:  # "Archive/../x": out of the archive
                tally.exclude("path escapes SOURCE (absolute or ..)", f"{path.name}:{line}: {raw}")
                tally.rejected.append({"path": raw, "reason": f"{path.name} row {line}: path "
                                                              "escapes the archive folder"})
                continue
            if views == "frontal" and (row.get("Frontal/Lateral") or "").strip() != "Frontal":
                tally.exclude("lateral view (--views all: included)", rel, rel)
                continue
            value = _float(row.get("Pneumonia"))
            if value == -1.0:
                if uncertain == "ignore":
                    tally.exclude("Pneumonia uncertain (-1.0), U-Ignore", rel, rel)
                    continue
                value = 1.0 if uncertain == "ones" else 0.0
            if value == 1.0:
                label, rule = _POS, "Pneumonia 1.0" + ("" if _float(row.get("Pneumonia")) == 1.0
                                                        else f" (uncertain, U-{uncertain.capitalize()})")
            elif _float(row.get("No Finding")) == 1.0:
                label, rule = _NEG, "No Finding 1.0"
            elif negatives == "all" and value in (0.0, None):
                label, rule = _NEG, "Pneumonia 0.0 or blank (--negatives all)"
            else:
                tally.exclude("neither Pneumonia 1.0 nor No Finding 1.0 (--negatives all: NORMAL)", rel, rel)
                continue
            patient = next((p for p in rel.split("/") if p.startswith("patient")), None)
            tally.rule(rule, rule, label)
            rows.append((rel, label, patient, split, f"{path.name}:{line}"))
    tally.info["patient_rule"] = "the patientNNNNN folder of Path"
    return rows


# --- shared steps ---

def _discovery(source: Path, rows: list[tuple], images: dict, tally: _Tally) -> Discovery:
    files, used = [], set()
    unusable = {r["path"] for r in images["unusable"]}
    for rel, label, patient, split, where in rows:
        if rel in unusable:
            continue  # rejected with its reason already (a FIFO, a link out of SOURCE, ...)
        if rel is None or rel not in images["rel"]:
            tally.missing(f"{where}: {rel}" if rel else str(where))
            continue
        if rel in used:
            tally.exclude("a second label row for the same image (the first is kept)", str(where))
            continue
        used.add(rel)
        files.append(SourceFile(
            rel_path=rel, label=label,
            official_split=None if split is None else sys.intern(split),
            patient_id=patient or f"file:{rel}", patient_from_name=patient is not None))
    for rel in sorted(images["rel"]):
        if rel not in used and rel not in tally.seen and rel.rsplit("/", 1)[-1] not in tally.seen:
            _count(tally.info["unlabelled_images"], rel)
    # Test rows in the label file: its splits are official; otherwise patients split by fraction.
    layout = "official" if any(f.official_split == "test" for f in files) else "flat"
    tally.info["splits_from_label_file"] = layout == "official"
    tally.info["rows_used"] = len(files)
    if not files:
        m = tally.info["missing_images"]
        raise CxrError(f"no labelled images found under {source} from {tally.info['label_file']} "
                       f"({m['count']} label rows without their image, e.g. "
                       f"{(m['examples'] or ['none'])[0]})")
    return Discovery(files=sorted(files, key=lambda f: f.rel_path), rejected=tally.rejected, layout=layout,
                     labels=tally.info, base=str(source))


def _image_index(source: Path, follow_links: bool = False) -> dict:
    """Every usable image file below `source`: relative paths, and the paths of each file name;
    and the unusable ones (FIFOs, devices, links leaving SOURCE, names that are not UTF-8) with
    their reasons: folder discovery's walk and rules (`ImageWalk`)."""
    rels: set[str] = set()
    by_name: dict[str, list[str]] = {}
    unusable: list[dict] = []
    for rel, reason in ImageWalk(source, follow_links):
        if reason:
            unusable.append({"path": rel, "reason": reason})
            continue
        rels.add(rel)
        by_name.setdefault(rel.rpartition("/")[2], []).append(rel)
    return {"rel": rels, "name": by_name, "unusable": unusable}


def _by_name(images: dict, name: str) -> str | None:
    found = sorted(images["name"].get(name, []), key=lambda r: (r.count("/"), r))
    return found[0] if found else None  # the shallowest copy, as the folder walk keeps


def _inside(raw: str, label_file: Path, line: int, tally: _Tally) -> str | None:
    """A normalised POSIX path relative to SOURCE, or None (rejected) if it escapes SOURCE."""
    raw = raw.strip().replace("\\", "/")
    norm = os.path.normpath(raw).replace("\\", "/") if raw else ""
    if not raw or raw.startswith("/") or (len(raw) > 1 and raw[1] == ":") or norm == ".." \
            or norm.startswith("../"):
        tally.exclude("path escapes SOURCE (absolute or ..)", f"{label_file.name}:{line}: {raw}")
        tally.rejected.append({"path": raw, "reason": f"{label_file.name} row {line}: path escapes "
                                                      "SOURCE (absolute or ..)"})
        return None
    return norm


def _label_value(value: str | None, label_file: Path, line: int) -> int:
    text = (value or "").strip().upper()
    if text in CLASS_NAMES:
        return CLASS_NAMES.index(text)
    if text in ("0", "1"):
        return int(text)
    raise CxrError(f"{label_file}:{line}: unknown label {value!r} (expected NORMAL, PNEUMONIA, 0 or 1)")


def _int01(value: str | None, label_file: Path, line: int) -> int:
    text = (value or "").strip()
    if text not in ("0", "1"):
        raise CxrError(f"{label_file}:{line}: Target must be 0 or 1, got {value!r}")
    return int(text)


def _float(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def _header(path: Path) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return next(csv.reader(f), [])


def _rows(path: Path):
    """(line number, {column: value}) per data row; extra unnamed fields are ignored."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in next(reader, [])]
        for number, fields in enumerate(reader, start=2):
            if fields:
                yield number, dict(zip(header, fields))
