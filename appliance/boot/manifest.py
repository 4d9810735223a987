"""The code manifest: the SHA-256 of every file of the code a server runs.

Two formats, both canonical CBOR (:mod:`appliance.crypto.encoding`); the SHA-256 of the
encoding (:meth:`Manifest.digest`) is the ``code_digest`` of the constants C, so the network
certifies the code with C ([Scert(M), M]) and a server can check the code it runs against it.

* **Format 2, the environment** (what ``pst manifest``, ``pst cluster init`` and ``pst init``
  put in C): every file of the virtual environment the server runs in (``pyvenv.cfg``,
  ``bin/``, all of site-packages with its ``.pth`` files and every dependency; symbolic links
  by their target), the ``appliance`` package wherever it is (an editable install keeps it
  in the source tree), and the ``sitecustomize``/``usercustomize`` module the server's module
  search path would load. Keys are ``env/...``, ``appliance/...``, ``startup/...``
  (:class:`~appliance.boot.bootstrap.Layout`). :mod:`appliance.boot.bootstrap` builds it with
  the standard library alone, before anything of the environment runs.
* **Format 1, one package directory** (``pst manifest --root DIR``; what C named before the
  environment was covered): the files of the package, relative to it. A C that names one
  still boots, with a warning that the rest of the environment is not checked.

Only the bytecode caches ``__pycache__/*.pyc`` are left out, which the interpreter derives
from the sources; a server started by the bootstrap never reads them (``sys.pycache_prefix``
is ``/dev/null``). Anything else that appears is a mismatch (an extra file), not only a
changed one.

:meth:`Manifest.verify` names every file that changed, went missing or appeared. It also
checks the bytecode caches this interpreter would load in place of a verified source (its
header matches the source): they must hold the code the source compiles to, or an attacker
could leave the sources intact and change only the cache. That costs one compilation per
cached module the first time; later calls skip a cache file whose metadata (inode, size,
mtime, ctime) and source are unchanged since it was verified. Under the bootstrap there is
no cache to check.

tests/test_manifest.py measures building and verifying (docs/performance.md).
"""

from __future__ import annotations

import hashlib
import importlib.util
import marshal
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import CodeType
from typing import Any

from appliance.boot import bootstrap
from appliance.boot.bootstrap import (
    CHANGED,
    ENV,
    EXTRA,
    LABELS,
    MISSING,
    PACKAGE,
    UNEXPECTED,
    UNREADABLE,
    Layout,
    LayoutError,
    Scan,
)
from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError

__all__ = [
    "BYTECODE",
    "CHANGED",
    "DIGEST",
    "EXTRA",
    "MISSING",
    "UNEXPECTED",
    "UNREADABLE",
    "Layout",
    "Manifest",
    "ManifestError",
    "Mismatch",
    "environment",
    "installed",
    "package_root",
]

TYPE = bootstrap.TYPE
VERSION = 1
ENVIRONMENT_VERSION = 2
#: Bounds on what a decoder accepts (a development venv lists about 3,600 files, a server's 1,500).
MAX_FILES = 100_000
MAX_PATH = 1024
MAX_ENCODED = 32 * 1024 * 1024

#: Kinds of :class:`Mismatch` besides those of :mod:`appliance.boot.bootstrap`.
BYTECODE, DIGEST = ("bytecode differs from its source", "code digest differs")


class ManifestError(Exception):
    """A manifest cannot be built; the message names the file."""


@dataclass(frozen=True)
class Mismatch:
    """One difference between the installed code and a manifest.

    ``path`` is the manifest's key (relative to ``root`` in format 1); ``file`` the file.
    """

    kind: str
    path: str
    root: Path
    detail: str = ""
    location: Path | None = None

    @property
    def file(self) -> Path:
        return self.location if self.location is not None else self.root / self.path

    def __str__(self) -> str:
        return f"{self.file}: {self.kind}" + (f" ({self.detail})" if self.detail else "")


def package_root() -> Path:
    """The directory of the ``appliance`` package this interpreter imported."""
    import appliance

    return Path(appliance.__file__).resolve().parent


def environment(package: Path | None = None) -> Layout:
    """The layout of this interpreter's environment with ``package`` (default: the imported one)."""
    try:
        return bootstrap.environment_layout(package if package is not None else package_root())
    except LayoutError as exc:
        raise ManifestError(str(exc)) from None


def _check_path(path: Any, environment: bool) -> str:
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH:
        raise DecodeError(f"manifest: a file path must be a non-empty string of at most {MAX_PATH} chars")
    parts = path.split("/")
    if any(p in ("", ".", "..") or "\x00" in p or "\\" in p for p in parts):
        raise DecodeError(f"manifest: {path!r} is not a plain relative path")
    if bootstrap.is_cache(parts):
        raise DecodeError(f"manifest: {path!r} is a bytecode cache, which no manifest lists")
    if environment and (len(parts) < 2 or parts[0] not in LABELS):
        raise DecodeError(f"manifest: {path!r} must start with one of {', '.join(LABELS)}")
    return path


