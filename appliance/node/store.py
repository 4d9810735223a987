"""The state directory: public data apart from private data, written atomically, erased for real.

Layout (``root`` is the server's StateDirectory)::

    public/M.cbor          [Scert(M), M]
    public/keytable.cbor   the signed KeyTable of the current period
    public/sharings.cbor   the public sharings (commitments) of every long-lived secret
    public/transcript.cbor the last decided refresh (KeyTable and dealing set with their
                           quorum certificates, the dealings): laggards catch up from it
    private/period.cbor    this period's key seeds and shares, and the recovery values owed
                           to recovering servers (mode 0600, directory 0700)
    private/pending/       a refresh in progress: its new period key seeds, announcement,
                           dealing and voting records (SafetyData), each saved before the
                           message that depends on it is sent; erased at the decision
    serve/                 what pst serve writes (the API's registrations, its own alerts):
                           under [privsep] the only place it may write (appliance.node.privsep)

Every write is temp file + fsync + rename + directory fsync, so a crash leaves either the
old or the new file, never a torn one. Private files are overwritten with zeros and
synced before they are unlinked (:func:`erase`), and so is the content a private write
replaces (kept under a second name until the new file is durable; leftovers of a crash are
erased when the directory is loaded). On ext4 (ordered data, the default) that overwrites the
very blocks; on a copy-on-write or log-structured file system, or an SSD's remapped flash, it is
best effort, which docs/security.md says plainly.

A file that is missing, unreadable or fails to decode is reported (``problems``) and
treated as absent: the server then recovers it from its peers at the next refresh,
never crashes on it. A private state that exists but cannot be used (its mode or owner, a
directory in its place, garbage) is also reported apart (``Loaded.private_unusable``): the
server raises an alert and sets it aside (:meth:`StateDir.set_aside_private`), so that the
next refresh can write its new shares there.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.crypto.secret import SecretScalar
from appliance.host.files import MAX_FILE, atomic_write, erase, erase_leftovers
from appliance.protocols.refresh import PrivateData, PublicData, Transcript
from appliance.protocols.state import GROUPS, InvariantInfo, KeyTable, sharing_from_obj, sharing_to_obj

#: What ``set_aside_private`` renames an unusable ``private/period.cbor`` to (plus a time).
UNUSABLE_MARK = "period.cbor.unusable-"


@dataclass
class Loaded:
    public: PublicData
    private: PrivateData | None
    problems: list[str] = field(default_factory=list)
    #: Why ``private/period.cbor`` exists but cannot be used; None if it is fine or absent.
    private_unusable: str | None = None


class StateDir:
    """One server's state directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.public_dir = root / "public"
        self.private_dir = root / "private"
        self.serve_dir = root / "serve"

    def alert_files(self) -> list[Path]:
        """The key-holder's alerts (and the boot check's), then pst serve's own."""
        return [self.public_dir / "alerts.jsonl", self.serve_dir / "alerts.jsonl"]

    def init(self) -> None:
        self.public_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.private_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.private_dir, 0o700)

    # Saving --------------------------------------------------------------------------

    def save(self, public: PublicData, private: PrivateData | None, *, superseded: bool = False) -> None:
        """Persist a refresh outcome: private first (new keys), then public, then erase the old.

        ``superseded``: the network decided a later period without us, so the private data we
        hold (shares of a sharing that no longer exists) is erased, not kept."""
        self.init()
        if private is not None:
            atomic_write(self.private_dir / "period.cbor", encode_private(private), private=True)
        elif superseded:
            erase(self.private_dir / "period.cbor")
        if public.m is not None:
            atomic_write(self.public_dir / "M.cbor", public.m.encode())
        if public.key_table is not None:
            atomic_write(self.public_dir / "keytable.cbor", public.key_table.encode())
        atomic_write(self.public_dir / "sharings.cbor", encode_sharings(public))
        if public.transcript is not None:
            atomic_write(self.public_dir / "transcript.cbor", public.transcript.encode())
        else:
            (self.public_dir / "transcript.cbor").unlink(missing_ok=True)

    def erase_private(self) -> None:
        for path in sorted(self.private_dir.glob("*")):
            if path.is_file():
                erase(path)

    # Loading -------------------------------------------------------------------------

    def _read(self, path: Path, problems: list[str]) -> bytes | None:
        try:
            st = path.stat()
            if not stat.S_ISREG(st.st_mode):
                problems.append(f"{path}: not a regular file")
                return None
            if st.st_size > MAX_FILE:
                problems.append(f"{path}: {st.st_size} bytes is larger than any state file can be")
                return None
            return path.read_bytes()
        except FileNotFoundError:
            problems.append(f"{path}: missing")
        except OSError as exc:
            problems.append(f"{path}: unreadable ({exc.strerror})")
        return None

    def load(self, *, erase_crash_leftovers: bool = False) -> Loaded:
        """Read the state; a missing or bad file is a problem, never an exception.

        ``erase_crash_leftovers``: first erase what a crashed write left in ``private/``. Only
        the process that alone writes this directory may ask for it, when it starts (a
        key-holder child: the zygote forks the next only after the last one exited): anyone
        else (the CLI, a status reader) would erase a temp file the server is writing now.
        """
        problems: list[str] = []
        if erase_crash_leftovers:
            for path in erase_leftovers(self.private_dir):
                problems.append(f"{path}: left by an interrupted write; erased")
        public = PublicData()
        data = self._read(self.public_dir / "M.cbor", problems)
        if data is not None:
            try:
                public.m = InvariantInfo.decode(data)
            except DecodeError as exc:
                problems.append(f"{self.public_dir / 'M.cbor'}: {exc}")
        data = self._read(self.public_dir / "keytable.cbor", problems)
        if data is not None:
            try:
                public.key_table = KeyTable.decode(data)
            except DecodeError as exc:
                problems.append(f"{self.public_dir / 'keytable.cbor'}: {exc}")
        data = self._read(self.public_dir / "sharings.cbor", problems)
        if data is not None:
            try:
                public.sharings = decode_sharings(data)
            except DecodeError as exc:
                problems.append(f"{self.public_dir / 'sharings.cbor'}: {exc}")
        if (self.public_dir / "transcript.cbor").exists():
            data = self._read(self.public_dir / "transcript.cbor", problems)
            if data is not None:
                try:
                    public.transcript = Transcript.decode(data)
                except DecodeError as exc:
                    problems.append(f"{self.public_dir / 'transcript.cbor'}: {exc}")
        private, unusable = self._load_private(problems)
        return Loaded(public, private, problems, unusable)

    def _load_private(self, problems: list[str]) -> tuple[PrivateData | None, str | None]:
        """The private state, or None and why it cannot be used (None too when it is absent)."""
        path = self.private_dir / "period.cbor"
        mine: list[str] = []
        data = self._read(path, mine)
        private = None
        if data is not None:
            try:
                private = decode_private(data)
            except DecodeError as exc:
                mine.append(f"{path}: {exc}")
        problems += mine
        return private, (mine[0] if mine and mine != [f"{path}: missing"] else None)

    def private_problem(self) -> str | None:
        """Why the private state cannot be used, if it exists (for ``pst check``; changes nothing)."""
        private, unusable = self._load_private([])
        if private is not None:
            private.wipe()
        return unusable

    def set_aside_private(self, now: float) -> Path:
        """Rename an unusable ``private/period.cbor`` out of the way; OSError if that fails too.

        It is not erased: it may be a readable file the server was not meant to read, or hold
        what an operator wants to inspect. ``pst check`` warns while such a file is there."""
        target = self.private_dir / f"{UNUSABLE_MARK}{int(now)}"
        os.rename(self.private_dir / "period.cbor", target)
        return target

    def set_aside(self) -> list[Path]:
        """Unusable private states set aside earlier, still waiting for the operator."""
        try:
            return sorted(self.private_dir.glob(UNUSABLE_MARK + "*"))
        except OSError:
            return []


