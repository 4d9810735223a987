"""The first code ``pst`` runs: it measures the Python environment before any of it runs.

Every ``pst`` process that runs or checks a server starts as::

    <venv>/bin/python -I -S <package>/boot/bootstrap.py COMMAND ARGS...

``bin/pst`` (``scripts/pst``, and so the systemd unit and ``/usr/bin/pst`` of the Debian
package) and every process pst starts itself (:func:`command`: ``pst cluster up``, the demo,
the network ceremony) do this. ``-I`` ignores every ``PYTHON*`` variable (``PYTHONPATH``,
``PYTHONSTARTUP``, ``PYTHONHOME``), the user's site-packages and the current directory; ``-S``
skips :mod:`site`, so that no ``.pth`` file and no ``sitecustomize``/``usercustomize`` module
runs before this file. This file uses the standard library only and imports nothing of the
package or of site-packages before it has hashed them.

**Who runs first.** The kernel, the interpreter and the C libraries it loads, ``pyvenv.cfg``
(which the interpreter reads to find its standard library), the standard library, the
launcher ``bin/pst`` and this file. Everything else of the environment is hashed here first:
for ``serve``, ``check`` and ``init`` (:data:`MEASURED`) the manifest of the environment
(:class:`Layout`) must have the digest that the server's config names in
``network.code_digest``, or the command is refused before a single file of the environment
runs (exit 3 for ``serve``, as the boot check; the refusal names the files when the stored
manifest ``public/manifest.cbor`` is the one the config names, and goes to the server's
alerts). Only then does it pin ``import appliance`` to the package it lives in, run
:func:`site.main` (the ``.pth`` files, ``sitecustomize``) and run ``appliance.cli`` as
``python -m appliance.cli`` would, whose boot check then binds the config to the certified C.
``pst manifest`` (without ``--root``) is computed here too, before anything of the
environment runs. Bytecode caches are never read afterwards (``sys.pycache_prefix`` is
``/dev/null``, which can never be a directory), so a changed ``__pycache__/*.pyc`` cannot
replace a hashed source: the manifest leaves them out.

**The manifest of an environment** (format 2; :mod:`appliance.boot.manifest` holds the
object and its strict decoder) maps ``env/<path>`` to the SHA-256 of every file of the
virtual environment (``pyvenv.cfg``, ``bin/``, all of site-packages with its ``.pth`` files
and every dependency; symbolic links by their target), ``appliance/<path>`` to the files of
the package when it lives outside the environment (an editable install of a source tree),
and ``startup/<name>`` to the ``sitecustomize``/``usercustomize`` module that the server's
module search path would load, wherever it is (Debian keeps one in ``/usr/lib/python3.X``).
Only bytecode caches (``__pycache__/*.pyc``) are left out. An environment whose ``.pth``
files add a directory outside it to the search path, or which includes the system's
site-packages, cannot be listed: its code would not be covered.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import json
import os
import runpy
import signal
import stat
import sys
import time
import tomllib
import types
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TYPE = "pst/manifest"
#: Root labels of an environment manifest (format 2).
ENV, PACKAGE, STARTUP = "env", "appliance", "startup"
LABELS = (ENV, PACKAGE, STARTUP)
#: The startup modules :mod:`site` imports on its own.
HOOKS = ("sitecustomize", "usercustomize")
#: Commands that run or check a server: measured against the config before anything runs.
MEASURED = ("serve", "check", "init")
#: Where the interpreter would look for bytecode caches: never a directory, even for root.
NO_BYTECODE = "/dev/null"

#: Kinds of difference between an installed tree and a manifest.
CHANGED, MISSING, EXTRA, UNEXPECTED, UNREADABLE = (
    "changed",
    "missing",
    "extra",
    "not a regular file",
    "unreadable",
)
_CODE_MISMATCH = "code-mismatch"  # appliance.protocols._core.AlertKind.CODE_MISMATCH
_EXIT = {"serve": 3, "check": 1, "init": 2}  # as boot_check's and the ceremony's refusals
_MAX_STORED = 64 * 1024 * 1024


class LayoutError(Exception):
    """The environment cannot be described by a manifest; the message says why."""


# The layout of an environment --------------------------------------------------------------------


@dataclass(frozen=True)
class Hook:
    """A startup module on the module search path: a file, a package directory or a zip archive."""

    name: str
    path: Path
    kind: str  # "module", "package" or "archive"

    @property
    def key(self) -> str:
        return f"{STARTUP}/{self.name if self.kind == 'package' else self.path.name}"


@dataclass(frozen=True)
class Layout:
    """Where the code of a server's environment lives."""

    env: Path
    package: Path
    search_path: tuple[Path, ...] = ()
    hooks: tuple[Hook, ...] = ()
    #: (key of a .pth file, a directory it adds to the search path outside the environment)
    outside: tuple[tuple[str, Path], ...] = ()

    @property
    def package_outside(self) -> bool:
        return not _inside(self.package, self.env)

    def roots(self) -> list[tuple[str, Path]]:
        """(label, directory) of every tree the manifest lists."""
        out = [(ENV, self.env)]
        if self.package_outside:
            out.append((PACKAGE, self.package))
        return out

    def root_of(self, key: str) -> Path:
        label = key.partition("/")[0]
        if label == ENV:
            return self.env
        if label == PACKAGE:
            return self.package
        return Path(STARTUP)

    def locate(self, key: str) -> Path:
        """The file a manifest key stands for (a startup module no longer found: the key itself)."""
        label, _, rel = key.partition("/")
        if label in (ENV, PACKAGE):
            return self.root_of(key) / rel
        for hook in self.hooks:
            if hook.kind == "package" and key.startswith(hook.key + "/"):
                return hook.path / key[len(hook.key) + 1 :]
            if key == hook.key:
                return hook.path
        return Path(key)

    def describe(self) -> str:
        where = f"the environment {self.env}"
        return where + (f" and {self.package}" if self.package_outside else "")


