"""The Debian package: `make deb` builds it, its metadata and scripts are sound, and it installs offline.

The package is built once per test session (packaging/build-deb.sh; the dependencies'
wheels are cached under build/deb-wheels). The install test runs real dpkg and the real
maintainer scripts in a throwaway copy-on-write root of this machine
(packaging/throwaway-root.sh; packaging/README.md says why not a debootstrap chroot).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import appliance
from appliance.host import config as node_config
from appliance.protocols.state import ConfigError

REPO = Path(__file__).resolve().parent.parent
VERSION = appliance.__version__
CONFFILE = "/etc/pst/server.toml"
SCRIPTS = ("postinst", "prerm", "postrm")

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb missing (not Debian)")


def run(*args: str | Path, timeout: float = 300, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # type: ignore[call-overload, no-any-return]
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    built = run(
        REPO / "packaging" / "build-deb.sh", "--out", out, env={**os.environ, "PYTHON": sys.executable}
    )
    assert built.returncode == 0, built.stdout + built.stderr
    path = Path(built.stdout.strip().splitlines()[-1])
    arch = run("dpkg", "--print-architecture").stdout.strip()
    assert path == out / f"pst-appliance_{VERSION}_{arch}.deb"
    return path


@pytest.fixture(scope="module")
def tree(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tree")
    assert run("dpkg-deb", "-x", deb, root).returncode == 0
    assert run("dpkg-deb", "-e", deb, root / "DEBIAN").returncode == 0
    return root


def field(info: str, name: str) -> str:
    match = re.search(rf"^ {name}: (.*)$", info, re.MULTILINE)
    assert match, f"no {name} in dpkg-deb --info"
    return match.group(1)


def test_control_fields(deb: Path) -> None:
    info = run("dpkg-deb", "--info", deb).stdout
    assert field(info, "Package") == "pst-appliance"
    assert field(info, "Version") == VERSION
    depends = [d.strip() for d in field(info, "Depends").split(",")]
    assert depends[:4] == ["python3 (>= 3.11)", "python3 (<< 3.12)", "python3-venv", "adduser"]
    # tpm2-pytss is built here against the system's TSS libraries: the package needs them.
    assert "libtss2-esys-3.0.2-0" in depends


def test_conffiles_and_maintainer_scripts(tree: Path) -> None:
    control = tree / "DEBIAN"
    assert (control / "conffiles").read_text().split() == [CONFFILE]
    for name in SCRIPTS:
        script = control / name
        assert script.stat().st_mode & 0o111, f"{name} is not executable"
        assert script.read_text().startswith("#!/bin/sh\n")
        syntax = run("sh", "-n", script)
        assert syntax.returncode == 0, f"{name}: {syntax.stderr}"
        assert script.read_bytes() == (REPO / "packaging" / "debian" / name).read_bytes()


def test_contents(deb: Path, tree: Path) -> None:
    listing = run("dpkg-deb", "--contents", deb).stdout
    assert re.search(r"^l\S+ root/root .* \./usr/bin/pst -> /opt/pst-appliance/venv/bin/pst$", listing, re.M)
    assert all(" root/root " in line for line in listing.splitlines())
    assert (tree / "lib/systemd/system/pst-server.service").read_bytes() == (
        REPO / "systemd" / "pst-server.service"
    ).read_bytes()
    assert (tree / CONFFILE.lstrip("/")).read_bytes() == (REPO / "packaging" / "server.toml").read_bytes()
    assert (tree / "usr/share/doc/pst-appliance/examples/tpm.conf").is_file()
    assert (tree / "usr/share/doc/pst-appliance/README.systemd.md").is_file()
    # The period-certificate agent (docs/ca.md) and its unit template.
    assert re.search(
        r"^l\S+ root/root .* \./usr/bin/pst-keys -> /opt/pst-appliance/clients/pst-keys$", listing, re.M
    )
    for name in ("pst-keys", "pst_keys.py"):
        assert (tree / "opt/pst-appliance/clients" / name).read_bytes() == (
            REPO / "clients" / name
        ).read_bytes()
    assert (tree / "lib/systemd/system/pst-keys@.service").read_bytes() == (
        REPO / "systemd" / "pst-keys@.service"
    ).read_bytes()
    # bin/pst is the launcher (scripts/pst), shipped in the project wheel as a script.
    [wheel] = (tree / "opt/pst-appliance/wheels").glob("pst_appliance-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert zf.read(f"pst_appliance-{VERSION}.data/scripts/pst") == (REPO / "scripts" / "pst").read_bytes()


def test_every_runtime_dependency_ships_as_a_wheel_pinned_by_hash(tree: Path) -> None:
    wheels = tree / "opt/pst-appliance/wheels"
    lines = (tree / "opt/pst-appliance/requirements.txt").read_text().splitlines()
    pinned = {}
    for line in lines:
        match = re.fullmatch(r"([A-Za-z0-9_.]+)==(\S+) --hash=sha256:([0-9a-f]{64})", line)
        assert match, line
        pinned[match.group(1).lower().replace("_", "-")] = (match.group(2), match.group(3))
    files = sorted(wheels.glob("*.whl"))
    assert len(files) == len(lines)
    for whl in files:
        name, version = whl.name.split("-")[:2]
        assert pinned[name.lower().replace("_", "-")] == (
            version,
            hashlib.sha256(whl.read_bytes()).hexdigest(),
        )
    lock = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            lock[name.strip().lower().replace("_", "-")] = version.strip()
    assert pinned.pop("pst-appliance")[0] == VERSION
    for runtime in ("trio", "pynacl", "gmpy2", "cbor2", "pyudev", "cryptography", "cffi"):
        assert pinned[runtime][0] == lock[runtime]
    assert "pytest" not in pinned and "mypy" not in pinned  # test tools stay out


def test_default_config_names_what_is_missing_and_loads_once_filled_in(tmp_path: Path) -> None:
    shipped = REPO / "packaging" / "server.toml"
    with pytest.raises(ConfigError, match=r"server\.toml: missing network\.peers"):
        node_config.load(shipped)
    filled = re.sub(
        r"^# (id = |n = |t = |genesis = |\[network\.peers\]|[1-5] = )", r"\1", shipped.read_text(), flags=re.M
    ).replace('# code_digest = "<64 hex digits from pst manifest>"', f'code_digest = "{"ab" * 32}"')
    path = tmp_path / "server.toml"
    path.write_text(filled)
    config = node_config.load(path)
    assert (config.server_id, config.constants.n, config.constants.t) == (1, 5, 1)
    assert config.rom_backend == "tpm" and config.listen == ("0.0.0.0", 7100)
    assert str(config.state_dir) == "/var/lib/pst" and str(config.api_socket) == "/run/pst/api.sock"


INSTALL = r"""
set -e
dpkg -i /tmp/{deb} >/tmp/dpkg.log 2>&1 || {{ cat /tmp/dpkg.log; exit 1; }}
echo "version: $(pst --version)"
echo "user: $(getent passwd pst)"
echo "keys-user: $(getent passwd pst-keys)"
echo "state: $(stat -c '%a %U:%G' /var/lib/pst)"
echo "venv-home: $(sed -n 's/^home = //p' /opt/pst-appliance/venv/pyvenv.cfg)"
echo "launcher: $(head -n1 /opt/pst-appliance/venv/bin/pst)"
echo "pip-left: $(ls /opt/pst-appliance/venv/bin /opt/pst-appliance/venv/lib/python3*/site-packages \
    | grep -c -E '^(pip|setuptools)' || true)"
