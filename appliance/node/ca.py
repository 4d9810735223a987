"""The group's certificate authority on a server: the key-holder's side and ``pst serve``'s side.

Key-holder (:class:`CaAuthority`): registers the ``sign/ca`` check
(:class:`~appliance.apps.ca.policy.CertificateCheck`, with this server's clock and [ca]
policy), and answers two calls of the network-facing process:

* ``ca_root``: the group root PEM, kept in the public state dir (``public/ca-root.pem``).
  ``mode`` "stored" returns it if this server has it; "offer" takes a PEM a peer served and keeps
  it if its TBSCertificate is ours byte for byte and its signature verifies with the ``ca`` key;
  "make" gets the network's threshold signature on the root's TBS (two passes) and keeps it.
* ``ca_issue``: a leaf for a public key (SubjectPublicKeyInfo DER), a profile and names, valid for
  the current period plus the grace, signed through ``sign/ca`` (each signer checks it first).

``pst serve`` (:class:`GroupRoot`): on first need, asks its key-holder for the stored root, else
fetches a peer's (``GET /ca/root.pem?stored=1`` on ``[http.peers]``) and offers it, else has one
made. So the servers serve the same certificate, unless two made one at the same moment: then
both are valid roots with the same TBS (same key, names, validity) and differ only in the bytes
of the signature (FROST signatures are randomized).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from appliance.apps.ca.policy import (
    CaPolicy,
    CertificateCheck,
    app_profile,
    name_allowed,
    server_tls_profile,
    tsa_profile,
)
from appliance.apps.ca.x509 import CertificateError
from appliance.host.config import CaConfig, NodeConfig
from appliance.host.files import atomic_write
from appliance.node.store import StateDir
from appliance.protocols.signing import SigningRefused
from appliance.protocols.state import CA_SECRET

if TYPE_CHECKING:
    from appliance.node.server import PServer

log = logging.getLogger("pst.ca")

#: What a period certificate is handed to: (the private key, the leaf PEM, the (key, cert) files or None).
Install = Callable[[Any, bytes, "tuple[Path, Path] | None"], None]

ROOT_FILE = "ca-root.pem"
#: A period certificate that could not be had is asked for again after 0.5 s, doubling up to 30 s.
RETRY_FIRST = 0.5
RETRY_MAX = 30.0
MAX_PEM = 16 * 1024
#: Leaves prepared and not signed yet that the key-holder keeps, and for how long.
MAX_PREPARED = 256
PREPARED_LIFETIME = 60.0


def policy_of(config: NodeConfig) -> CaPolicy:
    """The [ca] policy: the servers' TLS names (C's peers' hosts and ``tls_names``), the TSA's,
    and one profile per application of ``[ca.apps]``."""
    ca = config.ca or CaConfig()
    profiles = [server_tls_profile(config.constants, ca.tls_names)]
    if ca.tsa_names:
        profiles.append(tsa_profile(ca.tsa_names))
    profiles.extend(app_profile(app, names) for app, names in ca.apps)
    return CaPolicy(ca.grace, tuple(profiles))


class CaAuthority:
    """The key-holder's CA: the check on ``sign/ca`` and the root and leaves it asks the network for."""

    def __init__(self, config: NodeConfig, server: PServer) -> None:
        self.config = config
        self.server = server
        self.policy = policy_of(config)
        self.path = StateDir(config.state_dir).public_dir / ROOT_FILE
        self.check = CertificateCheck(config.constants, self.public, self.policy, clock=server.clock)
        server.add_payload_check(CA_SECRET, self.check)
        #: Leaves prepared for :meth:`sign_prepared`: SHA-256 of the TBS -> (builder, expiry).
        self._prepared: dict[bytes, tuple[Any, float]] = {}

    def public(self) -> bytes | None:
        core = self.server.core
        sharing = core.public.sharings.get(CA_SECRET) if core is not None else None
        return sharing.public_key if sharing is not None else None

    def _public(self) -> bytes:
        public = self.public()
        if public is None:
            raise SigningRefused("this server does not hold the ca public key yet")
        return public

    def _sign(self, timeout: float) -> Callable[[bytes], Awaitable[bytes]]:
        async def sign(tbs: bytes) -> bytes:
            return await self.server.sign_payload(tbs, timeout=timeout, secret=CA_SECRET)

        return sign

    def stored(self) -> bytes | None:
        from appliance.apps.ca.x509 import check_root

        try:
            pem = self.path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            check_root(pem, self._public(), self.config.constants)
        except CertificateError as exc:
            log.warning("ca: %s is not this network's root (%s); it will be made again", self.path, exc)
            return None
        return pem

    def offer(self, pem: bytes) -> bytes:
        from appliance.apps.ca.x509 import check_root

        if len(pem) > MAX_PEM:
            raise ValueError("ca_root: the offered PEM is too large")
        try:
            check_root(pem, self._public(), self.config.constants)
        except CertificateError as exc:
            raise ValueError(f"ca_root: the offered certificate is refused: {exc}") from None
        atomic_write(self.path, pem)
        return pem

    async def make(self, timeout: float) -> bytes:
        from appliance.apps.ca.x509 import pem, root_builder, sign_certificate

        public = self._public()
        cert = await sign_certificate(
            root_builder(public, self.config.constants), public, self._sign(timeout)
        )
        data = pem(cert)
        atomic_write(self.path, data)
        log.info("ca: the group root certificate was signed by the network")
        return data

    def prepare(self, spki: bytes, profile_name: str, names: list[str]) -> bytes:
        """The TBSCertificate of a leaf (not signed yet); kept a minute for :meth:`sign_prepared`."""
        import hashlib

        from appliance.apps.ca.x509 import tbs_of

        builder = self._leaf_builder(spki, profile_name, names)
        tbs = tbs_of(builder, self._public())
        now = self.server.clock()
        self._prepared = {k: v for k, v in self._prepared.items() if v[1] > now}
        while len(self._prepared) >= MAX_PREPARED:
            del self._prepared[next(iter(self._prepared))]
        self._prepared[hashlib.sha256(tbs).digest()] = (builder, now + PREPARED_LIFETIME)
        return tbs

    async def sign_prepared(self, tbs: bytes, timeout: float) -> bytes:
        """The certificate of a TBS :meth:`prepare` made: the network's threshold signature (every
        signer checking the policy first), assembled and checked."""
        import hashlib

        from appliance.apps.ca.x509 import assemble, pem

        found = self._prepared.pop(hashlib.sha256(tbs).digest(), None)
        if found is None:
            raise ValueError("ca_sign: no certificate prepared with this TBS (unknown, used or expired)")
        public = self._public()
        return pem(assemble(found[0], public, tbs, await self._sign(timeout)(tbs)))

    async def issue(self, spki: bytes, profile_name: str, names: list[str], timeout: float) -> bytes:
        from appliance.apps.ca.x509 import pem, sign_certificate

        builder = self._leaf_builder(spki, profile_name, names)
        return pem(await sign_certificate(builder, self._public(), self._sign(timeout)))

    def _leaf_builder(self, spki: bytes, profile_name: str, names: list[str]) -> Any:
        from cryptography.hazmat.primitives.serialization import load_der_public_key
        from cryptography.x509 import ObjectIdentifier

        from appliance.apps.ca.policy import PolicyError
        from appliance.apps.ca.x509 import leaf_builder, leaf_validity

        public = self._public()
        try:
            profile = self.policy.profile(profile_name)
        except PolicyError as exc:
            raise ValueError(str(exc)) from None
        if profile.app is not None:
            outside = [n for n in names if not name_allowed(n.lower(), profile.names)]
        else:
            outside = [n for n in names if n.lower() not in profile.names]
        if not names or outside:
            raise ValueError(
                f"ca_issue: names {outside or names} are not allowed by profile {profile.name!r}"
            )
        try:
            key = load_der_public_key(spki)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"ca_issue: unreadable public key: {exc}") from None
        return leaf_builder(
            root_public=public,
            constants=self.config.constants,
            subject_key=key,
            names=[n.lower() for n in names],
            eku=[ObjectIdentifier(oid) for oid in sorted(profile.eku)],
            eku_critical=profile.eku_critical,
            validity=leaf_validity(self.config.constants, self.server.clock(), self.policy.grace),
            app=profile.app,
        )

    # The key-holder's methods (keyholder.py) ----------------------------------------------------

    async def ca_root(self, args: dict[str, Any]) -> bytes | None:
        mode = args.get("mode")
        timeout = args.get("timeout_ms")
        seconds = timeout / 1000 if isinstance(timeout, int) and 0 < timeout <= 600_000 else 15.0
        if mode == "stored":
            return self.stored()
        if mode == "offer":
            offered = args.get("pem")
            if not isinstance(offered, bytes):
                raise TypeError("ca_root: 'pem' must be bytes")
            return self.offer(offered)
        if mode == "make":
            try:
                return self.stored() or await self.make(seconds)
            except CertificateError as exc:
                raise SigningRefused(f"ca_root: {exc}") from None
        raise ValueError(f"ca_root: unknown mode {mode!r} (stored, offer, make)")

    def _leaf_args(self, args: dict[str, Any], what: str) -> tuple[bytes, str, list[str]]:
        spki, profile, names = args.get("spki"), args.get("profile"), args.get("names")
        if not isinstance(spki, bytes) or not isinstance(profile, str) or not isinstance(names, list):
            raise TypeError(f"{what}: 'spki' must be bytes, 'profile' a string and 'names' a list")
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"{what}: 'names' must be strings")
        return spki, profile, list(names)

    async def ca_prepare(self, args: dict[str, Any]) -> bytes:
        """The TBSCertificate of a leaf, to be signed by ``ca_sign`` (so that the network-facing
        process can log it while the network signs it)."""
        try:
            return self.prepare(*self._leaf_args(args, "ca_prepare"))
        except CertificateError as exc:
            raise SigningRefused(f"ca_prepare: {exc}") from None

    async def ca_sign(self, args: dict[str, Any]) -> bytes:
        tbs = args.get("tbs")
        if not isinstance(tbs, bytes):
            raise TypeError("ca_sign: 'tbs' must be bytes")
        timeout = args.get("timeout_ms")
        seconds = timeout / 1000 if isinstance(timeout, int) and 0 < timeout <= 600_000 else 15.0
        try:
            return await self.sign_prepared(tbs, seconds)
        except CertificateError as exc:
            raise SigningRefused(f"ca_sign: {exc}") from None

    async def ca_issue(self, args: dict[str, Any]) -> bytes:
        spki, profile, names = self._leaf_args(args, "ca_issue")
        timeout = args.get("timeout_ms")
        seconds = timeout / 1000 if isinstance(timeout, int) and 0 < timeout <= 600_000 else 15.0
        try:
            return await self.issue(spki, profile, names, seconds)
        except CertificateError as exc:
            raise SigningRefused(f"ca_issue: {exc}") from None


