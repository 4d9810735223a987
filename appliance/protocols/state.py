"""The PServer's data as the paper names it: constants C, invariant information M, KeyTable.

* :class:`Constants` (C): the public constants every server holds: n, t, peers, period and
  round lengths, the long-lived secrets and their groups, the code manifest digest.
* :class:`InvariantInfo` (M): M = (M_1, ..., M_n) with M_i = Sign_Sstart_i(Vcert, C), jointly
  signed with Scert as [Scert(M), M]. A server that reads Vstart from ROM can check its own
  M_i, learn Vcert from it and check Scert(M): this is how a server that lost everything
  but its ROM gets back Vcert and C (PushM, Table 2).
* :class:`KeyTable`: the period's key announcements K_i = (V_i, E_i, S_i(E_i)) that
  survived the judgment rules, the public sharings' digests every server must hold entering
  the period, and the recovering servers, jointly signed with Scert (Table 1, step 4).

Every object has one canonical CBOR encoding; signatures cover
:func:`~appliance.crypto.encoding.signing_payload` of it (type, version, context, period).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from appliance.crypto import annkey, encoding
from appliance.crypto.errors import DecodeError
from appliance.crypto.groups import DSA2048, ED25519, P256, Group
from appliance.crypto.keyshare import PublicSharing
from appliance.crypto.vss import Commitment
from appliance.protocols._core import ed25519_verify

#: The group key (Scert, Vcert) is the long-lived secret every network has.
SCERT = "scert"
#: The log's own key (issue 11), when C has it: it signs the log's checkpoints and nothing else.
LOG_SECRET = "log"
#: The network's certificate authority key (appliance.apps.ca), when C has it: it signs the group
#: root certificate and the leaves its policy allows, nothing else.
CA_SECRET = "ca"
#: The timestamping authority's P-256 key (appliance.apps.tsa.threshold), when C has it: it signs
#: timestamp tokens whose TSTInfo each signer checked, nothing else; a server not configured to
#: stamp with it refuses every request.
TSA_SECRET = "tsa"
#: The DSS secrets per-application keys are public tweaks of (appliance.apps.dsskeys), by group:
#: each signs only application keys' requests its owners made, nothing else.
APP_KEY_SECRETS: dict[str, str] = {"p256": "appkeys-p256", "dsa2048": "appkeys-dsa2048"}
GROUPS: dict[str, Group[Any]] = {"ed25519": ED25519, "dsa2048": DSA2048, "p256": P256}
CONTEXT = "pst/state"


class ConfigError(ValueError):
    """The constants C are inconsistent; the message says which value and why."""


def max_threshold(n: int) -> int:
    """The largest t a network of n servers may use: n >= 3t+1."""
    return (n - 1) // 3


def check_size(n: int, t: int) -> None:
    """Raise ConfigError (one line, with the t or n that works) unless t >= 1 and n >= 3t+1.

    The asynchronous refresh decides with quorums of ceil((n+t+1)/2) signed votes: two quorums
    share an honest server, and the n-t honest servers can form one without the faulty ones, under
    any message timing, exactly when n >= 3t+1 (docs/design.md).
    """
    if not isinstance(n, int) or not isinstance(t, int) or t < 1:
        raise ConfigError(f"n and t must be integers with t >= 1 (got n={n}, t={t})")
    if n < 3 * t + 1:
        why = f"n={n} servers cannot tolerate t={t}: safety under any message timing needs n >= 3t+1"
        if max_threshold(n) >= 1:
            raise ConfigError(f"{why} = {3 * t + 1} (with n={n}, use t={max_threshold(n)})")
        raise ConfigError(f"{why} = {3 * t + 1} (at least 4 servers are needed for t=1)")


@dataclass(frozen=True)
class Constants:
    """C: the network's public constants. ``secrets`` maps secret id -> group name."""

    n: int
    t: int
    period_length: float
    delta: float
    genesis: float = 0.0
    peers: dict[int, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=lambda: {SCERT: "ed25519"})
    code_digest: bytes = b""

    def __post_init__(self) -> None:
        check_size(self.n, self.t)
        if self.delta <= 0 or self.period_length <= 0:
            raise ConfigError("period_length and delta must be positive")
        if self.secrets.get(SCERT) != "ed25519":
            raise ConfigError("the group key 'scert' must be an ed25519 (FROST) key")
        if CA_SECRET in self.secrets and self.secrets[CA_SECRET] != "ed25519":
            raise ConfigError("the certificate authority key 'ca' must be an ed25519 (FROST) key")
        for group, sid in APP_KEY_SECRETS.items():
            if sid in self.secrets and self.secrets[sid] != group:
                raise ConfigError(f"the application keys' secret {sid!r} must be a {group} key")
        for sid, group in self.secrets.items():
            if group not in GROUPS:
                raise ConfigError(f"secret {sid!r}: unknown group {group!r} (known: {sorted(GROUPS)})")
        if self.peers and set(self.peers) != set(range(1, self.n + 1)):
            raise ConfigError(f"peers must name servers 1..{self.n}, got {sorted(self.peers)}")

    @property
    def ids(self) -> range:
        return range(1, self.n + 1)

    def group(self, sid: str) -> Group[Any]:
        return GROUPS[self.secrets[sid]]

    def to_obj(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "t": self.t,
            "period_length_ms": round(self.period_length * 1000),
            "delta_ms": round(self.delta * 1000),
            "genesis_ms": round(self.genesis * 1000),
            "peers": {i: a for i, a in self.peers.items()},
            "secrets": dict(self.secrets),
            "code_digest": self.code_digest,
        }

    @classmethod
    def from_obj(cls, obj: Any) -> Constants:
        f = encoding.expect_map(
            obj,
            {
                "n": int,
                "t": int,
                "period_length_ms": int,
                "delta_ms": int,
                "genesis_ms": int,
                "peers": dict,
                "secrets": dict,
                "code_digest": bytes,
            },
            "constants C",
        )
        try:
            return cls(
                f["n"],
                f["t"],
                f["period_length_ms"] / 1000,
                f["delta_ms"] / 1000,
                f["genesis_ms"] / 1000,
                {int(k): str(v) for k, v in f["peers"].items()},
                {str(k): str(v) for k, v in f["secrets"].items()},
                f["code_digest"],
            )
        except (ConfigError, TypeError, ValueError) as exc:
            raise DecodeError(f"constants C: {exc}") from None

    def encode(self) -> bytes:
        return encoding.encode(self.to_obj())

    def period_start(self, period: int) -> float:
        return self.genesis + period * self.period_length

    def period_at(self, now: float) -> int:
        return max(0, int((now - self.genesis) // self.period_length))

    def periods_missed(self, keytable_period: int, now: float) -> int:
        """Whole periods that ended with no KeyTable decided, for a server whose newest KeyTable is
        for ``keytable_period``: 0 while it holds the current period's table, or the previous one's
        while the current refresh runs."""
        return max(0, self.period_at(now) - 1 - keytable_period)


def m_i_payload(vcert: bytes, constants: Constants, server: int, ann_key: bytes | None = None) -> bytes:
    """What server i signs with Sstart_i at initialization: (Vcert, C), and the public key of its
    announcement key A_i when its ROM is a TPM (issue 8)."""
    body: dict[str, Any] = {"server": server, "vcert": vcert, "C": constants.to_obj()}
    if ann_key is not None:
        body["A"] = ann_key
    return encoding.signing_payload("M_i", 1, "pst/init/M_i", 0, body)


@dataclass(frozen=True)
class InvariantInfo:
    """[Scert(M), M]: Vcert, C, every M_i, and the group's signature over all of it.

    ``ann_keys`` maps each server whose ROM is a TPM to the public key of its announcement key
    A_i (SEC1, :mod:`appliance.crypto.annkey`); M_i covers it. Servers without one are absent, and
    an M where no server has one encodes exactly as before the field existed."""

    vcert: bytes
    constants: Constants
    m: dict[int, bytes]
    scert_signature: bytes = b""
    ann_keys: dict[int, bytes] = field(default_factory=dict)

    def body(self) -> dict[str, Any]:
        body = {"vcert": self.vcert, "C": self.constants.to_obj(), "M": {i: s for i, s in self.m.items()}}
        if self.ann_keys:
            body["A"] = dict(sorted(self.ann_keys.items()))
        return body

    def signed(self, signature: bytes) -> InvariantInfo:
        return InvariantInfo(self.vcert, self.constants, self.m, signature, self.ann_keys)

    def payload(self) -> bytes:
        return encoding.signing_payload("M", 1, "pst/init/M", 0, self.body())

    def encode(self) -> bytes:
        return encoding.encode({"body": self.body(), "sig": self.scert_signature})

    @classmethod
    def decode(cls, data: bytes) -> InvariantInfo:
        obj = encoding.expect_map(encoding.decode(data, what="M"), {"body": dict, "sig": bytes}, "M")
        fields: dict[str, type] = {"vcert": bytes, "C": dict, "M": dict}
        if isinstance(obj["body"], dict) and "A" in obj["body"]:
            fields["A"] = dict
        body = encoding.expect_map(obj["body"], fields, "M body")
        m = {}
        for k, v in body["M"].items():
            if not isinstance(k, int) or not isinstance(v, bytes) or len(v) != 64:
                raise DecodeError("M: each M_i must be a 64-byte signature under a server id")
            m[k] = v
        ann_keys = {}
        for k, v in body.get("A", {}).items():
            if type(k) is not int or not isinstance(v, bytes):
                raise DecodeError("M: announcement keys must map server ids to public keys")
            annkey.load_public(v, f"M: announcement key of server {k}")
            ann_keys[k] = v
        if "A" in body and not ann_keys:
            raise DecodeError("M: an empty map of announcement keys (omit it instead)")
        return cls(body["vcert"], Constants.from_obj(body["C"]), m, obj["sig"], ann_keys)

    def check(self, server: int, vstart: bytes) -> str | None:
        """Table 2 (i)-(ii): None if valid for ``server`` holding ``vstart`` in ROM, else why not."""
        mi = self.m.get(server)
        if mi is None:
            return f"M holds no M_{server}"
        if not ed25519_verify(
            vstart, m_i_payload(self.vcert, self.constants, server, self.ann_keys.get(server)), mi
        ):
            return f"M_{server} does not verify with Vstart from ROM"
        if set(self.m) != set(self.constants.ids):
            return "M does not hold exactly one M_i per server"
        if not set(self.ann_keys) <= set(self.constants.ids):
            return "M holds announcement keys of servers that do not exist"
        if not ed25519_verify(self.vcert, self.payload(), self.scert_signature):
            return "Scert(M) does not verify with Vcert"
        return None


@dataclass(frozen=True)
class KeyEntry:
    """K_i = (V_i(t), S_i(t)(E_i(t))): period signing and encryption public keys."""

    verify_key: bytes
    encryption_key: bytes
    signature: bytes

    def to_obj(self) -> dict[str, bytes]:
        return {"V": self.verify_key, "E": self.encryption_key, "sigE": self.signature}

    @classmethod
    def from_obj(cls, obj: Any, what: str) -> KeyEntry:
        f = encoding.expect_map(obj, {"V": bytes, "E": bytes, "sigE": bytes}, what)
        if len(f["V"]) != 32 or len(f["E"]) != 32 or len(f["sigE"]) != 64:
            raise DecodeError(f"{what}: wrong key or signature length")
        return cls(f["V"], f["E"], f["sigE"])


def encryption_key_payload(server: int, period: int, encryption_key: bytes) -> bytes:
    return encoding.signing_payload(
        "E_i", 1, "pst/refresh/E_i", period, {"server": server, "E": encryption_key}
    )


@dataclass(frozen=True)
class KeyTable:
    """The period's KeyTable, with the digests of the sharings and the recovering servers."""

    period: int
    entries: dict[int, KeyEntry]
    sharings: dict[str, bytes]
    recovering: frozenset[int]
    signature: bytes = b""

    def body(self) -> dict[str, Any]:
        return {
            "entries": {i: e.to_obj() for i, e in self.entries.items()},
            "sharings": dict(self.sharings),
            "recovering": sorted(self.recovering),
        }

    def payload(self) -> bytes:
        return encoding.signing_payload("KeyTable", 1, "pst/refresh/keytable", self.period, self.body())

    def signed(self, signature: bytes) -> KeyTable:
        return KeyTable(self.period, self.entries, self.sharings, self.recovering, signature)

    def verify(self, vcert: bytes) -> bool:
        return ed25519_verify(vcert, self.payload(), self.signature)

    def encode(self) -> bytes:
        return encoding.encode({"period": self.period, "body": self.body(), "sig": self.signature})

    @classmethod
    def decode(cls, data: bytes) -> KeyTable:
        obj = encoding.expect_map(
            encoding.decode(data, what="KeyTable"), {"period": int, "body": dict, "sig": bytes}, "KeyTable"
        )
        if obj["period"] < 0:
            raise DecodeError("KeyTable: negative period")
        body = encoding.expect_map(
            obj["body"], {"entries": dict, "sharings": dict, "recovering": list}, "KeyTable"
        )
        entries = {}
        for k, v in body["entries"].items():
            if not isinstance(k, int):
                raise DecodeError("KeyTable: entry keys must be server ids")
            entries[k] = KeyEntry.from_obj(v, f"KeyTable entry {k}")
        sharings = {}
        for k, v in body["sharings"].items():
            if not isinstance(k, str) or not isinstance(v, bytes):
                raise DecodeError("KeyTable: sharings must map secret ids to digests")
            sharings[k] = v
        if not all(isinstance(i, int) for i in body["recovering"]):
            raise DecodeError("KeyTable: recovering must list server ids")
        return cls(obj["period"], entries, sharings, frozenset(body["recovering"]), obj["sig"])

    def fingerprint(self) -> str:
        return hashlib.sha256(self.payload()).hexdigest()[:16]


# Public sharings ---------------------------------------------------------------------


def sharing_to_obj(group: Group[Any], sharing: PublicSharing[Any]) -> dict[str, Any]:
    return {"n": sharing.n, "t": sharing.t, "commitment": sharing.commitment.encode(group)}


def sharing_from_obj(group: Group[Any], obj: Any, what: str = "public sharing") -> PublicSharing[Any]:
    f = encoding.expect_map(obj, {"n": int, "t": int, "commitment": list}, what)
    if not 1 <= f["t"] < f["n"]:
        raise DecodeError(f"{what}: bad n={f['n']}, t={f['t']}")
    return PublicSharing(f["n"], f["t"], Commitment.decode(group, f["commitment"], f["t"], what))


def sharing_digest(group: Group[Any], sharing: PublicSharing[Any]) -> bytes:
    return hashlib.sha256(encoding.encode({"group": group.name, **sharing_to_obj(group, sharing)})).digest()
