"""Code upgrades: a new C approved by the network, never a local edit.

M = [Scert(M), M] is signed once, at initialization, with start keys that are then
erased, so M itself can never change. An upgrade is therefore a separate certificate::

    U = [Scert(U), (digest of the C it replaces, C')]

where C' equals the C it replaces in every field except ``code_digest`` (changing n, t,
the peers or the secrets would need a resharing, which an upgrade does not do). The
boot check starts from the C certified in M and applies the stored chain of upgrades
(``public/upgrades.cbor``) in order; each step must name the digest of the C before it
and carry a signature that verifies with Vcert. The result is the C in force: the
config's [network] must equal it and the code must match its manifest.

Only the network can sign U: the signature is a FROST signature of the group key
(Scert), so it needs t+1 servers' signing services. The payload of U is a protocol
payload (:func:`appliance.crypto.encoding.signing_payload`), which the local API refuses
to have signed on request (:func:`appliance.protocols.signing.is_protocol_payload`). A
signing service contributes a signature share for it only if its own operator approved
that very payload with ``pst upgrade approve`` (:func:`approved`), so t+1 approvals are
needed, at least one of them from an honest operator. The certificate is public and
self-authenticating: operators copy it to every server (``pst upgrade install``), and a
server that lost its state gets it back the same way, so no file here needs protecting.

What it does not stop: an attacker who can rewrite the config and delete the chain can
roll a server back to an earlier approved C (no monotonic counter in the ROM yet); the
config check then still demands that the config and the certified chain agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.boot.manifest import Manifest
from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.host.files import atomic_write
from appliance.protocols._core import ed25519_verify
from appliance.protocols.state import Constants, InvariantInfo

TYPE = "Upgrade"
CONTEXT = "pst/upgrade"
CHAIN_TYPE = "pst/upgrades"
MAX_CHAIN = 1000
UPGRADES_FILE = "upgrades.cbor"
APPROVAL_FILE = "upgrade-approval.cbor"


class UpgradeError(Exception):
    """An upgrade cannot be proposed, approved or installed; the message says why."""


def constants_digest(c: Constants) -> bytes:
    """SHA-256 of C's canonical encoding: how an upgrade names the C it replaces."""
    return hashlib.sha256(c.encode()).digest()


@dataclass(frozen=True)
class Upgrade:
    """[Scert(U), U] with U = (digest of the previous C, C')."""

    previous: bytes
    constants: Constants
    signature: bytes = b""

    def body(self) -> dict[str, Any]:
        return {"prev": self.previous, "C": self.constants.to_obj()}

    def payload(self) -> bytes:
        """What the group signs; a protocol payload, so never signed on a client's request."""
        return encoding.signing_payload(TYPE, 1, CONTEXT, 0, self.body())

    def signed(self, signature: bytes) -> Upgrade:
        return dataclasses.replace(self, signature=signature)

    def to_obj(self) -> dict[str, Any]:
        return {"body": self.body(), "sig": self.signature}

    def encode(self) -> bytes:
        return encoding.encode(self.to_obj())

    @classmethod
    def from_obj(cls, obj: Any, what: str = "upgrade") -> Upgrade:
        f = encoding.expect_map(obj, {"body": dict, "sig": bytes}, what)
        body = encoding.expect_map(f["body"], {"prev": bytes, "C": dict}, f"{what} body")
        if len(body["prev"]) != 32:
            raise DecodeError(f"{what}: prev must be a 32-byte SHA-256")
        if f["sig"] and len(f["sig"]) != 64:
            raise DecodeError(f"{what}: the signature must be 64 bytes (or empty when unsigned)")
        return cls(body["prev"], Constants.from_obj(body["C"]), f["sig"])

    @classmethod
    def decode(cls, data: bytes) -> Upgrade:
        return cls.from_obj(encoding.decode(data, what="upgrade"))

    def fingerprint(self) -> str:
        """What operators compare out of band before approving."""
        return hashlib.sha256(self.payload()).hexdigest()[:32]


def propose(current: Constants, manifest: Manifest) -> Upgrade:
    """The unsigned upgrade from ``current`` to the code of ``manifest``."""
    new = dataclasses.replace(current, code_digest=manifest.digest())
    if new.code_digest == current.code_digest:
        raise UpgradeError("the new manifest is the code C already names: nothing to upgrade")
    return Upgrade(constants_digest(current), new)


def step_problem(current: Constants, upgrade: Upgrade, vcert: bytes) -> str | None:
    """None if ``upgrade`` is a valid successor of ``current`` under Vcert, else why not."""
    if upgrade.previous != constants_digest(current):
        return "it does not name the C in force as the one it replaces"
    before, after = current.to_obj(), upgrade.constants.to_obj()
    changed = sorted(k for k in before if k != "code_digest" and before[k] != after[k])
    if changed:
        return f"it changes {', '.join(changed)}; an upgrade may change code_digest only"
    if not ed25519_verify(vcert, upgrade.payload(), upgrade.signature):
        return "Scert(U) does not verify with Vcert"
    return None


