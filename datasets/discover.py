"""Find the images under a source folder, with their label, official split and patient.

Accepted layouts, at any depth below SOURCE:
    .../{train,val,test}/{NORMAL,PNEUMONIA}/<name>     the Kaggle/Mendeley layout ("official")
    .../{NORMAL,PNEUMONIA}/<name>                      class folders only ("flat")
Folder names are matched case-insensitively; `__MACOSX/`, hidden files and folders and AppleDouble
`._*` files are skipped. The Kaggle zip holds the whole data set twice (`chest_xray/` and
`chest_xray/chest_xray/`): copies with the same path below their layout root are counted once,
the shallowest copy wins.

Patient ids come from the Kermany et al. file names (see `patient_id`); a file named otherwise is
its own patient, and the manifest counts how many were.
"""
from __future__ import annotations

import os
import posixpath
import re
import stat
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from .config import CLASS_NAMES, IMAGE_EXTENSIONS, SPLITS
from .errors import CxrError
from .image import not_regular_reason
from .storage import Location, list_files

_IGNORED_DIRS = {"__macosx"}

# Patient ids from the file names of the Kermany et al. data set. Evidence for each rule, checked
# on the real file names of the Kaggle split (tests/data/kaggle_chest_xray_names.csv: 5,216 train
# and 624 test names; tests/test_datasets_layout.py repeats the counts below):
#
# person<N>_<bacteria|virus>_<k> (Kaggle PNEUMONIA): the patient is (type, N), not N. Person
#   numbers count separately per diagnosis type. Read as one child per N, 808 of the 1,635 train
#   numbers would have both a bacterial and a viral pneumonia (in test: 1 of 202), and 170 numbers
#   would be in both train and test while not one (type, N) pair is: e.g. train holds only
#   person1_bacteria_{1,2}, test only person1_virus_{6..13}. k is one running index per type over
#   the whole set (2,772 bacteria indices, all distinct), not per patient. Taking N alone removed
#   453 train images (8.7%) as "test patients" that were not.
# IM-<N>-<k> and NORMAL2-IM-<N>-<k> (Kaggle NORMAL): two numbering schemes (the same N in both is
#   not the same child); no id of either is in both train and test.
# NORMAL-<id>-<k>, BACTERIA-<id>-<k>, VIRUS-<id>-<k> (the Mendeley release, "CellData/chest_xray"):
#   the release describes its names as (disease)-(randomized patient ID)-(image number of that
#   patient), stated for the OCT half of the same release; no list of its chest X-ray names was
#   available here to check it against. So the id rule is a guess, and the manifest says so: <id>
#   is taken as the patient whatever the diagnosis word (randomized 7-digit ids of different
#   children rarely collide, and grouping too much never leaks, grouping too little does).
_PERSON = re.compile(r"^person(\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
_IM = re.compile(r"^(NORMAL2-)?IM-(\d+)-\d+", re.IGNORECASE)
_MENDELEY = re.compile(r"^(?:NORMAL|BACTERIA|VIRUS)-(\d+)-\d+", re.IGNORECASE)

# naming scheme -> how its patient id is read, and whether that rule was checked (manifest:
# `patient_id_rule`, for the schemes a source uses).
PATIENT_ID_RULES: dict[str, dict] = {
    "kaggle_person": {
        "pattern": "person<N>_<bacteria|virus>_<k>", "patient": "(type, N): person<N>_<type>",
        "status": "checked", "evidence": "the real Kaggle train/test names: 0 (type, N) pairs in "
        "both splits, while 170 bare N are; N counts per diagnosis type"},
    "kaggle_im": {
        "pattern": "IM-<N>-<k>", "patient": "IM-<N>", "status": "checked",
        "evidence": "the real Kaggle train/test names: no id in both splits"},
    "kaggle_normal2": {
        "pattern": "NORMAL2-IM-<N>-<k>", "patient": "NORMAL2-IM-<N>", "status": "checked",
        "evidence": "the real Kaggle train/test names: no id in both splits"},
    "mendeley": {
        "pattern": "<NORMAL|BACTERIA|VIRUS>-<id>-<k>", "patient": "patient<id>, whatever the "
        "diagnosis word", "status": "guess", "evidence": "the release's description of its "
        "names ((disease)-(randomized patient ID)-(image number)); not checked on a name list"},
    "unknown": {
        "pattern": "any other name", "patient": "file:<path>: each file its own patient",
        "status": "guess", "evidence": "nothing in the name links images of one patient"},
}

@dataclass(frozen=True, slots=True)
class SourceFile:
    # No absolute path: it is `Discovery.base` joined with `rel_path` (`Discovery.paths()`), made
    # when a batch of files is handed to Ray, not kept for every file (~0.15 KB each).
    rel_path: str  # relative to SOURCE, POSIX separators: what the manifest and shards record
    label: int  # index into CLASS_NAMES
    official_split: str | None  # "train" | "val" | "test", None in a flat layout
    patient_id: str
    patient_from_name: bool  # False: the name matched no known scheme; the file is its own patient


@dataclass
class Discovery:
    files: list[SourceFile]
    rejected: list[dict]  # [{"path", "reason"}] for files that look like images but cannot be used
    layout: str  # "official" (split folders found) or "flat"
    mirror_copies_skipped: int = 0
    mirror_roots: list[str] = field(default_factory=list)  # layout roots whose files were copies
    ignored_files: int = 0  # non-image files, hidden files, AppleDouble files
    labels: dict | None = None  # from a label file (labels.read_labels): format, rules, exclusions
    # What the files' rel_path are relative to: SOURCE's local path, or its path in the URI's
    # file system (symbolic links not resolved).
    base: str = ""

    def paths(self) -> FilePaths:
        """The path of every file (in `files`' order), as the Ray tasks open it."""
        return FilePaths(self.base, [f.rel_path for f in self.files])

    def summary(self) -> dict:
        return {
            "layout": self.layout,
            "images_found": len(self.files),
            "mirror_copies_skipped": self.mirror_copies_skipped,
            "mirror_roots": self.mirror_roots,
            "ignored_files": self.ignored_files,
            "patients_not_from_name": sum(not f.patient_from_name for f in self.files),
            **({"label_file": self.labels["label_file"]} if self.labels else {}),
        }


class FilePaths(Sequence[str]):
    """`base` joined with each of `rel_paths`, made when indexed (one string per file asked for)."""

    def __init__(self, base: str, rel_paths: Sequence[str]):
        self.base, self.rel_paths = base, rel_paths

    def __len__(self) -> int:
        return len(self.rel_paths)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [posixpath.join(self.base, rel) for rel in self.rel_paths[index]]
        return posixpath.join(self.base, self.rel_paths[index])


@dataclass(frozen=True, slots=True)
class _Candidate:
    # Plain strings and slots, no PurePosixPath, no absolute path: a candidate exists for every
    # file, and the driver's peak memory should not grow with the data more than it must.
    rel: str  # relative to SOURCE, POSIX separators
    label: int | None
    split: str | None  # interned: one shared object per split name
    root: tuple[str, ...]  # the folders above the split (or class) folder; one object per root
    reason: str | None = None
    size: int | None = None  # known from a URI listing; local files are asked when needed

    @property
    def key(self) -> str:
        """The path below the root, lower-cased: equal keys below nested roots are mirror copies."""
        return self.rel.split("/", len(self.root))[-1].lower()


def discover(source: str | os.PathLike | Location, *, follow_links: bool = False) -> Discovery:
    """Every image file under `source` (a folder or a pyarrow.fs URI) with its label, split and
    patient; raises CxrError if none. A file's `path` is what the decode tasks open: an absolute
    local path, or the path inside the URI's file system. A symbolic link to a file outside
    SOURCE is rejected unless `follow_links` (links to folders are never entered)."""
    loc = source if isinstance(source, Location) else Location.of(source)
    kind = loc.kind()
    if kind == "missing":
        raise CxrError(f"source folder not found: {loc}")
    if kind != "dir":
        raise CxrError(f"source is not a folder: {loc}")
    candidates, ignored = _walk(loc.local, follow_links) if loc.local else _walk_uri(loc)
    base = str(loc.local) if loc.local else loc.path
    source = loc.uri
    if not candidates:
        raise CxrError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) found under {source}")
    kept, skipped, mirror_roots = _drop_mirror_copies([c for c in candidates if c.reason is None], base)
    layout = "official" if any(c.split for c in kept) else "flat"
    rejected = [{"path": c.rel, "reason": c.reason} for c in candidates if c.reason]
    del candidates
    # Each candidate becomes its SourceFile in place, so that the two never exist side by side for
    # every file (the driver's peak memory at the largest archives: ~80 bytes a file).
    files: list = kept
    count = 0
    for index, cand in enumerate(kept):
        files[index] = None
        if layout == "official" and cand.split is None:
            rejected.append({"path": cand.rel, "reason": "outside the train/val/test folders"})
            continue
        files[count] = _source_file(cand)
        count += 1
    del files[count:]
    if not files:
        raise CxrError(
            f"no usable images under {source}: expected NORMAL/ and PNEUMONIA/ folders "
            f"({len(rejected)} files rejected, e.g. {rejected[0]['path']}: {rejected[0]['reason']})"
        )
    return Discovery(
        files=files,
        rejected=sorted(rejected, key=lambda r: r["path"]),
        layout=layout,
        mirror_copies_skipped=skipped,
        mirror_roots=mirror_roots,
        ignored_files=ignored,
        base=base,
    )


