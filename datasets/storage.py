"""Where SOURCE and OUT live: a local folder, or any `pyarrow.fs` URI (s3://, gs://, hdfs://, file://).

    loc = Location.of("s3://bucket/chest_xray")     # FileSystem.from_uri: credentials as pyarrow finds them
    loc = Location.of("data/chest_xray")            # a plain path: the local file system

A plain path is read with the operating system's calls (clearer reasons for broken links and
permissions); a URI through its pyarrow file system, by the driver (listing) and by the Ray tasks
(reading files, writing shards). `Location` is picklable, so tasks receive it as an argument.
"""
from __future__ import annotations

import os
import posixpath
from dataclasses import dataclass
from pathlib import Path

from .errors import CxrError


@dataclass(frozen=True)
class Location:
    uri: str  # what the user gave (absolute for plain paths): the manifest's `source`
    path: str  # the path inside `fs` (POSIX separators)
    fs: object  # a pyarrow.fs.FileSystem

    @classmethod
    def of(cls, where: str | os.PathLike) -> Location:
        import pyarrow.fs as pafs

        text = os.fspath(where)
        if "://" not in text:
            absolute = str(Path(text).absolute())
            return cls(absolute, absolute, pafs.LocalFileSystem())
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except Exception as exc:  # pyarrow: ArrowInvalid, ArrowNotImplementedError, OSError ...
            raise CxrError(f"cannot open {text}: {str(exc).strip().splitlines()[0]}") from None
        return cls(text.rstrip("/"), path.rstrip("/") or "/", fs)

    @property
    def is_uri(self) -> bool:
        return "://" in self.uri

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

        info = self.fs.get_file_info(self.path)
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
        with self.fs.open_input_stream(self.path) as stream:
            return stream.readall()

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
    """(path relative to `loc`, size in bytes, is a folder) of everything below a URI location,
    sorted (plain paths are walked by `discover` itself)."""
    import pyarrow.fs as pafs

    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
    base = loc.path.rstrip("/") + "/"
    entries = []
    for info in infos:
        rel = info.path[len(base):] if info.path.startswith(base) else info.path
        entries.append((rel, info.size or 0, info.type == pafs.FileType.Directory))
    return sorted(entries)
