"""Threshold mode: every token signed by t+1 servers, each checking the ``TSTInfo`` first.

The coordinating server (the one a client asked) proposes the ``TSTInfo`` (its genTime, its
serial) and asks the network for a threshold ECDSA signature with the P-256 secret of C named
in ``[tsa] secret`` (protocols/dss_signing.py, from presignatures). What travels is the
*payload* :func:`encode_payload`: a canonical CBOR map with the domain ``pst/tsa/v1``, the
``TSTInfo`` DER and the TSA certificate the token names. Every signer, the coordinator
included, runs :class:`TimestampCheck` on it before it contributes a share:

* the payload decodes, and the certificate is a TSA certificate (P-256, EKU timeStamping
  critical) for the network's own key of that secret, *issued by the group*: it chains to the
  group root and is a leaf of the CA policy's ``tsa`` profile (``issued``, an
  :class:`~appliance.apps.ca.policy.IssuedCheck`), and the token's genTime is within its validity;
* :func:`~appliance.apps.tsa.authority.check_proposal` with the signer's own policy OID,
  accuracy and clock: the imprint's hash algorithm accepted, the policy and accuracy ours, the
  genTime within the stated accuracy of the signer's clock, and the serial in the range of the
  server that asked (its id in the serial's high bits: serials stay unique across servers).

It then signs what it computes itself from the payload: the CMS signed attributes of that
``TSTInfo`` under that certificate (:meth:`TimestampCheck.signed_bytes`,
:func:`~appliance.apps.tsa.rfc3161.signed_attributes`). A refusal raises an alert naming the
server that asked: ``timestamp-time-off`` for a genTime off our clock, ``timestamp-outside-policy``
for anything else. The check claims every message of its secret: the TSA key signs nothing else
(not even through the operator's ``dss_sign``), so a backdated token needs t+1 servers that lie.

What the signers do not check: the nonce (the client's, echoed as given).
"""

from __future__ import annotations

import datetime as dt
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

from cryptography.hazmat.primitives import serialization

from appliance.apps.tsa import rfc3161
from appliance.apps.tsa.authority import TimeOff, check_proposal
from appliance.apps.tsa.rfc3161 import Accuracy, ChainError, SigningChain
from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError
from appliance.protocols._core import AlertKind

__all__ = ["DOMAIN", "TimestampCheck", "decode_payload", "encode_payload"]

#: The payload's domain (never the protocol's signing domain: the service refuses those).
DOMAIN: Final = "pst/tsa/v1"
#: Largest payload accepted (a TSTInfo and one certificate).
MAX_PAYLOAD: Final = 16 * 1024
#: Certificates whose parsed chain a signer keeps (one per period in practice).
CHAIN_CACHE: Final = 8


def encode_payload(tst_info_der: bytes, certificate: bytes) -> bytes:
    """What the coordinator asks the network to sign for a token: the ``TSTInfo`` and the TSA
    certificate (DER) the token names."""
    return encoding.encode({"dom": DOMAIN, "tst": tst_info_der, "cert": certificate})


def decode_payload(message: bytes) -> tuple[bytes, bytes]:
    """(``TSTInfo`` DER, certificate DER) of a payload; ValueError naming what is wrong."""
    if len(message) > MAX_PAYLOAD:
        raise ValueError(f"timestamp payload of {len(message)} bytes is larger than {MAX_PAYLOAD}")
    try:
        obj = encoding.decode(message, max_size=MAX_PAYLOAD, what="timestamp payload")
    except DecodeError as exc:
        raise ValueError(f"not a timestamp payload: {exc}") from None
    if not isinstance(obj, dict) or obj.get("dom") != DOMAIN:
        raise ValueError(f"not a timestamp payload (domain {DOMAIN})")
    try:
        f = encoding.expect_map(obj, {"dom": str, "tst": bytes, "cert": bytes}, "timestamp payload")
    except DecodeError as exc:
        raise ValueError(str(exc)) from None
    return f["tst"], f["cert"]


