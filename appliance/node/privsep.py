"""Privilege separation: the key-holder and ``pst serve`` under two accounts (issue 9 item 2).

Theory of operation
-------------------
Forking a key-holder (:mod:`appliance.node.keyholder`) keeps the shares out of the address
space that parses the network's bytes, but as long as both processes run as one uid the
network-facing process can simply read ``private/period.cbor``, write the upgrade approval
the key-holder trusts, or ptrace the key-holder. With a ``[privsep]`` section in the config,
``pst serve`` starts as root and splits, as OpenSSH's privilege separation does:

1. as root, after the boot check and before anything else: :func:`prepare` gives the state
   directory its owners (below) and creates the API socket's directory for the server's
   account;
2. it forks the zygote, which raises its memory-lock limit (mlockall needs it once root is
   gone), then :func:`drop` s to the key-holder's account for good, and only then forks
   key-holder children (which load the shares);
3. it :func:`drop` s to the server's account for good before trio starts, before it opens a
   socket or reads a byte from anyone.

After the split no process of the server is root, the two accounts cannot signal or ptrace
each other, and the only way between them is the key-holder link (frames the key-holder
checks; the application payload is built by the key-holder from a name and a digest).

Owners and modes of the state directory::

    <state>/            root        0755
    <state>/private/    keyholder   0700   shares and seeds: the key-holder alone
    <state>/public/     keyholder   0755   M, KeyTable, upgrades, the operator's upgrade approval,
                                           status.json, alerts.jsonl: written by the key-holder
                                           (and by root: the boot check, ``pst upgrade``);
                                           read by everyone
    <state>/serve/      server      2750   what pst serve writes: the API's registrations, its
                        group keyholder    own alerts; the key-holder reads the registrations
    <state>/log/        server      2750   the log's tiles and entry bundles ([log] dir, which may
                        group keyholder    be elsewhere): written by pst serve's ingest, readable by
                                           the key-holder's group (the checkpoint guard will read it)

The log's directory is handed over whole (``chown -R``) only when its top is not yet the
server's: a log of millions of files is not walked at every start. New files inherit the
key-holder's group from the set-group-id directories, and the server's umask 027 leaves
them readable to that group.

Syslog ports below 1024 (514): ``pst serve`` binds the [log] sockets after forking the
zygote and before it drops to the server's account (:func:`appliance.node.run.bind_log`),
so the server's account needs no capability; the sockets are never inherited by the
key-holder.

So the server's account can read no share (``private/`` is not even listable) and cannot
write an approval (``public/`` is not writable to it). What it can still do if it is taken
over is what any network-facing process can: refuse service, lie on its status page, and
speak for this server's own API clients (docs/security.md).
"""

from __future__ import annotations

import contextlib
import os
import resource
import stat
from pathlib import Path

from appliance.host.config import Account, NodeConfig, Privsep, resolve_account
from appliance.node.hardening import keep_capabilities, only_memory_lock_capability
from appliance.protocols.state import ConfigError

#: The directory of ``pst serve``'s own files in the state directory.
SERVE_DIR = "serve"


class PrivsepError(Exception):
    """Privilege separation could not be set up; the server must not start half-separated."""


def require_root(config: NodeConfig) -> Privsep | None:
    """The config's [privsep] with its accounts looked up, after checking that ``pst serve``
    can carry it out."""
    if config.privsep is None:
        return None
    privsep = Privsep(
        server=resolve_account(config.privsep.server, "server_user", config.path),
        keyholder=resolve_account(config.privsep.keyholder, "keyholder_user", config.path),
    )
    if privsep.server.uid == privsep.keyholder.uid:
        raise ConfigError(f"{config.path}: privsep.server_user and privsep.keyholder_user are one uid")
    if os.geteuid() != 0:
        raise ConfigError(
            f"{config.path}: [privsep] needs pst serve to start as root (it then runs as "
            f"{privsep.server.name} and its key-holder as {privsep.keyholder.name}); "
            f"running as uid {os.geteuid()}"
        )
    return privsep


