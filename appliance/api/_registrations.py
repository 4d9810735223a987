"""The API's registrations on disk, so that they survive a restart of the server.

Theory of operation
-------------------
One file, ``<state>/public/api-registrations.cbor`` (canonical CBOR), rewritten whole with
:func:`appliance.node.store.atomic_write` (temp file, fsync, rename) after every change of
the registrations, and at most every :data:`SAVE_INTERVAL` seconds while only the quotas
move (every signature spends a token; an fsync per signature would cost more than the
signature). It holds what the rules of :mod:`appliance.api._core` need after a restart:

* every registration: name, unique id (empty for a distributed registration), uid, pid,
  SHA-256 of its handle (never the handle: the file gives nobody a usable handle), the
  tokens left in its rate-limit bucket (in thousandths), and for a distributed
  application the password *verifier* (scrypt; never the password);
* the owner uid of every name ever registered (names stay with their first user).

The file has no key material, but a verifier lets whoever reads it guess the password
offline (at scrypt's cost), so it is written with mode 0600, readable by the server's
user only. The key-holder reads the verifiers of distributed applications from it
(:class:`appliance.node._approvals.RegistrationClients`).

Loading is forgiving, and loud: a file that cannot be read or decoded at all is reported
naming it, kept aside as ``<name>.corrupt`` for inspection, and the server starts with no
registrations; a single bad entry is reported (file and entry) and skipped, and the
others are loaded.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.host.files import atomic_write

FILE_NAME: Final = "api-registrations.cbor"
FORMAT_VERSION: Final = 1
#: Quotas are saved at most this often (registration changes are saved at once).
SAVE_INTERVAL: Final = 10.0
MAX_FILE: Final = 16 * 1024 * 1024
_ENTRY_FIELDS: Final[Mapping[str, type | tuple[type, ...]]] = {
    "name": str,
    "unique_id": bytes,
    "uid": int,
    "pid": int,
    "handle_digest": bytes,
    "tokens_milli": int,
    "verifier": (bytes, type(None)),
}


@dataclass(frozen=True)
class SavedRegistration:
    name: str
    unique_id: bytes
    uid: int
    pid: int
    handle_digest: bytes
    tokens: float
    verifier: bytes | None


@dataclass
class Saved:
    registrations: list[SavedRegistration] = field(default_factory=list)
    owners: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def registrations_path(state_dir: Path) -> Path:
    return Path(state_dir) / "public" / FILE_NAME


def encode_registrations(registrations: Iterable[SavedRegistration], owners: Mapping[str, int]) -> bytes:
    entries = [
        {
            "name": r.name,
            "unique_id": r.unique_id,
            "uid": r.uid,
            "pid": r.pid,
            "handle_digest": r.handle_digest,
            "tokens_milli": max(0, round(r.tokens * 1000)),
            "verifier": r.verifier,
        }
        for r in sorted(registrations, key=lambda r: (r.name, r.uid, r.unique_id))
    ]
    return encoding.encode({"v": FORMAT_VERSION, "owners": dict(owners), "registrations": entries})


def _uid(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32


def decode_registrations(data: bytes, where: str) -> Saved:
    """Decode the file's bytes; DecodeError if nothing is usable, else entries and problems."""
    obj = encoding.decode(data, max_size=MAX_FILE, what=where)
    f = encoding.expect_map(obj, {"v": int, "owners": dict, "registrations": list}, where)
    if f["v"] != FORMAT_VERSION:
        raise DecodeError(f"{where}: format version {f['v']}, this server reads {FORMAT_VERSION}")
    saved = Saved()
    for name, uid in f["owners"].items():
        if isinstance(name, str) and name and _uid(uid):
            saved.owners[name] = uid
        else:
            saved.problems.append(f"{where}: owner entry {str(name)[:40]!r} is malformed; skipped")
    for index, entry in enumerate(f["registrations"]):
        try:
            e = encoding.expect_map(entry, _ENTRY_FIELDS, f"{where}: registration {index}")
            if not e["name"] or not _uid(e["uid"]) or not _uid(e["pid"]):
                raise DecodeError(f"{where}: registration {index}: bad name, uid or pid")
            if len(e["handle_digest"]) != 32 or len(e["unique_id"]) > 64 or e["tokens_milli"] < 0:
                raise DecodeError(f"{where}: registration {index}: bad handle digest, unique id or tokens")
            verifier = e["verifier"]
            if (verifier is None) == (not e["unique_id"]) or (verifier is not None and len(verifier) != 32):
                raise DecodeError(f"{where}: registration {index}: unique id and verifier do not agree")
        except DecodeError as exc:
            saved.problems.append(f"{exc}; skipped")
            continue
        saved.registrations.append(
            SavedRegistration(
                e["name"],
                e["unique_id"],
                e["uid"],
                e["pid"],
                e["handle_digest"],
                e["tokens_milli"] / 1000,
                verifier,
            )
        )
    return saved


class RegistrationStore:
    """Loads and saves the registration file of one server."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @classmethod
    def in_state_dir(cls, state_dir: Path) -> RegistrationStore:
        return cls(registrations_path(state_dir))

    def load(self, *, quarantine: bool = True) -> Saved:
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
            return decode_registrations(data, str(self.path))
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
        """Replace the file atomically (mode 0600); OSError if the disk refuses."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        atomic_write(self.path, encode_registrations(registrations, owners), private=True)


def load_verifiers(path: Path) -> dict[str, bytes]:
    """name -> verifier of the distributed applications registered in the file at ``path``."""
    saved = RegistrationStore(path).load(quarantine=False)
    return {r.name: r.verifier for r in saved.registrations if r.verifier is not None}
