"""Applications' period certificates over HTTP (``GET /ca/enroll/challenge``, ``POST /ca/enroll``):
the endpoint through the ASGI application, with the CA of tests/test_api_certificate.py (the
signers' own policy check on every leaf, one local key), an operator's enrollment CA made here,
and the request decoder fuzzed. The real cluster is in tests/test_ca_enroll_cluster.py."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from enrollutil import Credential, EnrollCa, make_enroll_ca
from hypothesis import given, settings
from hypothesis import strategies as st
from test_api_certificate import LocalCa, csr_for, verify_chain
from test_web import make_service

from appliance.api._certreg import ClientCA
from appliance.api._core import TokenBucket
from appliance.api._enroll import (
    CHALLENGE_LIFETIME,
    MAX_BODY,
    MAX_CHALLENGES_PER_SOURCE,
    Challenges,
    EnrollCA,
    EnrollError,
    EnrollRequest,
    decode_request,
    enroll_uri,
)
from appliance.web._enroll import EnrollService

APP = "web-tunnel"


@pytest.fixture(scope="module")
def enroll_ca() -> EnrollCa:
    return make_enroll_ca()


@pytest.fixture(scope="module")
def credential(enroll_ca: EnrollCa) -> Credential:
    return enroll_ca.credential(APP)


class Setup:
    def __init__(self, tmp_path: Path, enroll_ca: EnrollCa) -> None:
        self.ca = LocalCa()
        # "db" has a profile but no enroll_ca: it cannot enroll over HTTP.
        self.service = EnrollService(1, {APP: EnrollCA(APP, ClientCA([enroll_ca.cert], "test"))}, self.ca)
        self.web, _, _ = make_service(tmp_path, enroll=self.service.routes())

    def client(self, source: str = "127.0.0.1") -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.web.app.asgi, client=(source, 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:7201")


async def challenge(c: httpx.AsyncClient) -> bytes:
    answer = await c.get("/ca/enroll/challenge")
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert doc["server"] == 1 and doc["expires_in"] == CHALLENGE_LIFETIME
    return base64.b64decode(doc["challenge"])


def body(
    cred: Credential,
    chal: bytes,
    *,
    app: str = APP,
    csr: bytes | None = None,
    names: list[str] | None = None,
    signer: Credential | None = None,
    signed_names: list[str] | None = None,
    server: int = 1,
) -> dict[str, Any]:
    request = EnrollRequest(
        app,
        chal,
        cred.pem,
        b"-",
        csr,
        tuple(signed_names if signed_names is not None else names) if (signed_names or names) else None,
    )
    signature = (signer or cred).sign(request.payload(server))
    out: dict[str, Any] = {
        "app": app,
        "challenge": base64.b64encode(chal).decode(),
        "credential": cred.pem.decode(),
        "signature": base64.b64encode(signature).decode(),
    }
    if csr is not None:
        out["csr"] = csr.decode()
    if names is not None:
        out["names"] = names
    return out


async def enroll(c: httpx.AsyncClient, doc: dict[str, Any]) -> httpx.Response:
    return await c.post("/ca/enroll", json=doc)


def error_of(answer: httpx.Response) -> tuple[int, str, str]:
    err = answer.json()["error"]
    assert err["status"] == answer.status_code
    return answer.status_code, err["code"], err["message"]


async def test_a_csr_with_a_credential_gets_a_logged_certificate_for_the_csr_key(
    tmp_path: Path, enroll_ca: EnrollCa, credential: Credential
) -> None:
    s = Setup(tmp_path, enroll_ca)
    key = ec.generate_private_key(ec.SECP256R1())
    async with s.client() as c:
        answer = await enroll(c, body(credential, await challenge(c), csr=csr_for(key)))
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    assert "key" not in doc
    leaf = verify_chain(doc["certificate"].encode(), s.ca.root)
    assert doc["bundle"] == doc["certificate"] + s.ca.root.decode()
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["tunnel.example.org"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"urn:pst:app:{APP}"]
    assert doc["serial"] == f"{leaf.serial_number:x}"
    assert doc["not_before"] <= doc["renew_after"] <= doc["not_after"]
    # The record names the credential that asked.
    ((client, app, logged),) = s.ca.records
    assert app == APP and logged == doc["certificate"].encode()
    assert client == f"enroll credential {credential.cert.serial_number:x} (CN=tunnel host) app {APP}"
    assert s.service.issued == 1


async def test_the_server_makes_the_key_only_over_tls_or_loopback(
    tmp_path: Path, enroll_ca: EnrollCa, credential: Credential
) -> None:
    s = Setup(tmp_path, enroll_ca)
    async with s.client() as c:
        answer = await enroll(c, body(credential, await challenge(c), names=["a.vpn.example.org"]))
    assert answer.status_code == 200, answer.text
    doc = answer.json()
    key = serialization.load_pem_private_key(doc["key"].encode(), None)
    leaf = verify_chain(doc["certificate"].encode(), s.ca.root)
    assert leaf.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    async with s.client("192.0.2.7") as c:
        answer = await enroll(c, body(credential, await challenge(c)))
    assert error_of(answer)[:2] == (403, "forbidden")
    assert "send a CSR" in error_of(answer)[2]
    async with s.client("192.0.2.7") as c:  # a CSR from afar is fine: no secret travels
        csr = csr_for(ed25519.Ed25519PrivateKey.generate())
        answer = await enroll(c, body(credential, await challenge(c), csr=csr))
    assert answer.status_code == 200, answer.text


async def test_a_challenge_is_good_once_and_at_its_own_server_only(
    tmp_path: Path, enroll_ca: EnrollCa, credential: Credential
) -> None:
    s = Setup(tmp_path, enroll_ca)
    async with s.client() as c:
        chal = await challenge(c)
        assert (await enroll(c, body(credential, chal))).status_code == 200
        again = await enroll(c, body(credential, chal))
        assert error_of(again)[:2] == (403, "forbidden") and "challenge" in error_of(again)[2]
        made_up = await enroll(c, body(credential, bytes(32)))
        assert error_of(made_up)[0] == 403 and "challenge" in error_of(made_up)[2]
        # Signed for server 2's payload: refused here (and the challenge is spent).
        chal = await challenge(c)
        other = await enroll(c, body(credential, chal, server=2))
        assert error_of(other)[0] == 403 and "signature" in error_of(other)[2]
        assert error_of(await enroll(c, body(credential, chal)))[0] == 403
    assert len(s.ca.records) == 1


def _bad_credentials(ca: EnrollCa) -> dict[str, tuple[Credential, str]]:
    other_ca = make_enroll_ca("another CA")
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    return {
        "other CA": (other_ca.credential(APP), "not issued by the enrollment CA"),
        "other app": (ca.credential("db"), "exactly one URI"),
        "no URI": (ca.issue([]), "exactly one URI"),
        "two URIs": (ca.issue([enroll_uri(APP), enroll_uri(APP) + "x"]), "exactly one URI"),
        "a CA": (ca.credential(APP, ca=True), "CA certificate"),
        "expired": (ca.credential(APP, start=old, days=1), "not valid now"),
        "P-384": (ca.credential(APP, key=ec.generate_private_key(ec.SECP384R1())), "Ed25519 or P-256"),
    }


async def test_wrong_credentials_are_refused_with_the_reason(tmp_path: Path, enroll_ca: EnrollCa) -> None:
    s = Setup(tmp_path, enroll_ca)
    async with s.client() as c:
        for what, (cred, reason) in _bad_credentials(enroll_ca).items():
            answer = await enroll(c, body(cred, await challenge(c)))
            status, code, message = error_of(answer)
            assert (status, code) == (403, "forbidden"), what
            assert reason in message, (what, message)
        # A good credential, signed by another key (no proof of possession).
        good = enroll_ca.credential(APP)
        thief = Credential(ec.generate_private_key(ec.SECP256R1()), good.cert)
        answer = await enroll(c, body(good, await challenge(c), signer=thief))
        assert error_of(answer)[0] == 403 and "signature" in error_of(answer)[2]
        # Names changed after signing.
        doc = body(good, await challenge(c), names=["tunnel.example.org"])
        doc["names"] = ["b.vpn.example.org"]
        assert error_of(await enroll(c, doc))[0] == 403
        # A CSR swapped after signing.
        doc = body(good, await challenge(c), csr=csr_for(ec.generate_private_key(ec.SECP256R1())))
        doc["csr"] = csr_for(ec.generate_private_key(ec.SECP256R1())).decode()
        assert error_of(await enroll(c, doc))[0] == 403
    assert s.ca.records == []


async def test_names_outside_the_profile_and_applications_without_enrollment(
    tmp_path: Path, enroll_ca: EnrollCa, credential: Credential
) -> None:
    s = Setup(tmp_path, enroll_ca)
    async with s.client() as c:
        for names in (["db.example.org"], ["a.b.vpn.example.org"], ["tunnel.example.org", "evil.org"]):
            answer = await enroll(c, body(credential, await challenge(c), names=names))
            status, code, message = error_of(answer)
            assert (status, code) == (403, "not-permitted") and "outside the profile" in message, names
        answer = await enroll(c, body(credential, await challenge(c), names=["not a name"]))
        assert error_of(answer)[0] in (400, 403)
        for app in ("db", "nobody"):
            answer = await enroll(c, body(enroll_ca.credential(app), await challenge(c), app=app))
            assert error_of(answer)[:2] == (404, "no-enrollment"), app
        # A CSR whose own signature does not verify.
        doc = body(credential, await challenge(c), csr=b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n")
        answer = await enroll(c, doc)
        assert error_of(answer)[:2] == (400, "bad-request") and "'csr'" in error_of(answer)[2]
    assert s.ca.records == []


async def test_malformed_requests_get_4xx_with_a_json_reason(
    tmp_path: Path, enroll_ca: EnrollCa, credential: Credential
) -> None:
    s = Setup(tmp_path, enroll_ca)
    async with s.client() as c:
        doc = body(credential, await challenge(c))
        answer = await c.post("/ca/enroll", content=json.dumps(doc), headers={"content-type": "text/plain"})
        assert error_of(answer)[:2] == (415, "unsupported-media-type")
        answer = await c.post(
            "/ca/enroll", content=b"{" + b" " * MAX_BODY + b"}", headers={"content-type": "application/json"}
        )
        assert error_of(answer)[:2] == (413, "too-large")
        for raw in (b"", b"[]", b"{", b'{"app": 1}', json.dumps({**doc, "extra": 1}).encode()):
            answer = await c.post("/ca/enroll", content=raw, headers={"content-type": "application/json"})
            assert error_of(answer)[:2] == (400, "bad-request"), raw[:40]
        answer = await c.get("/ca/enroll")
        assert error_of(answer)[:2] == (405, "method-not-allowed") and answer.headers["allow"] == "POST"
        answer = await c.post("/ca/enroll/challenge")
        assert error_of(answer)[0] == 405
        answer = await c.get("/ca/enroll/challenge?x=1")
        assert error_of(answer)[:2] == (400, "bad-request")


async def test_each_application_is_rate_limited(
    tmp_path: Path, enroll_ca: EnrollCa, credential: Credential
) -> None:
    s = Setup(tmp_path, enroll_ca)
    s.service._buckets[APP] = TokenBucket.full(0.5, 1, time.monotonic())
    async with s.client() as c:
        assert (await enroll(c, body(credential, await challenge(c)))).status_code == 200
        answer = await enroll(c, body(credential, await challenge(c)))
    assert error_of(answer)[:2] == (429, "rate-limited") and int(answer.headers["retry-after"]) >= 1


def test_challenges_expire_are_one_time_and_capped_per_source() -> None:
    now = [1000.0]
    challenges = Challenges(lambda: now[0])
    first, expires = challenges.issue("a")
    assert expires == 1000.0 + CHALLENGE_LIFETIME
    assert challenges.take(first) and not challenges.take(first)
    late, _ = challenges.issue("a")
    now[0] += CHALLENGE_LIFETIME + 1
    assert not challenges.take(late)
    mine = [challenges.issue("b")[0] for _ in range(MAX_CHALLENGES_PER_SOURCE + 3)]
    theirs, _ = challenges.issue("c")
    assert len(challenges) == MAX_CHALLENGES_PER_SOURCE + 1
    assert not any(challenges.take(x) for x in mine[:3])  # the oldest of b's went first
    assert challenges.take(mine[-1]) and challenges.take(theirs)


# -- The decoder, fuzzed -----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_random_bodies_never_crash_the_decoder(data: bytes) -> None:
    try:
        decode_request(data)
    except EnrollError as exc:
        assert exc.status in (400, 413)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
_FIELD = st.sampled_from(["app", "challenge", "credential", "csr", "names", "signature", "other"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_FIELD, _json_values, max_size=7))
def test_fuzz_json_objects_are_decoded_or_refused_by_field(obj: dict[str, Any]) -> None:
    try:
        req = decode_request(json.dumps(obj).encode())
    except EnrollError as exc:
        assert exc.status in (400, 413) and "'" in exc.message
        return
    assert isinstance(req, EnrollRequest) and len(req.challenge) == 32


@settings(max_examples=100, deadline=None)
@given(
    app=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64),
    challenge=st.binary(min_size=32, max_size=32),
    credential=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200),
    signature=st.binary(min_size=1, max_size=80),
    names=st.none() | st.lists(st.from_regex(r"[a-z0-9.-]{1,30}", fullmatch=True), min_size=1, max_size=4),
)
def test_well_formed_requests_round_trip(
    app: str, challenge: bytes, credential: str, signature: bytes, names: list[str] | None
) -> None:
    doc: dict[str, Any] = {
        "app": app,
        "challenge": base64.b64encode(challenge).decode(),
        "credential": credential,
        "signature": base64.b64encode(signature).decode(),
        "names": names,
    }
    req = decode_request(json.dumps(doc).encode())
    assert (req.app, req.challenge, req.credential, req.signature) == (
        app,
        challenge,
        credential.encode(),
        signature,
    )
    assert req.names == (tuple(names) if names is not None else None) and req.csr is None
    payload = req.payload(3).decode()
    assert payload.startswith("pst/enroll/v1\nserver=3\n") and f"app={app}\n" in payload


@settings(max_examples=100, deadline=None)
@given(
    server=st.integers(1, 64),
    challenge=st.binary(min_size=32, max_size=32),
    credential=st.binary(max_size=64),
    csr=st.none() | st.binary(max_size=64),
    names=st.none() | st.lists(st.from_regex(r"[a-z0-9.-]{1,30}", fullmatch=True), min_size=1, max_size=4),
)
def test_the_agent_signs_the_payload_the_server_checks(
    server: int, challenge: bytes, credential: bytes, csr: bytes | None, names: list[str] | None
) -> None:
    from test_pst_keys import pst_keys

    request = EnrollRequest(APP, challenge, credential, b"x", csr, tuple(names) if names else None)
    assert pst_keys.enroll_payload(server, challenge, APP, credential, csr, names) == request.payload(server)


async def test_the_openapi_document_lists_the_enrollment_endpoint(
    tmp_path: Path, enroll_ca: EnrollCa
) -> None:
    s = Setup(tmp_path, enroll_ca)
    async with s.client() as c:
        doc = (await c.get("/v1/openapi.json")).json()
    assert doc["paths"]["/ca/enroll/challenge"]["get"]["responses"].keys() == {"200"}
    post = doc["paths"]["/ca/enroll"]["post"]
    assert set(post["responses"]) == {"200", "400", "403", "404", "413", "415", "429", "503"}
    schema = post["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == {"app", "challenge", "credential", "csr", "names", "signature"}
