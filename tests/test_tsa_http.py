"""RFC 3161 over HTTP on the server's HTTP service (``POST /tsa``): through the ASGI application,
and on a real hypercorn with curl posting what ``openssl ts -query`` made."""

from __future__ import annotations

import datetime as dt
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from cryptography.hazmat.primitives import serialization
from test_web import client, free_port, make_service, write_config
from tsautil import StandIn, make_stand_in

from appliance.apps.tsa import rfc3161
from appliance.apps.tsa.authority import (
    DEFAULT_BLOCK,
    Authority,
    MemorySerialStore,
    SerialAllocator,
    TokenRecord,
    serial_server,
)
from appliance.apps.tsa.issuing import STALE_CODE
from appliance.apps.tsa.rfc3161 import Accuracy, FailureInfo, Status
from appliance.apps.tsa.service import authority_from_config, load_period_key
from appliance.apps.tsa.threshold import decode_payload
from appliance.host import config as node_config
from appliance.host.config import HttpConfig
from appliance.protocols.signing import OWN_CHECK, SigningRefused
from appliance.protocols.state import ConfigError
from appliance.web import WebService
from appliance.web._app import SECURITY_HEADERS
from appliance.web._tsa import QUERY_TYPE, REPLY_TYPE, local_signer, network_signer, timestamp_route

POLICY = "1.3.6.1.4.1.57264.2.1"

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def stand_in() -> StandIn:
    return make_stand_in()


def serve(
    tmp_path: Path, stand_in: StandIn, http: HttpConfig | None = None, *, fail_records: bool = False
) -> tuple[WebService, list[TokenRecord]]:
    authority = Authority(
        policy=POLICY,
        accuracy=Accuracy(seconds=1),
        clock=lambda: dt.datetime.now(dt.UTC),
        serials=SerialAllocator(1, MemorySerialStore()),
        chain=stand_in.chain,
    )
    records: list[TokenRecord] = []

    async def record(token: TokenRecord) -> None:
        if fail_records:
            raise OSError("the log is full")
        records.append(token)

    route = timestamp_route(authority, local_signer(stand_in.sign), on_record=record)
    service, _, _ = make_service(tmp_path, http=http, tsa=route)
    return service, records


def openssl(*args: str | Path) -> str:
    done = subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, check=True, timeout=30
    )
    return done.stdout


async def test_post_a_query_get_a_reply_that_openssl_verifies(tmp_path: Path, stand_in: StandIn) -> None:
    stand_in.write(tmp_path)
    (tmp_path / "data.txt").write_bytes(b"posted over HTTP\n")
    openssl("ts", "-query", "-data", tmp_path / "data.txt", "-cert", "-out", tmp_path / "q.tsq")
    service, records = serve(tmp_path, stand_in)
    async with client(service) as c:
        answer = await c.post(
            "/tsa", content=(tmp_path / "q.tsq").read_bytes(), headers={"content-type": QUERY_TYPE}
        )
    assert answer.status_code == 200 and answer.headers["content-type"] == REPLY_TYPE
    assert answer.headers["x-content-type-options"] == "nosniff"
    (tmp_path / "r.tsr").write_bytes(answer.content)
    out = openssl(
        "ts",
        "-verify",
        "-queryfile",
        tmp_path / "q.tsq",
        "-in",
        tmp_path / "r.tsr",
        "-CAfile",
        tmp_path / "root.pem",
    )
    assert "Verification: OK" in out
    assert len(records) == 1
    tst = rfc3161.decode_response(answer.content).tst_info
    assert tst is not None and records[0].serial == rfc3161.decode_tst_info(tst).serial
    # the raw handler is answered with every security header and counted like any route
    assert all(answer.headers[name] == value for name, value in SECURITY_HEADERS.items())
    async with client(service) as c:
        metrics = (await c.get("/metrics")).text
    assert 'pst_http_requests_total{code="200",route="/tsa"} 1.0' in metrics


