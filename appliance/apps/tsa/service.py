"""A server's timestamping authority from its config's [tsa] section ("period-key" mode).

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


def load_period_key(tsa: TsaConfig, config_path: Path) -> PeriodKey:
    where = f"{config_path}: tsa.cert / tsa.key"
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
) -> tuple[Authority, Signer]:
    """The authority of [tsa] and its signer; the serial counter in ``state_dir/tsa-serial``."""
    period_key = load_period_key(tsa, config_path)
    authority = Authority(
        policy=tsa.policy,
        accuracy=Accuracy(tsa.accuracy_ms // 1000, tsa.accuracy_ms % 1000),
        clock=system_clock,
        serials=file_serials(server_id, state_dir),
        chain=period_key.chain,
    )
    return authority, period_key.sign
