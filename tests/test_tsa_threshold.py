"""Threshold mode of the timestamping authority (appliance/apps/tsa/threshold.py) in the seeded
simulation of protocols/dss_signing.py: four servers sign tokens with the P-256 secret ``tsa``,
each running the TimestampCheck with its own clock before it gives a share.

The TSA certificate is issued by the group root of a stand-in ``ca`` key (a local Ed25519 key,
the root and the leaf built as the network builds them: appliance/apps/ca/x509.py); the cluster
test (tests/test_tsa_threshold_cluster.py) has the group's CA issue it with the threshold key.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from rfc3161_client import TimestampRequestBuilder, VerifierBuilder, decode_timestamp_response
from test_dss_signing import Net

from appliance.apps.ca import x509 as ca
from appliance.apps.ca.policy import IssuedCheck, tsa_profile
from appliance.apps.tsa import rfc3161
from appliance.apps.tsa.authority import Authority, MemorySerialStore, Prepared, SerialAllocator
from appliance.apps.tsa.issuing import STALE_CODE
from appliance.apps.tsa.rfc3161 import Accuracy, SigningChain
from appliance.apps.tsa.threshold import NoTimestamps, TimestampCheck, decode_payload, encode_payload
from appliance.crypto import dss, encoding
from appliance.protocols._core import AlertKind
from appliance.protocols.signing import OWN_CHECK, SigningRefused, refusal_code
from appliance.protocols.state import CA_SECRET, SCERT, Constants

POLICY = "1.3.6.1.4.1.99999.1.1"
ACCURACY = Accuracy(1, 0)
#: The simulation's clocks start now (openssl checks the certificate's validity at its own time).
EPOCH = dt.datetime.now(dt.UTC).replace(second=0, microsecond=0)
TSA_NAME = "tsa.example.org"
GRACE = 60.0
#: C of the stand-in network: a period of 30 days around EPOCH (the leaf is valid for it).
C = Constants(
    n=4,
    t=1,
    period_length=30 * 86400.0,
    delta=0.1,
    genesis=EPOCH.timestamp() - 86400.0,
    peers={i: f"127.0.0.{i}:{7100 + i}" for i in range(1, 5)},
    secrets={SCERT: "ed25519", CA_SECRET: "ed25519", "tsa": "p256"},
)


def raw(key: ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def group_certificate(
    ca_key: ed25519.Ed25519PrivateKey,
    subject_key: Any,
    *,
    names: tuple[str, ...] = (TSA_NAME,),
    validity: tuple[int, int] | None = None,
    issuer: x509.Name | None = None,
) -> bytes:
    """A leaf of the ``tsa`` profile by the group root of ``ca_key`` (the network's two passes)."""
    public = raw(ca_key)
    builder = ca.leaf_builder(
        root_public=public,
        constants=C,
        subject_key=subject_key,
        names=list(names),
        eku=list(ca.TSA_EKU),
        eku_critical=True,
        validity=validity or ca.leaf_validity(C, EPOCH.timestamp(), GRACE),
        issuer=issuer,
    )
    tbs = ca.tbs_of(builder, public)
    return ca.assemble(builder, public, tbs, ca_key.sign(tbs)).public_bytes(serialization.Encoding.DER)


class Setup:
    """A net whose servers check timestamps; ``offset[i]``: how far server i's clock is off."""

    def __init__(self, seed: int, offset: dict[int, float] | None = None) -> None:
        self.net = Net(4, 1, seed=seed)
        self.offset = offset or {}
        self.public = dss.cryptography_public_key(self.net.group, self.net.public_key())
        self.spki = self.public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.root_key = ed25519.Ed25519PrivateKey.generate()  # stands in for the ca key
        builder = ca.root_builder(raw(self.root_key), C)
        tbs = ca.tbs_of(builder, raw(self.root_key))
        self.root = ca.assemble(builder, raw(self.root_key), tbs, self.root_key.sign(tbs))
        self.cert = self.certificate(self.public)
        self.chain = SigningChain(self.cert)
        for i, service in self.net.services.items():
            service.checks.append(self.check(i))

    def check(self, i: int) -> TimestampCheck:
        issued = IssuedCheck(C, lambda: raw(self.root_key), tsa_profile([TSA_NAME]), GRACE)
        return TimestampCheck(
            policy=POLICY, accuracy=ACCURACY, clock=self.clock(i), public_key=lambda: self.spki, issued=issued
        )

    def certificate(self, public: Any) -> bytes:
        return group_certificate(self.root_key, public)

    def clock(self, i: int) -> Any:
        return lambda: EPOCH + dt.timedelta(seconds=self.net.sim.now + self.offset.get(i, 0.0))

    def authority(self, coordinator: int, serial_id: int | None = None) -> Authority:
        return Authority(
            policy=POLICY,
            accuracy=ACCURACY,
            clock=self.clock(coordinator),
            serials=SerialAllocator(serial_id or coordinator, MemorySerialStore()),
            chain=self.chain,
        )

    def prepare(self, authority: Authority, nonce: int = 7) -> Prepared:
        prepared = authority.prepare(
            rfc3161.encode_request("sha256", bytes(range(32)), nonce=nonce, cert_req=True)
        )
        assert isinstance(prepared, Prepared)
        return prepared

    def request(self, coordinator: int, message: bytes) -> str | bytes:
        """Ask the network; the DER signature, or the failure's text."""
        service = self.net.services[coordinator]
        rid = service.request(message, self.net.sim.now)
        self.net.run_until(self.net.sim.now + 20.0, lambda: rid in service.done or rid in service.failed)
        return service.done.pop(rid).der if rid in service.done else service.failed[rid]

    def alerts(self) -> set[tuple[AlertKind, int, int]]:
        """(kind, server named, server that raised it)."""
        return {(a.kind, a.server, i) for i, s in self.net.services.items() for a in s.alerts}


def test_tokens_signed_by_t_plus_1_checking_servers_verify_with_openssl(tmp_path: Path) -> None:
    setup = Setup(31, offset={2: 0.4, 3: -0.3})  # clocks apart, within the stated accuracy
    setup.net.fill([1, 3])
    for coordinator in (1, 3):
        authority = setup.authority(coordinator)
        prepared = setup.prepare(authority)
        signature = setup.request(coordinator, encode_payload(prepared.tst_info_der, setup.cert))
        assert isinstance(signature, bytes), signature
        reply = authority.finish(prepared, signature)
        assert reply.record is not None and reply.record.serial >> 64 == coordinator
        (tmp_path / "root.pem").write_bytes(setup.root.public_bytes(serialization.Encoding.PEM))
        (tmp_path / "r.tsr").write_bytes(reply.body)
        (tmp_path / "q.tsq").write_bytes(
            rfc3161.encode_request("sha256", bytes(range(32)), nonce=7, cert_req=True)
        )
        out = subprocess.run(
            ["openssl", "ts", "-verify", "-queryfile", "q.tsq", "-in", "r.tsr", "-CAfile", "root.pem"],
            cwd=tmp_path, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert "Verification: OK" in out.stdout, out.stdout + out.stderr
    # rfc3161-client (PyPI) verifies a threshold token too.
    message = b"a message for rfc3161-client"
    request = (
        TimestampRequestBuilder().data(message).nonce(nonce=True).cert_request(cert_request=True).build()
    )
    authority = setup.authority(1)
    prepared = authority.prepare(request.as_bytes())
    assert isinstance(prepared, Prepared)
    signature = setup.request(1, encode_payload(prepared.tst_info_der, setup.cert))
    assert isinstance(signature, bytes), signature
    response = decode_timestamp_response(authority.finish(prepared, signature).body)
    verifier = (
        VerifierBuilder.from_request(request)
        .tsa_certificate(x509.load_der_x509_certificate(setup.cert))
        .add_root_certificate(setup.root)
        .policy_id(x509.ObjectIdentifier(POLICY))
        .build()
    )
    assert verifier.verify_message(response, message) is True
    assert setup.alerts() == set()


def test_a_coordinator_an_hour_off_gets_no_signature_and_is_named_by_every_signer() -> None:
    setup = Setup(32, offset={1: 3600.0})
    setup.net.fill([1])
    prepared = setup.prepare(setup.authority(1))
    failure = setup.request(1, encode_payload(prepared.tst_info_der, setup.cert))
    assert isinstance(failure, str) and "refused by its signers' checks" in failure
    assert "+3599.9" in failure and "beyond the stated accuracy of 1.0 s" in failure
    assert setup.alerts() == {(AlertKind.TIMESTAMP_TIME_OFF, 1, i) for i in (2, 3, 4)}


@pytest.mark.parametrize(
    ("offset", "named"),
    [(-3.0, False), (-9.0, False), (-13.0, True), (-60.0, True), (3.0, True)],
)
def test_a_genTime_that_may_have_arrived_late_is_refused_without_naming_anyone(
    offset: float, named: bool
) -> None:
    """Behind the signers' clocks by up to LATE_GRACE (10 s) beyond the accuracy (1 s), a proposal
    may just have been delayed on the way: every signer refuses it (no token) but names nobody.
    Further behind, or ahead of their clocks by more than the accuracy, each names the coordinator."""
    setup = Setup(34, offset={1: offset})
    setup.net.fill([1])
    prepared = setup.prepare(setup.authority(1))
    failure = setup.request(1, encode_payload(prepared.tst_info_der, setup.cert))
    assert isinstance(failure, str) and "refused by its signers' checks" in failure
    assert "beyond the stated accuracy of 1.0 s" in failure
    expected = {(AlertKind.TIMESTAMP_TIME_OFF, 1, i) for i in (2, 3, 4)} if named else set()
    assert setup.alerts() == expected


def test_a_byzantine_coordinator_skipping_its_own_check_is_refused_by_the_others() -> None:
    setup = Setup(33)
    setup.net.services[1].checks = [AcceptAll()]  # it signs anything itself; the others check
    setup.net.fill([1])
    # A serial of server 2's range, from server 1.
    prepared = setup.prepare(setup.authority(1, serial_id=2))
    failure = setup.request(1, encode_payload(prepared.tst_info_der, setup.cert))
    assert isinstance(failure, str) and "is not from server 1" in failure
    # Bare signed attributes (what a token's signature covers) instead of a payload.
    failure = setup.request(1, prepared.to_sign)
    assert isinstance(failure, str) and "not a timestamp payload" in failure
    # A certificate for another key.
    other = setup.certificate(ed25519_free_p256())
    failure = setup.request(1, encode_payload(setup.prepare(setup.authority(1)).tst_info_der, other))
    assert isinstance(failure, str) and "not for the network's TSA key" in failure
    # A certificate for the network's key, of the tsa profile, naming the group root as its
    # issuer, but signed by a root of the coordinator's own (a token under it verifies for
    # whoever trusts that root): it does not chain to the group root.
    stranger = group_certificate(ed25519.Ed25519PrivateKey.generate(), setup.public)
    assert x509.load_der_x509_certificate(stranger).issuer == setup.root.subject  # it looks the part
    failure = setup.request(1, encode_payload(setup.prepare(setup.authority(1)).tst_info_der, stranger))
    assert isinstance(failure, str) and "refused by its signers' checks" in failure
    assert "not the group's TSA certificate: not signed by the group root's key" in failure
    assert setup.alerts() == {(AlertKind.TIMESTAMP_OUTSIDE_POLICY, 1, i) for i in (2, 3, 4)}


def test_the_check_accepts_only_the_group_s_tsa_certificate_valid_at_the_gentime() -> None:
    """Each way a certificate for the network's key can fail to be the group's TSA certificate,
    refused by a signer's check with ``timestamp-outside-policy``, and the group's own accepted."""
    setup = Setup(37)
    tst = setup.prepare(setup.authority(1)).tst_info_der
    now = int(EPOCH.timestamp())
    group, public = setup.root_key, setup.public
    cases = {
        "not signed by the group root's key": group_certificate(ed25519.Ed25519PrivateKey.generate(), public),
        "the issuer is not the group root": group_certificate(
            group, public, issuer=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "another root")])
        ),
        "are not allowed by profile 'tsa'": group_certificate(group, public, names=("evil.example.org",)),
        "longer than a period plus the grace": group_certificate(
            group, public, validity=(now - 86400, now + int(C.period_length))
        ),
        "outside the token's certificate's validity": group_certificate(
            group, public, validity=(now - 7200, now - 3600)
        ),
    }
    for expected, certificate in cases.items():
        check = setup.check(2)
        reason = check.check_from(encode_payload(tst, certificate), 1)
        assert reason is not None and expected in reason, (expected, reason)
        assert check.alert is AlertKind.TIMESTAMP_OUTSIDE_POLICY
    assert setup.check(2).check_from(encode_payload(tst, setup.cert), 1) is None
    # A signer that does not know the group's ca key yet signs nothing.
    blind = TimestampCheck(
        policy=POLICY, accuracy=ACCURACY, clock=setup.clock(2), public_key=lambda: setup.spki,
        issued=IssuedCheck(C, lambda: None, tsa_profile([TSA_NAME]), GRACE),
    )  # fmt: skip
    reason = blind.check_from(encode_payload(tst, setup.cert), 1)
    assert reason is not None and "does not know the group's ca key yet" in reason


