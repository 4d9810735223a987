"""Which servers an operator's command acts on: ``--dir`` (a local cluster) or ``--config``.

Every ``pst`` command that reads or talks to servers takes one of the two:

* ``--dir D``: a cluster made by ``pst cluster init``; its servers are ``D/node-<i>``, each
  with ``config.toml``, its state in ``state/`` and, while ``pst cluster up`` runs it,
  ``server.pid``. A node is found by its directory alone, so a node whose config is broken
  still shows (as not running).
* ``--config F``: one server's config, as deployed (``/etc/pst/server.toml``, docs/deploy.md);
  its state directory is the config's ``server.state_dir``. The config must load.

Giving both, or neither, is a usage error (argparse, exit 2); a missing config file or a
directory without a cluster is a :class:`ConfigError` naming the path (exit 2). ``pst cluster
init|up|down`` and ``pst demo`` make and run a local cluster, so they take ``--dir`` only (a
deployed server is started and stopped by systemd).

A node's running ``pst serve`` is found from ``server.pid`` (a cluster) or from the ``pid``
its key-holder writes in ``status.json``, and only counts when that process really is
``pst serve`` with this very config file: a pid file outlives its process (a reboot, a
copied directory), and the number may then name an unrelated process, which no command may
signal.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.host import config as node_config
from appliance.protocols.state import ConfigError

#: Where ``pst cluster up`` writes the pid of a node's ``pst serve``.
PID_FILE = "server.pid"


@dataclass(frozen=True)
class Node:
    """One server as a command finds it."""

    server: int
    config_path: Path
    state_dir: Path
    #: ``node-<i>`` of a local cluster; None for a server given by ``--config``.
    directory: Path | None = None

    @classmethod
    def of_directory(cls, directory: Path) -> Node:
        return cls(
            int(directory.name.split("-")[1]), directory / "config.toml", directory / "state", directory
        )

    @classmethod
    def of_config(cls, path: Path) -> Node:
        config = node_config.load(path)
        return cls(config.server_id, path, config.state_dir)

    @property
    def name(self) -> str:
        return self.directory.name if self.directory is not None else f"server {self.server}"

    @property
    def public_dir(self) -> Path:
        return self.state_dir / "public"

    @property
    def pid_file(self) -> Path | None:
        return self.directory / PID_FILE if self.directory is not None else None

    @property
    def log_file(self) -> Path | None:
        """``server.log`` of a cluster node (a deployed server logs to the journal)."""
        return self.directory / "server.log" if self.directory is not None else None

    def config(self) -> node_config.NodeConfig:
        return node_config.load(self.config_path)

    def status(self) -> dict[str, Any]:
        """status.json as the key-holder last wrote it, or why there is none (``status`` unknown)."""
        path = self.public_dir / "status.json"
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            why = "not started yet" if isinstance(exc, FileNotFoundError) else f"{path}: {exc}"
            return {"server": self.server, "status": "unknown", "error": why}
        return data

    def pid(self) -> int | None:
        """The pid of this node's ``pst serve``, if one runs with this node's config file."""
        try:
            if self.pid_file is not None:
                pid = int(self.pid_file.read_text())
            else:
                pid = int(self.status().get("pid") or 0)
        except (OSError, ValueError, TypeError):
            return None
        return pid if pid > 0 and serves(pid, self.config_path) else None


def serves(pid: int, config: Path) -> bool:
    """Is process ``pid`` a ``pst serve`` of the config file ``config``?"""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    args = [os.fsdecode(a) for a in argv]
    if "serve" not in args or "--config" not in args[:-1]:
        return False
    given = args[args.index("--config") + 1]
    try:
        if not os.path.isabs(given):
            given = os.path.join(os.readlink(f"/proc/{pid}/cwd"), given)
        return os.path.samefile(given, config)
    except OSError:
        return False


def cluster_nodes(root: Path) -> list[Node]:
    """The servers of a cluster directory made by ``pst cluster init``, by id."""
    dirs = [p for p in root.glob("node-*") if p.name[5:].isdigit() and p.is_dir()]
    if not dirs:
        raise ConfigError(f"{root}: holds no cluster (pst cluster init --dir {root} makes one)")
    return [Node.of_directory(d) for d in sorted(dirs, key=lambda p: int(p.name[5:]))]


def add_node_options(parser: argparse.ArgumentParser, *, node: bool = False) -> None:
    """``--dir D`` or ``--config F`` (exactly one), and with ``node`` also ``--node I``."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--dir", help="a cluster made by pst cluster init (every server of it)")
    group.add_argument("--config", help="one server's TOML config (e.g. /etc/pst/server.toml)")
    if node:
        parser.add_argument("--node", type=int, help="with --dir: only this server")


def nodes_of(args: argparse.Namespace) -> list[Node]:
    """The servers ``--dir`` or ``--config`` (and ``--node``, if the command has it) name."""
    if args.config is not None:
        return [Node.of_config(Path(args.config))]
    root = Path(args.dir)
    nodes = cluster_nodes(root)
    which = getattr(args, "node", None)
    if which is not None:
        nodes = [n for n in nodes if n.server == which]
        if not nodes:
            raise ConfigError(f"{root}: holds no server {which}")
    return nodes
