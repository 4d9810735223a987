"""The code manifest: every installed file hashed, a strict decoder, every difference named.

Format 1 lists one package directory; format 2 (the end of this file) the whole environment:
the venv with site-packages, its .pth files and dependencies, bin/ and pyvenv.cfg, the package
wherever it is, and the startup module site would load. Also the bytecode caches: a ``.pyc``
that the interpreter would load instead of a verified source must hold that source's code (the
attack is shown to work first, then caught).
"""

from __future__ import annotations

import ast
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

from appliance.boot import bootstrap
from appliance.boot.bootstrap import LayoutError, environment_layout
from appliance.boot.manifest import (
    BYTECODE,
    CHANGED,
    DIGEST,
    EXTRA,
    MISSING,
    UNEXPECTED,
    Layout,
    Manifest,
    ManifestError,
    Mismatch,
    environment,
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


# Format 2: the whole environment ------------------------------------------------------------

PY = f"python{sys.version_info.major}.{sys.version_info.minor}"


def make_env(root: Path) -> tuple[Path, Path, Path]:
    """A venv-shaped tree (pyvenv.cfg, bin/, site-packages with a dependency and a .pth), a package
    outside it (as an editable install has it) and a standard library with a sitecustomize."""
    venv = root / "venv"
    site = venv / "lib" / PY / "site-packages"
    (site / "dep").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = false\n")
    (venv / "bin").mkdir()
    (venv / "bin" / "pst").write_text("#!/bin/sh\nexec python -I -S boot.py\n")
    (venv / "bin" / "python3").symlink_to("/usr/bin/python3")
    (venv / "bin" / "python").symlink_to("python3")
    (venv / "lib64").symlink_to("lib")
    (site / "dep" / "__init__.py").write_text("VALUE = 1\n")
    (site / "dep" / "__pycache__").mkdir()
    (site / "dep" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"regenerated")
    (site / "editable.pth").write_text("import dep\n")
    pkg = make_tree(root)
    stdlib = root / "stdlib"
    stdlib.mkdir()
    (stdlib / "os.py").write_text("# the interpreter's, not listed\n")
    (stdlib / "sitecustomize.py").write_text("# Debian keeps one here\n")
    return venv, pkg, stdlib


def layout_of(venv: Path, pkg: Path, stdlib: Path) -> Layout:
    return environment_layout(pkg, executable=str(venv / "bin" / "python"), interpreter=[stdlib])


def test_the_environment_manifest_lists_venv_package_and_startup_module(tmp_path: Path) -> None:
    venv, pkg, stdlib = make_env(tmp_path)
    layout = layout_of(venv, pkg, stdlib)
    m = Manifest.build_environment(layout)
    site = f"env/lib/{PY}/site-packages"
    assert sorted(m.files) == sorted(
        [
            "env/pyvenv.cfg",
            "env/bin/pst",
            f"{site}/dep/__init__.py",
            f"{site}/editable.pth",
            "appliance/__init__.py",
            "appliance/mod.py",
            "appliance/sub/__init__.py",
            "appliance/sub/data.json",
            "startup/sitecustomize.py",
        ]
    )
    assert m.links == {"env/bin/python3": "/usr/bin/python3", "env/bin/python": "python3", "env/lib64": "lib"}
    assert m.environment and len(m) == 12
    assert m.files["startup/sitecustomize.py"] == hashlib.sha256(b"# Debian keeps one here\n").digest()
    assert Manifest.decode(m.encode()) == m
    assert bootstrap.canonical(m.to_obj()) == m.encode()  # what the bootstrap hashes, byte for byte
    assert bootstrap.decode_stored(m.encode()) == (dict(m.files), dict(m.links or {}))
    assert m.verify(layout) == []
    assert m.verify(pkg) == [
        Mismatch(DIGEST, ".", pkg, "C names a whole environment (manifest format 2), not one directory")
    ]


def test_every_addition_change_and_removal_in_the_environment_is_named(tmp_path: Path) -> None:
    venv, pkg, stdlib = make_env(tmp_path)
    m = Manifest.build_environment(layout_of(venv, pkg, stdlib))
    site = venv / "lib" / PY / "site-packages"
    (site / "zz-speedups.pth").write_text("import os; os.environ['X'] = '1'\n")  # a new .pth
    (site / "dep" / "__init__.py").write_text("VALUE = 2\n")  # a changed dependency
    (venv / "bin" / "pst").unlink()  # a removed script
    (venv / "bin" / "python3").unlink()
    (venv / "bin" / "python3").symlink_to("/tmp/python3")  # another interpreter
    (stdlib / "usercustomize.py").write_text("print('hi')\n")  # a startup module appears
    (venv / "pyvenv.cfg").write_text("home = /tmp\ninclude-system-site-packages = false\n")
    layout = layout_of(venv, pkg, stdlib)  # computed afresh at every check, as the boot check does
    found = {(x.kind, x.path): x for x in m.verify(layout)}
    assert set(found) == {
        (EXTRA, f"env/lib/{PY}/site-packages/zz-speedups.pth"),
        (CHANGED, f"env/lib/{PY}/site-packages/dep/__init__.py"),
        (MISSING, "env/bin/pst"),
        (CHANGED, "env/bin/python3"),
        (EXTRA, "startup/usercustomize.py"),
        (CHANGED, "env/pyvenv.cfg"),
    }
    assert found[(EXTRA, f"env/lib/{PY}/site-packages/zz-speedups.pth")].file == site / "zz-speedups.pth"
    assert found[(EXTRA, "startup/usercustomize.py")].file == stdlib / "usercustomize.py"
    assert "symbolic link to '/tmp/python3', expected '/usr/bin/python3'" in str(
        found[(CHANGED, "env/bin/python3")]
    )


def test_an_environment_that_reaches_outside_itself_cannot_be_listed(tmp_path: Path) -> None:
    venv, pkg, stdlib = make_env(tmp_path)
    m = Manifest.build_environment(layout_of(venv, pkg, stdlib))
    site = venv / "lib" / PY / "site-packages"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (site / "extra.pth").write_text(f"{elsewhere}\n")  # a path line: elsewhere joins the search path
    with pytest.raises(ManifestError, match=rf"extra\.pth: adds {elsewhere}, outside the environment"):
        Manifest.build_environment(layout_of(venv, pkg, stdlib))
    kinds = {(x.kind, x.path) for x in m.verify(layout_of(venv, pkg, stdlib))}
    assert (UNEXPECTED, f"env/lib/{PY}/site-packages/extra.pth") in kinds
    (site / "extra.pth").unlink()
    (site / "evil").symlink_to(elsewhere)  # a package that is a link out of the environment
    with pytest.raises(
        ManifestError, match=rf"evil: a symbolic link to {elsewhere}, outside the environment"
    ):
        Manifest.build_environment(layout_of(venv, pkg, stdlib))
    (site / "evil").unlink()
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\ninclude-system-site-packages = true\n")
    with pytest.raises(LayoutError, match="include-system-site-packages = true"):
        layout_of(venv, pkg, stdlib)
    with pytest.raises(LayoutError, match="not the interpreter of a virtual environment"):
        environment_layout(pkg, executable=str(tmp_path / "nowhere" / "bin" / "python"))


def test_the_startup_module_is_found_where_the_import_system_finds_it(tmp_path: Path) -> None:
    venv, pkg, stdlib = make_env(tmp_path)
    site = venv / "lib" / PY / "site-packages"
    first = tmp_path / "first"
    (first / "sitecustomize").mkdir(parents=True)  # a namespace directory: no code, not a module
    layout = environment_layout(pkg, executable=str(venv / "bin" / "python"), interpreter=[first, stdlib])
    assert [(h.name, h.path) for h in layout.hooks] == [("sitecustomize", stdlib / "sitecustomize.py")]
    (first / "sitecustomize" / "__init__.py").write_text("")  # now a package, ahead on the path
    (site / "usercustomize.py").write_text("")
    layout = environment_layout(pkg, executable=str(venv / "bin" / "python"), interpreter=[first, stdlib])
    assert [(h.name, h.path, h.kind) for h in layout.hooks] == [
        ("sitecustomize", first / "sitecustomize", "package"),
        ("usercustomize", site / "usercustomize.py", "module"),
    ]
    m = Manifest.build_environment(layout)
    assert "startup/sitecustomize/__init__.py" in m.files and "startup/usercustomize.py" in m.files


def test_the_search_path_of_the_standard_library_is_the_interpreters() -> None:
    """What `python -I -S` starts with (the bootstrap's view) is what the layout assumes."""
    out = subprocess.run(
        [sys.executable, "-I", "-S", "-c", "import sys; print(repr(sys.path))"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert [Path(p) for p in ast.literal_eval(out.stdout)] == bootstrap.interpreter_path()


def test_this_environment_builds_and_verifies_fast() -> None:
    """The manifest of the environment these tests run in (read only), timed: docs/performance.md."""
    layout = environment()
    started = time.perf_counter()
    m = Manifest.build_environment(layout)
    built = time.perf_counter() - started
    started = time.perf_counter()
    found = m.verify(layout, bytecode=False)
    verified = time.perf_counter() - started
    size = sum((layout.locate(k)).stat().st_size for k in m.files)
    print(
        f"environment manifest of {len(m)} files ({size / 1e6:.0f} MB) in {layout.describe()}: "
        f"build {built * 1000:.0f} ms, verify {verified * 1000:.0f} ms"
    )
    assert f"env/lib/{PY}/site-packages/trio/__init__.py" in m.files and "env/pyvenv.cfg" in m.files
    assert all(x.kind in (CHANGED, EXTRA, MISSING) for x in found)  # others may install meanwhile
    assert built < 10.0 and verified < 10.0  # about 150 ms each here; generous for a loaded machine


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.text(min_size=1, max_size=40), st.binary(min_size=32, max_size=32), max_size=30),
    st.one_of(
        st.none(), st.dictionaries(st.text(min_size=1, max_size=300), st.text(max_size=300), max_size=5)
    ),
)
def test_the_bootstraps_encoding_is_the_canonical_encoding(
    files: dict[str, bytes], links: dict[str, str] | None
) -> None:
    obj = bootstrap.manifest_object(files, links)
    data = bootstrap.canonical(obj)
    assert data == encoding.encode(obj)
    assert bootstrap.decode_stored(data) == (files, links)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (enc({"m.py": D}, v=2, links={}), "must start with one of env, appliance, startup"),
        (enc({"env/m.py": D}, v=2, links={"env/m.py": "x"}), "both as a file and as a link"),
        (enc({"env/m.py": D}, v=2, links={"env/l": ""}), "must map to its target"),
        (enc({"env/m.py": D}, v=2, links={"env/l": 3}), "must map to its target"),
        (enc({"env/m.py": D}, v=2, links={"../l": "x"}), "not a plain relative path"),
        (enc({"env/m.py": D}, v=1, links={}), "wrong fields"),
    ],
)
def test_bad_environment_manifests_are_refused_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError, match=reason):
        Manifest.decode(data)