def _inside(path: Path, root: Path) -> bool:
    real, base = os.path.realpath(path), os.path.realpath(root)
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def venv_root(executable: str | None = None) -> tuple[Path, Path]:
    """The virtual environment of ``executable`` and its pyvenv.cfg, found as :func:`site.venv` does."""
    exe = executable if executable is not None else sys.executable
    if not exe:
        raise LayoutError("the interpreter does not know its own executable (sys.executable is empty)")
    exe_dir = os.path.dirname(os.path.abspath(exe))
    prefix = os.path.dirname(exe_dir)
    for candidate in (os.path.join(exe_dir, "pyvenv.cfg"), os.path.join(prefix, "pyvenv.cfg")):
        if os.path.isfile(candidate):
            return Path(prefix), Path(candidate)
    raise LayoutError(
        f"{exe} is not the interpreter of a virtual environment (no pyvenv.cfg next to it): "
        "pst runs from its own venv, whose files the code manifest lists"
    )


def _venv_settings(cfg: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        text = cfg.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LayoutError(f"{cfg}: cannot read: {exc}") from None
    for line in text.splitlines():
        if "=" in line:
            key, _, value = line.partition("=")
            out[key.strip().lower()] = value.strip()
    return out


def interpreter_path() -> list[Path]:
    """The module search path of ``python -I -S``: the standard library (not a manifest's business).

    As the interpreter computes it at start (``Modules/getpath.py``) from its base prefixes.
    """
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return [
        Path(sys.base_prefix) / sys.platlibdir / f"python{version.replace('.', '')}.zip",
        Path(sys.base_prefix) / sys.platlibdir / f"python{version}",
        Path(sys.base_exec_prefix) / sys.platlibdir / f"python{version}" / "lib-dynload",
    ]


def _pth_dirs(sitedir: Path) -> list[tuple[str, Path]]:
    """(name of the .pth file, directory) for every path line :func:`site.addpackage` would add."""
    out: list[tuple[str, Path]] = []
    try:
        names = sorted(n for n in os.listdir(sitedir) if n.endswith(".pth"))
    except OSError:
        return out
    for name in names:
        try:
            with open(sitedir / name, "rb") as f:
                lines = f.read().decode("utf-8", "replace").splitlines()
        except OSError:
            continue  # site skips it too; the scan reports it unreadable
        for line in lines:
            if line.startswith("#") or not line.strip() or line.startswith(("import ", "import\t")):
                continue
            directory = Path(os.path.abspath(os.path.join(sitedir, line.rstrip())))
            if directory.exists():
                out.append((name, directory))
    return out


def _find_hook(name: str, search_path: Sequence[Path]) -> Hook | None:
    """The module ``name`` as the path-based import system would find it (namespace dirs load no code)."""
    m = importlib.machinery
    suffixes = [*m.EXTENSION_SUFFIXES, *m.SOURCE_SUFFIXES, *m.BYTECODE_SUFFIXES]
    for entry in search_path:
        if entry.is_dir():
            package = entry / name
            if package.is_dir() and any((package / f"__init__{s}").is_file() for s in suffixes):
                return Hook(name, package, "package")
            for s in suffixes:
                if (entry / f"{name}{s}").is_file():
                    return Hook(name, entry / f"{name}{s}", "module")
        elif entry.is_file():
            try:
                with zipfile.ZipFile(entry) as archive:
                    names = set(archive.namelist())
            except (OSError, zipfile.BadZipFile):
                continue
            if names & {f"{name}.py", f"{name}.pyc", f"{name}/__init__.py", f"{name}/__init__.pyc"}:
                return Hook(name, entry, "archive")
    return None


def environment_layout(
    package: Path | None = None,
    *,
    executable: str | None = None,
    interpreter: Sequence[Path] | None = None,
) -> Layout:
    """The layout of the environment a server started by :func:`command` runs in.

    ``package`` is the appliance package (default: the one this file belongs to);
    ``executable`` the interpreter (default: this one); ``interpreter`` the standard
    library's part of the search path (default: :func:`interpreter_path`).
    """
    import site

    env, cfg = venv_root(executable)
    if _venv_settings(cfg).get("include-system-site-packages", "false").lower() == "true":
        raise LayoutError(
            f"{cfg}: include-system-site-packages = true puts the system's site-packages on the "
            "server's module search path, which the code manifest does not cover; make the venv without it"
        )
    pkg = package if package is not None else Path(__file__).resolve().parent.parent
    search = list(interpreter if interpreter is not None else interpreter_path())
    sitedirs = [Path(p) for p in site.getsitepackages([str(env)])]
    search += sitedirs
    outside: list[tuple[str, Path]] = []
    for sitedir in sitedirs:
        for name, directory in _pth_dirs(sitedir):
            search.append(directory)
            if not _inside(directory, env) and not _inside(directory, pkg):
                rel = os.path.relpath(sitedir / name, env).replace(os.sep, "/")
                outside.append((f"{ENV}/{rel}", directory))
    hooks = tuple(h for h in (_find_hook(n, search) for n in HOOKS) if h is not None)
    return Layout(env, pkg, tuple(search), hooks, tuple(outside))


# Scanning ----------------------------------------------------------------------------------------


def is_cache(parts: Sequence[str]) -> bool:
    """A bytecode cache ``__pycache__/*.pyc``: what the interpreter regenerates, in no manifest."""
    return len(parts) >= 2 and parts[-2] == "__pycache__" and parts[-1].endswith(".pyc")


@dataclass
class Scan:
    """What is installed: files by SHA-256, symbolic links by target, and what cannot be listed."""

    files: dict[str, bytes] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)
    special: list[tuple[str, str]] = field(default_factory=list)  # (key, why)
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (key, why)


