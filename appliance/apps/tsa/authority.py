"""The timestamping authority's core, sans-IO: a request in, a ``TimeStampResp`` out.

An :class:`Authority` knows its policy OID, the accuracy it states, a clock (injected), where
its serial numbers come from (:class:`SerialAllocator`) and the certificate chain of the key
that signs. The signing itself is the caller's: :meth:`Authority.prepare` turns the request
bytes into a :class:`Prepared` token (the ``TSTInfo`` and the exact bytes to sign) or a
rejection, :meth:`Authority.finish` takes the signature (from a local key, or the network's
threshold signers) and returns the reply and the :class:`TokenRecord` to append to the secure
log. :meth:`Authority.issue` does both with a synchronous signer.

A co-signer runs :func:`check_proposal` on the ``TSTInfo`` a coordinating server proposes
before it contributes a share: the time no single server decides.

Serial numbers are unique across servers and crashes: the server id sits in the high bits
(above :data:`COUNTER_BITS`), and the counter below it is reserved in blocks persisted *before*
any number of the block is used, so a restarted server starts after everything it may have
issued (it skips at most a block's worth of numbers).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.apps.tsa import rfc3161
from appliance.apps.tsa.rfc3161 import (
    Accuracy,
    FailureInfo,
    RequestError,
    SigningChain,
    TimeStampRequest,
    TokenDecodeError,
)
from appliance.host.files import atomic_write
from appliance.protocols.signing import NotYet

#: Bits of a serial number below the server id: the per-server counter.
COUNTER_BITS: Final = 64
#: Largest server id that fits the serial layout (serials stay far below RFC 3161's 160 bits).
MAX_SERVER_ID: Final = (1 << 16) - 1
#: Serial numbers reserved per write of the counter file.
DEFAULT_BLOCK: Final = 4096


class ClockUnavailable(Exception):
    """Raised by a clock that cannot tell the time (not synchronised): the request gets
    ``timeNotAvailable``."""


class SerialStoreError(Exception):
    """The serial counter's storage is unreadable or unwritable; the message names the file."""


class SerialStore(Protocol):
    """Durable storage of one number: the first counter value not yet reserved."""

    def load(self) -> int:
        """The stored number, 0 if none was ever stored."""
        ...

    def save(self, reserved: int) -> None:
        """Store ``reserved`` durably before returning."""
        ...


class MemorySerialStore:
    """A :class:`SerialStore` in memory (tests; a "crash" is a new allocator on the same store)."""

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.saves = 0

    def load(self) -> int:
        return self.value

    def save(self, reserved: int) -> None:
        self.value = reserved
        self.saves += 1


