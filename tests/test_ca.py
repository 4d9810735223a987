"""The certificate authority on the threshold key ``ca``: root, leaves, and the signers' policy check.

The check and the decoder are exercised directly (and fuzzed: bad bytes never crash it and
are never accepted); the attack of MISSION scenario H (certificate part) runs on ServerCores
of one period exchanging messages in process, the ``ca`` key dealt by its own DKG.
"""

from __future__ import annotations

import heapq
import random
import re
import subprocess
import time
from pathlib import Path

import cryptography
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from appliance.apps.ca import x509 as ca
from appliance.apps.ca.policy import (
    CaPolicy,
    CertificateCheck,
    PolicyError,
    decode_tbs,
    server_tls_profile,
    tsa_profile,
)
from appliance.protocols import signing
from appliance.protocols._core import EVERYONE, AlertKind
from appliance.protocols.core import ServerCore
from appliance.protocols.signing import SigningRefused, SigningService
from appliance.protocols.state import CA_SECRET, SCERT, Constants
from appliance.sim.setup import ServerSetup, make_network, seeded_bytes

GENESIS = 1_790_000_000.0
C = Constants(
    n=4,
    t=1,
    period_length=600.0,
    delta=0.1,
    genesis=GENESIS,
    peers={i: f"127.0.0.{i}:{7100 + i}" for i in range(1, 5)},
    secrets={SCERT: "ed25519", CA_SECRET: "ed25519"},
)
NOW = GENESIS + 3 * 600 + 100  # in period 3
GRACE = 60.0
POLICY = CaPolicy(GRACE, (server_tls_profile(C, ["pst.example.org"]), tsa_profile(["tsa.example.org"])))
SEED = bytes(range(32))
ROOT_KEY = SigningKey(SEED)
ROOT_PUBLIC = bytes(ROOT_KEY.verify_key)
LEAF_KEY = ec.generate_private_key(ec.SECP256R1())


def check(now: float = NOW, public: bytes = ROOT_PUBLIC) -> CertificateCheck:
    return CertificateCheck(C, lambda: public, POLICY, clock=lambda: now)


def leaf_tbs(
    names: list[str],
    *,
    eku: tuple[x509.ObjectIdentifier, ...] = ca.TLS_EKU,
    critical: bool = False,
    validity: tuple[int, int] | None = None,
    builder: x509.CertificateBuilder | None = None,
) -> bytes:
    b = builder or ca.leaf_builder(
        root_public=ROOT_PUBLIC,
        constants=C,
        subject_key=LEAF_KEY.public_key(),
        names=names,
        eku=eku,
        eku_critical=critical,
        validity=validity or ca.leaf_validity(C, NOW, GRACE),
    )
    return ca.tbs_of(b, ROOT_PUBLIC)


def signed(builder: x509.CertificateBuilder) -> x509.Certificate:
    tbs = ca.tbs_of(builder, ROOT_PUBLIC)
    return ca.assemble(builder, ROOT_PUBLIC, tbs, ROOT_KEY.sign(tbs).signature)


# -- cryptography's external signer (not a documented contract: pinned, and checked here) ----------


def test_cryptography_signs_certificates_with_an_external_ed25519_key() -> None:
    """If this fails, cryptography changed how CertificateBuilder.sign calls the key: the CA's
    two-pass signing (x509.tbs_of / assemble) needs another way (pyproject pins the range)."""
    major = int(cryptography.__version__.split(".")[0])
    assert 50 <= major < 51, f"cryptography {cryptography.__version__} is outside the tested range"
    builder = ca.root_builder(ROOT_PUBLIC, C)
    tbs = ca.tbs_of(builder, ROOT_PUBLIC)
    cert = ca.assemble(builder, ROOT_PUBLIC, tbs, ROOT_KEY.sign(tbs).signature)
    assert cert.tbs_certificate_bytes == tbs
    cert.verify_directly_issued_by(cert)
    # A wrong signature is caught before any certificate is made.
    with pytest.raises(ca.CertificateError, match="does not verify"):
        ca.assemble(builder, ROOT_PUBLIC, tbs, bytes(64))


