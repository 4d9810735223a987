"""A server's timestamping authority from its config's [tsa] section.

In "threshold" mode the network signs (:mod:`appliance.apps.tsa.threshold`): the authority
gets its certificate from the group's CA for the network's key (:class:`ThresholdCertificate`)
and no local signer. In "period-key" mode:

:func:`load_period_key` reads the operator's certificate chain and P-256 key (the CA of the
network will later certify a key per server and period instead), checks that they match and
that the certificate may sign tokens, and :func:`authority_from_config` builds the
:class:`~appliance.apps.tsa.authority.Authority` with this server's serial counter. Every
problem is a ConfigError naming the config file, the key and the file, so ``pst serve`` stops
at start with a clear message rather than serving rejections.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.apps.tsa.authority import Authority, file_serials, system_clock
from appliance.apps.tsa.rfc3161 import Accuracy, ChainError, Signer, SigningChain
from appliance.host.config import TsaConfig
from appliance.protocols.state import ConfigError


@dataclass(frozen=True)
class PeriodKey:
    """The chain and a signer over the local key (``sign(data)``: ECDSA P-256 with SHA-256)."""

    chain: SigningChain
    sign: Signer


class RenewedKey:
    """``[tsa] cert = "period"``: this period's key and certificate, issued by the group's CA.

    The node makes a fresh P-256 key each period, has the group certify it (profile ``tsa``) and
    calls :meth:`install`, which sets the key and the authority's chain together (in one step of
    the event loop, so a token is prepared and signed with one pair). Until the first one
    arrives, the authority refuses requests with systemFailure and :meth:`sign` raises.
    """

    def __init__(self, authority: Authority) -> None:
        self.authority = authority
        self._key: ec.EllipticCurvePrivateKey | None = None

    def install(self, key: ec.EllipticCurvePrivateKey, certificate: bytes) -> None:
        """Serve ``certificate`` (DER, from the group's CA) with ``key`` from now on."""
        chain = SigningChain(certificate, ())
        if key.public_key() != chain.public_key:
            raise ValueError("the period certificate is not for this key")
        self._key = key
        self.authority.chain = chain

    def sign(self, data: bytes) -> bytes:
        if self._key is None:
            raise RuntimeError("no period key yet")
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))


class ThresholdCertificate:
    """``[tsa] mode = "threshold"``: the group CA's certificate for the network's threshold key,
    renewed each period like a period key's (the key itself never changes). Until the first
    arrives, the authority refuses requests with systemFailure."""

    def __init__(self, authority: Authority) -> None:
        self.authority = authority

    def install(self, key: object, certificate: bytes) -> None:
        """Serve ``certificate`` (DER, from the group's CA); ``key`` is None (the network's)."""
        self.authority.chain = SigningChain(certificate, ())


def load_period_key(tsa: TsaConfig, config_path: Path) -> PeriodKey:
    where = f"{config_path}: tsa.cert / tsa.key"
    if tsa.cert is None or tsa.key is None:
        raise ConfigError(f'{where}: no files (tsa.cert = "period")')
    try:
        pem = tsa.cert.read_bytes()
        key_pem = tsa.key.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read: {exc.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError:
        raise ConfigError(f"{where}: {tsa.cert} holds no PEM certificate") from None
    der = serialization.Encoding.DER
    try:
        chain = SigningChain(certs[0].public_bytes(der), tuple(c.public_bytes(der) for c in certs[1:]))
    except ChainError as exc:
        raise ConfigError(f"{where}: {tsa.cert}: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{where}: {tsa.key} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != chain.public_key:
        raise ConfigError(f"{where}: the key in {tsa.key} is not the key of the certificate in {tsa.cert}")
    now = dt.datetime.now(dt.UTC)
    if not (chain.certificate.not_valid_before_utc <= now <= chain.certificate.not_valid_after_utc):
        raise ConfigError(f"{where}: the certificate in {tsa.cert} is not valid now")
    algorithm = ec.ECDSA(hashes.SHA256())

    def sign(data: bytes) -> bytes:
        return key.sign(data, algorithm)

    return PeriodKey(chain, sign)


def authority_from_config(
    tsa: TsaConfig, config_path: Path, server_id: int, state_dir: Path
) -> tuple[Authority, Signer | None, RenewedKey | ThresholdCertificate | None]:
    """The authority of [tsa], its local signer (None in threshold mode: the network signs), and
    with ``cert = "period"`` or in threshold mode the holder of the certificate that the node
    renews each period; the serial counter in ``state_dir/tsa-serial``."""
    period_key = load_period_key(tsa, config_path) if not tsa.period_cert else None
    authority = Authority(
        policy=tsa.policy,
        accuracy=Accuracy(tsa.accuracy_ms // 1000, tsa.accuracy_ms % 1000),
        clock=system_clock,
        serials=file_serials(server_id, state_dir),
        chain=period_key.chain if period_key is not None else None,
    )
    if period_key is not None:
        return authority, period_key.sign, None
    if tsa.threshold:
        return authority, None, ThresholdCertificate(authority)
    renewed = RenewedKey(authority)
    return authority, renewed.sign, renewed