def _hash_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").digest()


#: Files hashed in this process (and in the processes it forks: the key-holder): path ->
#: ((device, inode, size, mtime, ctime), SHA-256). A later scan hashes a file again only if one
#: of these changed, or if the file had changed less than :data:`RACY_NS` before it was hashed
#: (a change within the same clock tick would leave its times as they were). A process cannot
#: set a file's ctime back without setting the system clock back. The first scan of a process
#: (the bootstrap's) hashes everything.
DIGESTS: dict[str, tuple[tuple[int, ...], bytes]] = {}
RACY_NS = 2_000_000_000


def file_digest(path: str, st: os.stat_result) -> bytes:
    """SHA-256 of the file at ``path`` whose status (taken before reading) is ``st``."""
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    known = DIGESTS.get(path)
    if known is not None and known[0] == key:
        return known[1]
    started = time.time_ns()
    value = _hash_file(path)
    if max(st.st_mtime_ns, st.st_ctime_ns) < started - RACY_NS:
        DIGESTS[path] = (key, value)
    else:
        DIGESTS.pop(path, None)
    return value


#: Decides whether a symbolic link may be listed (by its target); None: links are refused.
LinkPolicy = Callable[[str, str], str | None]


def walk(root: Path, prefix: str, scan: Scan, links: LinkPolicy | None = None) -> None:
    """Add every entry under ``root`` to ``scan``, keyed ``prefix/relative path`` (or the path)."""
    _walk(root, (), prefix, scan, links)