def test_the_root_is_a_deterministic_function_of_the_ca_key_and_c(tmp_path: Path) -> None:
    first = ca.root_tbs(ROOT_PUBLIC, C)
    assert ca.root_tbs(ROOT_PUBLIC, C) == first
    # Two signatures (FROST's nonces differ) give two certificates with the same TBS.
    builder = ca.root_builder(ROOT_PUBLIC, C)
    cert = signed(builder)
    assert cert.tbs_certificate_bytes == first
    assert cert.subject == cert.issuer
    assert cert.subject.rfc4514_string() == f"CN=pst-{int(GENESIS)} group root,O=Proactive Security Toolkit"
    assert cert.not_valid_before_utc.timestamp() == int(GENESIS)
    basic = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert basic.critical and basic.value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    # Another key or another network: another root.
    other = bytes(SigningKey(bytes(32)).verify_key)
    assert ca.root_tbs(other, C) != first
    later = Constants(n=4, t=1, period_length=600.0, delta=0.1, genesis=GENESIS + 1, secrets=C.secrets)
    assert ca.root_tbs(ROOT_PUBLIC, later) != first
    # openssl verifies the root and a leaf it issued.
    leaf = signed(
        ca.leaf_builder(
            root_public=ROOT_PUBLIC,
            constants=C,
            subject_key=LEAF_KEY.public_key(),
            names=["pst.example.org"],
            eku=ca.TLS_EKU,
            eku_critical=False,
            validity=ca.leaf_validity(C, time.time(), GRACE),
        )
    )
    (tmp_path / "root.pem").write_bytes(ca.pem(cert))
    (tmp_path / "leaf.pem").write_bytes(ca.pem(leaf))
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", str(tmp_path / "root.pem"), str(tmp_path / "leaf.pem")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0 and "leaf.pem: OK" in out.stdout, out.stdout + out.stderr
    assert ca.check_root(ca.pem(cert), ROOT_PUBLIC, C).tbs_certificate_bytes == first
    with pytest.raises(ca.CertificateError, match="not this network's group root"):
        ca.check_root(ca.pem(leaf), ROOT_PUBLIC, C)


# -- the policy check -------------------------------------------------------------------------------


def test_the_check_signs_the_exact_root_and_leaves_the_policy_allows() -> None:
    chk = check()
    assert chk.claims(b"anything at all")
    assert chk.check(ca.root_tbs(ROOT_PUBLIC, C)) is None
    assert chk.check(leaf_tbs(["127.0.0.2", "pst.example.org"])) is None
    assert chk.check(leaf_tbs(["tsa.example.org"], eku=ca.TSA_EKU, critical=True)) is None
    leaf = decode_tbs(leaf_tbs(["127.0.0.3"]))
    assert leaf.names == ("127.0.0.3",) and not leaf.ca
    assert leaf.eku == {"1.3.6.1.5.5.7.3.1", "1.3.6.1.5.5.7.3.2"}
    # Without the ca key the check signs nothing.
    assert CertificateCheck(C, lambda: None, POLICY).check(ca.root_tbs(ROOT_PUBLIC, C)) is not None


def _ca_builder(validity: tuple[int, int], c: Constants = C) -> x509.CertificateBuilder:
    key = LEAF_KEY.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "pst.example.org")]))
        .issuer_name(ca.root_subject(c))
        .public_key(key)
        .serial_number(12345)
        .not_valid_before(ca._utc(validity[0]))
        .not_valid_after(ca._utc(validity[1]))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("pst.example.org")]), critical=False)
    )