Call = Callable[..., Awaitable[Any]]
Fetch = Callable[[str], Awaitable[tuple[int, bytes]]]


class GroupRoot:
    """``pst serve``'s view of the group root: stored, a peer's, or made (see the module doc)."""

    def __init__(self, call: Call, peer_urls: Mapping[int, str], fetch: Fetch) -> None:
        self.call = call
        self.peer_urls = dict(peer_urls)
        self.fetch = fetch
        self._pem: bytes | None = None
        self._lock = trio.Lock()

    async def get(self, *, stored_only: bool = False) -> bytes | None:
        if self._pem is not None:
            return self._pem
        async with self._lock:
            if self._pem is not None:
                return self._pem
            pem = await self.call("ca_root", 5.0, mode="stored")
            if isinstance(pem, bytes):
                self._pem = pem
                return pem
            if stored_only:
                return None
            for i, url in sorted(self.peer_urls.items()):
                try:
                    status, body = await self.fetch(url.rstrip("/") + "/ca/root.pem?stored=1")
                except Exception as exc:  # any failure of one peer: try the next
                    log.info("ca: server %d's root could not be fetched: %s", i, exc)
                    continue
                if status != 200 or len(body) > MAX_PEM:
                    continue
                try:
                    pem = await self.call("ca_root", 5.0, mode="offer", pem=body)
                except SigningRefused as exc:
                    log.warning("ca: server %d served a root we refuse: %s", i, exc)
                    continue
                if isinstance(pem, bytes):
                    self._pem = pem
                    return pem
            pem = await self.call("ca_root", 20.0, mode="make")
            if not isinstance(pem, bytes):
                raise SigningRefused("the key-holder made no root certificate")
            self._pem = pem
            return pem


