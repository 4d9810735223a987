"""Files of a server's host: written atomically, and private ones erased for real.

Every write is temp file + fsync + rename + directory fsync, so a crash leaves either the
old or the new file, never a torn one. Private files are overwritten with zeros and
synced before they are unlinked (:func:`erase`), and so is the content a private write
replaces (kept under a second name until the new file is durable; :func:`erase_leftovers`
erases what a crash left). On ext4 (ordered data, the default) that overwrites the very
blocks; on a copy-on-write or log-structured file system, or an SSD's remapped flash, it is
best effort, which docs/security.md says plainly.

This module sits below ``boot``, ``api`` and ``node``: all of them write through it.
"""

from __future__ import annotations

import os
from pathlib import Path

MAX_FILE = 16 * 1024 * 1024


#: Names of a private file's replaced content awaiting erasure, and of a write in progress;
#: both are erased when the state directory is opened (a crash may leave them behind).
RETIRED_MARK = ".old-"
TEMP_MARK = ".tmp-"


def atomic_write(
    path: Path, data: bytes, *, private: bool = False, group_readable: bool = False, sync_dir: bool = True
) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old or the new content, nothing else.

    ``sync_dir=False`` leaves the directory's sync (which makes the rename durable) to the
    caller (:func:`sync_dir`), so that a batch of files in one directory costs one; until it
    runs, a crash may leave the old content. Not for private files.

    For a private file the replaced content is then overwritten in place and unlinked: a rename
    alone frees the old blocks with the old secrets still in them (issue 9: every share of four
    periods was read back from a file system image). The old file is kept reachable under a
    second name until the new one is durable, so a crash at any point leaves one valid file.
    ``group_readable``: a private file is created 0640, not 0600 (for the key-holder's group).
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700 if private else 0o755)
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(tmp, flags, (0o640 if group_readable else 0o600) if private else 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    retired = None
    if private and not sync_dir:
        raise ValueError("a private file's directory is synced with it")
    if private and path.exists():
        retired = path.with_name(f".{path.name}{RETIRED_MARK}{os.getpid()}")
        erase(retired)  # a leftover of a crashed write: its content is no newer than path's
        os.link(path, retired)
    os.replace(tmp, path)
    if sync_dir:
        _fsync_dir(path.parent)
    if retired is not None:
        erase(retired)


def erase_leftovers(directory: Path) -> list[Path]:
    """Erase what a crashed write left in a private directory (and its subdirectories)."""
    erased: list[Path] = []
    if not directory.exists():
        return erased
    for path in sorted(directory.rglob(".*")):
        if path.is_file() and (RETIRED_MARK in path.name or TEMP_MARK in path.name):
            erase(path)
            erased.append(path)
    return erased


def make_dirs(directory: Path, mode: int = 0o755) -> None:
    """Create ``directory`` and its missing parents so that a crash cannot lose them.

    :func:`atomic_write` syncs the directory that holds the file; a directory it had to create
    is only durable once its own parent is synced too, which this does for each one it makes.
    """
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        try:
            path.mkdir(mode=mode)
        except FileExistsError:
            continue
        _fsync_dir(path.parent)


def sync_dir(directory: Path) -> None:
    """Make the renames and unlinks done in ``directory`` durable (fsync of the directory)."""
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def erase(path: Path) -> None:
    """Overwrite a file with zeros, sync, then unlink it (best effort on CoW file systems)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, bytes(size))
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()
    _fsync_dir(path.parent)