def _own(path: Path, uid: int, gid: int, mode: int | None) -> None:
    os.chown(path, uid, gid, follow_symlinks=False)
    if mode is not None:
        os.chmod(path, mode)


def _own_tree(root: Path, uid: int, gid: int) -> None:
    """chown -R, never following a symlink (a planted link must not hand over another file)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)
    os.chown(root, uid, gid, follow_symlinks=False)


def prepare(config: NodeConfig, privsep: Privsep) -> None:
    """As root: the owners and modes of the state directory and the API socket's directory."""
    state = config.state_dir
    keys, server = privsep.keyholder, privsep.server
    try:
        state.mkdir(parents=True, exist_ok=True)
        _own(state, 0, 0, 0o755)
        for name, mode in (("private", 0o700), ("public", 0o755)):
            path = state / name
            path.mkdir(exist_ok=True)
            _own_tree(path, keys.uid, keys.gid)
            os.chmod(path, mode)
        serve = state / SERVE_DIR
        serve.mkdir(exist_ok=True)
        _own_tree(serve, server.uid, keys.gid)
        os.chmod(serve, 0o2750)
        if config.log is not None:
            _log_dir(config.log.directory, server, keys)
        _socket_dir(config, server)
    except OSError as exc:
        raise PrivsepError(
            f"{exc.filename}: cannot prepare for privilege separation: {exc.strerror}"
        ) from None


def _log_dir(directory: Path, server: Account, keys: Account) -> None:
    """The log's directory: the server's, group key-holder, 2750 (chown -R the first time)."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o750)
    st = os.lstat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise PrivsepError(f"{directory}: log.dir is not a directory")
    if (st.st_uid, st.st_gid) != (server.uid, keys.gid):
        _own_tree(directory, server.uid, keys.gid)
    os.chmod(directory, 0o2750)


def _socket_dir(config: NodeConfig, server: Account) -> None:
    """The API socket's directory belongs to the server's account (it binds the socket there).

    Only a directory of the socket's own: handing over a directory that holds anything else
    (the config, say) would let the server's account replace it.
    """
    directory = config.api_socket.parent
    if not directory.exists():
        directory.mkdir(parents=True, mode=0o750)
    st = directory.stat()
    if st.st_uid == server.uid:
        return
    others = [
        e.name for e in os.scandir(directory) if not stat.S_ISSOCK(e.stat(follow_symlinks=False).st_mode)
    ]
    if others:
        raise PrivsepError(
            f"{config.path}: server.api_socket's directory {directory} holds other files "
            f"({', '.join(sorted(others)[:3])}); with [privsep] the socket needs a directory "
            "of its own, such as /run/pst/api.sock"
        )
    os.chown(directory, server.uid, server.gid)


def allow_memory_lock() -> bool:
    """As root, before dropping: let the key-holder lock all of its memory (mlockall).

    True if RLIMIT_MEMLOCK is now unlimited; otherwise (no CAP_SYS_RESOURCE here) the
    key-holder keeps CAP_IPC_LOCK through the drop (``drop(..., keep_memory_lock=True)``).
    """
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    return resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] == resource.RLIM_INFINITY


def drop(account: Account, umask: int, *, keep_memory_lock: bool = False) -> None:
    """Become ``account`` for good (real, effective and saved ids; no supplementary groups).

    ``keep_memory_lock``: keep CAP_IPC_LOCK (and no other capability) for mlockall.
    """
    try:
        os.setgroups([])
        os.setresgid(account.gid, account.gid, account.gid)
        if keep_memory_lock:
            keep_capabilities(True)
        os.setresuid(account.uid, account.uid, account.uid)
        if keep_memory_lock:
            keep_capabilities(False)
            only_memory_lock_capability()
    except OSError as exc:
        raise PrivsepError(f"cannot become {account.name} (uid {account.uid}): {exc.strerror}") from None
    if os.getresuid() != (account.uid,) * 3 or os.getresgid() != (account.gid,) * 3:
        raise PrivsepError(f"the ids did not change to {account.name}'s")
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - the kernel would have to be broken
        raise PrivsepError("root could be regained after dropping privileges")
    os.umask(umask)
