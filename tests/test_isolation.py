"""Issue 9 item 6: nothing of a server's Python environment runs before that environment is checked.

Each test builds its own small server venv (tests/venvutil.py: the runtime dependencies and
a copy of the package, copied from this environment, with ``bin/pst``), makes a cluster with
it, and then does what the reviewer did: a ``.pth`` file or a ``sitecustomize.py`` in
site-packages that patches the checker, or a PYTHONPATH with a fake ``appliance``. Before
the change, ``pst check`` ran the patched checker and answered "may boot", and a server
started by ``pst cluster up`` imported the fake package.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from bootutil import random_free_base_port
from venvutil import make_venv, run, site_packages

from appliance.boot.check import EXIT_BOOT_REFUSED
from appliance.protocols._core import AlertKind

#: What an attacker leaves in site-packages: once appliance.boot.manifest is imported, every
#: verification finds nothing. It leaves a mark, so the test sees whether it ran at all.
PATCH = """
import importlib.abc, importlib.util, pathlib, sys

class _Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "appliance.boot.manifest":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        real = spec.loader.exec_module

        def exec_module(module):
            real(module)
            module.Manifest.verify = lambda self, where, bytecode=True: []
            pathlib.Path({mark!r}).write_text("the patch ran")

        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, _Patch())
"""


def _cluster(venv: Path, root: Path) -> Path:
    """A 4-server cluster whose C names ``venv``; the config of server 1."""
    init = run(
        venv, "cluster", "init", "--nodes", "4", "--threshold", "1", "--dir", str(root),
        "--period", "600", "--round-ms", "60", "--base-port", str(random_free_base_port(4)), "--log", "off",
    )  # fmt: skip
    assert init.returncode == 0, init.stdout + init.stderr
    config = root / "node-1" / "config.toml"
    ok = run(venv, "check", "--config", str(config))
    assert ok.returncode == 0 and "server 1 may boot" in ok.stdout, ok.stdout + ok.stderr
    assert f"files of the environment {venv} match the manifest" in ok.stdout
    return config


def _patch_works(venv: Path, mark: Path) -> None:
    """The patch is real: a plain start of this venv's Python runs it and verification finds nothing."""
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import appliance.boot.manifest as m; print(m.Manifest.verify)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "<lambda>" in out.stdout and mark.read_text() == "the patch ran"
    mark.unlink()


def _alerts(config: Path) -> list[dict[str, object]]:
    path = config.parent / "state" / "public" / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize("where", ["pth", "sitecustomize"])
def test_a_patch_in_site_packages_cannot_make_pst_check_say_may_boot(tmp_path: Path, where: str) -> None:
    venv = make_venv(tmp_path / "venv")
    config = _cluster(venv, tmp_path / "c")
    mark = tmp_path / "patched"
    site = site_packages(venv)
    if where == "pth":
        (site / "_pst_patch.py").write_text(PATCH.format(mark=str(mark)))
        added = [site / "zz-speedups.pth", site / "_pst_patch.py"]
        added[0].write_text("import _pst_patch\n")
    else:
        added = [site / "sitecustomize.py"]
        added[0].write_text(PATCH.format(mark=str(mark)))
    _patch_works(venv, mark)

    bad = run(venv, "check", "--config", str(config))
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "may boot" not in bad.stdout and "BOOT REFUSED" in bad.stderr, bad.stdout + bad.stderr
    assert "FAIL  code: the installed code differs from the manifest" in bad.stdout
    for path in added:
        assert f"{path}: extra (not in the manifest)" in bad.stderr, bad.stderr
    if where == "sitecustomize":  # a file of site-packages, and the startup module site would load
        assert bad.stderr.count(f"{added[0]}: extra") == 2, bad.stderr
    assert not mark.exists(), "the patch ran before the environment was checked"
    [alert] = _alerts(config)
    assert alert["kind"] == AlertKind.CODE_MISMATCH.value and str(added[0]) in str(alert["detail"])

    # pst serve refuses the same way (exit 3: systemd does not restart it), and runs nothing of it.
    serve = run(venv, "serve", "--config", str(config), timeout=60)
    assert serve.returncode == EXIT_BOOT_REFUSED, serve.stdout + serve.stderr
    assert "boot refused" in serve.stderr and f"{added[0]}: extra" in serve.stderr
    assert not mark.exists()

    # Removing what was added is enough: the environment is the one C names again.
    for path in added:
        path.unlink()
    again = run(venv, "check", "--config", str(config))
    assert again.returncode == 0 and "server 1 may boot" in again.stdout, again.stdout + again.stderr


def test_a_changed_dependency_is_named_before_it_runs(tmp_path: Path) -> None:
    """Not only appliance/: trio is part of the environment, and a changed file of it is found."""
    venv = make_venv(tmp_path / "venv")
    config = _cluster(venv, tmp_path / "c")
    target = site_packages(venv) / "trio" / "__init__.py"
    with open(target, "a", encoding="utf-8") as f:
        f.write("\nimport os as _os  # something the network did not approve\n")
    bad = run(venv, "check", "--config", str(config))
    assert bad.returncode == 1 and f"{target}: changed (sha256 " in bad.stderr, bad.stdout + bad.stderr
    assert "found before any of it ran" in bad.stderr


