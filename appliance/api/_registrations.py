"""The API's registrations on disk, so that they survive a restart of the server.

Theory of operation
-------------------
One file, ``<state>/serve/api-registrations.cbor`` (canonical CBOR), rewritten whole with
:func:`appliance.host.files.atomic_write` (temp file, fsync, rename) at once after every change
that matters across a restart (a new or removed registration, a new name owner, a verifier, an
operator's revocation), and at most every :data:`SAVE_INTERVAL` seconds while only quotas, use
times and the handles of existing registrations move (every signature spends a token; an fsync
per signature would cost more than the signature). It holds what the rules of
:mod:`appliance.api._core` need after a restart:

* every registration: name, unique id (empty for a distributed application), uid, the pid that
  registered last, the tokens left in its rate-limit bucket (in thousandths), when it was made
  and last used (Unix milliseconds), for a distributed application the password *verifier*
  (scrypt; never the password), and its live handles: SHA-256 of each (never the handle: the
  file gives nobody a usable handle), with the pid that got it, when, and its last use;
* the owner uid of every name ever registered (names stay with their first user).

Format version 2 (this one) keeps several handles per registration; a version-1 file (one
handle per entry, no times) is still read: each entry becomes a registration with one handle,
made and last used "now", so it expires after the idle time like a fresh one.

The file has no key material, but a verifier lets whoever reads it guess the password
offline (at scrypt's cost), so it is written with mode 0640 in ``serve/`` (mode 2750, group
the key-holder's under [privsep]), readable by the server's account and the key-holder's only.
(Earlier versions kept it in ``public/``; :func:`move_registrations` moves it at start.)
The key-holder reads the verifiers of distributed applications from it
(:class:`appliance.node._approvals.RegistrationClients`). Nothing but the API server writes it:
operators change registrations through the API socket (``pst api registrations``), so the
server's memory and the file never disagree.

Loading is forgiving, and loud: a file that cannot be read or decoded at all is reported
naming it, kept aside as ``<name>.corrupt`` for inspection, and the server starts with no
registrations; a single bad entry is reported (file and entry) and skipped, and the
others are loaded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.host.files import atomic_write

FILE_NAME: Final = "api-registrations.cbor"
FORMAT_VERSION: Final = 2
READABLE_VERSIONS: Final = (1, 2)
#: Quotas, use times and handles of existing registrations are saved at most this often.
SAVE_INTERVAL: Final = 10.0
MAX_FILE: Final = 16 * 1024 * 1024
_MAX_MS: Final = 2**63 - 1
_V1_FIELDS: Final[Mapping[str, type | tuple[type, ...]]] = {
    "name": str,
    "unique_id": bytes,
    "uid": int,
    "pid": int,
    "handle_digest": bytes,
    "tokens_milli": int,
    "verifier": (bytes, type(None)),
}
_FIELDS: Final[Mapping[str, type | tuple[type, ...]]] = {
    "name": str,
    "unique_id": bytes,
    "uid": int,
    "pid": int,
    "tokens_milli": int,
    "verifier": (bytes, type(None)),
    "created_ms": int,
    "last_used_ms": int,
    "handles": list,
}
_HANDLE_FIELDS: Final[Mapping[str, type | tuple[type, ...]]] = {
    "digest": bytes,
    "pid": int,
    "created_ms": int,
    "last_used_ms": int,
}


@dataclass(frozen=True)
class SavedHandle:
    digest: bytes
    pid: int
    created: float
    last_used: float


@dataclass(frozen=True)
class SavedRegistration:
    name: str
    unique_id: bytes
    uid: int
    pid: int
    tokens: float
    verifier: bytes | None
    created: float
    last_used: float
    handles: tuple[SavedHandle, ...]


@dataclass
class Saved:
    registrations: list[SavedRegistration] = field(default_factory=list)
    owners: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def registrations_path(state_dir: Path) -> Path:
    return Path(state_dir) / "serve" / FILE_NAME


def move_registrations(state_dir: Path) -> str | None:
    """Move a registration file of an earlier version from ``public/`` to ``serve/``."""
    old, new = Path(state_dir) / "public" / FILE_NAME, registrations_path(state_dir)
    if not old.exists() or new.exists():
        return None
    new.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    os.replace(old, new)
    return f"moved the API registrations from {old} to {new}"


def _ms(seconds: float) -> int:
    return max(0, min(_MAX_MS, round(seconds * 1000)))


def encode_registrations(registrations: Iterable[SavedRegistration], owners: Mapping[str, int]) -> bytes:
    entries = [
        {
            "name": r.name,
            "unique_id": r.unique_id,
            "uid": r.uid,
            "pid": r.pid,
            "tokens_milli": max(0, round(r.tokens * 1000)),
            "verifier": r.verifier,
            "created_ms": _ms(r.created),
            "last_used_ms": _ms(r.last_used),
            "handles": [
                {
                    "digest": h.digest,
                    "pid": h.pid,
                    "created_ms": _ms(h.created),
                    "last_used_ms": _ms(h.last_used),
                }
                for h in sorted(r.handles, key=lambda h: h.digest)
            ],
        }
        for r in sorted(registrations, key=lambda r: (r.name, r.uid, r.unique_id))
    ]
    return encoding.encode({"v": FORMAT_VERSION, "owners": dict(owners), "registrations": entries})


def _uid(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32


def _stamp(value: int, what: str) -> float:
    if not 0 <= value <= _MAX_MS:
        raise DecodeError(f"{what}: time out of range")
    return value / 1000


def _check_common(e: Mapping[str, Any], what: str) -> bytes | None:
    """Checks shared by both versions; returns the verifier."""
    if not e["name"] or not _uid(e["uid"]) or not _uid(e["pid"]):
        raise DecodeError(f"{what}: bad name, uid or pid")
    if len(e["unique_id"]) > 64 or e["tokens_milli"] < 0:
        raise DecodeError(f"{what}: bad unique id or tokens")
    verifier: bytes | None = e["verifier"]
    if (verifier is None) == (not e["unique_id"]) or (verifier is not None and len(verifier) != 32):
        raise DecodeError(f"{what}: unique id and verifier do not agree")
    return verifier


def _entry_v1(entry: object, what: str, now: float) -> SavedRegistration:
    e = encoding.expect_map(entry, _V1_FIELDS, what)
    verifier = _check_common(e, what)
    if len(e["handle_digest"]) != 32:
        raise DecodeError(f"{what}: bad handle digest")
    handle = SavedHandle(e["handle_digest"], e["pid"], now, now)
    return SavedRegistration(
        e["name"], e["unique_id"], e["uid"], e["pid"], e["tokens_milli"] / 1000, verifier, now, now, (handle,)
    )


def _entry_v2(entry: object, what: str) -> SavedRegistration:
    e = encoding.expect_map(entry, _FIELDS, what)
    verifier = _check_common(e, what)
    created, last_used = _stamp(e["created_ms"], what), _stamp(e["last_used_ms"], what)
    handles: list[SavedHandle] = []
    seen: set[bytes] = set()
    for index, raw in enumerate(e["handles"]):
        where = f"{what}: handle {index}"
        h = encoding.expect_map(raw, _HANDLE_FIELDS, where)
        if len(h["digest"]) != 32 or h["digest"] in seen or not _uid(h["pid"]):
            raise DecodeError(f"{where}: bad or repeated handle digest, or bad pid")
        seen.add(h["digest"])
        created_h, used_h = _stamp(h["created_ms"], where), _stamp(h["last_used_ms"], where)
        handles.append(SavedHandle(h["digest"], h["pid"], created_h, used_h))
    if not handles:
        raise DecodeError(f"{what}: no handle")
    return SavedRegistration(
        e["name"],
        e["unique_id"],
        e["uid"],
        e["pid"],
        e["tokens_milli"] / 1000,
        verifier,
        created,
        last_used,
        tuple(handles),
    )


def decode_registrations(data: bytes, where: str, *, now: float | None = None) -> Saved:
    """Decode the file's bytes; DecodeError if nothing is usable, else entries and problems.

    ``now`` (Unix seconds) stamps the entries of a version-1 file, which has no times.
    """
    obj = encoding.decode(data, max_size=MAX_FILE, what=where)
    f = encoding.expect_map(obj, {"v": int, "owners": dict, "registrations": list}, where)
    if f["v"] not in READABLE_VERSIONS:
        raise DecodeError(f"{where}: format version {f['v']}, this server reads {READABLE_VERSIONS}")
    stamp = time.time() if now is None else now
    saved = Saved()
    for name, uid in f["owners"].items():
        if isinstance(name, str) and name and _uid(uid):
            saved.owners[name] = uid
        else:
            saved.problems.append(f"{where}: owner entry {str(name)[:40]!r} is malformed; skipped")
    for index, entry in enumerate(f["registrations"]):
        what = f"{where}: registration {index}"
        try:
            reg = _entry_v1(entry, what, stamp) if f["v"] == 1 else _entry_v2(entry, what)
        except DecodeError as exc:
            saved.problems.append(f"{exc}; skipped")
            continue
        saved.registrations.append(reg)
    return saved


class RegistrationStore:
    """Loads and saves the registration file of one server."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> RegistrationStore:
        return cls(registrations_path(state_dir))

    def load(self, *, quarantine: bool = True, now: float | None = None) -> Saved:
        """What the file holds; never raises (problems are listed, naming the file).

        An undecodable file is renamed to ``<name>.corrupt`` when ``quarantine`` is set
        (the API server, which owns the file), left alone otherwise (readers).
        """
        try:
            size = self.path.stat().st_size
            if size > MAX_FILE:
                raise DecodeError(f"{self.path}: {size} bytes is larger than a registration file can be")
            data = self.path.read_bytes()
        except FileNotFoundError:
            return Saved()
        except OSError as exc:
            return Saved(
                problems=[f"{self.path}: unreadable ({exc.strerror}); starting without registrations"]
            )
        except DecodeError as exc:
            return Saved(problems=[f"{exc}; starting without registrations"])
        try:
            return decode_registrations(data, str(self.path), now=now)
        except DecodeError as exc:
            aside = self.path.with_name(self.path.name + ".corrupt")
            kept = ""
            if quarantine:
                try:
                    os.replace(self.path, aside)
                    kept = f"; kept as {aside}"
                except OSError:
                    pass
            return Saved(problems=[f"{exc}; starting without registrations{kept}"])

    def save(self, registrations: Iterable[SavedRegistration], owners: Mapping[str, int]) -> None:
        """Replace the file atomically (mode 0640); OSError if the disk refuses."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        data = encode_registrations(registrations, owners)
        atomic_write(self.path, data, private=True, group_readable=True)


def load_verifiers(path: Path) -> dict[str, bytes]:
    """name -> verifier of the distributed applications registered in the file at ``path``."""
    saved = RegistrationStore(path).load(quarantine=False)
    return {r.name: r.verifier for r in saved.registrations if r.verifier is not None}