def _with_extension(extension: x509.ExtensionType, critical: bool = False) -> bytes:
    builder = ca.leaf_builder(
        root_public=ROOT_PUBLIC,
        constants=C,
        subject_key=LEAF_KEY.public_key(),
        names=["pst.example.org"],
        eku=ca.TLS_EKU,
        eku_critical=False,
        validity=ca.leaf_validity(C, NOW, GRACE),
    ).add_extension(extension, critical=critical)
    return ca.tbs_of(builder, ROOT_PUBLIC)


@pytest.mark.parametrize(
    ("tbs", "reason"),
    [
        (lambda: leaf_tbs(["evil.example.com"]), "names ['evil.example.com'] are not allowed"),
        (lambda: leaf_tbs(["pst.example.org", "evil.example.com"]), "are not allowed"),
        (lambda: leaf_tbs(["pst.example.org"], eku=ca.TSA_EKU, critical=True), "is not a subset"),
        (lambda: leaf_tbs(["tsa.example.org"], eku=ca.TSA_EKU, critical=False), "must be critical"),
        (
            lambda: leaf_tbs(["pst.example.org"], validity=(int(NOW), int(NOW) + 365 * 86400)),
            "longer than a period plus the grace",
        ),
        (
            lambda: leaf_tbs(["pst.example.org"], validity=(int(NOW) + 3600, int(NOW) + 3900)),
            "later than this server's clock",
        ),
        (
            lambda: leaf_tbs(["pst.example.org"], validity=(int(NOW) - 3000, int(NOW) - 2500)),
            "before the previous period",
        ),
        (lambda: ca.tbs_of(_ca_builder(ca.leaf_validity(C, NOW, GRACE)), ROOT_PUBLIC), "a CA certificate"),
        (
            lambda: _with_extension(x509.OCSPNoCheck()),
            "is not one the policy allows",
        ),
        (
            lambda: leaf_tbs(["pst.example.org"])[:-1],
            "not a DER TBSCertificate",
        ),
        (lambda: b"", "not a DER TBSCertificate"),
        (lambda: ca.root_tbs(bytes(SigningKey(bytes(32)).verify_key), C), "a CA certificate"),
    ],
)
def test_the_check_refuses_certificates_outside_the_policy(tbs: object, reason: str) -> None:
    message = tbs()  # type: ignore[operator]
    why = check().check(message)
    assert why is not None and reason in why, why


def test_a_leaf_whose_issuer_is_not_the_root_is_refused() -> None:
    builder = ca.leaf_builder(
        root_public=ROOT_PUBLIC,
        constants=C,
        subject_key=LEAF_KEY.public_key(),
        names=["pst.example.org"],
        eku=ca.TLS_EKU,
        eku_critical=False,
        validity=ca.leaf_validity(C, NOW, GRACE),
        issuer=x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "someone else")]),
    )
    why = check().check(ca.tbs_of(builder, ROOT_PUBLIC))
    assert why == "the issuer is not the group root"
    # The same leaf under another ca key: its authority key identifier is not the root's.
    other = bytes(SigningKey(bytes(32)).verify_key)
    tbs = ca.tbs_of(
        ca.leaf_builder(
            root_public=other,
            constants=C,
            subject_key=LEAF_KEY.public_key(),
            names=["pst.example.org"],
            eku=ca.TLS_EKU,
            eku_critical=False,
            validity=ca.leaf_validity(C, NOW, GRACE),
        ),
        other,
    )
    assert check().check(tbs) == "the authority key identifier is not the group root's"


def _bare_leaf(san: list[x509.GeneralName], key: object | None = None) -> bytes:
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.root_subject(C))
        .public_key(key or LEAF_KEY.public_key())  # type: ignore[arg-type]
        .serial_number(7)
        .not_valid_before(ca._utc(ca.leaf_validity(C, NOW, GRACE)[0]))
        .not_valid_after(ca._utc(ca.leaf_validity(C, NOW, GRACE)[1]))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
    )
    return ca.tbs_of(builder, ROOT_PUBLIC)