def _walk(root: Path, rel: tuple[str, ...], prefix: str, scan: Scan, links: LinkPolicy | None) -> None:
    directory = root.joinpath(*rel)
    here = "/".join(rel)
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        scan.unreadable.append((_key(prefix, here or "."), exc.strerror or str(exc)))
        return
    for entry in entries:
        parts = (*rel, entry.name)
        name = "/".join(parts)
        key = _key(prefix, name)
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            scan.unreadable.append((key, exc.strerror or str(exc)))
            continue
        if stat.S_ISDIR(st.st_mode):
            _walk(root, parts, prefix, scan, links)
        elif stat.S_ISLNK(st.st_mode) and links is not None:
            try:
                target = os.readlink(entry.path)
            except OSError as exc:
                scan.unreadable.append((key, exc.strerror or str(exc)))
                continue
            why = links(name, entry.path)
            if why is None:
                scan.links[key] = target
            else:
                scan.special.append((key, why))
        elif not stat.S_ISREG(st.st_mode):
            scan.special.append((key, ""))  # a symlink, socket, device ...: never part of the code
        elif not is_cache(parts):
            try:
                scan.files[key] = file_digest(entry.path, st)
            except OSError as exc:
                scan.unreadable.append((key, exc.strerror or str(exc)))


def _key(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def _env_links(env: Path) -> LinkPolicy:
    """A venv's links: the interpreter in bin/ (python -> /usr/bin/python3) and links within it."""

    def policy(name: str, path: str) -> str | None:
        if name.startswith("bin/python") and name.count("/") == 1:
            return None
        if _inside(Path(path), env):
            return None
        return f"a symbolic link to {os.path.realpath(path)}, outside the environment"

    return policy


def scan_layout(layout: Layout) -> Scan:
    """Every file of the environment, keyed by root label (see the module doc)."""
    scan = Scan()
    walk(layout.env, ENV, scan, _env_links(layout.env))
    if layout.package_outside:
        walk(layout.package, PACKAGE, scan)
    for hook in layout.hooks:
        if hook.kind == "package":
            walk(hook.path, hook.key, scan)
        else:
            try:
                scan.files[hook.key] = file_digest(str(hook.path), os.stat(hook.path))
            except OSError as exc:
                scan.unreadable.append((hook.key, exc.strerror or str(exc)))
    for key, directory in layout.outside:
        scan.special.append((key, f"adds {directory}, outside the environment, to the module search path"))
    return scan


def scan_tree(root: Path) -> Scan:
    """Every file of one directory (a package: format 1), keyed by relative path; links refused."""
    scan = Scan()
    walk(root, "", scan)
    return scan


def differences(
    files: Mapping[str, bytes], links: Mapping[str, str], scan: Scan
) -> list[tuple[str, str, str]]:
    """(kind, key, detail) of every difference between a manifest and a scan."""
    out: list[tuple[str, str, str]] = []
    troubled = {k for k, _ in scan.special} | {k for k, _ in scan.unreadable}
    for key in sorted(set(files) | set(links) | set(scan.files) | set(scan.links)):
        expected = _entry(files, links, key)
        actual = _entry(scan.files, scan.links, key)
        if expected is None:
            out.append((EXTRA, key, "not in the manifest"))
        elif actual is None:
            if key not in troubled:
                out.append((MISSING, key, ""))
        elif actual != expected:
            out.append((CHANGED, key, _change(actual, expected)))
    out += [(UNEXPECTED, key, why) for key, why in scan.special]
    out += [(UNREADABLE, key, why) for key, why in scan.unreadable]
    return sorted(out, key=lambda d: (d[1], d[0]))


def _entry(files: Mapping[str, bytes], links: Mapping[str, str], key: str) -> tuple[str, Any] | None:
    if key in files:
        return ("file", files[key])
    if key in links:
        return ("link", links[key])
    return None


def _change(actual: tuple[str, Any], expected: tuple[str, Any]) -> str:
    if actual[0] != expected[0]:
        return f"a {'symbolic link' if actual[0] == 'link' else 'file'}, expected a " + (
            "symbolic link" if expected[0] == "link" else "file"
        )
    if actual[0] == "link":
        return f"a symbolic link to {actual[1]!r}, expected {expected[1]!r}"
    return f"sha256 {actual[1].hex()[:16]}.., expected {expected[1].hex()[:16]}.."


# Canonical encoding (the same bytes as appliance.crypto.encoding, for what a manifest holds) ------


def manifest_object(files: Mapping[str, bytes], links: Mapping[str, str] | None) -> dict[str, Any]:
    """The manifest object: format 1 (one package, no links) if ``links`` is None, else format 2."""
    if links is None:
        return {"type": TYPE, "v": 1, "files": dict(files)}
    return {"type": TYPE, "v": 2, "files": dict(files), "links": dict(links)}


def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for extra, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | extra]) + n.to_bytes(size, "big")
    raise ValueError("integer too large")


