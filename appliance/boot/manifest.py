"""The code manifest: the SHA-256 of every installed file of the ``appliance`` package.

A :class:`Manifest` maps each file's path, relative to the package directory, to the
SHA-256 of its bytes. Every file is listed (modules and package data alike) except the
bytecode caches ``__pycache__/*.pyc``, which the interpreter derives from the sources.
Its canonical CBOR encoding (:mod:`appliance.crypto.encoding`) is what
:meth:`Manifest.digest` hashes; that digest is the ``code_digest`` of the constants C, so
the network certifies the code with C ([Scert(M), M]) and a server can check the code it
runs against it.

:meth:`Manifest.verify` names every file that changed, went missing or appeared. It also
checks the bytecode caches: a ``.pyc`` that this interpreter would load in place of a
verified source (its header matches the source) must hold the code the source compiles
to, or an attacker could leave the sources intact and change only the cache. That costs
one compilation per cached module the first time; later calls skip a cache file whose
metadata (inode, size, mtime, ctime) and source are unchanged since it was verified.

Hashing the whole package takes a few milliseconds (tests/test_manifest.py measures it),
cheap enough to run at every refresh.
"""

from __future__ import annotations

import hashlib
import importlib.util
import marshal
import os
import stat
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import CodeType
from typing import Any

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError

TYPE = "pst/manifest"
VERSION = 1
#: Bounds on what a decoder accepts (the package has about a hundred files).
MAX_FILES = 20_000
MAX_PATH = 1024
MAX_ENCODED = 4 * 1024 * 1024

#: Kinds of :class:`Mismatch`.
CHANGED, MISSING, EXTRA, UNEXPECTED, UNREADABLE, BYTECODE, DIGEST = (
    "changed",
    "missing",
    "extra",
    "not a regular file",
    "unreadable",
    "bytecode differs from its source",
    "code digest differs",
)


class ManifestError(Exception):
    """A manifest cannot be built from a directory; the message names the file."""


@dataclass(frozen=True)
class Mismatch:
    """One difference between the installed code and a manifest; ``path`` is relative to ``root``."""

    kind: str
    path: str
    root: Path
    detail: str = ""

    @property
    def file(self) -> Path:
        return self.root / self.path

    def __str__(self) -> str:
        return f"{self.file}: {self.kind}" + (f" ({self.detail})" if self.detail else "")


def package_root() -> Path:
    """The directory of the ``appliance`` package this interpreter imported."""
    import appliance

    return Path(appliance.__file__).resolve().parent


def _is_cache(parts: tuple[str, ...]) -> bool:
    return len(parts) >= 2 and parts[-2] == "__pycache__" and parts[-1].endswith(".pyc")


@dataclass
class _Scan:
    files: dict[str, bytes] = field(default_factory=dict)
    special: list[str] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def _walk(root: Path, rel: tuple[str, ...], scan: _Scan) -> None:
    directory = root.joinpath(*rel)
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        scan.unreadable.append(("/".join(rel) or ".", exc.strerror or str(exc)))
        return
    for entry in entries:
        parts = (*rel, entry.name)
        name = "/".join(parts)
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError as exc:
            scan.unreadable.append((name, exc.strerror or str(exc)))
            continue
        if stat.S_ISDIR(st.st_mode):
            _walk(root, parts, scan)
        elif not stat.S_ISREG(st.st_mode):
            scan.special.append(name)  # a symlink, socket, device ...: never part of the code
        elif not _is_cache(parts):
            try:
                with open(entry.path, "rb") as f:
                    scan.files[name] = hashlib.file_digest(f, "sha256").digest()
            except OSError as exc:
                scan.unreadable.append((name, exc.strerror or str(exc)))


def _scan(root: Path) -> _Scan:
    if not root.is_dir():
        raise ManifestError(f"{root}: not a directory")
    scan = _Scan()
    _walk(root, (), scan)
    return scan


def _check_path(path: Any) -> str:
    if not isinstance(path, str) or not 0 < len(path) <= MAX_PATH:
        raise DecodeError(f"manifest: a file path must be a non-empty string of at most {MAX_PATH} chars")
    parts = path.split("/")
    if any(p in ("", ".", "..") or "\x00" in p or "\\" in p for p in parts):
        raise DecodeError(f"manifest: {path!r} is not a plain relative path")
    if _is_cache(tuple(parts)):
        raise DecodeError(f"manifest: {path!r} is a bytecode cache, which no manifest lists")
    return path