systemd-analyze verify --man=no pst-server.service && echo "verify: clean"
if pst --help | grep -qE '^ +check '; then
    if pst check --config /etc/pst/server.toml >/tmp/check.out 2>&1; then r=0; else r=$?; fi
    echo "template-check: $r $(tail -n1 /tmp/check.out)"
    pst cluster init --nodes 4 --threshold 1 --dir /srv/c --period 30 --round-ms 100 --base-port 7100 \
        >/dev/null
    if pst check --config /srv/c/node-1/config.toml >/tmp/check.out 2>&1; then r=0; else r=$?; fi
    echo "boot-check: $r $(tail -n1 /tmp/check.out)"
    echo "config-digest: $(sed -n 's/^code_digest = "\(.*\)"$/\1/p' /srv/c/node-1/config.toml)"
    echo "manifest: $(pst manifest 2>/dev/null)"
    mkdir -p /tmp/fake/appliance && echo 'raise SystemExit(42)' >/tmp/fake/appliance/__init__.py
    if (cd /tmp/fake && PYTHONPATH=/tmp/fake pst check --config /srv/c/node-1/config.toml \
        >/tmp/check.out 2>&1); then r=0; else r=$?; fi
    echo "pythonpath-check: $r $(tail -n1 /tmp/check.out)"
    site=$(echo /opt/pst-appliance/venv/lib/python3*/site-packages)
    echo 'import os' >"$site/zz-evil.pth"
    if pst check --config /srv/c/node-1/config.toml >/tmp/check.out 2>&1; then r=0; else r=$?; fi
    echo "pth-check: $r $(grep -c "$site/zz-evil.pth: extra" /tmp/check.out)"
    rm "$site/zz-evil.pth"