def test_a_proposal_gone_stale_is_refused_by_its_own_coordinator_with_a_code() -> None:
    """The coordinator's request waits for a presignature while its genTime goes stale: its own
    check, run again before anything is sent, refuses it with the code the authority acts on
    (``own-check/time-off``: it proposes a fresh TSTInfo, apps/tsa/issuing.py), and no signer
    saw it (no alert). Asked again with that proposal, it refuses at once, with the same code."""
    setup = Setup(38)
    service = setup.net.services[1]
    payload = encode_payload(setup.prepare(setup.authority(1)).tst_info_der, setup.cert)
    rid = service.request(payload, setup.net.sim.now)  # no presignature in stock yet: it waits
    setup.offset[1] = 2.0  # meanwhile our clock moved on beyond the stated accuracy (1 s)
    setup.net.run_until(setup.net.sim.now + 20.0, lambda: rid in service.done or rid in service.failed)
    failure = service.failed.get(rid)
    assert failure is not None and "this server now refuses the timestamp" in failure, failure
    assert refusal_code(failure) == STALE_CODE == "own-check/time-off"
    assert setup.alerts() == set()
    with pytest.raises(SigningRefused) as refused:
        service.request(payload, setup.net.sim.now)
    assert refused.value.code == STALE_CODE
    # A refusal for another reason carries another code (not retried): a serial of another server.
    other = encode_payload(setup.prepare(setup.authority(1, serial_id=2)).tst_info_der, setup.cert)
    with pytest.raises(SigningRefused) as refused:
        service.request(other, setup.net.sim.now)
    assert refused.value.code == OWN_CHECK


