"""Scenario F against real processes: one changed byte of an installed module, and the boot refuses.

The package is copied to a temporary directory and every ``pst`` command runs with
PYTHONPATH pointing at the copy (checked: the copy is what gets imported and hashed), so
the test never changes the repository's own files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from bootutil import copy_package, flip_one_byte, random_free_base_port

from appliance.boot.check import EXIT_BOOT_REFUSED, read_manifest
from appliance.boot.manifest import Manifest


def test_scenario_f_a_changed_module_stops_the_boot_with_an_alert_naming_it(tmp_path: Path) -> None:
    pkg = tmp_path / "site"
    code = copy_package(pkg)
    (code / "COPY-MARKER").write_text("a package data file only the copy has\n")
    env = {**os.environ, "PYTHONPATH": str(pkg)}

    def pst(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "appliance.cli", *args],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    imported = subprocess.run(
        [sys.executable, "-c", "import appliance; print(appliance.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(imported.stdout.strip()) == code / "__init__.py"

    root = tmp_path / "c"
    init = pst(
        "cluster",
        "init",
        "--nodes",
        "3",
        "--threshold",
        "1",
        "--dir",
        str(root),
        "--period",
        "600",
        "--round-ms",
        "60",
        "--base-port",
        str(random_free_base_port(3)),
    )
    assert init.returncode == 0, init.stdout + init.stderr
    node = root / "node-1"
    digest = Manifest.build(code).digest()
    assert f'code_digest = "{digest.hex()}"' in (node / "config.toml").read_text()
    stored = read_manifest(node / "state" / "public")
    assert stored is not None and stored.digest() == digest and "COPY-MARKER" in stored.files

    ok = pst("check", "--config", str(node / "config.toml"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"code imported from {code}" in ok.stdout and "server 1 may boot" in ok.stdout

    # The intact server boots: its local API comes up.
    api = node / "api.sock"
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli", "serve", "--config", str(node / "config.toml")],
            env=env,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while not api.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert api.exists(), (tmp_path / "serve.log").read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)

    # The attack: one byte of an installed module (still valid Python).
    target = code / "protocols" / "refresh.py"
    flip_one_byte(target)

    bad = pst("check", "--config", str(node / "config.toml"))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "BOOT REFUSED" in bad.stderr and f"{target}: changed" in bad.stderr
    assert "FAIL  code:" in bad.stdout

    started = time.monotonic()
    refused = pst("serve", "--config", str(node / "config.toml"))
    assert refused.returncode == EXIT_BOOT_REFUSED, refused.stdout + refused.stderr
    assert "boot refused" in refused.stderr and f"{target}: changed" in refused.stderr
    assert "local API" not in refused.stderr and time.monotonic() - started < 30

    lines = (node / "state" / "public" / "alerts.jsonl").read_text().splitlines()
    alerts = [json.loads(line) for line in lines]
    assert [a["kind"] for a in alerts] == ["code-mismatch", "code-mismatch"]  # pst check, pst serve
    assert all(a["server"] == 1 and str(target) in a["detail"] for a in alerts)
    shown = pst("alerts", "--dir", str(root))
    assert "ALERT code-mismatch: server 1" in shown.stdout and str(target) in shown.stdout

    # Every server of this machine runs the same code: every one refuses.
    other = pst("check", "--config", str(root / "node-2" / "config.toml"))
    assert other.returncode == 1 and f"{target}: changed" in other.stderr
