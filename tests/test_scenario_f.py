"""Scenario F against real processes: one changed byte of an installed module, and the boot refuses.

Each test builds its own server venv (tests/venvutil.py: the runtime dependencies and a copy
of the package in its site-packages, ``bin/pst``) and runs every ``pst`` command from it
(checked: the copy is what gets imported and hashed), so the test never changes the
repository's own files nor its environment.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from bootutil import flip_one_byte, random_free_base_port
from venvutil import make_venv, run, site_packages

from appliance.boot.bootstrap import environment_layout
from appliance.boot.check import EXIT_BOOT_REFUSED, read_manifest
from appliance.boot.manifest import Manifest


def test_scenario_f_a_changed_module_stops_the_boot_with_an_alert_naming_it(tmp_path: Path) -> None:
    venv = make_venv(tmp_path / "venv")
    code = site_packages(venv) / "appliance"
    (code / "COPY-MARKER").write_text("a package data file only the copy has\n")
    pst = functools.partial(run, venv, cwd=tmp_path)

    imported = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import appliance; print(appliance.__file__)"],
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
        "4",
        "--threshold",
        "1",
        "--dir",
        str(root),
        "--period",
        "600",
        "--round-ms",
        "60",
        "--base-port",
        str(random_free_base_port(4)),
    )
    assert init.returncode == 0, init.stdout + init.stderr
    node = root / "node-1"
    # C names the whole environment of the venv (as this process computes it for that venv).
    layout = environment_layout(code, executable=str(venv / "bin" / "python"))
    digest = Manifest.build_environment(layout).digest()
    assert f'code_digest = "{digest.hex()}"' in (node / "config.toml").read_text()
    stored = read_manifest(node / "state" / "public")
    assert stored is not None and stored.digest() == digest and stored.environment
    assert f"env/{code.relative_to(venv)}/COPY-MARKER" in stored.files and "env/pyvenv.cfg" in stored.files

    ok = pst("check", "--config", str(node / "config.toml"))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert f"code imported from {code}" in ok.stdout and "server 1 may boot" in ok.stdout

    # The intact server boots: its local API comes up.
    api = node / "api.sock"
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            [str(venv / "bin" / "pst"), "serve", "--config", str(node / "config.toml")],
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


def test_scenario_f_a_module_changed_while_running_stops_the_server_at_the_next_refresh(
    tmp_path: Path,
) -> None:
    """The check runs again before every period: the key-holder of the next period refuses."""
    venv = make_venv(tmp_path / "venv")
    code = site_packages(venv) / "appliance"
    pst = functools.partial(run, venv, cwd=tmp_path)

    root = tmp_path / "c"
    init = pst(
        "cluster", "init", "--nodes", "4", "--threshold", "1", "--dir", str(root),
        "--period", "600", "--round-ms", "80", "--base-port", str(random_free_base_port(4)), "--log", "off",
    )  # fmt: skip
    assert init.returncode == 0, init.stdout + init.stderr
    up = pst("cluster", "up", "--dir", str(root), "--detach")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        first = pst("refresh", "--now", "--dir", str(root))
        assert first.returncode == 0, first.stdout + first.stderr  # the intact code refreshes

        # Each server's next key-holder is forked ahead (a third of the period, at most 5 s) and
        # checks the code then, with the environment watched: the change below, made after that
        # check, must be seen through the watch (appliance.boot.watch).
        def standbys_ready() -> bool:
            for i in (1, 2, 3, 4):
                serve = int((root / f"node-{i}" / "server.pid").read_text())
                zygotes = Path(f"/proc/{serve}/task/{serve}/children").read_text().split()
                children = [
                    c for z in zygotes for c in Path(f"/proc/{z}/task/{z}/children").read_text().split()
                ]
                if len(children) < 2:
                    return False
            return True

        deadline = time.monotonic() + 20
        while not standbys_ready():
            assert time.monotonic() < deadline, "no standby key-holder was forked"
            time.sleep(0.2)
        time.sleep(1.0)  # their checks ahead (a fraction of a second each)
        target = code / "crypto" / "shamir.py"
        flip_one_byte(target)  # while the servers run
        pst("refresh", "--now", "--dir", str(root), timeout=60)
        deadline = time.monotonic() + 30
        pids = [int((root / f"node-{i}" / "server.pid").read_text()) for i in (1, 2, 3, 4)]

        def alive(pid: int) -> bool:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text()

        while time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.3)
        assert not any(alive(p) for p in pids), "a server went on running changed code"
        for i in (1, 2, 3, 4):
            node = root / f"node-{i}"
            alerts = [
                json.loads(x) for x in (node / "state" / "public" / "alerts.jsonl").read_text().splitlines()
            ]
            refused = [a for a in alerts if a["kind"] == "code-mismatch" and "refresh refused" in a["detail"]]
            assert refused and str(target) in refused[0]["detail"], alerts
            assert "key-holder zygote" in (node / "server.log").read_text()
    finally:
        pst("cluster", "down", "--dir", str(root))