class AcceptAll:
    name = "timestamp"
    alert = AlertKind.TIMESTAMP_OUTSIDE_POLICY

    def claims(self, message: bytes) -> bool:
        return True

    def check(self, message: bytes) -> str | None:
        return None


def ed25519_free_p256() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).public_key()


def test_the_tsa_key_signs_nothing_else_even_for_its_own_server() -> None:
    setup = Setup(34)
    with pytest.raises(SigningRefused, match="not a timestamp payload"):
        setup.net.services[1].request(b"an arbitrary message", 0.0)
    other = Setup(34)
    authority = Authority(
        policy="1.2.3", accuracy=ACCURACY, clock=other.clock(1),
        serials=SerialAllocator(1, MemorySerialStore()), chain=other.chain,
    )  # fmt: skip
    with pytest.raises(SigningRefused, match=r"proposed policy 1\.2\.3 is not ours"):
        other.net.services[1].request(encode_payload(other.prepare(authority).tst_info_der, other.cert), 0.0)


def test_a_server_not_in_threshold_mode_gives_no_share_of_the_tsa_key() -> None:
    # A Byzantine coordinator sends bare signed attributes (what a token's signature covers).
    # Servers 2-4 have no threshold [tsa] (the key-holder installs NoTimestamps for C's tsa
    # secret then): without that check, the key would sign whatever it is sent.
    setup = Setup(35)
    setup.net.services[1].checks = [AcceptAll()]
    for i in (2, 3, 4):
        setup.net.services[i].checks = [NoTimestamps()]
    setup.net.fill([1])
    prepared = setup.prepare(setup.authority(1))
    failure = setup.request(1, prepared.to_sign)
    assert isinstance(failure, str) and "does not stamp with this key" in failure


@settings(max_examples=150, deadline=None)
@given(
    st.binary(max_size=300)
    | st.builds(encoding.encode, st.dictionaries(st.text(max_size=5), st.binary(max_size=20)))
    | st.builds(encode_payload, st.binary(max_size=200), st.binary(max_size=200))
)
def test_fuzz_the_payload_decoder_and_the_check_never_raise(data: bytes) -> None:
    issued = IssuedCheck(C, lambda: None, tsa_profile([TSA_NAME]), GRACE)
    check = TimestampCheck(
        policy=POLICY, accuracy=ACCURACY, clock=lambda: EPOCH, public_key=lambda: None, issued=issued
    )
    with contextlib.suppress(ValueError):
        decode_payload(data)
    assert isinstance(check.check_from(data, 1), str)
    assert check.alert is AlertKind.TIMESTAMP_OUTSIDE_POLICY