class FileSerialStore:
    """A :class:`SerialStore` in a file holding the number in decimal, written atomically
    (temp file, fsync, rename, directory fsync: a crash leaves the old or the new number)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> int:
        try:
            text = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise SerialStoreError(f"{self.path}: cannot read the serial counter: {exc.strerror}") from None
        value = text.strip()
        if not (value.isdigit() and len(value) <= 20):
            raise SerialStoreError(f"{self.path}: serial counter is not a decimal number")
        return int(value)

    def save(self, reserved: int) -> None:
        try:
            atomic_write(self.path, b"%d\n" % reserved)
        except OSError as exc:
            raise SerialStoreError(f"{self.path}: cannot write the serial counter: {exc.strerror}") from None


class SerialAllocator:
    """Serial numbers ``server_id << COUNTER_BITS | counter``, the counter reserved ahead of use."""

    def __init__(self, server_id: int, store: SerialStore, *, block: int = DEFAULT_BLOCK) -> None:
        if not (1 <= server_id <= MAX_SERVER_ID):
            raise ValueError(f"server id {server_id} outside 1..{MAX_SERVER_ID}")
        if block < 1:
            raise ValueError("block must be at least 1")
        self.server_id = server_id
        self.store = store
        self.block = block
        self._next = store.load()
        self._reserved = self._next
        if self._next >= 1 << COUNTER_BITS:
            raise SerialStoreError("serial counter exhausted")

    def next(self) -> int:
        """A serial never returned before by this server (across restarts). Raises
        :class:`SerialStoreError` if the counter cannot be persisted."""
        if self._next >= self._reserved:
            reserved = min(self._next + self.block, 1 << COUNTER_BITS)
            if reserved <= self._next:
                raise SerialStoreError("serial counter exhausted")
            self.store.save(reserved)
            self._reserved = reserved
        counter = self._next
        self._next += 1
        return self.server_id << COUNTER_BITS | counter


def serial_server(serial: int) -> int:
    """The id of the server that issued ``serial``."""
    return serial >> COUNTER_BITS


@dataclass(frozen=True)
class TokenRecord:
    """What the secure log keeps of each token: enough to find any token later and to see that
    a misdated one was issued."""

    serial: int
    gen_time: dt.datetime
    tst_info_sha256: bytes

    def encode(self) -> bytes:
        """One line of ASCII: ``tst <serial hex> <genTime> <TSTInfo SHA-256 hex>``."""
        when = rfc3161.format_gen_time(self.gen_time)
        return f"tst {self.serial:x} {when} {self.tst_info_sha256.hex()}".encode()


@dataclass(frozen=True)
class Prepared:
    """A token waiting for its signature: ``to_sign`` is what the signer signs."""

    request: TimeStampRequest
    tst_info: rfc3161.TSTInfo
    tst_info_der: bytes
    to_sign: bytes
    #: The certificate chain the token names (the one current when it was prepared).
    chain: SigningChain


@dataclass(frozen=True)
class Reply:
    """The ``TimeStampResp`` bytes, and the record to log when a token was granted."""

    body: bytes
    record: TokenRecord | None
    failure: FailureInfo | None


def rejection(error: RequestError) -> Reply:
    return Reply(rfc3161.rejection_response(error.failure, error.text), None, error.failure)


class Authority:
    """One server's timestamping authority; see the module's docstring."""

    def __init__(
        self,
        *,
        policy: str,
        accuracy: Accuracy,
        clock: Callable[[], dt.datetime],
        serials: SerialAllocator,
        chain: SigningChain | None,
        max_request: int = rfc3161.MAX_REQUEST,
    ) -> None:
        self.policy = policy
        self.accuracy = accuracy
        self.clock = clock
        self.serials = serials
        #: The TSA certificate and those above it; None until a period certificate arrives
        #: (``[tsa] cert = "period"``): requests are then refused with systemFailure.
        self.chain = chain
        self.max_request = max_request

    def prepare(self, data: bytes) -> Prepared | Reply:
        """Decode and judge the request; a :class:`Prepared` token, or a rejection :class:`Reply`."""
        try:
            request = rfc3161.decode_request(data, max_size=self.max_request)
            if self.chain is None:
                raise RequestError(
                    FailureInfo.SYSTEM_FAILURE,
                    "no certificate for this period yet; try again in a few seconds",
                )
            if request.policy is not None and request.policy != self.policy:
                raise RequestError(
                    FailureInfo.UNACCEPTED_POLICY,
                    f"policy {request.policy[:80]} not served (this authority's: {self.policy})",
                )
            try:
                now = self.clock()
            except ClockUnavailable as exc:
                raise RequestError(FailureInfo.TIME_NOT_AVAILABLE, f"time not available: {exc}") from None
            try:
                serial = self.serials.next()
            except SerialStoreError as exc:
                raise RequestError(FailureInfo.SYSTEM_FAILURE, "cannot allocate a serial number") from exc
        except RequestError as exc:
            return rejection(exc)
        info = rfc3161.TSTInfo(
            policy=self.policy,
            hash_algorithm=request.hash_algorithm,
            digest=request.digest,
            serial=serial,
            gen_time=rfc3161.truncate_gen_time(now),
            accuracy=self.accuracy,
            nonce=request.nonce,
        )
        der = rfc3161.encode_tst_info(info)
        chain = self.chain
        assert chain is not None
        return Prepared(request, info, der, rfc3161.signed_attributes(der, chain), chain)

    def finish(self, prepared: Prepared, signature: bytes) -> Reply:
        """The reply for ``prepared`` signed with ``signature``; a signature that does not verify
        under the TSA certificate's key gets ``systemFailure`` (nothing unverified leaves)."""
        try:
            prepared.chain.public_key.verify(signature, prepared.to_sign, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return rejection(
                RequestError(FailureInfo.SYSTEM_FAILURE, "the signature does not verify; no token issued")
            )
        token = rfc3161.build_token(
            prepared.tst_info_der, prepared.chain, signature, include_certs=prepared.request.cert_req
        )
        record = TokenRecord(
            prepared.tst_info.serial,
            prepared.tst_info.gen_time,
            hashlib.sha256(prepared.tst_info_der).digest(),
        )
        return Reply(rfc3161.granted_response(token), record, None)

    def issue(self, data: bytes, sign: rfc3161.Signer) -> Reply:
        """:meth:`prepare`, sign with ``sign`` (an exception from it is ``systemFailure``), :meth:`finish`."""
        prepared = self.prepare(data)
        if isinstance(prepared, Reply):
            return prepared
        try:
            signature = sign(prepared.to_sign)
        except Exception as exc:
            return rejection(
                RequestError(FailureInfo.SYSTEM_FAILURE, f"signing failed ({type(exc).__name__})")
            )
        return self.finish(prepared, signature)

    def check_proposal(self, tst_info_der: bytes, *, coordinator: int | None = None) -> str | None:
        """:func:`check_proposal` with this authority's policy, accuracy and clock."""
        return check_proposal(
            tst_info_der,
            policy=self.policy,
            accuracy=self.accuracy,
            clock=self.clock,
            coordinator=coordinator,
        )


class TimeOff(str):
    """A refusal of :func:`check_proposal` because of the proposed ``genTime`` (beyond the stated
    accuracy from the co-signer's clock); every other refusal is a plain ``str``. Its ``code``
    goes with the refusal (protocols/signing.py ``refusal_code``): the coordinator whose own
    check refused its proposal this way proposes a fresh one (apps/tsa/issuing.py)."""

    code: str | None = "time-off"


class LateTime(TimeOff, NotYet):
    """A :class:`TimeOff` refusal of a ``genTime`` *behind* the co-signer's clock by no more than
    :data:`LATE_GRACE` beyond the accuracy: the proposal may just have arrived late (a loaded
    machine, a slow link), which no signer can tell from a small backdate. It is refused all the
    same (no share), but accuses nobody: no alert (:class:`~appliance.protocols.signing.NotYet`).
    A genTime ahead of the clock, or behind by more, is a plain :class:`TimeOff` with its alert."""


#: How far behind a co-signer's clock (beyond the stated accuracy) a proposed genTime is refused
#: without an alert, as a proposal that arrived late (:class:`LateTime`).
LATE_GRACE: Final = dt.timedelta(seconds=10)


def check_proposal(
    tst_info_der: bytes,
    *,
    policy: str,
    accuracy: Accuracy,
    clock: Callable[[], dt.datetime],
    coordinator: int | None = None,
) -> str | None:
    """What a co-signer checks before it contributes a share to a proposed ``TSTInfo``: ``None``
    if it may sign, else the reason it refuses (for the refusal message and the alert).

    Refused: a ``TSTInfo`` that does not decode (or has an imprint of the wrong length, or an
    unaccepted hash), another policy, another accuracy than ours, a ``genTime`` farther from our
    own clock than that accuracy (plus ``genTime``'s millisecond truncation), a serial that is not
    the coordinator's (when ``coordinator`` is given), or no clock. The signer must then sign
    :func:`rfc3161.signed_attributes` of these same bytes, computed by itself.
    """
    try:
        info = rfc3161.decode_tst_info(tst_info_der)
    except TokenDecodeError as exc:
        return f"proposed TSTInfo rejected: {exc}"
    if info.policy != policy:
        return f"proposed policy {info.policy[:80]} is not ours ({policy})"
    stated = info.accuracy or Accuracy()
    if stated != accuracy:
        theirs, ours = stated.total.total_seconds(), accuracy.total.total_seconds()
        return f"proposed accuracy {theirs} s is not ours ({ours} s)"
    if coordinator is not None and serial_server(info.serial) != coordinator:
        return f"proposed serial {info.serial:x} is not from server {coordinator}"
    try:
        now = clock()
    except ClockUnavailable as exc:
        return f"own clock not available: {exc}"
    skew = info.gen_time - now
    limit = accuracy.total + rfc3161.GEN_TIME_PRECISION
    if abs(skew) > limit:
        text = (
            f"proposed genTime {rfc3161.format_gen_time(info.gen_time)} is {skew.total_seconds():+.3f} s "
            f"from our clock, beyond the stated accuracy of {accuracy.total.total_seconds()} s"
        )
        if skew < dt.timedelta(0) and -skew <= limit + LATE_GRACE:
            return LateTime(f"{text} (late, perhaps delayed: no alert)")
        return TimeOff(text)
    return None


def system_clock() -> dt.datetime:
    """The host's clock in UTC (the default clock of a server's authority)."""
    return dt.datetime.now(dt.UTC)


def file_serials(server_id: int, state_dir: Path, *, block: int = DEFAULT_BLOCK) -> SerialAllocator:
    """A :class:`SerialAllocator` whose counter lives in ``state_dir/tsa-serial``."""
    os.makedirs(state_dir, exist_ok=True)
    return SerialAllocator(server_id, FileSerialStore(state_dir / "tsa-serial"), block=block)
