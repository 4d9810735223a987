"""A small virtual environment for one test, laid out as the Debian package's server venv.

``make_venv(dest)`` runs ``python -m venv --without-pip``, copies into its site-packages the
files of every runtime dependency of pst-appliance (from this interpreter's environment, by
their RECORD) and a copy of the ``appliance`` package (a regular install, not an editable
one), and installs ``scripts/pst`` as ``bin/pst``. Tests may then add or change files in it:
nothing is shared with the project's own environment (files are copied, never linked).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from appliance.boot.manifest import package_root

REPO = Path(__file__).resolve().parent.parent
PROJECT = "pst-appliance"


def runtime_distributions() -> list[metadata.Distribution]:
    """pst-appliance's runtime dependencies and theirs, as installed here (extras left out)."""
    found: dict[str, metadata.Distribution] = {}
    todo = list(metadata.distribution(PROJECT).requires or [])
    while todo:
        req = Requirement(todo.pop())
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = canonicalize_name(req.name)
        if key in found:
            continue
        found[key] = dist = metadata.distribution(req.name)
        todo.extend(dist.requires or [])
    return list(found.values())


def site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def make_venv(dest: Path, *, package: Path | None = None, python: str = sys.executable) -> Path:
    """A server venv under ``dest`` holding a copy of ``package`` (default: the imported one).

    ``python``: the base interpreter (same minor version as this one: the copied extension
    modules are built for it), e.g. Debian's /usr/bin/python3 where this one is not readable
    to other accounts.
    """
    subprocess.run([python, "-m", "venv", "--without-pip", str(dest)], check=True, timeout=60)
    site = site_packages(dest)
    for dist in runtime_distributions():
        for file in dist.files or []:
            if "__pycache__" in file.parts or file.parts[0] == "..":  # caches; console scripts in bin/
                continue
            source = Path(str(dist.locate_file(file)))
            target = site / Path(*file.parts)
            if source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    shutil.copytree(
        package if package is not None else package_root(),
        site / "appliance",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    launcher = dest / "bin" / "pst"
    shutil.copy2(REPO / "scripts" / "pst", launcher)
    launcher.chmod(0o755)
    return dest


def run(
    venv: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``bin/pst ARGS`` of ``venv``: the command an operator types."""
    return subprocess.run(
        [str(venv / "bin" / "pst"), *args],
        env=env if env is not None else dict(os.environ),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