def test_a_venv_that_includes_the_systems_site_packages_is_refused(tmp_path: Path) -> None:
    """Then the system's site-packages (and their .pth files) would run in the server: not listed."""
    venv = make_venv(tmp_path / "venv")
    config = _cluster(venv, tmp_path / "c")
    cfg = venv / "pyvenv.cfg"
    cfg.write_text(
        cfg.read_text().replace("include-system-site-packages = false", "include-system-site-packages = true")
    )
    bad = run(venv, "check", "--config", str(config))
    assert bad.returncode == 1 and "BOOT REFUSED: code:" in bad.stderr, bad.stdout + bad.stderr
    assert "include-system-site-packages = true" in bad.stderr
    serve = run(venv, "serve", "--config", str(config), timeout=60)
    assert serve.returncode == EXIT_BOOT_REFUSED and "include-system-site-packages" in serve.stderr


def test_without_the_stored_manifest_a_change_is_still_refused_and_the_manifest_comes_back(
    tmp_path: Path,
) -> None:
    venv = make_venv(tmp_path / "venv")
    config = _cluster(venv, tmp_path / "c")
    stored = config.parent / "state" / "public" / "manifest.cbor"
    stored.unlink()
    pth = site_packages(venv) / "zz.pth"
    pth.write_text("import os\n")
    bad = run(venv, "check", "--config", str(config))
    assert bad.returncode == 1 and "so the changed file cannot be named" in bad.stderr, bad.stderr
    assert not stored.exists()  # a manifest of the changed environment is never stored
    pth.unlink()
    ok = run(venv, "check", "--config", str(config))
    assert ok.returncode == 0 and f"{stored} restored" in ok.stdout, ok.stdout + ok.stderr
    assert hashlib.sha256(stored.read_bytes()).hexdigest() in config.read_text()


def test_pythonpath_with_a_fake_appliance_does_not_change_what_a_started_server_runs(tmp_path: Path) -> None:
    venv = make_venv(tmp_path / "venv")
    root = tmp_path / "c"
    _cluster(venv, root)
    fake = tmp_path / "fake" / "appliance"
    fake.mkdir(parents=True)
    mark = tmp_path / "fake-ran"
    (fake / "__init__.py").write_text(
        f"import pathlib, sys\npathlib.Path({str(mark)!r}).write_text(' '.join(sys.argv))\n"
        "raise SystemExit('the fake appliance package ran')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(fake.parent), "PYTHONSTARTUP": str(fake / "__init__.py")}
    up = run(venv, "cluster", "up", "--dir", str(root), "--detach", env=env, cwd=fake.parent, timeout=90)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert not mark.exists(), f"the fake package ran: {mark.read_text()}"
        pids = [int((root / f"node-{i}" / "server.pid").read_text()) for i in (1, 2, 3, 4)]
        for pid in pids:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert cmdline[1:3] == [b"-I", b"-S"], cmdline  # isolated, measured first
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            assert f"PYTHONPATH={fake.parent}".encode() in environ  # inherited, and ignored
        for i in (1, 2, 3, 4):
            assert (root / f"node-{i}" / "api.sock").exists()
            log = (root / f"node-{i}" / "server.log").read_text()
            assert "the fake appliance package ran" not in log and "refused" not in log, log
    finally:
        down = run(venv, "cluster", "down", "--dir", str(root), env=env)
        assert down.returncode == 0, down.stdout + down.stderr
    assert not mark.exists()


def test_a_server_started_from_this_environment_ignores_pythonpath(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same for the process pst starts itself (cli._start_node), run here in the test process."""
    from appliance.cli import _start_node
    from appliance.host.nodes import Node
    from appliance.node.cluster import init_cluster, node_dir

    root = tmp_path / "c"
    init_cluster(root, n=4, t=1, period_seconds=600, round_ms=60, progress=lambda _: None,
                 base_port=random_free_base_port(4), log="off")  # fmt: skip
    fake = tmp_path / "fake" / "appliance"
    fake.mkdir(parents=True)
    mark = tmp_path / "fake-ran"
    (fake / "__init__.py").write_text(f"import pathlib\npathlib.Path({str(mark)!r}).write_text('ran')\n")
    (fake / "cli.py").write_text("raise SystemExit(42)\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    monkeypatch.chdir(fake.parent)  # the current directory holds the fake too
    node = node_dir(root, 1)
    pid = _start_node(Node.of_directory(node))
    try:
        deadline = time.monotonic() + 30
        while not (node / "api.sock").exists() and time.monotonic() < deadline:
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), (node / "server.log").read_text()
            time.sleep(0.1)
        assert (node / "api.sock").exists(), (node / "server.log").read_text()
        assert not mark.exists()
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