@dataclass(frozen=True)
class Manifest:
    """Relative path -> SHA-256 of every installed file of the package."""

    files: Mapping[str, bytes]

    @classmethod
    def build(cls, root: Path) -> Manifest:
        """The manifest of the files under ``root``; refuses symlinks and unreadable files."""
        scan = _scan(root)
        if scan.special:
            raise ManifestError(f"{root / scan.special[0]}: not a regular file; refusing to list it")
        if scan.unreadable:
            name, why = scan.unreadable[0]
            raise ManifestError(f"{root / name}: cannot read: {why}")
        if not scan.files:
            raise ManifestError(f"{root}: no files to list")
        return cls(scan.files)

    def to_obj(self) -> dict[str, Any]:
        return {"type": TYPE, "v": VERSION, "files": dict(self.files)}

    def encode(self) -> bytes:
        return encoding.encode(self.to_obj())

    @classmethod
    def decode(cls, data: bytes) -> Manifest:
        """Strict: canonical CBOR, exactly our fields, plain relative paths, 32-byte digests."""
        obj = encoding.decode(data, max_size=MAX_ENCODED, what="manifest")
        f = encoding.expect_map(obj, {"type": str, "v": int, "files": dict}, "manifest")
        if f["type"] != TYPE or f["v"] != VERSION:
            raise DecodeError(f"manifest: not a {TYPE} version {VERSION} object")
        raw = f["files"]
        if not raw or len(raw) > MAX_FILES:
            raise DecodeError(f"manifest: must list between 1 and {MAX_FILES} files, lists {len(raw)}")
        files: dict[str, bytes] = {}
        for path, digest in raw.items():
            _check_path(path)
            if not isinstance(digest, bytes) or len(digest) != 32:
                raise DecodeError(f"manifest: {path!r} must map to a 32-byte SHA-256")
            files[path] = digest
        return cls(files)

    def digest(self) -> bytes:
        """SHA-256 of the canonical encoding: what C.code_digest holds."""
        return hashlib.sha256(self.encode()).digest()

    def verify(self, root: Path, *, bytecode: bool = True) -> list[Mismatch]:
        """Every file under ``root`` that differs from this manifest, sorted by path."""
        scan = _scan(root)
        out: list[Mismatch] = []
        for name in sorted(set(self.files) | set(scan.files)):
            expected, actual = self.files.get(name), scan.files.get(name)
            if expected is None:
                out.append(Mismatch(EXTRA, name, root, "not in the manifest"))
            elif actual is None:
                if name not in scan.special and all(name != u for u, _ in scan.unreadable):
                    out.append(Mismatch(MISSING, name, root))
            elif actual != expected:
                out.append(
                    Mismatch(
                        CHANGED, name, root, f"sha256 {actual.hex()[:16]}.., expected {expected.hex()[:16]}.."
                    )
                )
        out += [Mismatch(UNEXPECTED, name, root) for name in scan.special]
        out += [Mismatch(UNREADABLE, name, root, why) for name, why in scan.unreadable]
        if bytecode:
            intact = [n for n in self.files if n.endswith(".py") and scan.files.get(n) == self.files[n]]
            out += _check_bytecode(root, intact)
        return sorted(out, key=lambda m: (m.path, m.kind))


# Bytecode caches -----------------------------------------------------------------------------

#: pyc path -> (stat key of the pyc, stat key of the source) when it was last found good.
_verified: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}


def _stat_key(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _caches(source: Path) -> Iterator[tuple[Path, int]]:
    """The cache files this interpreter would look for, with their optimization level."""
    if sys.implementation.cache_tag is None:
        return
    for level, opt in ((0, ""), (1, 1), (2, 2)):
        yield Path(importlib.util.cache_from_source(str(source), optimization=opt)), level


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


def _check_bytecode(root: Path, sources: list[str]) -> list[Mismatch]:
    out: list[Mismatch] = []
    for name in sources:
        source_path = root / name
        for cache, level in _caches(source_path):
            try:
                cst = cache.stat()
            except OSError:
                continue
            rel = os.path.relpath(cache, root).replace(os.sep, "/")
            try:
                sst = source_path.stat()
                key = (_stat_key(cst), _stat_key(sst))
                if _verified.get(str(cache)) == key:
                    continue
                data, source = cache.read_bytes(), source_path.read_bytes()
            except OSError as exc:
                out.append(Mismatch(UNREADABLE, rel, root, exc.strerror or str(exc)))
                continue
            if not _would_load(data, source, sst):
                continue  # stale or foreign: the interpreter compiles the verified source instead
            try:
                cached = marshal.loads(data[16:])
            except (EOFError, ValueError, TypeError) as exc:
                out.append(Mismatch(BYTECODE, rel, root, f"undecodable: {exc}"))
                continue
            try:
                fresh: CodeType = compile(source, str(source_path), "exec", dont_inherit=True, optimize=level)
            except (SyntaxError, ValueError) as exc:
                out.append(Mismatch(BYTECODE, rel, root, f"its source does not compile: {exc}"))
                continue
            if not isinstance(cached, CodeType) or cached != fresh:
                out.append(Mismatch(BYTECODE, rel, root, f"not the code of {name}"))
                continue
            _verified[str(cache)] = key
    return out


def installed() -> Manifest:
    """The manifest of the package this interpreter imported."""
    return Manifest.build(package_root())