def test_subject_keys_and_name_kinds_outside_the_policy_are_refused() -> None:
    assert check().check(_bare_leaf([x509.DNSName("pst.example.org")])) is None  # an empty subject is fine
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    assert check().check(_bare_leaf([x509.DNSName("pst.example.org")], ed)) is None  # Ed25519 too
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    why = check().check(_bare_leaf([x509.DNSName("pst.example.org")], p384))
    assert why == "subject public key: only P-256 and Ed25519 keys are certified"
    why = check().check(_bare_leaf([x509.RFC822Name("a@example.org")]))
    assert why == "subjectAltName: a rfc822Name entry (only DNS names, IP addresses, one app URI)"
    why = check().check(_bare_leaf([x509.DNSName("pst.example.org"), x509.DNSName("*.example.org")]))
    assert why is not None and "not allowed" in why


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600))
def test_fuzz_random_bytes_are_never_signed(data: bytes) -> None:
    why = check().check(data)
    assert isinstance(why, str) and why


_VALID = leaf_tbs(["pst.example.org"])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=len(_VALID) - 1), st.integers(min_value=1, max_value=255))
def test_fuzz_a_changed_byte_of_a_good_leaf_never_crashes_the_check(position: int, flip: int) -> None:
    data = bytearray(_VALID)
    data[position] ^= flip
    why = check().check(bytes(data))
    if why is None:
        # Whatever it accepted is still a leaf inside the policy (e.g. another serial or key bit).
        leaf = decode_tbs(bytes(data))
        assert not leaf.ca and set(leaf.names) <= POLICY.profiles[0].names | POLICY.profiles[1].names
        assert leaf.not_after - leaf.not_before <= C.period_length + GRACE + 2


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.sampled_from(["pst.example.org", "127.0.0.1", "127.0.0.4", "x.example", "10.0.0.9"]),
        min_size=1,
    ),
    st.integers(min_value=-4000, max_value=4000),
    st.integers(min_value=1, max_value=100_000),
)
def test_a_leaf_is_signed_exactly_when_its_names_and_validity_are_allowed(
    names: list[str], start_offset: int, length: int
) -> None:
    start = int(NOW) + start_offset
    tbs = leaf_tbs(sorted(set(names)), validity=(start, start + length))
    why = check().check(tbs)
    allowed = set(names) <= {"pst.example.org", "127.0.0.1", "127.0.0.4"}
    timely = (
        length <= C.period_length + GRACE + 2
        and start <= NOW + 30
        and start >= C.period_start(C.period_at(NOW) - 1) - 30
        and start + length >= NOW - 30
    )
    assert (why is None) == (allowed and timely), why


def test_decode_tbs_rejects_non_canonical_der() -> None:
    # A long-form length where the short form fits: same value, not DER.
    good = _VALID
    assert good[0] == 0x30 and good[1] == 0x82
    body = good[4:]
    bad = b"\x30\x83\x00" + good[2:4] + body
    with pytest.raises(PolicyError):
        decode_tbs(bad)


# -- scenario H, certificate part: a lying server asks the others to sign outside the policy -------


@pytest.fixture(autouse=True)
def _small_nonce_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(signing, "BATCH", 16)
    monkeypatch.setattr(signing, "LOW_WATER", 4)


SIM_C = Constants(
    n=4,
    t=1,
    period_length=1000.0,
    delta=0.1,
    peers={i: f"127.0.0.1:{7100 + i}" for i in range(1, 5)},
    secrets={SCERT: "ed25519", CA_SECRET: "ed25519"},
)
_SETUPS: dict[int, ServerSetup] = make_network(SIM_C, 33)