def period_names(config: NodeConfig) -> tuple[str, ...]:
    """The names of this server's syslog TLS leaf: ``[log] tls_names``, else its host in C."""
    if config.log is not None and config.log.tls_names:
        return config.log.tls_names
    address = config.constants.peers.get(config.server_id, "")
    host = address.rsplit(":", 1)[0].strip("[]").lower()
    return (host,) if host else ()


def tls_installer(context: Any) -> Install:
    """Load each period's key and leaf into the SSL ``context`` (new connections get them)."""

    def install(key: Any, leaf: bytes, files: tuple[Path, Path] | None) -> None:
        assert files is not None
        key_path, cert_path = files
        context.load_cert_chain(str(cert_path), str(key_path))

    return install


#: Facility 13 (log audit), severity 6 (informational), as the TSA's token records.
_RECORD_PRI = 110


def certificate_record(server_id: int, client: str, app: str, tbs: bytes) -> bytes:
    """The secure log's record of a certificate about to be issued: an RFC 5424 entry of
    ``pst-ca``, message id ``CERT``, structured data (serial, application, requester, names,
    validity, SHA-256 of the TBSCertificate) and the whole TBSCertificate (base64 DER) as the
    message: the certificate is that TBS with the network's signature, so it is found by its TBS."""
    import base64
    import datetime
    import hashlib

    from pyasn1.codec.der import decoder
    from pyasn1_modules import rfc5280

    from appliance.apps.ca.policy import decode_tbs
    from appliance.apps.log.syslog import SDElement, build_rfc5424

    leaf = decode_tbs(tbs)
    parsed, _ = decoder.decode(tbs, asn1Spec=rfc5280.TBSCertificate())
    params = (
        ("serial", f"{int(parsed['serialNumber']):x}"),
        ("app", app),
        ("client", client),
        ("names", " ".join(leaf.names)),
        ("notBefore", f"{datetime.datetime.fromtimestamp(leaf.not_before, datetime.UTC):%Y-%m-%dT%H:%M:%SZ}"),
        ("notAfter", f"{datetime.datetime.fromtimestamp(leaf.not_after, datetime.UTC):%Y-%m-%dT%H:%M:%SZ}"),
        ("tbs-sha256", hashlib.sha256(tbs).hexdigest()),
    )
    now = datetime.datetime.now(datetime.UTC)
    return build_rfc5424(
        _RECORD_PRI,
        f"{now:%Y-%m-%dT%H:%M:%S}.{now.microsecond // 1000:03d}Z",
        f"pst-server-{server_id}",
        "pst-ca",
        None,
        "CERT",
        (SDElement("cert@32473", params),),
        base64.b64encode(tbs),
    )