def canonical(obj: Any) -> bytes:
    """Canonical CBOR of unsigned ints, byte and text strings, and maps of them (keys sorted by encoding)."""
    if isinstance(obj, bool) or not isinstance(obj, (int, bytes, str, dict)):
        raise TypeError(f"cannot encode {type(obj).__name__}")
    if isinstance(obj, int):
        if obj < 0:
            raise ValueError("negative integers are not used here")
        return _head(0, obj)
    if isinstance(obj, bytes):
        return _head(2, len(obj)) + obj
    if isinstance(obj, str):
        data = obj.encode("utf-8")
        return _head(3, len(data)) + data
    items = sorted((canonical(k), canonical(v)) for k, v in obj.items())
    return _head(5, len(items)) + b"".join(k + v for k, v in items)


def digest(obj: Mapping[str, Any]) -> bytes:
    return hashlib.sha256(canonical(dict(obj))).digest()


def decode_stored(data: bytes) -> tuple[dict[str, bytes], dict[str, str] | None]:
    """(files, links or None for format 1) of an encoded manifest; ValueError if it is not one.

    Only for bytes whose SHA-256 the config names (the full decoder, which checks every path,
    is :meth:`appliance.boot.manifest.Manifest.decode`): it names the files that differ.
    """
    obj, end = _item(data, 0, 0)
    if end != len(data) or canonical(obj) != data:
        raise ValueError("not canonical CBOR")
    if not isinstance(obj, dict) or obj.get("type") != TYPE or obj.get("v") not in (1, 2):
        raise ValueError("not a code manifest")
    files, links = obj.get("files"), obj.get("links", {} if obj.get("v") == 2 else None)
    if not isinstance(files, dict) or not all(isinstance(v, bytes) for v in files.values()):
        raise ValueError("bad files")
    if links is not None and not (
        isinstance(links, dict) and all(isinstance(v, str) for v in links.values())
    ):
        raise ValueError("bad links")
    return files, links


def _item(data: bytes, at: int, depth: int) -> tuple[Any, int]:
    if depth > 4 or at >= len(data):
        raise ValueError("truncated or too deep")
    major, info = data[at] >> 5, data[at] & 31
    at += 1
    if info < 24:
        n = info
    elif info <= 27:
        size = 1 << (info - 24)
        if at + size > len(data):
            raise ValueError("truncated")
        n, at = int.from_bytes(data[at : at + size], "big"), at + size
    else:
        raise ValueError("indefinite or reserved length")
    if major == 0:
        return n, at
    if major in (2, 3):
        if at + n > len(data):
            raise ValueError("truncated string")
        raw = data[at : at + n]
        return (raw if major == 2 else raw.decode("utf-8")), at + n
    if major == 5:
        out: dict[Any, Any] = {}
        for _ in range(n):
            key, at = _item(data, at, depth + 1)
            if not isinstance(key, str) or key in out:
                raise ValueError("bad map key")
            out[key], at = _item(data, at, depth + 1)
        return out, at
    raise ValueError(f"major type {major} is not used in a manifest")


# Starting pst ------------------------------------------------------------------------------------


def path() -> Path:
    """This file: what ``python -I -S`` runs first."""
    return Path(__file__).resolve()


def command(*args: str) -> list[str]:
    """The argv that runs ``pst ARGS`` isolated, measured first (for every process pst starts)."""
    return [sys.executable, "-I", "-S", str(path()), *args]


def started_isolated() -> bool:
    """Does this process run as :func:`command` starts it (no PYTHON* variables, no site first)?"""
    return bool(sys.flags.isolated and sys.flags.no_site)