def test_a_later_scan_reads_only_changed_files_and_a_restored_mtime_does_not_hide_a_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pkg = make_tree(tmp_path)
    monkeypatch.setattr(bootstrap, "DIGESTS", {})
    m = Manifest.build(pkg)
    assert not bootstrap.DIGESTS  # just written: within the racy window, never remembered
    monkeypatch.setattr(bootstrap, "RACY_NS", 0)  # as if the files were older than 2 s
    assert Manifest.build(pkg) == m and str(pkg / "mod.py") in bootstrap.DIGESTS
    st = (pkg / "mod.py").stat()
    data = bytearray((pkg / "mod.py").read_bytes())
    data[-3] ^= 0x01  # same size ...
    (pkg / "mod.py").write_bytes(bytes(data))
    os.utime(pkg / "mod.py", ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the mtime put back
    assert [(x.kind, x.path) for x in m.verify(pkg)] == [(CHANGED, "mod.py")]  # the ctime moved


def test_with_the_bootstraps_cache_prefix_no_bytecode_cache_is_read_nor_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server started by the bootstrap looks for caches under /dev/null: a tampered one is inert."""
    pkg = make_tree(tmp_path)
    m = Manifest.build(pkg)
    good = Path(py_compile.compile(str(pkg / "mod.py"), doraise=True))
    header = tmp_path / "good-header.pyc"
    shutil.copy(good, header)
    _tampered_pyc(pkg, header)
    assert _import_answer(pkg) == "666"  # read by a plain interpreter
    out = subprocess.run(
        [
            sys.executable,
            "-X",
            f"pycache_prefix={bootstrap.NO_BYTECODE}",
            "-c",
            "import pkgx.mod; print(pkgx.mod.ANSWER)",
        ],
        env={**os.environ, "PYTHONPATH": str(pkg.parent)},
        cwd=pkg.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "42"  # not read with the bootstrap's prefix
    monkeypatch.setattr(sys, "pycache_prefix", bootstrap.NO_BYTECODE)
    assert m.verify(pkg) == []