def patient_id(file_name: str) -> str | None:
    """Patient id from a Kermany et al. file name (Kaggle or Mendeley release), or None if the name
    follows no known scheme (see PATIENT_ID_RULES for the rules and their evidence).

    >>> patient_id("person1763_bacteria_4606.jpeg"), patient_id("NORMAL2-IM-0736-0001.jpeg")
    ('person1763_bacteria', 'NORMAL2-IM-0736')
    >>> patient_id("BACTERIA-1351146-0002.jpeg")
    'patient1351146'
    """
    return _parse(file_name)[1]


def naming_scheme(file_name: str) -> str:
    """The key of PATIENT_ID_RULES that `patient_id` used for this name ("unknown" if none)."""
    return _parse(file_name)[0]


def _parse(file_name: str) -> tuple[str, str | None]:
    stem = os.path.basename(file_name.rstrip("/"))  # not Path(...).name: pathlib interns it
    if match := _PERSON.match(stem):
        return "kaggle_person", f"person{int(match.group(1))}_{match.group(2).lower()}"
    if match := _IM.match(stem):
        scheme, prefix = ("kaggle_normal2", "NORMAL2-IM") if match.group(1) else ("kaggle_im", "IM")
        return scheme, f"{prefix}-{int(match.group(2)):04d}"  # 4 digits as in the data set; 0042 == 42
    if match := _MENDELEY.match(stem):
        return "mendeley", f"patient{int(match.group(1))}"
    return "unknown", None


