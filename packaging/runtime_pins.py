"""Print a wheel's runtime dependency closure as pinned by requirements.lock: ``name==version`` lines.

Usage: ``python packaging/runtime_pins.py requirements.lock dist/pst_appliance-0.1.0-py3-none-any.whl``

The wheel's ``Requires-Dist`` (without extras) are followed through the metadata of the
distributions installed in the running interpreter's environment (the project's .venv,
which ``make`` builds from the same lock), with environment markers evaluated for this
interpreter: the package targets the same CPython minor version on Linux. Every
distribution of the closure must be pinned in the lock, and the installed version must be
the pinned one; otherwise the error names the distribution and who needs it, and nothing
is printed. Test tools pinned in the lock (pytest, mypy, ...) are not in the closure, so
they stay out of the package.
"""

from __future__ import annotations

import sys
import zipfile
from email.parser import HeaderParser
from importlib import metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name


class PinError(Exception):
    pass


def read_lock(path: Path) -> dict[str, tuple[str, str]]:
    """Canonical name -> (name as written, version) for every ``name==version`` line."""
    pins: dict[str, tuple[str, str]] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip():
            raise PinError(f"{path}:{number}: expected name==version, got {raw!r}")
        pins[canonicalize_name(name.strip())] = (name.strip(), version.strip())
    return pins


def wheel_requirements(wheel: Path) -> tuple[str, list[str]]:
    """The wheel's project name and its ``Requires-Dist`` lines."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1]
        if len(names) != 1:
            raise PinError(f"{wheel}: expected one .dist-info/METADATA, found {names}")
        meta = HeaderParser().parsestr(zf.read(names[0]).decode("utf-8"))
    return meta["Name"], meta.get_all("Requires-Dist") or []


def runtime_requirements(lines: list[str], needed_by: str) -> list[Requirement]:
    out = []
    for line in lines:
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise PinError(f"{needed_by}: invalid requirement {line!r}: {exc}") from None
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            out.append(req)
    return out


def closure(project: str, requires: list[str], pins: dict[str, tuple[str, str]]) -> list[tuple[str, str]]:
    todo = [(req, project) for req in runtime_requirements(requires, project)]
    found: dict[str, tuple[str, str]] = {}
    while todo:
        req, parent = todo.pop()
        key = canonicalize_name(req.name)
        if key in found:
            continue
        if key not in pins:
            raise PinError(f"requirements.lock pins no version of {req.name} (needed by {parent})")
        name, version = pins[key]
        if not req.specifier.contains(version, prereleases=True):
            raise PinError(f"requirements.lock pins {name}=={version}, but {parent} requires {req}")
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise PinError(f"{name} is not installed in {sys.prefix}: run `make venv` first") from None
        if dist.version != version:
            raise PinError(f"{sys.prefix} has {name} {dist.version}, requirements.lock pins {version}")
        found[key] = (name, version)
        todo.extend((r, name) for r in runtime_requirements(dist.requires or [], name))
    return sorted(found.values(), key=lambda nv: canonicalize_name(nv[0]))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        pins = read_lock(Path(argv[0]))
        project, requires = wheel_requirements(Path(argv[1]))
        for name, version in closure(project, requires, pins):
            print(f"{name}=={version}")
    except (OSError, zipfile.BadZipFile, PinError) as exc:
        print(f"runtime_pins: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