#: Appends one record to the secure log (``LogService.log_append``'s shape: client, messages).
Record = Callable[[str, list[bytes]], Awaitable[Any]]


class AppCertificates:
    """Applications' period certificates for the local API (``certificate``; issue 13 §1):
    the :class:`~appliance.api.CertificateBackend` of ``pst serve``.

    The leaf comes from the key-holder (``ca_prepare`` then ``ca_sign``, with profile ``app:NAME``:
    the application goes into the leaf, every signer checks its names against
    ``[ca.apps.NAME]``); its record (:func:`certificate_record`, of the TBSCertificate) is appended
    to the secure log while the network signs, and the certificate is released only once both are
    done. So the log may hold a record of a certificate whose signing then failed, never a
    certificate without its record. Without a log (``record`` None) the journal has it. A record
    that cannot be stored withholds the certificate (``unavailable``)."""

    def __init__(
        self,
        call: Call,
        root: GroupRoot,
        config: NodeConfig,
        record: Record | None,
    ) -> None:
        self.call = call
        self.root = root
        self.config = config
        self.record = record
        #: Certificates released, and refused (by the policy or the network); not on /metrics yet.
        self.issued = 0
        self.refused = 0

    def app_names(self, app: str) -> tuple[str, ...] | None:
        return (self.config.ca or CaConfig()).app_names(app)

    def next_period(self) -> float:
        c = self.config.constants
        return c.period_start(c.period_at(time.time()) + 1)

    async def issue_certificate(
        self, client: str, app: str, spki: bytes, names: Sequence[str]
    ) -> tuple[bytes, bytes]:
        from appliance.api import BackendRefused, BackendUnavailable

        recorded: list[BaseException | None] = []

        async def record(line: bytes) -> None:
            if self.record is None:
                log.info("ca: issuing %s", line.decode(errors="replace"))
                recorded.append(None)
                return
            try:
                await self.record(f"ca of server {self.config.server_id}", [line])
                recorded.append(None)
            except Exception as exc:  # the log's LogUnavailable, a full disk: no record, no release
                recorded.append(exc)

        try:
            root = await self.root.get()
            tbs = await self.call("ca_prepare", 10.0, spki=spki, profile=f"app:{app}", names=list(names))
            if not isinstance(tbs, bytes):
                raise BackendUnavailable("the key-holder prepared no certificate")
            # The record (of the TBS: the certificate but for the signature) goes to the log while
            # the network signs; the certificate leaves only once both are done.
            signed: list[Any] = []

            async def sign() -> None:
                try:
                    signed.append(await self.call("ca_sign", 20.0, tbs=tbs))
                except Exception as exc:  # raised below, outside the nursery (no exception group)
                    signed.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(record, certificate_record(self.config.server_id, client, app, tbs))
                nursery.start_soon(sign)
            if isinstance(signed[0], Exception):
                raise signed[0]
            leaf = signed[0]
        except SigningRefused as exc:
            self.refused += 1
            text = str(exc)
            if "not allowed" in text or "no certificate profile" in text:
                raise BackendRefused(text[:500]) from None
            if "no certificate prepared" in text:  # a refresh replaced the key-holder in between
                raise BackendUnavailable(
                    "this server is not operational for a moment: a refresh replaced its key-holder "
                    "between the certificate's preparation and its signature; retry"
                ) from None
            raise BackendUnavailable(text[:300]) from None
        except trio.TooSlowError:
            raise BackendUnavailable("the signers did not answer in time") from None
        if not isinstance(leaf, bytes) or not isinstance(root, bytes):
            raise BackendUnavailable("the key-holder returned no certificate")
        if recorded != [None]:
            log.error("ca: the record of a certificate for %r could not be stored: %s", app, recorded)
            raise BackendUnavailable(
                "the certificate's record could not be stored in the secure log; not released"
            )
        self.issued += 1
        return leaf, root


