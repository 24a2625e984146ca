"""One bounded walk of a channel, shared by every reader: the files each format is found by.

Formats are recognised by what their files hold (an XML with an `<annotation>` root, rows of
`class cx cy w h` at an image's label path, ...), wherever they sit in the channel, so every
reader looks at the same list of files instead of a few folder names of its own. The walk
lists each file once per job: `read_dataset` opens a `session`, within which a channel (or a
folder inside it) is walked at most once; outside a session each call walks afresh.

Bounds: folders at most MAX_DEPTH levels below the channel are entered (deeper ones are
counted, not searched) and at most MAX_FILES files are listed (more fails in one sentence:
a channel that large is read from a COCO JSON or a manifest, which need no walk). Symlinked
folders are listed but never entered, so the walk stays inside the channel; a symlinked file
is listed, and the reader that opens it refuses it when it leads outside (common.Boundary).
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import UserInputError

MAX_DEPTH = 16
MAX_FILES = 2_000_000
# How much of a file is read to tell what it is (the root element of an XML, a label's row).
HEAD_BYTES = 4096


@dataclass
class Scan:
    """The files under `root` in walk order (folders and names sorted, a folder's files before
    its subfolders'), as (folder relative to root, '' for root; names) pairs."""

    root: Path
    folders: list[tuple[str, list[str]]]
    deep_folders: list[str] = field(default_factory=list)  # not entered: below MAX_DEPTH
    unreadable_folders: list[str] = field(default_factory=list)
    _relative: set[str] | None = None

    @property
    def n_files(self) -> int:
        return sum(len(names) for _, names in self.folders)

    def paths(self, keep: Callable[[str], bool] | None = None, under: str = "") -> list[Path]:
        """The files whose name `keep` accepts, in walk order; `under`: only below that
        folder (relative to root, '/'-separated)."""
        out = []
        prefix = under.rstrip("/") + "/" if under else ""
        for folder, names in self.folders:
            if prefix and not (folder + "/").startswith(prefix):
                continue
            base = self.root / folder if folder else self.root
            out.extend(base / n for n in names if keep is None or keep(n))
        return out

    def relative_paths(self, keep: Callable[[str], bool] | None = None) -> list[str]:
        """Like `paths`, relative to root, '/'-separated."""
        return [f"{folder}/{n}" if folder else n for folder, names in self.folders
                for n in names if keep is None or keep(n)]

    def relative(self) -> set[str]:
        """Every file's path relative to root ('/'-separated), for lookups."""
        if self._relative is None:
            self._relative = {f"{folder}/{n}" if folder else n for folder, names in self.folders for n in names}
        return self._relative


_sessions: list[dict[str, Scan]] = []


@contextlib.contextmanager
def session() -> Iterator[None]:
    """Within it, each folder is walked once: detection and reading share the listing."""
    _sessions.append({})
    try:
        yield
    finally:
        _sessions.pop()


def cached(folder: Path) -> Scan | None:
    """The session's listing of `folder` when it was walked, else None."""
    return _sessions[-1].get(os.path.abspath(folder)) if _sessions else None


def scan(folder: Path) -> Scan:
    """The listing of `folder`: from the session's walk of it or of a folder above it, else
    walked now (and kept for the session)."""
    key = os.path.abspath(folder)
    cache = _sessions[-1] if _sessions else None
    if cache is not None:
        if key in cache:
            return cache[key]
        for root, found in cache.items():
            if key.startswith(root.rstrip(os.sep) + os.sep):
                return _below(found, Path(folder), os.path.relpath(key, root).replace(os.sep, "/"))
    found = _walk(Path(folder))
    if cache is not None:
        cache[key] = found
    return found


def _below(parent: Scan, folder: Path, under: str) -> Scan:
    prefix = under + "/"
    folders = [(f[len(prefix):] if f != under else "", names) for f, names in parent.folders
               if f == under or f.startswith(prefix)]
    deep = [f[len(prefix):] for f in parent.deep_folders if f.startswith(prefix)]
    return Scan(folder, folders, deep)


def _walk(root: Path) -> Scan:
    folders: list[tuple[str, list[str]]] = []
    deep: list[str] = []
    unreadable: list[str] = []
    base = os.fspath(root)
    count = 0

    def note_error(exc: OSError) -> None:
        if exc.filename is not None and os.fspath(exc.filename) != base:
            unreadable.append(os.path.relpath(exc.filename, base).replace(os.sep, "/"))

    for parent, dirs, files in os.walk(base, onerror=note_error):
        rel = os.path.relpath(parent, base).replace(os.sep, "/")
        rel = "" if rel == "." else rel
        depth = rel.count("/") + 1 if rel else 0
        dirs.sort()
        if depth >= MAX_DEPTH:
            deep.extend(f"{rel}/{d}" if rel else d for d in dirs)
            dirs[:] = []
        files.sort()
        count += len(files)
        if count > MAX_FILES:
            raise UserInputError(
                f"the channel {root} holds more than {MAX_FILES:,} files, more than this job "
                "lists to find annotations by their content; give a COCO JSON (name it with the "
                "annotations_file hyperparameter) or a Ground Truth manifest and set "
                "annotation_format, which are read without listing the channel."
            )
        folders.append((rel, files))
    return Scan(root, folders, deep, unreadable)


def head(path: Path, inside: Callable[[Path], bool], size: int = HEAD_BYTES) -> bytes | None:
    """The first bytes of a regular file inside the channel; None for anything else (a FIFO
    would block, a symlink out of the channel is not read)."""
    try:
        if not inside(path) or not stat.S_ISREG(os.stat(path).st_mode):
            return None
        with open(path, "rb") as f:
            return f.read(size)
    except (OSError, ValueError):
        return None


def decode(data: bytes) -> str:
    """Text from a file's first bytes: UTF-16 by its byte-order mark or its zero bytes, else
    UTF-8 (undecodable bytes replaced: only the shape is looked at)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    if data[:2] == b"<\x00":
        return data.decode("utf-16-le", errors="replace")
    if data[:2] == b"\x00<":
        return data.decode("utf-16-be", errors="replace")
    return data.decode("utf-8-sig", errors="replace")


_PROLOG = re.compile(r"\s+|<\?.*?\?>|<!--.*?-->|<!DOCTYPE[^\[>]*(\[.*?\])?\s*>", re.S)
_TAG = re.compile(r"<([A-Za-z_][\w.:-]*)")


def xml_root(data: bytes) -> str | None:
    """The root element's name from an XML file's first bytes; None when they do not show one."""
    text = decode(data)
    position = 0
    while match := _PROLOG.match(text, position):
        if match.end() == position:
            break
        position = match.end()
    tag = _TAG.match(text, position)
    return tag.group(1) if tag else None