class Net:
    """Four ServerCores of one period, the ca check registered on the ``ca`` key of each."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.now = 1.0
        self.cores: dict[int, ServerCore] = {}
        self._queue: list[tuple[float, int, int, int, bytes]] = []
        self._seq = 0
        self.public = _SETUPS[1].public.sharings[CA_SECRET].public_key
        policy = CaPolicy(GRACE, (server_tls_profile(SIM_C),))
        for i, setup in _SETUPS.items():
            core = ServerCore(
                i,
                setup.vstart,
                setup.public,
                setup.private,
                SIM_C,
                seeded_bytes(f"{seed}/{i}".encode()),
                signing=True,
            )
            ca_check = CertificateCheck(SIM_C, lambda: self.public, policy, lambda: self.now)
            core.add_payload_check(CA_SECRET, ca_check)
            core.start_signing()
            self.cores[i] = core
            self.flush(i)

    def service(self, i: int) -> SigningService:
        service = self.cores[i].signing_service(CA_SECRET)
        assert service is not None
        return service

    def flush(self, i: int) -> None:
        for out in self.cores[i].tick(self.now):
            for j in [k for k in self.cores if k != i] if out.to == EVERYONE else [out.to]:
                self._seq += 1
                at = self.now + self.rng.uniform(0.001, 0.03)
                heapq.heappush(self._queue, (at, self._seq, j, i, out.data))

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            nxt = self._queue[0][0] if self._queue else end
            self.now = min(nxt, end, self.now + 0.05)
            while self._queue and self._queue[0][0] <= self.now:
                _, _, to, sender, data = heapq.heappop(self._queue)
                self.cores[to].receive(sender, data, self.now)
                self.flush(to)
            for i in self.cores:
                self.flush(i)
            if self.now >= end:
                return

    def sign(self, i: int, message: bytes) -> bytes | str:
        service = self.service(i)
        try:
            rid = service.request(message, self.now)
        except SigningRefused as exc:
            return f"refused by the coordinator: {exc}"
        self.flush(i)
        for _ in range(200):
            self.run(0.05)
            if rid in service.done:
                return service.done.pop(rid)
            if rid in service.failed:
                return service.failed.pop(rid)
        return "no answer"


class Anything:
    """A broken-into server's "check": it accepts whatever it wants signed."""

    name = "certificate"
    alert = AlertKind.CERTIFICATE_OUTSIDE_POLICY

    def claims(self, message: bytes) -> bool:
        return True

    def check(self, message: bytes) -> str | None:
        return None


def _sim_leaf(
    net: Net, names: list[str], validity: tuple[int, int] | None = None, ca_flag: bool = False
) -> bytes:
    if ca_flag:
        builder = _ca_builder(validity or ca.leaf_validity(SIM_C, net.now, GRACE), SIM_C)
    else:
        builder = ca.leaf_builder(
            root_public=net.public,
            constants=SIM_C,
            subject_key=LEAF_KEY.public_key(),
            names=names,
            eku=ca.TLS_EKU,
            eku_critical=False,
            validity=validity or ca.leaf_validity(SIM_C, net.now, GRACE),
        )
    return ca.tbs_of(builder, net.public)


def test_the_network_signs_its_root_and_an_allowed_leaf_that_openssl_verifies(tmp_path: Path) -> None:
    net = Net(1)
    net.run(0.2)
    root_builder = ca.root_builder(net.public, SIM_C)
    root_tbs = ca.tbs_of(root_builder, net.public)
    sig = net.sign(2, root_tbs)
    assert isinstance(sig, bytes), sig
    root = ca.assemble(root_builder, net.public, root_tbs, sig)
    # The ca key is not the group key.
    assert net.public != _SETUPS[1].public.sharings[SCERT].public_key
    tbs = _sim_leaf(net, ["127.0.0.1"])
    sig = net.sign(3, tbs)
    assert isinstance(sig, bytes), sig
    root.verify_directly_issued_by(root)
    assert all(not net.service(i).alerts for i in net.cores)
    # The ca key signs nothing but certificates.
    result = net.sign(1, b"hello")
    assert isinstance(result, str) and "refused" in result
    raw = root.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert raw == net.public


