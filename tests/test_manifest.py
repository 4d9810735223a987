"""The code manifest: every installed file hashed, a strict decoder, every difference named.

Also the bytecode caches: a ``.pyc`` that the interpreter would load instead of a verified
source must hold that source's code (the attack is shown to work first, then caught).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import py_compile
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.boot.manifest import (
    BYTECODE,
    CHANGED,
    EXTRA,
    MISSING,
    UNEXPECTED,
    Manifest,
    ManifestError,
    package_root,
)
from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError


def make_tree(root: Path) -> Path:
    pkg = root / "pkgx"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""A tiny package."""\n')
    (pkg / "mod.py").write_text('"""Module."""\n\nANSWER = 42\n\n\ndef f() -> int:\n    return ANSWER\n')
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "data.json").write_text('{"k": 1}\n')
    return pkg


def test_build_lists_every_file_but_bytecode_caches(tmp_path: Path) -> None:
    pkg = make_tree(tmp_path)
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"cache")
    m = Manifest.build(pkg)
    assert sorted(m.files) == ["__init__.py", "mod.py", "sub/__init__.py", "sub/data.json"]
    assert m.files["sub/data.json"] == hashlib.sha256(b'{"k": 1}\n').digest()
    assert m.digest() == hashlib.sha256(m.encode()).digest()
    assert Manifest.decode(m.encode()) == m
    assert m.verify(pkg) == []


def test_verify_names_each_changed_missing_and_extra_file(tmp_path: Path) -> None:
    pkg = make_tree(tmp_path)
    m = Manifest.build(pkg)
    data = bytearray((pkg / "mod.py").read_bytes())
    data[-3] ^= 0x01  # one byte
    (pkg / "mod.py").write_bytes(bytes(data))
    (pkg / "sub" / "data.json").unlink()
    (pkg / "sub" / "evil.py").write_text("import os\n")
    (pkg / "link.py").symlink_to(pkg / "mod.py")
    found = {(x.kind, x.path) for x in m.verify(pkg)}
    assert found == {
        (CHANGED, "mod.py"),
        (MISSING, "sub/data.json"),
        (EXTRA, "sub/evil.py"),
        (UNEXPECTED, "link.py"),
    }
    changed = next(x for x in m.verify(pkg) if x.kind == CHANGED)
    assert str(changed).startswith(f"{pkg / 'mod.py'}: changed (sha256 ")


def test_build_refuses_symlinks_and_missing_roots(tmp_path: Path) -> None:
    pkg = make_tree(tmp_path)
    (pkg / "link.py").symlink_to(pkg / "mod.py")
    with pytest.raises(ManifestError, match=r"link\.py: not a regular file"):
        Manifest.build(pkg)
    with pytest.raises(ManifestError, match="not a directory"):
        Manifest.build(tmp_path / "nowhere")


def test_a_stray_pyc_outside_pycache_is_an_extra_file(tmp_path: Path) -> None:
    pkg = make_tree(tmp_path)
    m = Manifest.build(pkg)
    (pkg / "mod2.pyc").write_bytes(b"sourceless modules are importable")
    assert [(x.kind, x.path) for x in m.verify(pkg)] == [(EXTRA, "mod2.pyc")]


