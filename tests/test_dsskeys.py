"""Per-application DSS keys (apps/dsskeys): the payload, the registry, and every signer's check
on a seeded network of DSS services (the harness of test_dss_signing)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dss_signing import Net

from appliance.apps.dsskeys import model
from appliance.apps.dsskeys.model import AppKeyCheck, Entry, KeyRecord, Registry, RegistryFile, SignRequest
from appliance.crypto import appkeys, dss, encoding
from appliance.crypto.errors import DecodeError
from appliance.protocols import dss_signing
from appliance.protocols._core import AlertKind
from appliance.protocols.signing import NotYet, SigningRefused

OWNER = b"client-1"


@pytest.fixture(autouse=True)
def _small_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dss_signing, "BATCH", 2)
    monkeypatch.setattr(dss_signing, "LOW_WATER", 2)


def registry(**owners: bytes) -> Any:
    keys = {("billing", name): Entry(owner, "p256") for name, owner in owners.items()}
    return lambda app, name: keys.get((app, name))


def app_net(seed: int, lookups: dict[int, Any]) -> Net:
    net = Net(4, 1, seed=seed)
    for i, service in net.services.items():
        service.checks = [AppKeyCheck("p256", lookups.get(i, registry(invoices=OWNER)))]
        service.only_checked = True
    return net


def request(message: bytes, uid: bytes = OWNER, key: str = "invoices") -> bytes:
    return SignRequest("billing", uid, key, "p256", message).encode()


def test_an_application_key_signs_through_the_network_and_only_its_key_verifies() -> None:
    net = app_net(31, {})
    net.fill([1])
    sig = net.sign(1, request(b"invoice 17"))
    base = net.public_key()
    mine = appkeys.app_public_key(net.group, base, "billing", "invoices")
    assert dss.verify_with_cryptography(net.group, mine, b"invoice 17", sig.der)
    assert not dss.verify_with_cryptography(net.group, base, b"invoice 17", sig.der)
    assert not dss.verify_with_cryptography(
        net.group, appkeys.app_public_key(net.group, base, "billing", "other"), b"invoice 17", sig.der
    )
    assert not any(s.alerts for s in net.services.values())


def test_a_coordinator_asking_for_another_clients_key_gets_no_share_and_is_named() -> None:
    # Server 1 is broken into: its registry says the key is mallory's; the others know better.
    net = app_net(32, {1: registry(invoices=b"mallory")})
    net.fill([1])
    service = net.services[1]
    rid = service.request(request(b"pay mallory", uid=b"mallory"), net.sim.now)
    net.run_until(net.sim.now + 20.0, lambda: rid in service.failed or rid in service.done)
    assert rid not in service.done and "belongs to another client" in service.failed[rid]
    named = {
        (i, a.server)
        for i, s in net.services.items()
        for a in s.alerts
        if a.kind == AlertKind.APP_KEY_REFUSED
    }
    assert named and all(server == 1 for _, server in named)


def test_an_honest_coordinator_refuses_a_request_for_a_key_its_client_does_not_own() -> None:
    net = app_net(33, {})
    with pytest.raises(SigningRefused, match="belongs to another client"):
        net.services[1].request(request(b"x", uid=b"someone else"), 0.0)
    with pytest.raises(SigningRefused, match="no key 'nope'"):
        net.services[1].request(request(b"x", key="nope"), 0.0)
    with pytest.raises(SigningRefused, match="signs only what its checks accept"):
        net.services[1].request(b"a raw message for the base key", 0.0)


def test_a_signer_whose_store_lags_refuses_without_an_alert_and_another_signs() -> None:
    net = app_net(34, {2: registry()})
    net.fill([1])
    sig = net.sign(1, request(b"invoice 18"))
    mine = appkeys.app_public_key(net.group, net.public_key(), "billing", "invoices")
    assert dss.verify_with_cryptography(net.group, mine, b"invoice 18", sig.der)
    assert not any(s.alerts for s in net.services.values())


def test_the_check_refuses_another_group_and_not_yet_accuses_nobody() -> None:
    check = AppKeyCheck("p256", registry(invoices=OWNER))
    dsa = SignRequest("billing", OWNER, "invoices", "dsa2048", b"m").encode()
    assert check.claims(dsa) and "dsa2048 key asked of the p256" in str(check.check(dsa))
    assert isinstance(check.check(request(b"m", key="later")), NotYet)
    assert check.check(request(b"m")) is None and check.signed_bytes(request(b"m")) == b"m"
    assert not check.claims(b"raw") and not check.claims(encoding.encode({"dom": "other"}))


def test_the_registry_round_trips_and_is_read_again_when_the_file_changes(tmp_path: Path) -> None:
    class Rec:
        def __init__(self, app: str, data_id: str, owner: bytes, value: bytes) -> None:
            self.app, self.data_id, self.owner, self.value = app, data_id, owner, value

    good = KeyRecord("p256").encode()
    reg = Registry.from_records(
        [
            Rec("a", "dss-key/k", b"o", good),
            Rec("a", "other", b"o", good),
            Rec("b", "dss-key/x", b"o", b"junk"),
        ]
    )
    assert reg.keys == {("a", "k"): Entry(b"o", "p256")}
    assert Registry.decode(reg.encode()) == reg
    path = tmp_path / "dss-keys"
    file = RegistryFile(path)
    assert file.lookup("a", "k") is None
    path.write_bytes(reg.encode())
    assert file.lookup("a", "k") == Entry(b"o", "p256")
    path.write_bytes(Registry({("a", "k"): Entry(b"o", "dsa2048"), ("a", "j"): Entry(b"p", "p256")}).encode())
    assert file.lookup("a", "k") == Entry(b"o", "dsa2048") and file.lookup("a", "j") == Entry(b"p", "p256")
    path.write_bytes(b"garbage")  # unreadable: no key known (the check says not yet), no exception
    assert file.lookup("a", "k") is None


def test_the_stores_rule_for_key_records() -> None:
    good = KeyRecord("dsa2048").encode()
    assert model.check_key_write("a", "k", good, 0) is None
    assert "most it may have" in str(model.check_key_write("a", "k", good, model.MAX_KEYS))
    assert "key name" in str(model.check_key_write("a", "", good, 0))
    assert "not a key record" in str(
        model.check_key_write("a", "k", encoding.encode({"dom": "x", "group": "p256"}), 0)
    )
    assert "is not one of" in str(
        model.check_key_write("a", "k", encoding.encode({"dom": model.DOMAIN, "group": "rsa"}), 0)
    )


valid = SignRequest("billing", OWNER, "invoices", "p256", b"message").encode()


@settings(max_examples=300, deadline=None)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.builds(
            lambda cut, flip: valid[:cut] + bytes([valid[cut % len(valid)] ^ flip]) + valid[cut + 1 :],
            st.integers(0, len(valid) - 1),
            st.integers(1, 255),
        ),
        st.dictionaries(
            st.sampled_from(["dom", "app", "uid", "key", "group", "m", "x"]),
            st.one_of(st.text(max_size=70), st.binary(max_size=70), st.integers()),
        ).map(encoding.encode),
    )
)
def test_decoders_raise_only_decode_error(data: bytes) -> None:
    for decode in (SignRequest.decode, KeyRecord.decode, Registry.decode):
        with contextlib.suppress(DecodeError):
            decode(data)
    check = AppKeyCheck("p256", registry(invoices=OWNER))
    if check.claims(data):
        reason = check.check(data)
        assert reason is None or isinstance(reason, str)


def test_the_store_orders_key_records_with_its_rules_and_every_server_agrees() -> None:
    from test_store_model import ALICE, APP, BOB
    from test_store_model import Net as StoreNet

    from appliance.apps.store.model import DataType, WriteRequest

    net = StoreNet()
    record = KeyRecord("p256").encode()
    net.write(WriteRequest(APP, model.data_id("signer"), DataType.PUBLIC_ONCE, 1, value=record), ALICE)
    reg = Registry.from_records(net.states[1].records.values())
    assert reg.keys == {(APP, "signer"): Entry(ALICE.unique_id, "p256")}
    assert "write-once" in net.refused_everywhere(
        WriteRequest(APP, model.data_id("signer"), DataType.PUBLIC_ONCE, 1, value=record), BOB, "exists"
    )
    assert "public-once data a client writes" in net.refused_everywhere(
        WriteRequest(APP, model.data_id("rw"), DataType.PUBLIC_RW, 1, value=record),
        net.quorum(APP, WriteRequest(APP, model.data_id("rw"), DataType.PUBLIC_RW, 1, value=record).digest()),
        "bad-request",
    )
    assert "DSS key record" in net.refused_everywhere(
        WriteRequest(APP, model.data_id("junk"), DataType.PUBLIC_ONCE, 1, value=b"junk"), ALICE, "bad-request"
    )
    for k in range(1, model.MAX_KEYS):
        net.write(WriteRequest(APP, model.data_id(f"k{k}"), DataType.PUBLIC_ONCE, 1, value=record), ALICE)
    assert "most it may have" in net.refused_everywhere(
        WriteRequest(APP, model.data_id("one-more"), DataType.PUBLIC_ONCE, 1, value=record), ALICE, "quota"
    )


async def test_the_api_operations_with_an_applications_key() -> None:
    from test_api import ME, OTHER, FakeBackend, req
    from test_store_api import OneServerStore

    from appliance.api import ApiCore

    class AppDss(FakeBackend):
        async def sign_app_dss(self, group: str, app: str, uid: bytes, key: str, message: bytes) -> bytes:
            return b"der:" + SignRequest(app, uid, key, group, message).encode()

        async def app_dss_public_key(self, group: str, app: str, key: str) -> bytes | None:
            return f"PEM {group} {app} {key}".encode() if group == "p256" else None

    core = ApiCore(AppDss(), data_store=OneServerStore())

    async def handle(unique_id: bytes, peer: Any = ME) -> bytes:
        r = await core.handle(req("register", name="billing", unique_id=unique_id), peer)
        h: bytes = r["result"]["handle"]
        return h

    mine, theirs = await handle(b"alice"), await handle(b"bob")
    r = await core.handle(req("generate_dss_key", handle=mine, name="invoices"), ME)
    assert r["result"] == {"name": "invoices", "group": "p256", "pem": b"PEM p256 billing invoices"}
    again = await core.handle(req("generate_dss_key", handle=mine, name="invoices"), ME)
    assert again["result"] == r["result"]
    taken = await core.handle(req("generate_dss_key", handle=theirs, name="invoices"), ME)
    assert taken["error"]["code"] == "exists"
    no_dsa = await core.handle(req("generate_dss_key", handle=mine, name="d", group="dsa2048"), ME)
    assert no_dsa["error"]["code"] == "unavailable" and "appkeys-dsa2048" in no_dsa["error"]["message"]
    bad_group = await core.handle(req("generate_dss_key", handle=mine, name="d", group="rsa"), ME)
    assert bad_group["error"]["code"] == "bad-request"
    bad_name = await core.handle(req("generate_dss_key", handle=mine, name="a\nb"), ME)
    assert bad_name["error"]["code"] == "bad-request"

    signed = await core.handle(req("dss_sign", handle=mine, key="invoices", message=b"m"), ME)
    sent = SignRequest.decode(signed["result"]["signature"][4:])
    assert sent == SignRequest("billing", b"alice", "invoices", "p256", b"m")
    refused = await core.handle(req("dss_sign", handle=theirs, key="invoices", message=b"m"), ME)
    assert refused["error"]["code"] == "not-permitted"
    missing = await core.handle(req("dss_sign", handle=mine, key="nope", message=b"m"), ME)
    assert missing["error"]["code"] == "not-found"
    big = await core.handle(req("dss_sign", handle=mine, key="invoices", message=b"m" * 64_600), ME)
    assert big["error"]["code"] == "too-large"
    pem = await core.handle(req("dss_public_key", handle=theirs, key="invoices"), ME)
    assert pem["result"] == {"pem": b"PEM p256 billing invoices"}
    for fields in ({}, {"key": "invoices"}, {"secret": "tsa", "handle": mine, "key": "invoices"}):
        r = await core.handle(req("dss_sign", message=b"m", **fields), ME)
        assert r["error"]["code"] == "bad-request", fields
    # The operator's dss_sign on a secret of C is unchanged: not for other users.
    r = await core.handle(req("dss_sign", secret="appkeys-p256", message=b"m"), OTHER)
    assert r["error"]["code"] == "not-permitted"