@pytest.mark.parametrize(
    ("what", "reason"),
    [
        ("name", "are not allowed by profile 'server-tls'"),
        ("ca", "a CA certificate"),
        ("year", "longer than a period plus the grace"),
    ],
)
def test_a_lying_server_gets_no_certificate_outside_the_policy_and_is_named(what: str, reason: str) -> None:
    net = Net(2)
    net.run(0.2)
    liar = 4
    net.service(liar).checks = [Anything()]
    now = int(net.now)
    message = {
        "name": lambda: _sim_leaf(net, ["127.0.0.1", "bank.example.com"]),
        "ca": lambda: _sim_leaf(net, [], ca_flag=True),
        "year": lambda: _sim_leaf(net, ["127.0.0.1"], validity=(now, now + 365 * 86400)),
    }[what]()
    result = net.sign(liar, message)
    assert isinstance(result, str), "a lying server got a certificate signed"
    assert result.startswith("refused by its signers' checks"), result
    for i in (1, 2, 3):
        assert f"server {i}: " in result and reason in result
        alerts = [(a.kind, a.server) for a in net.service(i).alerts]
        assert alerts == [(AlertKind.CERTIFICATE_OUTSIDE_POLICY, liar)], (i, alerts)
        assert reason in net.service(i).alerts[0].detail
    # An honest coordinator refuses it itself, before asking anyone.
    assert net.sign(1, message).startswith("refused by the coordinator")  # type: ignore[union-attr]


# -- the [ca] section and [log] tls_cert = "period" -------------------------------------------------


def _node_config(tmp_path: Path, secrets: str, extra: str) -> Path:
    peers = "\n".join(f'{i} = "127.0.0.{i}:{7100 + i}"' for i in range(1, 5))
    path = tmp_path / "config.toml"
    path.write_text(
        f"""[server]
id = 2
listen = "127.0.0.2:7102"
state_dir = "{tmp_path / "state"}"
api_socket = "{tmp_path / "api.sock"}"
[rom]
backend = "simulated"
path = "{tmp_path / "rom"}"
[network]
n = 4
t = 1
period_seconds = 30
round_ms = 100
genesis = 0.0
secrets = {{ {secrets} }}
[network.peers]
{peers}
{extra}
"""
    )
    return path


WITH_CA = 'scert = "ed25519", ca = "ed25519"'


def test_the_ca_section_sets_the_policy_every_server_checks(tmp_path: Path) -> None:
    from appliance.host import config as node_config
    from appliance.node.ca import period_names, policy_of

    plain = node_config.load(_node_config(tmp_path, WITH_CA, ""))
    assert plain.ca == node_config.CaConfig()
    assert policy_of(plain).grace == 60.0
    assert [p.name for p in policy_of(plain).profiles] == ["server-tls"]
    assert policy_of(plain).profiles[0].names == {"127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4"}
    config = node_config.load(
        _node_config(
            tmp_path,
            WITH_CA,
            '[ca]\ngrace_seconds = 5\ntls_names = ["PST.example.org"]\ntsa_names = ["tsa.example.org"]\n'
            '[log]\ntls = "127.0.0.2:6514"\ntls_cert = "period"\n',
        )
    )
    policy = policy_of(config)
    assert policy.grace == 5.0 and [p.name for p in policy.profiles] == ["server-tls", "tsa"]
    assert "pst.example.org" in policy.profiles[0].names
    assert config.log is not None and config.log.period_cert and config.log.cert is None
    assert period_names(config) == ("127.0.0.2",)  # its own host in C