def test_the_installed_package_verifies_fast(tmp_path: Path) -> None:
    """Hash a copy of the package (others may be editing the tree): build + verify, timed."""
    copy = tmp_path / "appliance"
    shutil.copytree(package_root(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    started = time.perf_counter()
    m = Manifest.build(copy)
    built = time.perf_counter() - started
    started = time.perf_counter()
    assert m.verify(copy) == []
    verified = time.perf_counter() - started
    print(f"manifest of {len(m.files)} files: build {built * 1000:.1f} ms, verify {verified * 1000:.1f} ms")
    assert "boot/manifest.py" in m.files and "cli.py" in m.files
    assert built < 2.0 and verified < 2.0  # a few ms in practice; generous for a loaded machine


# Bytecode caches ----------------------------------------------------------------------------


def _tampered_pyc(pkg: Path, header_from: Path) -> Path:
    """A pyc of mod.py whose code says ANSWER = 666 but whose header matches the real source."""
    source = pkg / "mod.py"
    pyc = Path(importlib.util.cache_from_source(str(source)))
    evil = pkg.parent / "evil_mod.py"
    evil.write_text(source.read_text().replace("42", "666"))
    evil_pyc = pkg.parent / "evil.pyc"
    py_compile.compile(str(evil), cfile=str(evil_pyc), doraise=True)
    pyc.parent.mkdir(exist_ok=True)
    pyc.write_bytes(header_from.read_bytes()[:16] + evil_pyc.read_bytes()[16:])
    return pyc


def _import_answer(pkg: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(pkg.parent)}
    out = subprocess.run(
        [sys.executable, "-c", "import pkgx.mod; print(pkgx.mod.ANSWER)"],
        env=env,
        cwd=pkg.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def test_a_pyc_the_interpreter_would_load_must_hold_the_sources_code(tmp_path: Path) -> None:
    pkg = make_tree(tmp_path)
    m = Manifest.build(pkg)
    good = Path(py_compile.compile(str(pkg / "mod.py"), doraise=True))
    assert m.verify(pkg) == []  # a genuine cache is fine
    header = tmp_path / "good-header.pyc"
    shutil.copy(good, header)
    pyc = _tampered_pyc(pkg, header)
    # The attack works: the source is intact, yet the interpreter runs the tampered cache.
    assert _import_answer(pkg) == "666"
    found = m.verify(pkg)
    assert [(x.kind, x.path) for x in found] == [(BYTECODE, str(pyc.relative_to(pkg)))]
    assert "not the code of mod.py" in str(found[0])
    assert m.verify(pkg, bytecode=False) == []


def test_a_stale_pyc_is_not_loaded_and_not_reported(tmp_path: Path) -> None:
    pkg = make_tree(tmp_path)
    m = Manifest.build(pkg)
    header = tmp_path / "header.pyc"
    header.write_bytes(importlib.util.MAGIC_NUMBER + bytes(12))  # timestamp 0: never matches
    _tampered_pyc(pkg, header)
    assert _import_answer(pkg) == "42"  # the interpreter compiles the source instead
    assert m.verify(pkg) == []


@pytest.mark.parametrize("invalidation", ["checked-hash", "unchecked-hash"])
def test_hash_based_pycs_are_checked_too(tmp_path: Path, invalidation: str) -> None:
    pkg = make_tree(tmp_path)
    m = Manifest.build(pkg)
    mode = py_compile.PycInvalidationMode.CHECKED_HASH
    if invalidation == "unchecked-hash":
        mode = py_compile.PycInvalidationMode.UNCHECKED_HASH
    good = Path(py_compile.compile(str(pkg / "mod.py"), doraise=True, invalidation_mode=mode))
    assert m.verify(pkg) == []
    header = tmp_path / "good-header.pyc"
    shutil.copy(good, header)
    _tampered_pyc(pkg, header)
    assert _import_answer(pkg) == "666"
    assert [x.kind for x in m.verify(pkg)] == [BYTECODE]


def test_a_pyc_replaced_after_a_good_check_is_caught(tmp_path: Path) -> None:
    pkg = make_tree(tmp_path)
    m = Manifest.build(pkg)
    good = Path(py_compile.compile(str(pkg / "mod.py"), doraise=True))
    assert m.verify(pkg) == []  # now remembered as verified
    header = tmp_path / "good-header.pyc"
    shutil.copy(good, header)
    _tampered_pyc(pkg, header)
    assert [x.kind for x in m.verify(pkg)] == [BYTECODE]


# The decoder -------------------------------------------------------------------------------

D = b"\x11" * 32


def enc(files: Any, **over: Any) -> bytes:
    return encoding.encode({"type": "pst/manifest", "v": 1, "files": files, **over})


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (enc({}), "between 1 and"),
        (enc({"../x.py": D}), "not a plain relative path"),
        (enc({"/etc/passwd": D}), "not a plain relative path"),
        (enc({"a//b.py": D}), "not a plain relative path"),
        (enc({"a/./b.py": D}), "not a plain relative path"),
        (enc({"a\\b.py": D}), "not a plain relative path"),
        (enc({"x/__pycache__/m.cpython-311.pyc": D}), "bytecode cache"),
        (enc({"m.py": D[:31]}), "32-byte"),
        (enc({"m.py": "00" * 32}), "32-byte"),
        (enc({1: D}), "non-empty string"),
        (enc({"m.py": D}, v=2), "version 1"),
        (enc({"m.py": D}, type="pst/other"), "version 1"),
        (enc({"m.py": D}, extra=1), "wrong fields"),
        (encoding.encode([1, 2]), "expected a map"),
        (enc({"m.py": D}) + b"\x00", "canonical"),
    ],
)
def test_bad_manifests_are_refused_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        Manifest.decode(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    try:
        m = Manifest.decode(data)
    except DecodeError:
        return
    assert m.encode() == data


paths = st.lists(
    st.sampled_from(["a", "b.py", "..", ".", "", "__pycache__", "x.pyc", "c\\d", "é.txt", "\x00"]),
    min_size=1,
    max_size=4,
).map("/".join)
values = st.binary(min_size=30, max_size=33) | st.integers() | st.text(max_size=3)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(paths | st.integers(), values, max_size=5), st.sampled_from([0, 1, 2]))
def test_structured_garbage_decodes_to_a_valid_manifest_or_raises(files: dict[Any, Any], v: int) -> None:
    data = enc(files, v=v)
    try:
        m = Manifest.decode(data)
    except DecodeError:
        return
    assert m.encode() == data
    assert all(len(d) == 32 for d in m.files.values())
    assert all(".." not in p.split("/") and not p.startswith("/") for p in m.files)