else
    echo "boot-check: pst has no check command"
fi
dpkg -i /tmp/{deb} >/tmp/dpkg.log 2>&1 || {{ cat /tmp/dpkg.log; exit 1; }}
echo "reinstalled: $(pst --version)"
dpkg --remove pst-appliance >/tmp/dpkg.log 2>&1 || {{ cat /tmp/dpkg.log; exit 1; }}
echo "removed-venv: $(test -e /opt/pst-appliance || echo yes)"
echo "kept-conffile: $(test -f /etc/pst/server.toml && echo yes)"
dpkg --purge pst-appliance >/tmp/dpkg.log 2>&1 || {{ cat /tmp/dpkg.log; exit 1; }}
echo "after-purge: $(ls /opt/pst-appliance /etc/pst /lib/systemd/system/pst-server.service 2>/dev/null \
    | wc -l)"
echo "state-kept: $(test -d /var/lib/pst && echo yes)"
"""


@pytest.mark.slow
def test_installs_offline_runs_and_purges_in_a_throwaway_root(deb: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("installing into a throwaway root needs root (mount namespace, overlayfs)")
    out = run(REPO / "packaging" / "throwaway-root.sh", deb, "--", INSTALL.format(deb=deb.name), timeout=300)
    if out.returncode == 77:
        pytest.skip(f"no throwaway root on this machine: {out.stderr.strip()}")
    assert out.returncode == 0, out.stdout + out.stderr
    report = dict(line.split(": ", 1) for line in out.stdout.splitlines() if ": " in line)
    print(out.stdout)
    assert report["version"] == f"pst {VERSION}"
    assert re.fullmatch(r"pst:x:\d+:\d+:[^:]*:/var/lib/pst:/usr/sbin/nologin", report["user"])
    assert report["state"] == "755 root:root"  # its parts belong to pst-keys and pst (privsep)
    assert re.fullmatch(r"pst-keys:x:\d+:\d+:[^:]*:/var/lib/pst:/usr/sbin/nologin", report["keys-user"])
    assert report["venv-home"] == "/usr/bin"  # Debian's python3, not the build machine's
    assert report["verify"] == "clean"  # the unit with the real ExecStart executable
    # bin/pst starts Python isolated, and the venv holds exactly the shipped wheels (no pip).
    assert report["launcher"] == "#!/bin/sh" and report["pip-left"] == "0"
    if report["boot-check"] != "pst has no check command":
        code, _, message = report["template-check"].partition(" ")
        assert code == "2" and "/etc/pst/server.toml: missing network.peers" in message
        code, _, message = report["boot-check"].partition(" ")
        assert code == "0" and "may boot" in message
        # The digest measured before anything of the venv ran (with Debian's python3 and its
        # sitecustomize) is the one pst cluster init computed and put in C.
        assert re.fullmatch(r"[0-9a-f]{64}", report["manifest"])
        assert report["manifest"] == report["config-digest"]
        # A fake appliance on PYTHONPATH and in the current directory changes nothing ...
        assert report["pythonpath-check"] == "0 server 1 may boot"
        # ... and a new .pth in site-packages is found before it runs.
        code, _, count = report["pth-check"].partition(" ")
        assert code == "1" and int(count) >= 1, report["pth-check"]
    assert report["reinstalled"] == f"pst {VERSION}"  # prerm upgrade + postinst rebuilt the venv
    assert report["removed-venv"] == report["kept-conffile"] == "yes"  # dpkg -r keeps the operator's config
    assert report["after-purge"] == "0"
    assert report["state-kept"] == "yes"