async def test_bad_posts_get_their_http_status_and_rfc3161_rejection(
    tmp_path: Path, stand_in: StandIn
) -> None:
    service, records = serve(tmp_path, stand_in)
    query = {"content-type": QUERY_TYPE}
    async with client(service) as c:
        wrong_type = await c.post("/tsa", content=b"x", headers={"content-type": "application/json"})
        assert wrong_type.status_code == 415
        assert wrong_type.json()["error"]["code"] == "unsupported-media-type"
        no_type = await c.post("/tsa", content=b"x")
        assert no_type.status_code == 415
        get = await c.get("/tsa")
        assert get.status_code == 405 and get.headers["allow"] == "POST"

        async def rejected(answer: httpx.Response, status: int, failure: FailureInfo) -> str:
            assert answer.status_code == status and answer.headers["content-type"] == REPLY_TYPE
            decoded = rfc3161.decode_response(answer.content)
            assert decoded.status is Status.REJECTION and decoded.failures == {failure}
            return decoded.text or ""

        big = await c.post("/tsa", content=bytes(rfc3161.MAX_REQUEST + 1), headers=query)
        assert "larger than 4096 bytes" in await rejected(big, 413, FailureInfo.BAD_REQUEST)

        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(100):
                yield bytes(100)

        streamed = await c.post("/tsa", content=chunks(), headers=query)
        await rejected(streamed, 413, FailureInfo.BAD_REQUEST)
        garbage = await c.post("/tsa", content=b"\x30\x80garbage", headers=query)
        await rejected(garbage, 200, FailureInfo.BAD_DATA_FORMAT)
        unknown = rfc3161.encode_request("sha256", bytes(32)).replace(  # same length, 1.3.14.3.2.26.0.0.0.0
            bytes.fromhex("0609608648016503040201"), bytes.fromhex("06092b0e03021a00000000")
        )
        text = await rejected(await c.post("/tsa", content=unknown, headers=query), 200, FailureInfo.BAD_ALG)
        assert "hash algorithm 1.3.14.3.2.26.0.0.0.0 not accepted" in text
        policy = rfc3161.encode_request("sha256", bytes(32), policy="1.2.3.4")
        text = await rejected(
            await c.post("/tsa", content=policy, headers=query), 200, FailureInfo.UNACCEPTED_POLICY
        )
        assert "policy 1.2.3.4 not served" in text
        ok = await c.post(
            "/tsa",
            content=rfc3161.encode_request("sha512", bytes(64)),
            headers={"content-type": f"{QUERY_TYPE}; x=1"},
        )
        assert ok.status_code == 200 and rfc3161.decode_response(ok.content).status is Status.GRANTED
    assert len(records) == 1


async def test_a_client_gone_before_its_body_is_not_answered(tmp_path: Path, stand_in: StandIn) -> None:
    service, records = serve(tmp_path, stand_in)
    sent: list[Any] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(message)

    headers = [(b"host", b"127.0.0.1"), (b"content-type", QUERY_TYPE.encode())]
    scope = {"type": "http", "method": "POST", "path": "/tsa", "raw_path": b"/tsa", "query_string": b""}
    await service.app.asgi({**scope, "headers": headers}, receive, send)
    assert sent == [] and records == []


async def test_curl_posts_to_a_real_hypercorn(tmp_path: Path, stand_in: StandIn) -> None:
    stand_in.write(tmp_path)
    (tmp_path / "data.txt").write_bytes(b"posted by curl\n")
    openssl("ts", "-query", "-data", tmp_path / "data.txt", "-sha384", "-cert", "-out", tmp_path / "q.tsq")
    port = free_port()
    service, records = serve(tmp_path, stand_in, HttpConfig(listen=("127.0.0.1", port)))
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        curl = await trio.run_process(
            [
                "curl",
                "-sS",
                "--fail",
                "-H",
                f"Content-Type: {QUERY_TYPE}",
                "--data-binary",
                f"@{tmp_path / 'q.tsq'}",
                "-o",
                str(tmp_path / "r.tsr"),
                "-w",
                "%{http_code} %{content_type}",
                f"http://127.0.0.1:{port}/tsa",
            ],
            capture_stdout=True,
        )
        nursery.cancel_scope.cancel()
    assert curl.stdout.decode() == f"200 {REPLY_TYPE}"
    out = openssl(
        "ts",
        "-verify",
        "-data",
        tmp_path / "data.txt",
        "-in",
        tmp_path / "r.tsr",
        "-CAfile",
        tmp_path / "root.pem",
    )
    assert "Verification: OK" in out and len(records) == 1


# -- the [tsa] section ----------------------------------------------------------------------------


def tsa_section(folder: Path, **overrides: str) -> str:
    keys = {"mode": '"period-key"', "policy": f'"{POLICY}"', "cert": '"tsa.pem"', "key": '"tsa.key"'}
    keys.update(overrides)
    return "[tsa]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items() if v)