def patient_id_rules(names) -> dict:
    """{scheme: rule} for the naming schemes among `names`, with the number of files of each."""
    counts: dict[str, int] = {}
    for name in names:
        scheme = naming_scheme(name)
        counts[scheme] = counts.get(scheme, 0) + 1
    return {scheme: {**PATIENT_ID_RULES[scheme], "files": n} for scheme, n in sorted(counts.items())}

def _walk_uri(loc: Location) -> tuple[list[_Candidate], int]:
    """`_walk` over a pyarrow file system's listing."""
    candidates: list[_Candidate] = []
    roots = _FolderCache()
    ignored = 0
    for rel, size, is_dir in list_files(loc):
        parts = rel.split("/")
        if not all(enter_folder(part) for part in parts[:-1]):
            continue
        if is_dir and not is_image_name(parts[-1]):
            continue
        if not is_image_name(parts[-1]):
            ignored += 1
            continue
        cand = _classify_rel(str(PurePosixPath(rel)), roots)
        candidates.append(replace(cand, size=-1 if is_dir else size))
    return candidates, ignored


def _walk(source: Path, follow_links: bool = False) -> tuple[list[_Candidate], int]:
    candidates: list[_Candidate] = []
    roots = _FolderCache()
    walk = ImageWalk(source, follow_links)
    for rel, reason in walk:
        cand = _classify_rel(rel, roots)
        candidates.append(replace(cand, reason=reason) if reason else cand)
    return candidates, walk.ignored


