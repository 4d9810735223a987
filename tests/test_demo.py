"""`make demo` (`pst demo`): the network comes up, logs what `logger` sends, signs a checkpoint
of it that `pst log verify` checks, issues a timestamp and an application's period certificate
(renewed after a refresh) that OpenSSL verifies against the group root, refreshes, and stops
every server it started on SIGTERM."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from clusterutil import free_base_port


def _servers_of(root: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"serve" in cmdline and str(root).encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def test_the_demo_logs_signs_verifies_refreshes_and_stops(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    argv = [sys.executable, "-m", "appliance.cli", "demo", "--nodes", "4", "--dir", str(root)]
    argv += ["--period", "6", "--base-port", str(free_base_port(4))]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    assert proc.stdout is not None
    out = b""
    deadline = time.monotonic() + 240  # returns at the first refresh shown, normally within 15 s
    try:
        while time.monotonic() < deadline and re.search(rb"period [0-9]+ operational", out) is None:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
        text = out.decode(errors="replace")
        assert "sent 3 lines to server 1 with logger" in text, text
        assert re.search(r"a checkpoint of size [0-9]+ is signed", text), text
        assert "pst log verify --index 0: verified" in text, text
        assert "pst log verify --audit: verified" in text, text
        assert re.search(r"period [0-9]+ operational", text), text
        # The group's CA: a timestamp and two period certificates that verify against its root.
        assert re.search(r"openssl ts -verify -data demo-document.txt .*: Verification: OK", text), text
        assert re.search(r"openssl verify -CAfile ca-root.pem demo-tunnel-2.pem: .*: OK", text), text
        assert len(_servers_of(root)) >= 4
    finally:
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, (out + rest).decode(errors="replace")
    assert b"stopped. Logs and state stay in" in rest
    for _ in range(50):
        if not _servers_of(root):
            break
        time.sleep(0.1)
    assert _servers_of(root) == []