class _PinnedPackage(importlib.abc.MetaPathFinder):
    """``import appliance`` finds the package that was measured, whatever a finder of site-packages says."""

    def __init__(self, package: Path) -> None:
        self.package = package

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "appliance":
            return None
        return importlib.machinery.PathFinder.find_spec(fullname, [str(self.package.parent)])


def _option(args: Sequence[str], name: str) -> str | None:
    for k, arg in enumerate(args):
        if arg == name and k + 1 < len(args):
            return args[k + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1 :]
    return None


def _refuse(command_name: str, cfg: dict[str, Any], detail: str, package: Path) -> int:
    server = cfg.get("server", {})
    sid = server.get("id") if isinstance(server, dict) else None
    if command_name == "check":
        print(f"server {sid}: boot checks (code imported from {package})")
        print(f"  FAIL  code: {detail}")
        print(f"pst check: BOOT REFUSED: code: {detail}", file=sys.stderr)
    elif command_name == "serve":
        print(f"pst serve: boot refused: code: {detail}", file=sys.stderr)
    else:
        print(f"pst {command_name}: the installed code is not the code C names: {detail}", file=sys.stderr)
    if command_name != "init" and isinstance(sid, int) and isinstance(server, dict):
        _alert(server, cfg.get("network", {}), sid, f"boot refused: code: {detail}")
    return _EXIT[command_name]