class ImageWalk:
    """Every entry with an image name below a local folder, for folder discovery and for the
    label-file readers alike (one walk, one rule for what is not read). Iterating yields
    (rel, reason): `rel` the POSIX path below the folder, printable (a name that is not UTF-8
    has its bad bytes escaped as \\xNN); `reason` why the file is not read, or None. A folder
    with an image name is yielded with None (reading it reports it) and not entered; hidden
    folders, __MACOSX and links to folders are not entered. `ignored`: the files without an
    image name, once the walk is done.

    os.scandir, not os.walk: a directory entry's type says whether it is a plain regular file,
    so such a file costs no system call (os.walk's names needed an lstat and a stat each: ~2 s of
    the driver at 200,000 files). Strings joined per file, not a pathlib.Path per file: pathlib
    interns every file name in the interpreter's table, which then stays that size."""

    def __init__(self, source: str | os.PathLike, follow_links: bool = False):
        self.source, self.follow_links = Path(source), follow_links
        self.ignored = 0

    def __iter__(self) -> Iterator[tuple[str, str | None]]:
        self.ignored = 0
        pending = [""]  # folders still to list, as their prefix below SOURCE ("" or "a/b/")
        while pending:
            prefix = pending.pop()
            try:
                listing = os.scandir(os.path.join(self.source, prefix))
            except OSError:
                continue  # an unreadable folder is skipped, as os.walk skips it
            with listing:
                for entry in listing:
                    name = entry.name
                    if _is_folder(entry):
                        if is_image_name(name):  # where a file was expected: reported, not entered
                            yield _printable(prefix + name), None
                        elif enter_folder(name) and not entry.is_symlink():  # links to folders: never
                            pending.append(prefix + name + "/")
                        continue
                    if not is_image_name(name):
                        self.ignored += 1
                        continue
                    raw = prefix + name
                    rel = _printable(raw)
                    if rel != raw:
                        yield rel, f"file name is not valid UTF-8 (name bytes {os.fsencode(name).hex()})"
                    elif entry.is_file(follow_symlinks=False):
                        yield rel, None  # a plain regular file: nothing more to ask
                    else:
                        yield rel, unusable_file(self.source, entry.path, follow_links=self.follow_links)


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # a link to a folder too (listed, never entered)
    except OSError:
        return False


def _printable(rel: str) -> str:
    """A name os.fsdecode could not decode (surrogates) with its bad bytes escaped as \\xNN, so that
    the manifest, the shards' strings and the summary can all write it."""
    try:
        rel.encode("utf-8")
        return rel
    except UnicodeEncodeError:
        return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def unusable_file(source: Path, path: str, *, follow_links: bool = False) -> str | None:
    """Why the entry at `path` below `source`, not a plain regular file by its directory entry, is
    not read, decided by lstat/stat only (never an open that can hang): a FIFO, a device or
    socket, a link that leaves SOURCE (unless `follow_links`; what it points to must still be a
    regular file)."""
    try:
        link = os.path.islink(path)
        mode = os.stat(path).st_mode
    except OSError:
        return None  # a broken link or vanished file: reading it reports the reason
    if link and not follow_links:
        real, root = os.path.realpath(path), os.path.realpath(source)
        if os.path.commonpath([real, root]) != root:
            return "symbolic link to a file outside SOURCE (--follow-links reads it)"
    if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
        return None
    return not_regular_reason(mode)


def enter_folder(dir_name: str) -> bool:
    """Whether discovery walks into a folder of this name (not hidden, not __MACOSX)."""
    return not _is_hidden(dir_name) and dir_name.lower() not in _IGNORED_DIRS


def _is_hidden(name: str) -> bool:
    return name.startswith(".")  # also AppleDouble "._name.jpeg" resource forks


def is_image_name(name: str) -> bool:
    """A visible file with an image extension (.jpeg .jpg .png .dcm, any case)."""
    return not _is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


@dataclass
class _FolderCache:
    """A walk's memory of its folders: what each says (label, split, root, reason), read once per
    folder rather than once per file (half of discovery's time at 200,000 files), and one shared
    copy of each root tuple, which the candidates below it all point to."""

    folders: dict[str, tuple] = field(default_factory=dict)
    roots: dict[tuple[str, ...], tuple[str, ...]] = field(default_factory=dict)