def test_config_tsa_section_builds_an_authority_that_serves(tmp_path: Path, stand_in: StandIn) -> None:
    stand_in.write(tmp_path)
    path = write_config(tmp_path, tsa_section(tmp_path, accuracy_ms="1500"))
    tsa = node_config.load(path).tsa
    assert tsa is not None and tsa.cert == tmp_path / "tsa.pem" and tsa.accuracy_ms == 1500
    authority, sign, _ = authority_from_config(tsa, path, 2, tmp_path / "serve")
    assert authority.accuracy == Accuracy(1, 500) and authority.policy == POLICY
    reply = authority.issue(rfc3161.encode_request("sha256", bytes(32), nonce=1), sign)
    assert reply.record is not None and serial_server(reply.record.serial) == 2
    assert (tmp_path / "serve" / "tsa-serial").read_text() == f"{DEFAULT_BLOCK}\n"
    assert node_config.load(write_config(tmp_path, "")).tsa is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mode": '"hybrid"'}, "tsa.mode must be one of period-key, threshold, got 'hybrid'"),
        ({"mode": '"threshold"'}, 'tsa.cert is not used with tsa.mode = "threshold"'),
        ({"mode": '"threshold"', "cert": "", "key": ""}, 'tsa.mode = "threshold" needs the network\'s CA'),
        ({"secret": '"tsa"'}, 'tsa.secret is used only with tsa.mode = "threshold"'),
        ({"policy": ""}, "missing tsa.policy"),
        ({"policy": '"1.3.6.01"'}, "tsa.policy must be an OID"),
        ({"policy": '"3.1"'}, "tsa.policy must be an OID"),
        ({"accuracy_ms": "0"}, "tsa.accuracy_ms must be an integer in 1..3600000"),
        ({"key": ""}, "needs tsa.cert and tsa.key"),
        ({"cert": '"nope.pem"'}, "tsa.cert: no such file"),
        ({"serial": "1"}, "tsa.serial is not a known key"),
    ],
)
def test_config_tsa_errors_name_the_file_and_the_key(
    tmp_path: Path, stand_in: StandIn, overrides: dict[str, str], message: str
) -> None:
    stand_in.write(tmp_path)
    path = write_config(tmp_path, tsa_section(tmp_path, **overrides))
    with pytest.raises(ConfigError) as info:
        node_config.load(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_period_key_files_are_checked_at_start(tmp_path: Path, stand_in: StandIn) -> None:
    stand_in.write(tmp_path)
    path = write_config(tmp_path, tsa_section(tmp_path))
    tsa = node_config.load(path).tsa
    assert tsa is not None
    other = make_stand_in()
    (tmp_path / "tsa.key").write_bytes(
        other.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ConfigError, match="is not the key of the certificate"):
        load_period_key(tsa, path)
    (tmp_path / "tsa.key").write_text("not a key")
    with pytest.raises(ConfigError, match="is not an unencrypted PEM private key"):
        load_period_key(tsa, path)
    (tmp_path / "tsa.pem").write_bytes(other.root.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="key is not ECDSA P-256"):  # the Ed25519 root
        load_period_key(tsa, path)
    (tmp_path / "tsa.pem").write_text("no PEM here")
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        load_period_key(tsa, path)


async def test_a_token_whose_record_cannot_be_logged_is_not_released(
    tmp_path: Path, stand_in: StandIn
) -> None:
    """No record in the secure log, no token: the client gets systemFailure and no TSTInfo."""
    stand_in.write(tmp_path)
    (tmp_path / "data.txt").write_bytes(b"nobody will see this token\n")
    openssl("ts", "-query", "-data", tmp_path / "data.txt", "-out", tmp_path / "q.tsq")
    service, records = serve(tmp_path, stand_in, fail_records=True)
    async with client(service) as c:
        answer = await c.post(
            "/tsa", content=(tmp_path / "q.tsq").read_bytes(), headers={"content-type": QUERY_TYPE}
        )
    assert answer.status_code == 200 and records == []
    (tmp_path / "r.tsr").write_bytes(answer.content)
    text = openssl("ts", "-reply", "-in", tmp_path / "r.tsr", "-text")
    assert "Status: Rejected" in text and "could not be recorded in the secure log" in text
    assert "TST info:\nNot included." in text


async def _post_with(tmp_path: Path, stand_in: StandIn, sign_dss: Any) -> tuple[bytes, list[TokenRecord]]:
    authority = Authority(
        policy=POLICY,
        accuracy=Accuracy(seconds=1),
        clock=lambda: dt.datetime.now(dt.UTC),
        serials=SerialAllocator(1, MemorySerialStore()),
        chain=stand_in.chain,
    )
    records: list[TokenRecord] = []

    async def record(token: TokenRecord) -> None:
        records.append(token)

    route = timestamp_route(authority, network_signer(sign_dss, timeout=0.5), on_record=record)
    service, _, _ = make_service(tmp_path, tsa=route)
    query = rfc3161.encode_request("sha256", bytes(32), nonce=5)
    async with client(service) as c:
        answer = await c.post("/tsa", content=query, headers={"content-type": QUERY_TYPE})
    assert answer.status_code == 200
    return answer.content, records


async def test_threshold_signer_failures_are_rfc3161_system_failures_with_the_reason(
    tmp_path: Path, stand_in: StandIn
) -> None:
    """The network's refusal (the presignature stock ran dry) and its silence (a timeout) both
    get systemFailure, saying why; no token, no record."""

    async def dry(payload: bytes, timeout: float) -> bytes:
        raise SigningRefused("sign/tsa: no presignature in stock: none was made in 5 s")

    body, records = await _post_with(tmp_path, stand_in, dry)
    reply = rfc3161.decode_response(body)
    assert reply.failures == {FailureInfo.SYSTEM_FAILURE} and not records
    assert "no presignature in stock" in (reply.text or "")

    async def silent(payload: bytes, timeout: float) -> bytes:
        await trio.sleep(timeout + 1)
        raise AssertionError("not reached")

    async def bounded(payload: bytes, timeout: float) -> bytes:
        with trio.fail_after(timeout):
            return await silent(payload, timeout)

    body, records = await _post_with(tmp_path / "2", stand_in, bounded)
    reply = rfc3161.decode_response(body)
    assert reply.failures == {FailureInfo.SYSTEM_FAILURE} and "did not sign within 0.5 s" in (
        reply.text or ""
    )


@pytest.mark.parametrize(
    "refusal",
    [
        # Our own check, run again after the request waited for a presignature.
        SigningRefused("sign/tsa: this server now refuses the timestamp: ...", code=STALE_CODE),
        # Our own check when the request reached the key-holder (it waited in the link).
        SigningRefused("this server refuses the timestamp: ...", code=STALE_CODE),
        # The code decides, whatever the text says.
        SigningRefused("any words at all", code="own-check/time-off"),
    ],
)
async def test_a_stale_gentime_is_proposed_again_once(
    tmp_path: Path, stand_in: StandIn, refusal: SigningRefused
) -> None:
    """The coordinator's own check refused its proposal after waiting for a presignature: the
    route proposes a fresh TSTInfo (new genTime, new serial) and that one is signed."""
    payloads: list[bytes] = []

    async def sign_dss(payload: bytes, timeout: float) -> bytes:
        payloads.append(payload)
        if len(payloads) == 1:
            raise refusal
        tst, _cert = decode_payload(payload)
        return stand_in.sign(rfc3161.signed_attributes(tst, stand_in.chain))

    body, records = await _post_with(tmp_path, stand_in, sign_dss)
    reply = rfc3161.decode_response(body)
    assert reply.tst_info is not None and len(payloads) == 2 and len(records) == 1

    # Not retried: the others' refusal (no code, though its text quotes a genTime refusal), and
    # our own check refusing for another reason than the genTime.
    for i, other in enumerate(
        [
            SigningRefused(
                "sign/tsa: refused by its signers' checks (server 2: this server refuses the "
                "timestamp: proposed genTime ... is -1.2 s from our clock)"
            ),
            SigningRefused("this server refuses the timestamp: proposed genTime ...", code=OWN_CHECK),
        ]
    ):
        asked: list[bytes] = []

        async def others_refuse(
            payload: bytes, timeout: float, exc: SigningRefused = other, asked: list[bytes] = asked
        ) -> bytes:
            asked.append(payload)
            raise exc

        body, none = await _post_with(tmp_path / f"other-{i}", stand_in, others_refuse)
        assert rfc3161.decode_response(body).failures == {FailureInfo.SYSTEM_FAILURE} and not none
        assert len(asked) == 1
    serials = [rfc3161.decode_tst_info(decode_payload(p)[0]).serial for p in payloads]
    assert serials[0] != serials[1] == records[0].serial