def _alert(server: dict[str, Any], network: Any, sid: int, detail: str) -> None:
    """A code-mismatch line in the server's alerts.jsonl, in the server's own format."""
    now = time.time()
    period = 0
    if isinstance(network, dict):
        genesis, length = network.get("genesis"), network.get("period_seconds")
        if isinstance(genesis, (int, float)) and isinstance(length, (int, float)) and length > 0:
            period = max(0, int((now - genesis) // length))
    state_dir = server.get("state_dir")
    if not isinstance(state_dir, str):
        return
    public = Path(state_dir) / "public"
    line = {"time": now, "kind": _CODE_MISMATCH, "server": sid, "period": period, "detail": detail}
    try:
        public.mkdir(parents=True, exist_ok=True)
        with open(public / "alerts.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
    except OSError as exc:
        print(f"  WARN  alert: not written to {public / 'alerts.jsonl'}: {exc.strerror}", file=sys.stderr)


def _show(file: Path, kind: str, detail: str) -> str:
    """One difference, as :class:`appliance.boot.manifest.Mismatch` prints it."""
    return f"{file}: {kind}" + (f" ({detail})" if detail else "")


def _mismatch_detail(config: Path, cfg: dict[str, Any], expected: bytes, layout: Layout, scan: Scan) -> str:
    """Why the environment is not the code the config names, naming the files if we can."""
    server = cfg.get("server", {})
    state_dir = server.get("state_dir") if isinstance(server, dict) else None
    head = f"the installed code differs from the manifest named by {config} ({expected.hex()[:16]}..)"
    stored_path = Path(str(state_dir)) / "public" / "manifest.cbor"
    stored: tuple[dict[str, bytes], dict[str, str] | None] | None = None
    why = "missing"
    try:
        if stored_path.stat().st_size <= _MAX_STORED:
            data = stored_path.read_bytes()
            why = "not the manifest the config names"
            if hashlib.sha256(data).digest() == expected:
                stored = decode_stored(data)
    except (OSError, ValueError, TypeError):
        pass
    if stored is None:
        actual = digest(manifest_object(scan.files, scan.links))
        troubles = [(UNEXPECTED, k, w) for k, w in scan.special] + [
            (UNREADABLE, k, w) for k, w in scan.unreadable
        ]
        named = "".join(f"; {_show(layout.locate(k), kind, d)}" for kind, k, d in troubles[:5])
        return (
            f"{head}: the environment's manifest digest is {actual.hex()[:16]}..; {stored_path} is {why}, "
            f"so the changed file cannot be named{named}"
        )
    files, links = stored
    if links is None:  # format 1: the package alone
        found = differences(files, {}, scan_tree(layout.package))
        shown = [_show(layout.package / k, kind, d) for kind, k, d in found]
    else:
        found = differences(files, links, scan)
        shown = [_show(layout.locate(k), kind, d) for kind, k, d in found]
    more = f"; and {len(shown) - 5} more" if len(shown) > 5 else ""
    return f"{head}, found before any of it ran: {'; '.join(shown[:5])}{more}"


def _read_config(config: Path) -> dict[str, Any] | None:
    try:
        with open(config, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return None


def measure(command_name: str, config: Path, layout: Layout) -> int | None:
    """None if the environment is the code the config names (or it names none); else the exit status."""
    cfg = _read_config(config)
    if cfg is None:
        return None  # pst reports an unusable config itself (exit 2) and runs nothing
    network = cfg.get("network", {})
    hexdigest = network.get("code_digest", "") if isinstance(network, dict) else ""
    if not isinstance(hexdigest, str) or len(hexdigest) != 64:
        return None  # no code digest: the boot check says the code is not checked (or refuses, --strict)
    try:
        expected = bytes.fromhex(hexdigest)
    except ValueError:
        return None
    scan = scan_layout(layout)
    if not scan.special and not scan.unreadable:
        if digest(manifest_object(scan.files, scan.links)) == expected:
            return None
        package = scan_tree(layout.package)
        if (
            not package.special
            and not package.unreadable
            and digest(manifest_object(package.files, None)) == expected
        ):
            return None  # C names the package alone (format 1): the boot check warns
    return _refuse(command_name, cfg, _mismatch_detail(config, cfg, expected, layout, scan), layout.package)


def _manifest_command(args: Sequence[str], layout: Layout) -> int:
    """``pst manifest [--out FILE]``: the digest of this environment, computed before any of it ran."""
    scan = scan_layout(layout)
    problems = [(UNEXPECTED, k, w) for k, w in scan.special] + [
        (UNREADABLE, k, w) for k, w in scan.unreadable
    ]
    if problems:
        kind, key, why = problems[0]
        print(f"pst manifest: {_show(layout.locate(key), kind, why)}; refusing to list it", file=sys.stderr)
        return 1
    data = canonical(manifest_object(scan.files, scan.links))
    out = _option(args, "--out")
    if out is not None:
        tmp = Path(out).with_name(f".{Path(out).name}.{os.getpid()}")
        try:
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, out)
        except OSError as exc:
            print(f"pst manifest: {out}: {exc.strerror}", file=sys.stderr)
            return 1
    count = len(scan.files) + len(scan.links)
    print(f"{count} files in {layout.describe()}", file=sys.stderr)
    print(hashlib.sha256(data).hexdigest())
    return 0


def _start_site(package: Path) -> None:
    """Pin ``import appliance`` to ``package``, then let :mod:`site` do its work (.pth, sitecustomize)."""
    sys.meta_path.insert(0, _PinnedPackage(package))
    import site

    site.main()
    import appliance

    if Path(appliance.__file__ or "").resolve().parent != package:
        raise SystemExit(f"pst: imported {appliance.__file__}, not the measured package {package}")


def main(argv: Sequence[str]) -> int:
    """Measure, then run ``appliance.cli`` with ``argv``, as ``python -m appliance.cli`` would."""
    if not started_isolated():
        print(f"pst: start {path()} as: python -I -S {path()} COMMAND ...", file=sys.stderr)
        return 2
    package = path().parent.parent
    name = argv[0] if argv else ""
    if name == "serve":  # `pst refresh --now` may signal us while we measure: not fatal (run.py)
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    manifest = name == "manifest" and not {"--root", "-h", "--help"} & {a.split("=")[0] for a in argv}
    config = _option(argv, "--config")
    if manifest or (name in MEASURED and config is not None):
        sys.dont_write_bytecode = True
        sys.pycache_prefix = NO_BYTECODE
        try:
            layout = environment_layout(package)
        except LayoutError as exc:
            if manifest or config is None:
                print(f"pst {name}: {exc}", file=sys.stderr)
                return 1
            return _refuse(name, _read_config(Path(config)) or {}, str(exc), package)
        if manifest:
            return _manifest_command(argv[1:], layout)
        assert config is not None
        refused = measure(name, Path(config), layout)
        if refused is not None:
            return refused
    _start_site(package)
    from appliance.boot import bootstrap  # this file again, as a module of the measured package

    bootstrap.DIGESTS.update(DIGESTS)  # what was hashed before anything ran, for later checks
    # Run pst as `python -m appliance.cli ARGS` would (boot/ imports nothing of the layers above).
    sys.argv = [sys.argv[0], *argv]
    runpy.run_module("appliance.cli", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
