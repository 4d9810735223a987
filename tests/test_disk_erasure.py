"""Scenario A on the disk: after a refresh, no earlier period's secret is left in the file system.

Issue 9 item 1: the private state was replaced by rename, which frees the old blocks with the
old shares still in them; every share and key seed of four periods was read back from the raw
image of a 4-server cluster. Here a real cluster runs on a fresh ext4 image (loop device, the
default options: journal, ordered data) through four refreshes; then the raw image is searched
for every secret each server held in each period.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterutil import init_cluster, pst

from appliance.crypto.errors import DecodeError
from appliance.node.store import decode_private

pytestmark = pytest.mark.slow

NODES = 4


def _run(*cmd: str) -> None:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"{' '.join(cmd)}: {out.stdout}{out.stderr}"


@contextlib.contextmanager
def ext4_image(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    if os.geteuid() != 0 or not shutil.which("mkfs.ext4") or not shutil.which("losetup"):
        pytest.skip("needs root, mkfs.ext4 and losetup (make test installs e2fsprogs; CI runs as root)")
    image, mount = tmp_path / "disk.img", tmp_path / "mnt"
    with image.open("wb") as f:
        f.truncate(128 * 1024 * 1024)
    _run("mkfs.ext4", "-q", "-F", str(image))
    mount.mkdir()
    _run("mount", "-o", "loop", str(image), str(mount))
    try:
        yield image, mount
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(mount)], capture_output=True, check=False).returncode == 0:
                break
            time.sleep(0.5)


def _secrets(root: Path) -> dict[tuple[int, int], set[bytes]]:
    """Every secret value in each server's private state now, by (server, period)."""
    out: dict[tuple[int, int], set[bytes]] = {}
    for i in range(1, NODES + 1):
        try:
            private = decode_private((root / f"node-{i}" / "state" / "private" / "period.cbor").read_bytes())
        except (FileNotFoundError, DecodeError):
            continue
        values = {private.signing_seed, private.encryption_seed}
        values |= {s.value.to_bytes(64, "big") for s in private.shares.values()}
        values |= {v.to_bytes(64, "big") for r in private.rpoints.values() for v in r.values()}
        out[(i, private.period)] = values
    return out


def test_no_secret_of_an_earlier_period_is_left_in_the_file_system_image(tmp_path: Path) -> None:
    with ext4_image(tmp_path) as (image, mount):
        root = mount / "c"
        init_cluster(root, n=NODES, period=600, round_ms=80)
        assert pst("cluster", "up", "--dir", str(root), "--detach").returncode == 0
        held: dict[tuple[int, int], set[bytes]] = {}
        try:
            held |= _secrets(root)
            for _ in range(4):
                out = pst("refresh", "--now", "--dir", str(root))
                assert out.returncode == 0, out.stdout + out.stderr
                held |= _secrets(root)
        finally:
            pst("cluster", "down", "--dir", str(root))
        os.sync()
    raw = image.read_bytes()
    last = max(p for _i, p in held)
    assert {p for _i, p in held} == {0, 1, 2, 3, 4}, sorted(held)
    leaked = sorted((i, p) for (i, p), values in held.items() if p < last and any(v in raw for v in values))
    assert not leaked, f"secrets of earlier periods found in the image (server, period): {leaked}"
    # The search works: the current period's secrets are in the image (the live state file).
    assert all(any(v in raw for v in values) for (i, p), values in held.items() if p == last)