def _refuse_troubles(scan: Scan, locate: Any) -> None:
    if scan.special:
        key, why = scan.special[0]
        raise ManifestError(f"{locate(key)}: {why or 'not a regular file'}; refusing to list it")
    if scan.unreadable:
        key, why = scan.unreadable[0]
        raise ManifestError(f"{locate(key)}: cannot read: {why}")


@dataclass(frozen=True)
class Manifest:
    """Key -> SHA-256 of every file; ``links`` (format 2 only) key -> symbolic link target."""

    files: Mapping[str, bytes]
    links: Mapping[str, str] | None = None

    @property
    def environment(self) -> bool:
        """Format 2: a whole environment (else format 1: one package directory)."""
        return self.links is not None

    def __len__(self) -> int:
        return len(self.files) + len(self.links or {})

    @classmethod
    def build(cls, root: Path) -> Manifest:
        """Format 1: the files under one directory; refuses symlinks and unreadable files."""
        if not root.is_dir():
            raise ManifestError(f"{root}: not a directory")
        scan = bootstrap.scan_tree(root)
        _refuse_troubles(scan, lambda key: root / key)
        if not scan.files:
            raise ManifestError(f"{root}: no files to list")
        return cls(scan.files)

    @classmethod
    def build_environment(cls, layout: Layout | None = None) -> Manifest:
        """Format 2: the environment of ``layout`` (default: this interpreter's, see :func:`environment`)."""
        layout = layout if layout is not None else environment()
        if not layout.env.is_dir() or not layout.package.is_dir():
            raise ManifestError(f"{layout.describe()}: not a directory")
        scan = bootstrap.scan_layout(layout)
        _refuse_troubles(scan, layout.locate)
        return cls(scan.files, scan.links)

    def to_obj(self) -> dict[str, Any]:
        return bootstrap.manifest_object(self.files, self.links)

    def encode(self) -> bytes:
        return encoding.encode(self.to_obj())

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Strict: canonical CBOR, exactly our fields, plain relative paths, 32-byte digests."""
        obj = encoding.decode(data, max_size=MAX_ENCODED, what="manifest")
        if not isinstance(obj, dict):
            raise DecodeError(f"manifest: expected a map, got {type(obj).__name__}")
        version = obj.get("v")
        if (
            obj.get("type") != TYPE
            or version not in (VERSION, ENVIRONMENT_VERSION)
            or isinstance(version, bool)
        ):
            raise DecodeError(f"manifest: not a {TYPE} version 1 or 2 object")
        if version == ENVIRONMENT_VERSION and "links" not in obj:
            raise DecodeError("manifest: version 2 (an environment) needs links, which version 1 has not")
        fields: dict[str, type] = {"type": str, "v": int, "files": dict}
        if version == ENVIRONMENT_VERSION:
            fields["links"] = dict
        f = encoding.expect_map(obj, fields, "manifest")
        environment = version == ENVIRONMENT_VERSION
        raw, raw_links = f["files"], f.get("links", {})
        if not raw or len(raw) + len(raw_links) > MAX_FILES:
            raise DecodeError(f"manifest: must list between 1 and {MAX_FILES} files, lists {len(raw)}")
        files: dict[str, bytes] = {}
        for path, digest in raw.items():
            _check_path(path, environment)
            if not isinstance(digest, bytes) or len(digest) != 32:
                raise DecodeError(f"manifest: {path!r} must map to a 32-byte SHA-256")
            files[path] = digest
        links: dict[str, str] = {}
        for path, target in raw_links.items():
            _check_path(path, environment)
            if path in files:
                raise DecodeError(f"manifest: {path!r} is listed both as a file and as a link")
            if not isinstance(target, str) or not 0 < len(target) <= MAX_PATH or "\x00" in target:
                raise DecodeError(f"manifest: the link {path!r} must map to its target, a non-empty path")
            links[path] = target
        return cls(files, links if environment else None)

    def digest(self) -> bytes:
        """SHA-256 of the canonical encoding: what C.code_digest holds."""
        return hashlib.sha256(self.encode()).digest()

    def verify(self, where: Path | Layout, *, bytecode: bool = True) -> list[Mismatch]:
        """Every difference between the installed code and this manifest, sorted by path.

        ``where`` is the package directory (format 1; a :class:`Layout` stands for its
        package) or the environment's :class:`Layout` (format 2).
        """
        if not self.environment:
            root = where.package if isinstance(where, Layout) else where
            if not root.is_dir():
                return [Mismatch(DIGEST, ".", root, f"{root}: not a directory")]
            scan = bootstrap.scan_tree(root)
            out = [Mismatch(k, key, root, d) for k, key, d in bootstrap.differences(self.files, {}, scan)]
            sources = [(n, root / n, root, "") for n in self._intact_sources(scan)]
        else:
            if not isinstance(where, Layout):
                return [
                    Mismatch(
                        DIGEST,
                        ".",
                        where,
                        "C names a whole environment (manifest format 2), not one directory",
                    )
                ]
            scan = bootstrap.scan_layout(where)
            out = [
                Mismatch(k, key, where.root_of(key), d, where.locate(key))
                for k, key, d in bootstrap.differences(self.files, self.links or {}, scan)
            ]
            located = _locations.setdefault(where, {})
            sources = []
            for n in self._intact_sources(scan):
                label = n.partition("/")[0]
                if label in (ENV, PACKAGE):
                    path = located.get(n)
                    if path is None:
                        path = located[n] = where.locate(n)
                    sources.append((n, path, where.root_of(n), label + "/"))
        if bytecode:
            out += _check_bytecode(sources)
        return sorted(out, key=lambda m: (m.path, m.kind))

    def _intact_sources(self, scan: Scan) -> list[str]:
        return [n for n, d in self.files.items() if n.endswith(".py") and scan.files.get(n) == d]


# Bytecode caches -----------------------------------------------------------------------------

#: pyc path -> (stat key of the pyc, stat key of the source) when it was last found good.
_verified: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


#: layout -> manifest key -> the file it stands for (repeated checks build no paths).
_locations: dict[Layout, dict[str, Path]] = {}
#: source path -> the cache files the interpreter would look for, with their optimization level.
_cache_names: dict[str, tuple[tuple[str, int], ...]] = {}


def _caches(source: str) -> tuple[tuple[str, int], ...]:
    """The cache files this interpreter would look for, with their optimization level."""
    known = _cache_names.get(source)
    if known is None:
        if sys.implementation.cache_tag is None:
            known = ()
        else:
            known = tuple(
                (importlib.util.cache_from_source(source, optimization=opt), level)
                for level, opt in ((0, ""), (1, 1), (2, 2))
            )
        _cache_names[source] = known
    return known


def _would_load(data: bytes, source: bytes, st: os.stat_result) -> bool:
    """Would the import system load this pyc for this source (importlib's own header checks)?"""
    import _imp

    if len(data) < 16 or data[:4] != importlib.util.MAGIC_NUMBER:
        return False
    flags = int.from_bytes(data[4:8], "little")
    if flags & ~0b11:
        return False  # invalid flags: the import system falls back to the source
    if flags == 0:
        return (
            int.from_bytes(data[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(data[12:16], "little") == st.st_size & 0xFFFFFFFF
        )
    check = _imp.check_hash_based_pycs
    checked = check != "never" and (bool(flags & 0b10) or check == "always")
    return not checked or data[8:16] == importlib.util.source_hash(source)


def _check_bytecode(sources: list[tuple[str, Path, Path, str]]) -> list[Mismatch]:
    """Caches of verified sources: (the source's key, its file, its root, the key prefix of that root)."""
    out: list[Mismatch] = []
    if sys.pycache_prefix is not None and not os.path.isdir(sys.pycache_prefix):
        return out  # every cache would be under it (the bootstrap's /dev/null): none can exist
    for name, source_path, root, prefix in sources:
        source_name = str(source_path)
        for cache_name, level in _caches(source_name):
            try:  # the common case first: no such cache, or one verified before and unchanged
                cst = os.stat(cache_name)
            except OSError:
                continue
            try:
                sst = os.stat(source_name)
            except OSError:
                sst = None
            key = (_stat_key(cst), _stat_key(sst)) if sst is not None else None
            if key is not None and _verified.get(cache_name) == key:
                continue
            cache = Path(cache_name)
            rel = prefix + os.path.relpath(cache_name, root).replace(os.sep, "/")
            try:
                if sst is None:
                    sst = os.stat(source_name)
                data, source = cache.read_bytes(), source_path.read_bytes()
            except OSError as exc:
                out.append(Mismatch(UNREADABLE, rel, root, exc.strerror or str(exc), cache))
                continue
            if not _would_load(data, source, sst):
                continue  # stale or foreign: the interpreter compiles the verified source instead
            try:
                cached = marshal.loads(data[16:])
            except (EOFError, ValueError, TypeError) as exc:
                out.append(Mismatch(BYTECODE, rel, root, f"undecodable: {exc}", cache))
                continue
            try:
                fresh: CodeType = compile(source, str(source_path), "exec", dont_inherit=True, optimize=level)
            except (SyntaxError, ValueError) as exc:
                out.append(Mismatch(BYTECODE, rel, root, f"its source does not compile: {exc}", cache))
                continue
            if not isinstance(cached, CodeType) or cached != fresh:
                out.append(Mismatch(BYTECODE, rel, root, f"not the code of {name}", cache))
                continue
            _verified[cache_name] = (_stat_key(cst), _stat_key(sst))
    return out


def installed() -> Manifest:
    """The manifest of the environment this interpreter runs in, with the package it imported."""
    return Manifest.build_environment(environment())
