"""The client's side of the store (sans-IO): seal a value for a write, open the servers' answers.

A client never sends a secret in clear: :func:`seal_write` encrypts it under the store key
(TDH2) with the label the record will have, so that the servers hold only ciphertexts. To
read, the client gives an X25519 key; every server that allows the read sends its decryption
share sealed to that key, and :func:`open_answers` opens them, keeps the valid ones (each
server's answer names the store key's public sharing it used: shares of different periods are
checked against their own period's commitment, and never combined) and decrypts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import nacl.public

from appliance.apps.store import model
from appliance.apps.store.model import DataType, Record, WriteRequest
from appliance.crypto import tdh2
from appliance.crypto.errors import CryptoError, DecodeError, NotEnoughSharesError
from appliance.crypto.groups import Group
from appliance.crypto.keyshare import PublicSharing
from appliance.crypto.secret import ScalarSource, system_scalar_source
from appliance.crypto.vss import Commitment
from appliance.protocols.state import GROUPS


class ReadRefused(Exception):
    """Not enough servers gave a valid share: ``code`` (the servers' common refusal code, or
    ``refused``), the message naming each server's reason; ``refusals`` server -> (code, reason)."""

    def __init__(self, code: str, message: str, refusals: Mapping[int, tuple[str, str]]) -> None:
        super().__init__(message)
        self.code = code
        self.refusals = dict(refusals)


@dataclass(frozen=True)
class StoreKey:
    """The store key as the network publishes it: its group and public sharing."""

    group: Group[Any]
    sharing: PublicSharing[Any]
    period: int

    @property
    def public_key(self) -> Any:
        return self.sharing.public_key

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> StoreKey:
        what = "store key"
        name, n, t = result.get("group"), result.get("n"), result.get("t")
        if (
            not isinstance(name, str)
            or name not in GROUPS
            or not isinstance(n, int)
            or not isinstance(t, int)
        ):
            raise DecodeError(f"{what}: group, n and t")
        if not 1 <= t < n <= 1024:
            raise DecodeError(f"{what}: bad n or t")
        group = GROUPS[name]
        commitment = Commitment.decode(group, result.get("commitment"), t, what)
        period = result.get("period")
        return cls(group, PublicSharing(n, t, commitment), period if isinstance(period, int) else 0)


def seal_write(
    key: StoreKey | None,
    app: str,
    data_id: str,
    dtype: DataType,
    value: bytes,
    *,
    version: int = 1,
    reader: bytes = b"",
    until_ms: int = 0,
    rand: ScalarSource | None = None,
) -> WriteRequest:
    """The write request for ``value``: in clear for public types, sealed under the store key
    (part 0, bound to the record's label) for secret ones."""
    if not dtype.secret:
        return WriteRequest(app, data_id, dtype, version, value=value)
    if key is None:
        raise ValueError("a secret is sealed under the store key: pass it")
    request = WriteRequest(app, data_id, dtype, version, reader=reader, until_ms=until_ms)
    source = rand if rand is not None else system_scalar_source(key.group.order)
    sealed = model.seal_value(key.group, key.public_key, request, value, source)
    return WriteRequest(app, data_id, dtype, version, sealed={0: sealed}, reader=reader, until_ms=until_ms)


def open_answers(
    key: StoreKey,
    record_obj: Any,
    answers: Mapping[Any, Any],
    reader: nacl.public.PrivateKey,
) -> bytes:
    """The plaintext of the record's part 0 from the servers' answers, or of a random joint
    secret the value of its servers' contributions (:func:`~.model.joint_value`); ReadRefused
    otherwise."""
    record = Record.from_obj(record_obj, "store record")
    try:
        if record.dtype == DataType.JOINT_SECRET and 0 not in record.sealed:
            opened = {}
            for part in sorted(record.sealed):
                sealed, data_key = combine_answers(key, record, answers, reader, part)
                opened[part] = tdh2.open_sealed(sealed, data_key)
            return model.joint_value(opened)
        sealed, data_key = combine_answers(key, record, answers, reader)
        return tdh2.open_sealed(sealed, data_key)
    except tdh2.InvalidCiphertext as exc:  # the record this server gave does not hold together
        raise ReadRefused("refused", f"{record.app}/{record.data_id} not opened: {exc}", {}) from None


def combine_answers(
    key: StoreKey,
    record: Record,
    answers: Mapping[Any, Any],
    reader: nacl.public.PrivateKey,
    part: int = 0,
) -> tuple[tdh2.Sealed[Any], bytes]:
    """The record's sealed part ``part`` and its data key, combined from t+1 valid shares of the
    answers (the client's side, and a server's releasing a StoreUntil item); ReadRefused otherwise."""
    if not record.dtype.secret or part not in record.sealed:
        raise DecodeError(f"store record: not a secret with a part {part}")
    sealed = tdh2.decode_checked(key.group, record.sealed[part], record.label(part))
    refusals: dict[int, tuple[str, str]] = {}
    by_commitment: dict[tuple[bytes, ...], dict[int, bytes]] = {}
    for server, answer in answers.items():
        if not isinstance(server, int) or not isinstance(answer, Mapping):
            raise DecodeError("store answers: server -> answer")
        if "shares" in answer:
            commitment = answer.get("commitment")
            shares = answer.get("shares")
            if not isinstance(commitment, list) or not isinstance(shares, Mapping):
                raise DecodeError(f"store answer of server {server}: commitment and shares")
            blob = shares.get(part)
            if isinstance(blob, bytes):
                by_commitment.setdefault(tuple(bytes(c) for c in commitment), {})[server] = blob
        else:
            refusals[server] = (str(answer.get("code", "refused")), str(answer.get("reason", "")))
    errors: list[str] = []
    # The commitment most servers used first (a refresh may be under way: two periods answer).
    for points, boxed in sorted(by_commitment.items(), key=lambda kv: -len(kv[1])):
        try:
            commitment = Commitment.decode(key.group, list(points), key.sharing.t, "commitment")
        except DecodeError as exc:
            errors.append(str(exc))
            continue
        if commitment.points[0] != key.public_key:
            errors.append("an answer used a sharing of another key")  # a faulty server's
            continue
        public = PublicSharing(key.sharing.n, key.sharing.t, commitment)
        try:
            return sealed, model.combine_shares(key.group, public, sealed, boxed, reader)
        except (NotEnoughSharesError, CryptoError) as exc:
            errors.append(str(exc))
    codes = {code for code, _ in refusals.values()}
    code = codes.pop() if len(codes) == 1 else "refused"
    named = "; ".join(f"server {i}: {why}" for i, (_c, why) in sorted(refusals.items()))
    detail = "; ".join(errors)
    raise ReadRefused(
        code,
        f"{record.app}/{record.data_id} not opened: fewer than t+1 = {key.sharing.t + 1} valid shares"
        + (f" ({detail})" if detail else "")
        + (f"; refused by {named}" if named else ""),
        refusals,
    )
