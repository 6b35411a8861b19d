"""Where SOURCE and OUT live: a local folder, or any `pyarrow.fs` URI (s3://, gs://, hdfs://, file://).

    loc = Location.of("s3://bucket/chest_xray")     # FileSystem.from_uri: credentials as pyarrow finds them
    loc = Location.of("data/chest_xray")            # a plain path: the local file system

A plain path is read with the operating system's calls (clearer reasons for broken links and
permissions, and no copy through Arrow's buffers); a URI through its pyarrow file system, by the
driver (listing) and by the Ray tasks (reading files, writing shards). `Location` is picklable, so
tasks receive it as an argument.

The readers of a prepared folder (`cxr_datasets.load`, `read_manifest`, `manifest_hash`, and through
them `cxr train|evaluate|search`) take the same `Location`s, so PREPARED may be a URI too:

    data = loc.child("manifest.json").read_file("manifest")  # CxrError "manifest missing: s3://..."
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CxrError, first_line


@dataclass(frozen=True)
class Location:
    uri: str  # what the user gave (absolute for plain paths): the manifest's `source`
    path: str  # the path inside `fs` (POSIX separators)
    fs: Any  # a pyarrow.fs.FileSystem (pyarrow has no type stubs)

    @classmethod
    def of(cls, where: str | os.PathLike | Location) -> Location:
        import pyarrow.fs as pafs

        if isinstance(where, Location):
            return where
        text = os.fspath(where)
        if not is_uri(text):
            absolute = str(Path(text).absolute())
            return cls(absolute, absolute, pafs.LocalFileSystem())
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except Exception as exc:  # pyarrow: ArrowInvalid, ArrowNotImplementedError, OSError ...
            raise CxrError(f"cannot open {text}: {first_line(exc)}") from None
        return cls(text.rstrip("/"), path.rstrip("/") or "/", fs)

    @property
    def is_uri(self) -> bool:
        return is_uri(self.uri)

    @property
    def local(self) -> Path | None:
        """The local folder, for plain paths only (None for URIs, file:// included)."""
        return None if self.is_uri else Path(self.path)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def child(self, *parts: str) -> Location:
        path = posixpath.join(self.path, *parts)
        uri = posixpath.join(self.uri, *parts) if self.is_uri else path
        return Location(uri, path, self.fs)

    def sibling(self, name: str) -> Location:
        parent_path = posixpath.dirname(self.path.rstrip("/"))
        parent_uri = self.uri.rstrip("/").rsplit("/", 1)[0] if self.is_uri else parent_path
        return Location(posixpath.join(parent_uri, name), posixpath.join(parent_path, name), self.fs)

    def kind(self) -> str:
        """"dir", "file" or "missing"."""
        import pyarrow.fs as pafs

        try:
            info = self.fs.get_file_info(self.path)
        except OSError as exc:  # no network, no credentials, no permission ...
            raise CxrError(f"cannot access {self}: {first_line(exc)}") from None
        return {pafs.FileType.Directory: "dir", pafs.FileType.File: "file"}.get(info.type, "missing")

    def is_inside(self, other: Location) -> bool:
        """This location is `other` or below it (same file system)."""
        if type(self.fs) is not type(other.fs):
            return False
        return self.path == other.path or self.path.startswith(other.path.rstrip("/") + "/")

    def write_bytes(self, data: bytes) -> None:
        with self.fs.open_output_stream(self.path) as stream:
            stream.write(data)

    def read_bytes(self) -> bytes:
        if not self.is_uri:  # the operating system's read: one copy, its own error reasons
            return Path(self.path).read_bytes()
        with self.fs.open_input_stream(self.path) as stream:
            return stream.readall()

    def read_file(self, what: str = "file", missing: str | None = None) -> bytes:
        """The bytes of this file, or a one-line CxrError naming it: `missing` (default "<what>
        missing: URI") when it is not there, else the file system's reason (no credentials,
        no network, a folder ...)."""
        try:
            return self.read_bytes()
        except FileNotFoundError:
            raise CxrError(missing or f"{what} missing: {self}") from None
        except OSError as exc:
            if self._missing():  # some file systems say "not found" in their own words
                raise CxrError(missing or f"{what} missing: {self}") from None
            raise CxrError(f"cannot read {what} {self}: {first_line(exc)}") from None

    def _missing(self) -> bool:
        try:
            return self.kind() == "missing"
        except CxrError:
            return False

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def remove_tree(self) -> None:
        try:
            self.fs.delete_dir(self.path)
        except (FileNotFoundError, OSError):
            pass

    def __str__(self) -> str:
        return self.uri


def list_files(loc: Location) -> list[tuple[str, int, bool]]:
    """(path relative to `loc`, size in bytes, is a folder) of everything below `loc`, sorted
    (`discover` walks plain SOURCE paths itself, with the OS's reasons for unreadable entries)."""
    import pyarrow.fs as pafs

    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    base = loc.path.rstrip("/") + "/"
    entries = []
    for info in infos:
        rel = info.path[len(base):] if info.path.startswith(base) else info.path
        entries.append((rel, info.size or 0, info.type == pafs.FileType.Directory))
    return sorted(entries)


def is_uri(text: str) -> bool:
    """A URI (s3://, gs://, file://, ...) rather than a plain local path: the one check for it."""
    return "://" in text