def encode_sharings(public: PublicData) -> bytes:
    out: dict[str, Any] = {}
    for sid, sharing in sorted(public.sharings.items()):
        group = _group_of_sharing(public, sid)
        out[sid] = {"group": group, "sharing": sharing_to_obj(GROUPS[group], sharing)}
    return encoding.encode(out)


def _group_of_sharing(public: PublicData, sid: str) -> str:
    if public.m is not None and sid in public.m.constants.secrets:
        return public.m.constants.secrets[sid]
    return "ed25519"


def decode_sharings(data: bytes) -> dict[str, Any]:
    obj = encoding.decode(data, what="sharings")
    if not isinstance(obj, dict):
        raise DecodeError("sharings: expected a map")
    out = {}
    for sid, entry in obj.items():
        f = encoding.expect_map(entry, {"group": str, "sharing": dict}, f"sharing {sid!r}")
        if f["group"] not in GROUPS or not isinstance(sid, str):
            raise DecodeError(f"sharing {sid!r}: unknown group {f['group']!r}")
        out[sid] = sharing_from_obj(GROUPS[f["group"]], f["sharing"], f"sharing {sid!r}")
    return out


def encode_private(private: PrivateData) -> bytes:
    return encoding.encode(
        {
            "period": private.period,
            "signing_seed": private.signing_seed,
            "encryption_seed": private.encryption_seed,
            "shares": {sid: s.value.to_bytes(64, "big") for sid, s in sorted(private.shares.items())},
            "rpoints": {
                r: {sid: v.to_bytes(64, "big") for sid, v in sorted(values.items())}
                for r, values in sorted(private.rpoints.items())
            },
            **({"repair": dict(sorted(private.repair.items()))} if private.repair else {}),
        }
    )


