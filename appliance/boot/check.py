"""The boot checks: ROM -> M_i -> Vcert -> [Scert(M), M] -> C -> config -> code.

:func:`boot_check` runs before a server starts (``pst serve``) and on demand
(``pst check``):

1. Vstart is read from the ROM.
2. The server's copy of M (``public/M.cbor``) is checked as Table 2 does
   (:meth:`~appliance.protocols.state.InvariantInfo.check`): M_i must verify with Vstart,
   which gives Vcert, and [Scert(M), M] must verify with Vcert.
3. The C in force is the C certified in M followed by the stored chain of network-signed
   upgrades (:mod:`appliance.boot.upgrade`); the config's [network] must equal it.
4. The code must match the manifest whose digest is C.code_digest: the whole environment
   this interpreter runs in (the venv with site-packages, ``.pth`` files, dependencies,
   ``bin/``, ``pyvenv.cfg``; the imported ``appliance`` package; the ``sitecustomize`` it
   would load: :mod:`appliance.boot.manifest`), or for an older C the package alone, with
   a warning. The full manifest is kept in ``public/manifest.cbor`` so that a mismatch
   names the file; that file is trusted only if its digest is C.code_digest. If it is
   missing or not C's, the installed code's own manifest is built and its digest compared
   with C's (and the file is restored when they agree).

A code or constants mismatch refuses the boot: :class:`BootRefused`, whose message names
the file or the check, and an alert in ``public/alerts.jsonl`` in the server's format.

**A server without a valid M.** M can be missing (a new or wiped server) or invalid (an
attacker edited it). Table 2's answer is that such a server boots as *recovering* and
gets M from its peers (PushM) at the next refresh, with no operator (scenario B), so the
boot check does not refuse it: refusing an invalid M but not a missing one would stop
nothing, as an attacker who can edit M can delete it. Without M there is no certified
C, so the code is checked against the config's C instead, and the report says that C is
not certified. The check against the certified C happens once M is back: the lead calls
:func:`recheck_code` at every refresh, and :func:`code_mismatches` takes a C learned in
memory. ``strict=True`` (``pst check --strict``) refuses a server without a valid M and a
C without a code digest instead.

The checker is itself part of the checked code. ``pst serve`` and ``pst check`` therefore
start through :mod:`appliance.boot.bootstrap`, which hashes the environment with the
standard library alone and compares it with the config's code_digest before anything of
the environment (a ``.pth`` file, ``sitecustomize``, a dependency, this module) runs; the
checks here then bind the config to the certified C. What runs before the bootstrap (the
interpreter, its C libraries and standard library, the kernel) is not checked from here
(docs/security.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from appliance.boot import backends
from appliance.boot import rom as rom_module
from appliance.boot.manifest import (
    DIGEST,
    Layout,
    Manifest,
    ManifestError,
    Mismatch,
    environment,
    package_root,
)
from appliance.boot.upgrade import apply_chain, read_chain
from appliance.crypto.errors import DecodeError
from appliance.host.config import NodeConfig
from appliance.host.files import MAX_FILE, atomic_write
from appliance.protocols._core import AlertKind
from appliance.protocols.state import Constants, InvariantInfo

MANIFEST_FILE = "manifest.cbor"
#: ``pst serve``'s exit status when the boot is refused (systemd: RestartPreventExitStatus=3).
EXIT_BOOT_REFUSED = 3
OK, WARN, FAIL = "ok", "WARN", "FAIL"


class BootRefused(Exception):
    """The server must not start; the message names the file or the check that failed."""

    def __init__(self, message: str, report: BootReport) -> None:
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str


@dataclass
class BootReport:
    server: int
    code_root: Path
    checks: list[Check] = field(default_factory=list)
    #: The C the code was checked against, and whether M certifies it.
    constants: Constants | None = None
    certified: bool = False
    mismatches: list[Mismatch] = field(default_factory=list)

    def add(self, name: str, status: str, detail: str) -> None:
        self.checks.append(Check(name, status, detail))

    @property
    def warnings(self) -> list[str]:
        return [f"{c.name}: {c.detail}" for c in self.checks if c.status == WARN]

    def lines(self) -> list[str]:
        out = [f"server {self.server}: boot checks (code imported from {self.code_root})"]
        out += [f"  {c.status:4}  {c.name}: {c.detail}" for c in self.checks]
        return out


class _Rom(Protocol):
    def read_vstart(self) -> bytes: ...

    def describe(self) -> str: ...


def _open_rom(config: NodeConfig) -> _Rom:
    return backends.open_rom(config)


def read_vstart(config: NodeConfig) -> tuple[bytes, str]:
    """Vstart and a description of the ROM it came from; RomError if it cannot be read."""
    rom = _open_rom(config)
    return rom.read_vstart(), rom.describe()


def _read_m(public_dir: Path) -> tuple[InvariantInfo | None, str | None]:
    """Our copy of M, or None with why (None, None: there is no M at all)."""
    path = public_dir / "M.cbor"
    try:
        if path.stat().st_size > MAX_FILE:
            return None, f"{path}: larger than any M can be"
        return InvariantInfo.decode(path.read_bytes()), None
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"{path}: unreadable ({exc.strerror})"
    except DecodeError as exc:
        return None, f"{path}: {exc}"


def read_manifest(public_dir: Path) -> Manifest | None:
    try:
        data = (public_dir / MANIFEST_FILE).read_bytes()
        last = _decoded.get(public_dir)
        if last is not None and last[0] == data:
            return last[1]  # the check at every refresh decodes the same manifest once
        manifest = Manifest.decode(data)
    except (OSError, DecodeError):
        return None
    _decoded[public_dir] = (data, manifest)
    return manifest


#: public dir -> (the manifest file's bytes, its decoding): a manifest is never changed in place.
_decoded: dict[Path, tuple[bytes, Manifest]] = {}


def store_manifest(state_dir: Path, manifest: Manifest) -> None:
    """Keep the full manifest next to M, so that a mismatch can name the file."""
    atomic_write(state_dir / "public" / MANIFEST_FILE, manifest.encode())


def code_mismatches(constants: Constants, state_dir: Path, code_root: Path | None = None) -> list[Mismatch]:
    """The code against C's manifest: the environment, or only the package directory ``code_root``.

    For a C learned in memory (e.g. the M a recovering server got by PushM). An empty
    C.code_digest is not handled here: the callers decide what such a C means.
    """
    return _check_code(constants, state_dir, code_root).mismatches


@dataclass(frozen=True)
class _CodeCheck:
    mismatches: list[Mismatch]
    source: str  # which manifest was used
    files: int
    covered: str  # what was checked, for the report
    environment: bool  # did the manifest cover the environment (format 2)?


def _candidates(where: Path | Layout) -> list[tuple[Callable[[], Manifest], str, bool]]:
    """Manifests of the installed code that C may name: (build, what it covers, environment?)."""
    if isinstance(where, Path):
        return [(lambda: Manifest.build(where), f"under {where}", False)]
    return [
        (lambda: Manifest.build_environment(where), f"of {where.describe()}", True),
        (lambda: Manifest.build(where.package), f"under {where.package}", False),  # an older C
    ]


def _check_code(constants: Constants, state_dir: Path, code_root: Path | None) -> _CodeCheck:
    public_dir = state_dir / "public"
    try:
        where: Path | Layout = code_root if code_root is not None else environment()
    except ManifestError as exc:
        return _CodeCheck([Mismatch(DIGEST, ".", package_root(), str(exc))], "none", 0, "", False)
    candidates = _candidates(where)
    stored = read_manifest(public_dir)
    if stored is not None and stored.digest() == constants.code_digest:
        covered = next(c for _, c, env in candidates if env == stored.environment or len(candidates) == 1)
        return _CodeCheck(
            stored.verify(where), f"{public_dir / MANIFEST_FILE}", len(stored), covered, stored.environment
        )
    built: Manifest | None = None
    first: Manifest | None = None
    covered = ""
    for build, what, _ in candidates:
        try:
            manifest = build()
        except ManifestError as exc:
            if first is None:
                root = where if isinstance(where, Path) else where.package
                return _CodeCheck([Mismatch(DIGEST, ".", root, str(exc))], "none", 0, "", False)
            continue
        first = first if first is not None else manifest
        if manifest.digest() == constants.code_digest:
            built, covered = manifest, what
            break
    if built is None:
        assert first is not None
        why = (
            "missing" if stored is None and not (public_dir / MANIFEST_FILE).exists() else "not C's manifest"
        )
        root = where if isinstance(where, Path) else where.package
        return _CodeCheck(
            [
                Mismatch(
                    DIGEST,
                    ".",
                    root,
                    f"the installed files' manifest digest is {first.digest().hex()[:16]}.., C names "
                    f"{constants.code_digest.hex()[:16]}..; {public_dir / MANIFEST_FILE} is {why}, so the "
                    "changed file cannot be named",
                )
            ],
            "none",
            0,
            "",
            False,
        )
    note = "built from the installed files (their digest is C's)"
    try:
        store_manifest(state_dir, built)
        note += f"; {public_dir / MANIFEST_FILE} restored"
    except OSError as exc:
        note += f"; {public_dir / MANIFEST_FILE} not restored: {exc.strerror}"
    return _CodeCheck(built.verify(where), note, len(built), covered, built.environment)


def append_alert(
    public_dir: Path, kind: AlertKind, server: int, period: int, detail: str, now: float
) -> None:
    """One line of ``alerts.jsonl``, as the server writes its own alerts."""
    public_dir.mkdir(parents=True, exist_ok=True)
    line = {"time": now, "kind": kind.value, "server": server, "period": period, "detail": detail}
    with open(public_dir / "alerts.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def _show(key: str, value: Any) -> str:
    if isinstance(value, bytes):
        return f"{value.hex()[:16]}.." if value else "(none)"
    return repr(value)


def constants_diff(config_c: Constants, certified: Constants) -> list[str]:
    """The fields of C on which the config and the certified C disagree, both values shown."""
    a, b = config_c.to_obj(), certified.to_obj()
    return [f"{k} (config {_show(k, a[k])}, certified {_show(k, b[k])})" for k in sorted(a) if a[k] != b[k]]


def _constants_in_force(config: NodeConfig, vstart: bytes) -> tuple[InvariantInfo | None, Constants | None]:
    """The valid M (or None) and the C it certifies after the stored upgrades."""
    public_dir = config.state_dir / "public"
    m, _ = _read_m(public_dir)
    if m is None or m.check(config.server_id, vstart) is not None:
        return None, None
    chain, _ = read_chain(public_dir)
    c, _, _ = apply_chain(m, chain)
    return m, c


def boot_check(
    config: NodeConfig,
    *,
    strict: bool = False,
    code_root: Path | None = None,
    clock: Callable[[], float] = time.time,
) -> BootReport:
    """Run every boot check; raise :class:`BootRefused` on a mismatch (see the module doc)."""
    root = code_root if code_root is not None else package_root()
    report = BootReport(config.server_id, root)
    me = config.server_id
    public_dir = config.state_dir / "public"

    def alert(kind: AlertKind, c: Constants, detail: str) -> None:
        try:
            append_alert(public_dir, kind, me, c.period_at(clock()), detail, clock())
        except OSError as exc:  # e.g. pst check run by a user who cannot write the state directory
            report.add("alert", WARN, f"not written to {public_dir / 'alerts.jsonl'}: {exc.strerror}")

    def refuse(kind: AlertKind | None, name: str, detail: str, c: Constants) -> BootRefused:
        report.add(name, FAIL, detail)
        if kind is not None:
            alert(kind, c, f"boot refused: {detail}")
        return BootRefused(f"{name}: {detail}", report)

    # 1. Vstart from ROM.
    try:
        vstart, rom_text = read_vstart(config)
    except (rom_module.RomError, OSError, ValueError) as exc:
        raise refuse(None, "ROM", str(exc), config.constants) from None
    report.add("ROM", OK, f"{rom_text}; Vstart {vstart.hex()[:16]}..")

    # 2. M_i with Vstart, Vcert, [Scert(M), M].
    m, problem = _read_m(public_dir)
    if m is not None:
        problem = m.check(me, vstart)
        if problem is not None:
            problem = f"{public_dir / 'M.cbor'}: {problem}"
            m = None
    if m is None:
        if problem is None:
            detail = f"no M in {public_dir}: a new or wiped server"
        else:
            detail = f"own copy of M rejected: {problem}"
        if strict:
            raise refuse(AlertKind.INVALID_M if problem else None, "M", detail, config.constants)
        if problem is not None:
            alert(AlertKind.INVALID_M, config.constants, detail)
        report.add("M", WARN, f"{detail}; booting as recovering: M comes back from the peers (PushM)")
    else:
        report.add(
            "M",
            OK,
            f"M_{me} verifies with Vstart; Vcert {m.vcert.hex()[:16]}..; Scert(M) verifies with Vcert",
        )

    # 3. The C in force, and the config's C.
    if m is not None:
        chain, chain_problem = read_chain(public_dir)
        c, applied, step = apply_chain(m, chain)
        for why in (chain_problem, step):
            if why is not None:
                report.add("upgrades", WARN, f"{why}; the C in force is the one before it")
        diff = constants_diff(config.constants, c)
        if diff:
            hint = ""
            if any(d.startswith("code_digest") for d in diff):
                hint = " (an approved upgrade is installed with `pst upgrade install`)"
            raise refuse(
                AlertKind.CONSTANTS_MISMATCH,
                "C",
                f"{config.path}: [network] differs from the certified C in {'; '.join(diff)}{hint}",
                c,
            )
        ups = f" and {applied} network-signed upgrade(s)" if applied else ""
        report.add("C", OK, f"the config's [network] equals the C certified by M{ups}")
        report.constants, report.certified = c, True
    else:
        c = config.constants
        report.add("C", WARN, f"not certified (no valid M): using the config's [network] from {config.path}")
        report.constants = c

    # 4. The code against the manifest named by C.
    if not c.code_digest:
        detail = "C names no code digest (a network created without a code manifest): code NOT checked"
        if strict:
            raise refuse(None, "code", detail, c)
        report.add("code", WARN, detail)
        return report
    result = _check_code(c, config.state_dir, code_root)
    report.mismatches = result.mismatches
    if result.mismatches:
        shown = "; ".join(str(x) for x in result.mismatches[:5])
        more = f"; and {len(result.mismatches) - 5} more" if len(result.mismatches) > 5 else ""
        raise refuse(
            AlertKind.CODE_MISMATCH,
            "code",
            f"the installed code differs from the manifest in C ({c.code_digest.hex()[:16]}..): "
            f"{shown}{more}",
            c,
        )
    certified = "certified " if report.certified else "(uncertified) "
    report.add(
        "code",
        OK,
        f"{result.files} files {result.covered} match the manifest {c.code_digest.hex()[:16]}.. named by "
        f"the {certified}C (manifest: {result.source})",
    )
    if code_root is None and not result.environment:
        detail = (
            "C's manifest lists the appliance package alone (format 1): the rest of the environment "
            "(site-packages with its .pth files and dependencies, bin/, pyvenv.cfg) is NOT checked; "
            "have the network approve the environment's manifest (pst manifest, pst upgrade)"
        )
        if strict:
            raise refuse(None, "code", detail, c)
        report.add("code", WARN, detail)
    return report


def recheck_code(config: NodeConfig, *, code_root: Path | None = None) -> list[Mismatch]:
    """The code check alone, for every refresh: mismatches against the C in force.

    Uses the C certified by our M (after upgrades) if we hold a valid one, else the
    config's C (a recovering server). Never raises for bad input: an unreadable ROM or
    state only means the config's C is used. Hashing the package takes milliseconds.
    """
    c = constants_for_code_check(config)
    if not c.code_digest:
        return []
    return code_mismatches(c, config.state_dir, code_root)


def constants_for_code_check(config: NodeConfig) -> Constants:
    """The C whose code digest :func:`recheck_code` checks against (see there)."""
    try:
        vstart, _ = read_vstart(config)
        _, c = _constants_in_force(config, vstart)
    except (rom_module.RomError, OSError, ValueError):
        c = None
    return config.constants if c is None else c