@pytest.mark.parametrize(
    ("secrets", "extra", "message"),
    [
        ('scert = "ed25519"', "[ca]\n", 'needs ca = "ed25519" in network.secrets'),
        (WITH_CA, "[ca]\ngrace = 5\n", "ca.grace is not a known key"),
        (WITH_CA, "[ca]\ngrace_seconds = -1\n", "ca.grace_seconds must be a number"),
        (WITH_CA, '[ca]\ntls_names = "x"\n', "ca.tls_names must be a list"),
        ('scert = "ed25519", ca = "p256"', "", "'ca' must be an ed25519 (FROST) key"),
        ('scert = "ed25519"', '[log]\ntls_cert = "period"\n', 'needs ca = "ed25519"'),
        (WITH_CA, '[log]\ntls_cert = "files"\n', 'log.tls_cert must be "period"'),
        (WITH_CA, '[log]\ntls_names = ["a"]\n', 'log.tls_names goes with log.tls_cert = "period"'),
        (WITH_CA, '[log]\ntls = "127.0.0.1:6514"\n', 'or log.tls_cert = "period"'),
    ],
)
def test_bad_ca_settings_are_refused_with_the_key(
    tmp_path: Path, secrets: str, extra: str, message: str
) -> None:
    from appliance.host import config as node_config
    from appliance.protocols.state import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        node_config.load(_node_config(tmp_path, secrets, extra))


# -- pst serve's side: where the root comes from, and GET /ca/root.pem --------------------------------


async def test_the_group_root_is_the_stored_one_else_a_peers_else_made() -> None:
    from appliance.node.ca import GroupRoot

    calls: list[tuple[str, str]] = []
    stored: list[bytes] = []
    peers = {2: (404, b""), 3: (200, b"not a root"), 4: (200, b"ROOT-OF-4")}

    async def call(method: str, timeout: float, **args: object) -> object:
        calls.append((method, str(args.get("mode"))))
        if args["mode"] == "stored":
            return stored[0] if stored else None
        if args["mode"] == "offer":
            if args["pem"] != b"ROOT-OF-4":
                raise SigningRefused("ca_root: the offered certificate is refused")
            stored.append(b"ROOT-OF-4")
            return b"ROOT-OF-4"
        return b"MADE"

    fetched: list[str] = []

    async def fetch(url: str) -> tuple[int, bytes]:
        fetched.append(url)
        i = int(url.split("//p")[1].split("/")[0])
        return peers[i]

    urls = {i: f"http://p{i}/" for i in peers}
    root = GroupRoot(call, urls, fetch)
    assert await root.get(stored_only=True) is None
    assert await root.get() == b"ROOT-OF-4"  # server 3's is refused by the key-holder's check
    assert fetched == [f"http://p{i}/ca/root.pem?stored=1" for i in (2, 3, 4)]
    assert await root.get() == b"ROOT-OF-4" and calls[-1] == ("ca_root", "offer")  # cached
    # No peer has one: it is made.
    made = GroupRoot(call, {2: "http://p2"}, fetch)
    stored.clear()
    assert await made.get() == b"MADE" and calls[-1] == ("ca_root", "make")


async def test_get_ca_root_pem(tmp_path: Path) -> None:
    import httpx
    from test_web import make_service

    from appliance.web._app import WebApp

    service, _, _ = make_service(tmp_path)

    def app(ca_root: object) -> httpx.AsyncClient:
        web = WebApp(service.local, None, service.metrics, ca_root=ca_root)  # type: ignore[arg-type]
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=web.asgi), base_url="http://127.0.0.1")

    asked: list[bool] = []

    async def have(stored: bool) -> bytes | None:
        asked.append(stored)
        return None if stored else b"-----BEGIN CERTIFICATE-----\n"

    async def broken(stored: bool) -> bytes | None:
        raise SigningRefused("timed out")

    async with app(have) as c:
        ok = await c.get("/ca/root.pem")
        assert ok.status_code == 200 and ok.headers["content-type"] == "application/x-pem-file"
        assert (await c.get("/ca/root.pem?stored=1")).status_code == 404
        assert (await c.get("/ca/root.pem?stored=2")).status_code == 400
        assert asked == [False, True]
    async with app(None) as c:
        answer = await c.get("/ca/root.pem")
        assert answer.status_code == 404 and "no certificate authority" in answer.text
    async with app(broken) as c:
        assert (await c.get("/ca/root.pem")).status_code == 503
