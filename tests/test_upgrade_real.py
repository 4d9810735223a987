"""Upgrading the code needs a new C approved by the network (issue 4 §2), with real processes.

A 4-server network (t = 1). The operators approve a new manifest with `pst upgrade approve`;
`pst upgrade sign` asks the running network for the group's signature on the upgrade
[Scert(U), U]. Each server's signing service contributes a share only for the upgrade its own
operator approved, so one approval is not enough and two (t + 1) are. The certificate then
installs on every server, and the boot check holds the servers to the new code.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterutil import pst, running_cluster

import appliance


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with running_cluster(tmp_path_factory.mktemp("upg") / "c", n=4, period=30, round_ms=100) as root:
        yield root


def _new_manifest(tmp: Path) -> Path:
    """The manifest of a changed copy of the package: the code of the "next version"."""
    copy = tmp / "next" / "appliance"
    shutil.copytree(Path(appliance.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    with open(copy / "cli.py", "a", encoding="utf-8") as f:
        f.write("\n# the next version\n")
    out = tmp / "next.manifest"
    made = pst("manifest", "--root", str(copy), "--out", str(out))
    assert made.returncode == 0, made.stdout + made.stderr
    return out


def _config(root: Path, i: int) -> str:
    return str(root / f"node-{i}" / "config.toml")


def test_an_upgrade_needs_t_plus_1_approvals_then_installs_everywhere(cluster: Path, tmp_path: Path) -> None:
    manifest = _new_manifest(tmp_path)
    cert = tmp_path / "upgrade.cert"

    # Nobody approved on server 1: it refuses at once.
    out = pst("upgrade", "sign", "--config", _config(cluster, 1), "--out", str(cert))
    assert out.returncode == 1 and "no upgrade is approved on this server" in out.stderr, out.stderr

    # Only server 1's operator approved: the other signers refuse their shares.
    ok = pst("upgrade", "approve", "--config", _config(cluster, 1), "--manifest", str(manifest))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    out = pst("upgrade", "sign", "--config", _config(cluster, 1), "--out", str(cert))
    assert out.returncode == 1 and not cert.exists(), out.stdout + out.stderr
    assert "declined by servers [2, 3, 4]" in out.stderr, out.stderr  # at once, not after a timeout

    # Server 2's operator approves the same upgrade: t + 1 = 2 approvals, the network signs.
    ok = pst("upgrade", "approve", "--config", _config(cluster, 2), "--manifest", str(manifest))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    deadline = time.monotonic() + 40
    while True:
        out = pst("upgrade", "sign", "--config", _config(cluster, 1), "--out", str(cert))
        if out.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert out.returncode == 0, out.stdout + out.stderr
    assert cert.exists()

    # The certificate is self-authenticating: every server installs it, servers 3 and 4 included.
    for i in (1, 2, 3, 4):
        done = pst("upgrade", "install", "--config", _config(cluster, i), "--certificate", str(cert))
        assert done.returncode == 0, done.stdout + done.stderr
    # The C in force now names the new code: this (old) code no longer passes the boot check.
    check = pst("check", "--config", _config(cluster, 3))
    assert check.returncode != 0
    assert "code_digest" in check.stdout + check.stderr or "manifest" in check.stdout + check.stderr


def test_a_tampered_certificate_is_refused(cluster: Path, tmp_path: Path) -> None:
    cert = tmp_path / "forged.cert"
    cert.write_bytes(b"\xa1\x61x\x01")
    out = pst("upgrade", "install", "--config", _config(cluster, 1), "--certificate", str(cert))
    assert out.returncode != 0 and str(cert) in out.stderr
