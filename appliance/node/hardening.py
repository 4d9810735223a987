"""Process hardening for the key-holder: no core dumps, no ptrace by peers, locked memory.

Each call returns what it achieved instead of raising, so the key-holder can report it in
``status.json`` (``keyholder``): a server whose memory could not be locked still runs, and
says so. Linux only; elsewhere every step reports "unsupported".
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import resource
import signal
from dataclasses import asdict, dataclass
from typing import Any

from appliance.host.libc import libc as host_libc

PR_SET_PDEATHSIG = 1
PR_GET_DUMPABLE = 3
PR_SET_DUMPABLE = 4
MCL_CURRENT = 1
MCL_FUTURE = 2
#: Below this RLIMIT_MEMLOCK, MCL_FUTURE would make later allocations fail: lock current pages only.
_FUTURE_LOCK_MINIMUM = 1 << 30


@dataclass(frozen=True)
class Hardening:
    """What :func:`harden` achieved; ``mlock`` is "all", "current" or the reason it failed."""

    core_limit: int
    dumpable: bool
    mlock: str
    parent_death_signal: bool

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def no_core_dumps() -> int:
    """RLIMIT_CORE = 0 (soft and hard): a crash leaves no memory image on disk.

    Returns the hard limit now in force (0 unless a seccomp filter refused the call; the
    systemd unit sets LimitCORE=0 as well).
    """
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return resource.getrlimit(resource.RLIMIT_CORE)[1]


def not_dumpable(libc: Any) -> bool:
    """PR_SET_DUMPABLE 0: no core dump, and /proc/PID/mem and ptrace need CAP_SYS_PTRACE."""
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    return bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))


def die_with_parent(libc: Any) -> bool:
    """SIGKILL when the parent dies (kill -9 of ``pst serve`` takes the key-holder with it)."""
    return int(libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0


def lock_memory(libc: Any) -> str:
    """mlockall: keep every page of this process out of swap.

    MCL_FUTURE too when RLIMIT_MEMLOCK allows growth (unlimited, root, or CAP_IPC_LOCK kept
    through privilege separation); otherwise the pages present now only, so that a later
    allocation cannot fail on the limit.
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    roomy = (
        soft == resource.RLIM_INFINITY
        or soft >= _FUTURE_LOCK_MINIMUM
        or os.geteuid() == 0
        or has_memory_lock_capability()
    )
    flags = MCL_CURRENT | (MCL_FUTURE if roomy else 0)
    if libc.mlockall(flags) != 0:
        err = ctypes.get_errno()
        return f"failed: {os.strerror(err)} (RLIMIT_MEMLOCK={soft}); secrets may reach swap"
    return "all" if roomy else "current"


def harden(*, lock: bool, die_with_parent_process: bool) -> Hardening:
    """Apply every measure; ``lock`` adds mlockall (locks are not inherited through fork).

    ``die_with_parent_process`` only where the parent is single-threaded: the signal fires
    when the parent *thread* that forked us ends (trio starts processes from worker threads).
    """
    try:
        libc = host_libc()
    except OSError:  # pragma: no cover - not Linux
        return Hardening(no_core_dumps(), True, "unsupported", False)
    core = no_core_dumps()
    dumpable = not_dumpable(libc)
    pdeath = die_with_parent(libc) if die_with_parent_process else False
    mlock = lock_memory(libc) if lock else "not requested"
    return Hardening(core, dumpable, mlock, pdeath)


# Keeping CAP_IPC_LOCK across a change of uid (privilege separation) -----------------------------

PR_SET_KEEPCAPS = 8
CAP_IPC_LOCK = 14
_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def keep_capabilities(keep: bool) -> None:
    """PR_SET_KEEPCAPS: whether the permitted capabilities survive the coming setresuid."""
    libc = host_libc()
    if libc.prctl(PR_SET_KEEPCAPS, int(keep), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_KEEPCAPS): {os.strerror(err)}")


def has_memory_lock_capability() -> bool:
    """Is CAP_IPC_LOCK in this process's effective set (/proc/self/status CapEff)?"""
    try:
        for line in open("/proc/self/status", encoding="ascii"):  # noqa: SIM115 - read once
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) & (1 << CAP_IPC_LOCK))
    except (OSError, ValueError):
        pass
    return False


def only_memory_lock_capability() -> None:
    """After a setresuid away from root with PR_SET_KEEPCAPS: keep CAP_IPC_LOCK, nothing else.

    mlockall needs either a high RLIMIT_MEMLOCK (the systemd unit sets LimitMEMLOCK) or
    CAP_IPC_LOCK; where the limit cannot be raised (a container without CAP_SYS_RESOURCE),
    the key-holder keeps just this capability, which lets it lock its own pages and nothing more.
    """
    libc = host_libc()
    header = _CapHeader(_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    data[0].effective = data[0].permitted = 1 << CAP_IPC_LOCK
    if libc.capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset(CAP_IPC_LOCK): {os.strerror(err)}")