class NoTimestamps:
    """The check of a server whose ``[tsa]`` is not in threshold mode on the network's TSA
    secret: its share of that key signs nothing at all (without it, the key would sign any
    payload a coordinator sends, or the operator's ``dss_sign``)."""

    name = "timestamp"
    alert = AlertKind.TIMESTAMP_OUTSIDE_POLICY

    def claims(self, message: bytes) -> bool:
        return True

    def check(self, message: bytes) -> str | None:
        return 'this server does not stamp with this key ([tsa] mode = "threshold" is not configured here)'


class TimestampCheck:
    """The payload check of the TSA's secret (a :class:`~appliance.protocols.signing.PayloadCheck`
    with the ``check_from`` and ``signed_bytes`` hooks); see the module's docstring.

    ``public_key`` returns the SubjectPublicKeyInfo (DER or PEM) of the secret's public key once
    this server knows it; ``clock`` is this server's own clock; ``issued`` checks that a
    certificate (DER) is the group's (chains to the group root, fits the CA's ``tsa`` profile),
    raising ValueError saying why not (:class:`~appliance.apps.ca.policy.IssuedCheck`).
    """

    name = "timestamp"

    def __init__(
        self,
        *,
        policy: str,
        accuracy: Accuracy,
        clock: Callable[[], dt.datetime],
        public_key: Callable[[], bytes | None],
        issued: Callable[[bytes], object],
    ) -> None:
        self.policy = policy
        self.accuracy = accuracy
        self.clock = clock
        self.public_key = public_key
        self.issued = issued
        self._alert = AlertKind.TIMESTAMP_OUTSIDE_POLICY
        self._chains: OrderedDict[bytes, SigningChain] = OrderedDict()

    @property
    def alert(self) -> AlertKind:
        """The kind of the last refusal (the service reads it right after the check ran)."""
        return self._alert

    def claims(self, message: bytes) -> bool:
        return True  # the TSA key signs timestamps and nothing else

    def check(self, message: bytes) -> str | None:
        return self.check_from(message, None)

    def check_from(self, message: bytes, server: int | None) -> str | None:
        """None to sign; else why not (``server``: who asked, whose serial range it must be)."""
        self._alert = AlertKind.TIMESTAMP_OUTSIDE_POLICY
        try:
            tst, cert = decode_payload(message)
            chain = self._chain(cert)
        except ValueError as exc:
            return str(exc)
        reason = check_proposal(
            tst, policy=self.policy, accuracy=self.accuracy, clock=self.clock, coordinator=server
        )
        if isinstance(reason, TimeOff):
            self._alert = AlertKind.TIMESTAMP_TIME_OFF
        if reason is not None:
            return reason
        gen_time = rfc3161.decode_tst_info(tst).gen_time  # (it decoded in check_proposal)
        valid = chain.certificate
        if not valid.not_valid_before_utc <= gen_time <= valid.not_valid_after_utc:
            return (
                f"proposed genTime {rfc3161.format_gen_time(gen_time)} is outside the token's "
                f"certificate's validity ({valid.not_valid_before_utc:%Y-%m-%dT%H:%M:%SZ} to "
                f"{valid.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ})"
            )
        return None

    def signed_bytes(self, message: bytes) -> bytes:
        """The CMS signed attributes of the payload's ``TSTInfo`` under its certificate."""
        tst, cert = decode_payload(message)
        return rfc3161.signed_attributes(tst, self._chain(cert))

    def _chain(self, certificate: bytes) -> SigningChain:
        chain = self._chains.get(certificate)
        if chain is not None:
            self._chains.move_to_end(certificate)
            return chain
        try:
            chain = SigningChain(certificate)
        except ChainError as exc:
            raise ValueError(f"the token's certificate: {exc}") from None
        ours = self.public_key()
        if ours is None:
            raise ValueError("this server does not know the TSA key yet")
        spki = chain.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        if spki != _spki_der(ours):
            raise ValueError("the token's certificate is not for the network's TSA key")
        try:
            self.issued(certificate)
        except ValueError as exc:
            raise ValueError(f"the token's certificate is not the group's TSA certificate: {exc}") from None
        self._chains[certificate] = chain
        while len(self._chains) > CHAIN_CACHE:
            self._chains.popitem(last=False)
        return chain


def _spki_der(key: bytes) -> bytes:
    if key.startswith(b"-----BEGIN"):
        return serialization.load_pem_public_key(key).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    return key