class PeriodCertificate:
    """A period certificate from the group's CA: the syslog TLS listener's (``[log] tls_cert =
    "period"``, profile ``server-tls``) or the timestamping authority's (``[tsa] cert = "period"``,
    profile ``tsa``).

    For every period (a new KeyTable, i.e. each refresh, or a new period of C's clock), make a
    fresh P-256 key, have the group issue a leaf for it (this server's names for the profile,
    valid for the period plus the grace), and hand both to ``install``: for TLS, new connections
    get the new certificate, open ones keep theirs. With ``files`` the key and the leaf are kept
    in ``directory`` (pst serve's own; the key file 0600, replaced each period: the TLS context
    loads them from there); without, the key stays in memory. A failure is logged and retried
    after 0.5 s, doubling up to 30 s (sooner on a new KeyTable); the previous certificate serves
    meanwhile.
    """

    def __init__(
        self,
        call: Call,
        install: Install,
        names: tuple[str, ...],
        directory: Any,
        constants: Any,
        clock: Callable[[], float],
        *,
        profile: str = "server-tls",
        files: tuple[str, str] | None = ("syslog-period.key", "syslog-period.crt"),
        what: str = "syslog TLS",
        public_key: Callable[[], Awaitable[bytes | None]] | None = None,
    ) -> None:
        self.call = call
        self.install = install
        self.names = names
        self.directory = directory
        self.constants = constants
        self.clock = clock
        self.profile = profile
        self.files = files
        self.what = what
        #: The key to certify (PEM) when it is not made here: the timestamping authority's in
        #: threshold mode is the network's (``install`` then gets None for the private key).
        self.public_key = public_key
        self.period: int | None = None
        self.issued_for: tuple[int, int] | None = None
        #: The current leaf (PEM), once there is one.
        self.certificate: bytes | None = None
        self._changed = trio.Event()

    def new_period(self, period: int | None) -> None:
        """A new KeyTable (from the key-holder's identity): renew."""
        if period is not None:
            self.period = period
            self._changed.set()

    def _want(self) -> tuple[int, int] | None:
        if self.period is None:
            return None
        return (self.period, self.constants.period_at(self.clock()))

    async def run(self) -> None:
        failures = 0
        while True:
            want = self._want()
            if want is not None and want != self.issued_for:
                try:
                    await self.renew(want)
                    failures = 0
                except (SigningRefused, trio.TooSlowError, OSError, ValueError) as exc:
                    # 0.5 s, 1 s, 2 s ... up to 30 s: a refused request is an alert at every signer.
                    delay = min(RETRY_MAX, RETRY_FIRST * 2**failures)
                    failures += 1
                    log.warning(
                        "ca: no %s certificate for period %d yet (retry in %.1f s): %s",
                        self.what,
                        want[0],
                        delay,
                        exc,
                    )
                    with trio.move_on_after(delay):
                        await self._changed.wait()
                    self._changed = trio.Event()
                continue
            next_period = self.constants.period_start(self.constants.period_at(self.clock()) + 1)
            with trio.move_on_after(max(0.1, next_period - self.clock() + 0.05)):
                await self._changed.wait()
            self._changed = trio.Event()

    async def renew(self, want: tuple[int, int]) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key: Any = None
        if self.public_key is not None:
            pem = await self.public_key()
            if pem is None:
                raise ValueError("the key-holder does not know the key to certify yet")
            spki = serialization.load_pem_public_key(pem).public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        else:
            key = ec.generate_private_key(ec.SECP256R1())
            spki = key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        leaf = await self.call("ca_issue", 20.0, spki=spki, profile=self.profile, names=list(self.names))
        if not isinstance(leaf, bytes):
            raise ValueError("the key-holder returned no certificate")
        files = None
        if self.files is not None and key is not None:
            key_pem = key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
            key_path, cert_path = self.directory / self.files[0], self.directory / self.files[1]
            await trio.to_thread.run_sync(lambda: atomic_write(key_path, key_pem, private=True))
            await trio.to_thread.run_sync(lambda: atomic_write(cert_path, leaf))
            files = (key_path, cert_path)
        self.install(key, leaf, files)
        self.issued_for = want
        self.certificate = leaf
        log.info("ca: %s serves a new period certificate (KeyTable period %d)", self.what, want[0])