def apply_chain(m: InvariantInfo, chain: Sequence[Upgrade]) -> tuple[Constants, int, str | None]:
    """The C in force after the valid prefix of ``chain``, the steps applied, the first problem."""
    current = m.constants
    for k, upgrade in enumerate(chain):
        problem = step_problem(current, upgrade, m.vcert)
        if problem is not None:
            return current, k, f"upgrade {k + 1} of {len(chain)} rejected: {problem}"
        current = upgrade.constants
    return current, len(chain), None


def encode_chain(chain: Sequence[Upgrade]) -> bytes:
    return encoding.encode({"type": CHAIN_TYPE, "v": 1, "chain": [u.to_obj() for u in chain]})


def decode_chain(data: bytes) -> list[Upgrade]:
    f = encoding.expect_map(
        encoding.decode(data, what="upgrade chain"), {"type": str, "v": int, "chain": list}, "upgrade chain"
    )
    if f["type"] != CHAIN_TYPE or f["v"] != 1:
        raise DecodeError(f"upgrade chain: not a {CHAIN_TYPE} version 1 object")
    if len(f["chain"]) > MAX_CHAIN:
        raise DecodeError(f"upgrade chain: more than {MAX_CHAIN} upgrades")
    return [Upgrade.from_obj(u, f"upgrade {k + 1}") for k, u in enumerate(f["chain"])]


def read_chain(public_dir: Path) -> tuple[list[Upgrade], str | None]:
    """The stored chain (empty if none) and, if the file is unusable, why."""
    path = public_dir / UPGRADES_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], None
    except OSError as exc:
        return [], f"{path}: unreadable ({exc.strerror})"
    try:
        return decode_chain(data), None
    except DecodeError as exc:
        return [], f"{path}: {exc}"


# Approval ---------------------------------------------------------------------------------------


def read_approval(public_dir: Path) -> Upgrade | None:
    try:
        return Upgrade.decode((public_dir / APPROVAL_FILE).read_bytes())
    except (OSError, DecodeError):
        return None


def is_upgrade_payload(message: bytes) -> bool:
    """True if ``message`` is the payload of an :class:`Upgrade` (what only approvals unlock)."""
    try:
        obj = encoding.decode(message, what="message")
    except DecodeError:
        return False
    return (
        isinstance(obj, dict)
        and obj.get("dom") == encoding.SIGNING_DOMAIN
        and obj.get("type") == TYPE
        and obj.get("ctx") == CONTEXT
    )


def approved(public_dir: Path, message: bytes) -> bool:
    """May this server's signing service contribute a share to signing ``message``?

    True only for the payload of the upgrade this server's operator approved. The
    signing service asks this for a protocol payload, which it otherwise refuses.
    """
    approval = read_approval(public_dir)
    return approval is not None and approval.payload() == message


def add_to_chain(m: InvariantInfo, chain: Sequence[Upgrade], upgrade: Upgrade) -> list[Upgrade]:
    """The chain with ``upgrade`` appended, if it is a valid successor of the C in force."""
    current, applied, problem = apply_chain(m, chain)
    if problem is not None:
        raise UpgradeError(f"the stored chain is not valid ({problem}); fix it before installing")
    if any(u.payload() == upgrade.payload() for u in chain[:applied]):
        raise UpgradeError("this upgrade is already installed")
    problem = step_problem(current, upgrade, m.vcert)
    if problem is not None:
        raise UpgradeError(f"this upgrade cannot follow the C in force: {problem}")
    return [*chain[:applied], upgrade]


class ChainCheck:
    """The node's :class:`~appliance.protocols.refresh.CodeCheck`: upgrade chains in PushM.

    Operational servers push their stored chain with M. A recovering server applies the longest
    valid chain it knows (its own or a pushed one) to M's C, stores a pushed chain that is
    longer than its own (so it learns the C in force from its peers, not from its operator),
    and checks the installed code against that C before it accepts recovery values.
    """

    def __init__(self, public_dir: Path, code_mismatches: Callable[[Constants], list[str]]) -> None:
        self.public_dir = public_dir
        self.code_mismatches = code_mismatches

    def chain(self) -> bytes | None:
        try:
            return (self.public_dir / UPGRADES_FILE).read_bytes()
        except OSError:
            return None

    def check(self, m: InvariantInfo, chains: list[bytes]) -> str | None:
        own, _problem = read_chain(self.public_dir)
        best: list[Upgrade] = own
        best_c, best_len, _ = apply_chain(m, own)
        for data in chains:
            try:
                chain = decode_chain(data)
            except DecodeError:
                continue
            c, steps, _ = apply_chain(m, chain)
            if steps > best_len:
                best, best_c, best_len = chain[:steps], c, steps
        if best is not own:
            self.public_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.public_dir / UPGRADES_FILE, encode_chain(best))
        if not best_c.code_digest:
            return None
        mismatches = self.code_mismatches(best_c)
        if not mismatches:
            return None
        return ", ".join(mismatches[:5]) + (" ..." if len(mismatches) > 5 else "")
