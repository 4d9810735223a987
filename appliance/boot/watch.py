"""Knowing at almost no cost that the installed code has not changed since it was checked.

Scenario F's check at every refresh (:func:`appliance.boot.check.recheck_code`) walks the
whole environment: thousands of files, about 0.06 s of CPU per server, and every server does
it at the same moment, right after the refresh's decision, before its new key-holder child
reads a secret. A *standby* key-holder child (:mod:`appliance.node.keyholder`) does it ahead
instead:

1. it places an inotify watch on every directory of the environment (:class:`CodeWatch`),
2. *then* runs the full check, off the refresh's path,
3. and when it is let go, reads its watch. No event since the watches were placed means that
   no file or directory of the environment was created, written, truncated, renamed, deleted,
   or had its metadata changed (mode, owner, timestamps set, links), so the check it made
   still holds, for the same C (the caller compares C's code digest too).

Anything else and the full check runs again, as before: an event, a lost event queue
(``IN_Q_OVERFLOW``), a watch the kernel dropped (``IN_IGNORED``: its directory was deleted
or unmounted), an unmount, a changed mount table (a bind mount over a directory of the
environment sends no inotify event, so ``/proc/self/mountinfo`` is compared too), or watches
that could not be placed (the kernel's limits, another file system). inotify sees every write
through the kernel's file system layer, whichever process or user makes it; what it cannot see
is what bypasses that layer (writing to the block device under a mounted file system), which
the full check at a server's start (:func:`~appliance.boot.check.boot_check`) is there for.
Reading files (and the access times that reading updates) sends no event.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from collections.abc import Iterable
from pathlib import Path

from appliance.boot.bootstrap import Layout
from appliance.host.libc import libc as host_libc

# <sys/inotify.h>
_IN_MODIFY = 0x00000002
_IN_ATTRIB = 0x00000004
_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_FROM = 0x00000040
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_DELETE = 0x00000200
_IN_DELETE_SELF = 0x00000400
_IN_MOVE_SELF = 0x00000800
_IN_ONLYDIR = 0x01000000
_IN_DONT_FOLLOW = 0x02000000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
#: Every change to a directory's entries, to the files in it, or to the directory itself.
_MASK = (
    _IN_MODIFY
    | _IN_ATTRIB
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
    | _IN_ONLYDIR
    | _IN_DONT_FOLLOW
)
_MOUNTS = "/proc/self/mountinfo"


class WatchUnavailable(Exception):
    """The environment cannot be watched here; the message says why (the full check is used)."""


def _mounts() -> bytes:
    try:
        with open(_MOUNTS, "rb") as f:
            return f.read()
    except OSError as exc:
        raise WatchUnavailable(f"{_MOUNTS}: {exc.strerror or exc}") from None


def directories(layout: Layout) -> list[Path]:
    """Every directory a scan of ``layout`` lists files in (symbolic links are not followed)."""
    roots = [root for _, root in layout.roots()]
    for hook in layout.hooks:
        roots.append(hook.path if hook.kind == "package" else hook.path.parent)
    out: list[Path] = []
    for root in roots:
        out.append(root)
        for here, subdirs, _ in os.walk(root, followlinks=False):
            out.extend(Path(here) / d for d in subdirs if not os.path.islink(os.path.join(here, d)))
    return out


class CodeWatch:
    """inotify watches on directories: :meth:`changed` says whether anything happened since."""

    def __init__(self, dirs: Iterable[Path]) -> None:
        libc = host_libc()
        fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            raise WatchUnavailable(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        self._fd: int | None = fd
        self._mounts = _mounts()
        self.watched = 0
        try:
            for d in dirs:
                if libc.inotify_add_watch(fd, os.fsencode(d), _MASK) < 0:
                    raise WatchUnavailable(f"inotify_add_watch {d}: {os.strerror(ctypes.get_errno())}")
                self.watched += 1
        except BaseException:
            self.close()
            raise

    @classmethod
    def over(cls, layout: Layout) -> CodeWatch:
        return cls(directories(layout))

    def changed(self) -> bool:
        """Has anything changed (or may it have) since the watches were placed? Once true,
        always true: the watch is then closed."""
        if self._fd is None:
            return True
        try:
            pending = os.read(self._fd, 4096)
        except BlockingIOError:
            pending = b""
        except OSError:
            pending = b"?"
        if pending or _mounts_now() != self._mounts:
            self.close()
            return True
        return False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _mounts_now() -> bytes | None:
    try:
        return _mounts()
    except WatchUnavailable:
        return None