def _classify_rel(rel: str, cache: _FolderCache) -> _Candidate:
    """`rel`: a normalised POSIX path relative to SOURCE."""
    folder = rel.rpartition("/")[0]
    found = cache.folders.get(folder)
    if found is None:
        found = cache.folders[folder] = _classify_folder(folder, cache.roots)
    label, split, root, reason = found
    if reason is not None:
        return _Candidate(rel, None, None, (), reason=reason)
    return _Candidate(rel=rel, label=label, split=split, root=root)


def _classify_folder(folder: str, roots: dict) -> tuple[int | None, str | None, tuple[str, ...], str | None]:
    """(label, split, root, reason) of the files in `folder` (a POSIX path below SOURCE); `roots`:
    the shared copy of each root."""
    # Folder names interned: the candidates of one folder share its name's string (and `root`'s)
    # instead of holding a copy each (~0.15 KB a file at the driver's peak).
    folders = tuple(sys.intern(part) for part in folder.split("/")) if folder else ()
    upper = [f.upper() for f in folders]
    label_at = max((i for i, f in enumerate(upper) if f in CLASS_NAMES), default=None)
    if label_at is None:
        return None, None, (), _no_label_reason(folders)
    split_at = max((i for i in range(label_at) if folders[i].lower() in SPLITS), default=None)
    root = folders[:label_at if split_at is None else split_at]
    return (CLASS_NAMES.index(upper[label_at]),
            None if split_at is None else sys.intern(folders[split_at].lower()),
            roots.setdefault(root, root), None)


def _no_label_reason(folders: tuple[str, ...]) -> str:
    expected = " or ".join(CLASS_NAMES)
    if not folders:
        return f"not in a label folder (expected {expected})"
    return f"unknown label folder '{folders[-1]}' (expected {expected})"


def _drop_mirror_copies(candidates: list[_Candidate], base: str) -> tuple[list[_Candidate], int, list[str]]:
    """Drop files that repeat, byte-size for byte-size, a file at the same path below an enclosing
    layout root (`chest_xray/chest_xray/train/...` repeats `chest_xray/train/...`).

    Sibling roots (`site1/NORMAL/1.png`, `site2/NORMAL/1.png`) are different images and both kept;
    true duplicates anywhere are still caught later by content hash. Only the files below roots
    that enclose or are enclosed by another root are compared (none in most sources: no
    per-file key or group is made for them).
    """
    roots = {c.root for c in candidates}
    nested = {r for r in roots if any(_encloses(r, o) or _encloses(o, r) for o in roots)}
    by_key: dict[str, list[_Candidate]] = {}
    for cand in sorted((c for c in candidates if c.root in nested), key=lambda c: (len(c.root), c.rel)):
        by_key.setdefault(cand.key, []).append(cand)
    skipped: list[_Candidate] = []
    for group in by_key.values():
        group_kept: list[_Candidate] = []
        for cand in group:
            is_copy = any(_encloses(k.root, cand.root) and _same_size(k, cand, base) for k in group_kept)
            (skipped if is_copy else group_kept).append(cand)
    mirror_roots = sorted({"/".join(c.root) for c in skipped})
    dropped = {c.rel for c in skipped}  # a file's relative path is unique
    kept = [c for c in candidates if c.rel not in dropped] if dropped else candidates
    return sorted(kept, key=lambda c: c.rel), len(skipped), mirror_roots


def _encloses(outer: tuple[str, ...], inner: tuple[str, ...]) -> bool:
    return len(outer) < len(inner) and inner[: len(outer)] == outer


def _same_size(a: _Candidate, b: _Candidate, base: str) -> bool:
    if a.size is not None and b.size is not None:
        return a.size == b.size >= 0
    try:
        return os.path.getsize(posixpath.join(base, a.rel)) == os.path.getsize(posixpath.join(base, b.rel))
    except OSError:
        return False  # unreadable: keep it, so that it is reported rather than silently dropped


def _source_file(cand: _Candidate) -> SourceFile:
    assert cand.label is not None  # a candidate without a label has a reason and is never kept
    parsed = patient_id(cand.rel.rsplit("/", 1)[-1])
    return SourceFile(
        rel_path=cand.rel,
        label=int(cand.label),
        official_split=cand.split,
        patient_id=parsed if parsed else f"file:{cand.rel}",
        patient_from_name=parsed is not None,
    )
