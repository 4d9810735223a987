"""The C library, for the few system calls the standard library lacks (prctl, mlockall, inotify)."""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any


def libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)  # glibc; find_library would fork ldconfig
    except OSError:  # pragma: no cover - another libc
        return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
