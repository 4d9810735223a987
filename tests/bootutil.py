"""Helpers for the boot-check tests: a private copy of the package, a cluster that names it,
and the group's signature made the way t+1 signing services make it (FROST)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from appliance.boot.manifest import Manifest, package_root
from appliance.crypto import frost
from appliance.crypto.groups import ED25519
from appliance.host import config as node_config
from appliance.host.config import NodeConfig
from appliance.node.cluster import init_cluster, node_dir
from appliance.node.store import StateDir
from appliance.protocols.state import SCERT


def copy_package(dest: Path) -> Path:
    """A copy of the installed ``appliance`` package under ``dest`` (returns its directory).

    Tests change files of the copy, never of the repository (which other work may be
    editing at the same time, so the copy is also what makes the digest stable).
    """
    copy = dest / "appliance"
    shutil.copytree(package_root(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def cluster_for(root: Path, code: Path, *, n: int = 4) -> dict[int, NodeConfig]:
    """A one-process-ceremony cluster whose C names the code under ``code``; the configs."""
    init_cluster(
        root, n=n, t=1, period_seconds=600, round_ms=50, progress=lambda _: None, code=Manifest.build(code),
        log="off",
    )  # fmt: skip
    return {i: node_config.load(node_dir(root, i) / "config.toml") for i in range(1, n + 1)}


def flip_one_byte(path: Path) -> None:
    """Change one byte of a module and keep it valid Python: the case of its docstring's first letter."""
    data = bytearray(path.read_bytes())
    assert data[:3] == b'"""' and chr(data[3]).isalpha(), f"{path} does not start with a docstring"
    data[3] ^= 0x20
    path.write_bytes(bytes(data))


def group_sign(root: Path, signers: list[int], message: bytes) -> bytes:
    """The group key's signature on ``message`` by ``signers`` (t+1 of them), as FROST makes it."""
    m = StateDir(node_dir(root, signers[0]) / "state").load().public.m
    assert m is not None
    packages = []
    for i in signers:
        private = StateDir(node_dir(root, i) / "state").load().private
        assert private is not None
        share = private.shares[SCERT].value % ED25519.order
        packages.append(frost.KeyPackage(i, share, m.vcert, len(signers)))
    nonces = [frost.commit(p, os.urandom(64)) for p in packages]
    commitments = [x.commitment for x in nonces]
    shares = [frost.sign(p, x, message, commitments) for p, x in zip(packages, nonces, strict=True)]
    return frost.aggregate(commitments, message, m.vcert, shares)


def random_free_base_port(n: int) -> int:
    """Like clusterutil.free_base_port, but from a random start: tests of other sessions that run
    at the same time on this machine then rarely race for the same ports."""
    import random
    import socket

    for _ in range(200):
        base = random.randrange(20000, 32368 - n)  # below the ephemeral range (clusterutil.free_base_port)
        with contextlib.ExitStack() as stack:
            try:
                # the servers, their HTTP services, their syslog (TCP; UDP is rarely taken) and RELP
                for i in [*range(1, n + 1), *range(101, 101 + n), *range(201, 201 + n), *range(301, 301 + n)]:
                    s = stack.enter_context(socket.socket())
                    s.bind(("127.0.0.1", base + i))
            except OSError:
                continue
            return base
    raise RuntimeError("no free ports")