def decode_private(data: bytes) -> PrivateData:
    raw = encoding.decode(data, what="private state")
    fields: dict[str, type] = {
        "period": int,
        "signing_seed": bytes,
        "encryption_seed": bytes,
        "shares": dict,
        "rpoints": dict,
    }
    if isinstance(raw, dict) and "repair" in raw:
        fields["repair"] = dict
    obj = encoding.expect_map(raw, fields, "private state")
    repair: dict[int, bytes] = {}
    for d, complaint in obj.get("repair", {}).items():
        if type(d) is not int or not isinstance(complaint, bytes):
            raise DecodeError("private state: a repair maps dealer ids to complaints")
        repair[d] = complaint
    if len(obj["signing_seed"]) != 32 or len(obj["encryption_seed"]) != 32:
        raise DecodeError("private state: key seeds must be 32 bytes")
    shares = {}
    for sid, raw in obj["shares"].items():
        if not isinstance(sid, str) or not isinstance(raw, bytes) or len(raw) != 64:
            raise DecodeError("private state: shares must map secret ids to 64-byte scalars")
        value = int.from_bytes(raw, "big")
        shares[sid] = SecretScalar(value, 1 << 512)
    rpoints: dict[int, dict[str, int]] = {}
    for r, values in obj["rpoints"].items():
        if type(r) is not int or not isinstance(values, dict):
            raise DecodeError("private state: recovery values must map server ids to values")
        for sid, raw in values.items():
            if not isinstance(sid, str) or not isinstance(raw, bytes) or len(raw) != 64:
                raise DecodeError("private state: recovery values must be 64-byte scalars")
            rpoints.setdefault(r, {})[sid] = int.from_bytes(raw, "big")
    return PrivateData(obj["period"], obj["signing_seed"], obj["encryption_seed"], shares, rpoints, repair)


class PendingRecords:
    """The :class:`~appliance.protocols.refresh.Durable` records of a refresh in progress.

    One private file per record (``private/pending/<period>-<name>``), written atomically and
    synced before :meth:`put` returns; :meth:`forget` overwrites and unlinks every record of a
    decided period (it holds the seeds of period keys and the votes made with them).
    """

    def __init__(self, state: StateDir) -> None:
        self.dir = state.private_dir / "pending"

    def _path(self, key: str) -> Path:
        name = key.replace("/", "-")
        if not name or not all(ch.isalnum() or ch in "-_." for ch in name):
            raise ValueError(f"bad record name {key!r}")
        return self.dir / name

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def put(self, key: str, value: bytes) -> None:
        atomic_write(self._path(key), value, private=True)

    def forget(self, period: int) -> None:
        if not self.dir.exists():
            return
        for path in sorted(self.dir.iterdir()):
            head = path.name.split("-", 1)[0]
            if path.is_file() and (not head.isdigit() or int(head) <= period):
                erase(path)
