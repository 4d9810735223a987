"""Registrations of the local API (issue 10 §3): several handles per registration, release,
idle expiry, the operator's list and revoke, rate-limit waits, and the registration file
(version 2, and version 1 as older servers wrote it).

Core tests drive :class:`ApiCore` directly with an injected clock (no wall-clock waits).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_api import ME, OTHER, Clock, FakeBackend, FakeDistributed, req

from appliance.api import (
    BAD_REQUEST,
    NOT_PERMITTED,
    QUOTA,
    UNKNOWN_HANDLE,
    ApiCore,
    ApiError,
    Limits,
    RegistrationStore,
    parse_request,
)
from appliance.api._core import SWEEP_INTERVAL
from appliance.api._registrations import FORMAT_VERSION, decode_registrations
from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError

DAY = 24 * 3600.0


def core_with(clock: Clock | None = None, **limits: Any) -> ApiCore:
    clock = clock or Clock()
    return ApiCore(FakeBackend(), limits=Limits(control_burst=10_000, **limits), clock=clock, wall=clock)


async def register(
    core: ApiCore, name: str = "my-app", unique_id: bytes = b"default", peer: Any = ME
) -> bytes:
    r = await core.handle(req("register", name=name, unique_id=unique_id), peer)
    assert r["ok"], r
    handle: bytes = r["result"]["handle"]
    return handle


async def code(core: ApiCore, op: str, peer: Any = ME, **fields: Any) -> str:
    r = await core.handle(req(op, **fields), peer)
    return "ok" if r["ok"] else str(r["error"]["code"])


# The documented pattern and parallel use --------------------------------------------------------


async def test_register_sign_exit_never_locks_an_application_out() -> None:
    """The issue's first report: register("my-app"), sign, exit (no unregister), 100 times.
    With the stable default unique id every run is the same registration: no quota builds up."""
    core = core_with(max_registrations=16)
    for _ in range(100):
        h = await register(core)
        assert await code(core, "sign", handle=h, message=b"m") == "ok"
    assert len(core.registry.by_key) == 1 and core.registry.per_uid == {ME.uid: 1}
    # The handles the runs left behind are bounded (the least recently used go first).
    (reg,) = core.registry.by_key.values()
    assert len(reg.handles) == core.limits.max_handles


async def test_random_unique_ids_hit_the_quota_with_a_message_that_says_how_to_recover() -> None:
    clock = Clock()
    core = core_with(clock, max_registrations=16)
    for i in range(16):
        await register(core, unique_id=bytes([i]) * 16)
    r = await core.handle(req("register", name="my-app", unique_id=b"\xff" * 16), ME)
    message = r["error"]["message"]
    assert r["error"]["code"] == QUOTA
    for hint in ("16 registrations, the limit per user", "close()", "pst api registrations", "expires"):
        assert hint in message, hint
    # A day later the abandoned registrations have expired: registering works again.
    clock.now += DAY
    await register(core, unique_id=b"\xff" * 16)
    assert core.registry.per_uid[ME.uid] == 1


async def test_parallel_registrations_of_one_application_keep_their_handles() -> None:
    """Eight runs of a script register the same application at once: each keeps its handle
    until it releases it, and releasing one never breaks another."""
    core = core_with()
    handles = [await register(core) for _ in range(8)]
    for h in handles:
        assert await code(core, "sign", handle=h, message=b"m") == "ok"
    for i, h in enumerate(handles):
        assert await code(core, "unregister", handle=h) == "ok"
        for other in handles[i + 1 :]:
            assert await code(core, "sign", handle=other, message=b"m") == "ok"
    assert not core.registry.by_key and not core.registry.by_handle and ME.uid not in core.registry.per_uid


async def test_beyond_max_handles_the_least_recently_used_is_released() -> None:
    clock = Clock()
    core = core_with(clock, max_handles=3)
    h1 = await register(core)
    clock.now += 1
    h2 = await register(core)
    clock.now += 1
    h3 = await register(core)
    clock.now += 1
    assert await code(core, "sign", handle=h1, message=b"m") == "ok"  # h1 is now the most recent
    clock.now += 1
    h4 = await register(core)
    assert await code(core, "sign", handle=h2, message=b"m") == UNKNOWN_HANDLE
    for h in (h1, h3, h4):
        assert await code(core, "sign", handle=h, message=b"m") == "ok"


async def test_handles_of_a_registration_share_its_quota() -> None:
    core = core_with(sign_rate=0.0001, sign_burst=3)
    handles = [await register(core) for _ in range(3)]
    assert [await code(core, "sign", handle=h, message=b"m") for h in handles] == ["ok", "ok", "ok"]
    fresh = await register(core)
    assert await code(core, "sign", handle=fresh, message=b"m") == QUOTA


async def test_distributed_registration_same_password_adds_new_password_replaces() -> None:
    core = ApiCore(FakeDistributed(), limits=Limits(control_burst=1000))
    first = (await core.handle(req("register_distributed", name="ledger", password=b"pw"), ME))["result"][
        "handle"
    ]
    second = (await core.handle(req("register_distributed", name="ledger", password=b"pw"), ME))["result"][
        "handle"
    ]
    assert await code(core, "pending", handle=first) == "ok"
    assert await code(core, "pending", handle=second) == "ok"
    third = (await core.handle(req("register_distributed", name="ledger", password=b"new"), ME))["result"][
        "handle"
    ]
    assert await code(core, "pending", handle=first) == UNKNOWN_HANDLE
    assert await code(core, "pending", handle=second) == UNKNOWN_HANDLE
    assert await code(core, "pending", handle=third) == "ok"


# Idle expiry -------------------------------------------------------------------------------------------


async def test_unused_handles_expire_used_ones_do_not(tmp_path: Path) -> None:
    clock = Clock()
    store = RegistrationStore.in_state_dir(tmp_path)
    core = ApiCore(FakeBackend(), limits=Limits(idle_expiry=30.0), clock=clock, wall=clock, store=store)
    idle = await register(core, "idle-app")
    busy = await register(core, "busy-app")
    for _ in range(2):
        clock.now += 25  # within a sweep interval: the handle's own expiry is checked on use
        assert await code(core, "sign", handle=busy, message=b"m") == "ok"
    r = await core.handle(req("sign", handle=idle, message=b"m"), ME)
    assert r["error"]["code"] == UNKNOWN_HANDLE and "expired; register again" in r["error"]["message"]
    assert [r.name for r in core.registry.by_key.values()] == ["busy-app"]
    # The file followed at once (the registration went): a restart does not bring it back.
    assert [r.name for r in store.load().registrations] == ["busy-app"]


async def test_expired_registrations_are_swept_without_being_touched(tmp_path: Path) -> None:
    clock = Clock()
    store = RegistrationStore.in_state_dir(tmp_path)
    core = ApiCore(FakeBackend(), limits=Limits(idle_expiry=100.0), clock=clock, wall=clock, store=store)
    await register(core, "left-behind")
    clock.now += max(100.0, SWEEP_INTERVAL)
    assert await code(core, "get_time") == "ok"  # any request sweeps, at most once a minute
    assert not core.registry.by_key and store.load().registrations == []


async def test_expiry_counts_across_a_restart(tmp_path: Path) -> None:
    clock = Clock()
    store = RegistrationStore.in_state_dir(tmp_path)
    limits = Limits(idle_expiry=100.0)
    first = ApiCore(FakeBackend(), limits=limits, clock=clock, wall=clock, store=store)
    old = await register(first, "old-app")
    clock.now += 60
    recent = await register(first, "recent-app")
    first.flush()
    clock.now += 50  # old-app unused for 110 s, recent-app for 50 s
    second = ApiCore(FakeBackend(), limits=limits, clock=clock, wall=clock, store=store)
    assert await code(second, "sign", handle=old, message=b"m") == UNKNOWN_HANDLE
    assert await code(second, "sign", handle=recent, message=b"m") == "ok"
    # Name ownership outlives the registration.
    assert second.registry.owner("old-app") == ME.uid


# Operator -------------------------------------------------------------------------------------------


async def test_operator_lists_registrations_without_handles_or_verifiers() -> None:
    clock = Clock()
    clock.now = 1_700_000_000.0
    backend = FakeDistributed()
    core = ApiCore(backend, limits=Limits(control_burst=1000), clock=clock, wall=clock)
    h1 = await register(core, "my-app")
    await register(core, "my-app")
    clock.now += 30
    dist = (await core.handle(req("register_distributed", name="ledger", password=b"pw"), OTHER))["result"]
    freed = await register(core, "old-app", b"x")
    assert await code(core, "unregister", handle=freed) == "ok"
    clock.now += 15
    assert await code(core, "sign", handle=h1, message=b"m") == "ok"
    r = await core.handle(req("registrations"), ME)
    assert r["ok"]
    result = r["result"]
    assert result["now_ms"] == 1_700_000_045_000
    assert result["registrations"] == [
        {
            "name": "ledger",
            "uid": OTHER.uid,
            "kind": "distributed",
            "unique_id": b"",
            "pid": OTHER.pid,
            "handles": 1,
            "created_ms": 1_700_000_030_000,
            "last_used_ms": 1_700_000_030_000,
        },
        {
            "name": "my-app",
            "uid": ME.uid,
            "kind": "centralized",
            "unique_id": b"default",
            "pid": ME.pid,
            "handles": 2,
            "created_ms": 1_700_000_000_000,
            "last_used_ms": 1_700_000_045_000,
        },
    ]
    assert result["owners"] == {"ledger": OTHER.uid, "my-app": ME.uid, "old-app": ME.uid}
    encoded = encoding.encode(r)
    reg = core.registry.by_key[("ledger", b"", OTHER.uid)]
    assert reg.verifier is not None and reg.verifier not in encoded
    for digest in core.registry.by_handle:
        assert digest not in encoded
    assert h1 not in encoded and dist["handle"] not in encoded


async def test_only_the_operator_may_list_or_revoke(caplog: pytest.LogCaptureFixture) -> None:
    core = core_with()
    await register(core)
    with caplog.at_level(logging.WARNING, logger="pst.api"):
        for op, fields in (("registrations", {}), ("revoke", {"name": "my-app"})):
            r = await core.handle(req(op, **fields), OTHER)
            assert r["error"]["code"] == NOT_PERMITTED
            assert "for the operator (root or the server's own user)" in r["error"]["message"]
    assert f"uid {OTHER.uid} (pid {OTHER.pid}) refused registrations: not the operator" in caplog.text
    assert len(core.registry.by_key) == 1


async def test_revoke_by_name_and_uid_frees_the_quota_and_release_name_lets_it_go(tmp_path: Path) -> None:
    store = RegistrationStore.in_state_dir(tmp_path)
    core = ApiCore(FakeBackend(), limits=Limits(control_burst=1000, max_registrations=1), store=store)
    mine = await register(core, "shared", b"a")
    theirs = await register(core, "their-app", b"b", OTHER)
    assert await code(core, "register", name="my-other", unique_id=b"c") == QUOTA
    # By name and uid: only that uid's registration goes.
    r = await core.handle(req("revoke", name="their-app", uid=ME.uid), ME)
    assert r["result"] == {"revoked": 0, "handles": 0, "released": False, "owner": OTHER.uid}
    r = await core.handle(req("revoke", name="shared"), ME)
    assert r["result"] == {"revoked": 1, "handles": 1, "released": False, "owner": ME.uid}
    assert await code(core, "sign", handle=mine, message=b"m") == UNKNOWN_HANDLE
    assert await code(core, "sign", OTHER, handle=theirs, message=b"m") == "ok"
    await register(core, "my-other", b"c")  # the quota is free again
    assert [r.name for r in store.load().registrations] == ["my-other", "their-app"]
    # The name still belongs to its first user, until the operator releases it.
    assert await code(core, "register", OTHER, name="shared", unique_id=b"x") == NOT_PERMITTED
    r = await core.handle(req("revoke", name="shared", release_name=True), ME)
    assert r["result"] == {"revoked": 0, "handles": 0, "released": True, "owner": ME.uid}
    r = await core.handle(req("revoke", name="their-app", uid=OTHER.uid), ME)
    assert r["result"]["revoked"] == 1  # frees OTHER's only registration
    await register(core, "shared", b"x", OTHER)
    assert store.load().owners["shared"] == OTHER.uid


async def test_revoke_refuses_to_release_a_reserved_name() -> None:
    core = ApiCore(FakeBackend(), reserved={"syslog": OTHER.uid})
    r = await core.handle(req("revoke", name="syslog", release_name=True), ME)
    assert r["error"]["code"] == NOT_PERMITTED and "reserved for uid" in r["error"]["message"]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"name": "a", "uid": -1}, "uid"),
        ({"name": "a", "uid": 2**32}, "uid"),
        ({"name": "a", "uid": True}, "uid"),
        ({"name": "a", "release_name": 1}, "release_name"),
        ({"name": "a b"}, "name"),
        ({}, "name"),
        ({"name": "a", "handle": b"x" * 32}, "handle"),
    ],
)
def test_revoke_fields_are_checked(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_request(req("revoke", **fields))
    assert err.value.code == BAD_REQUEST and repr(field) in err.value.message


# Rate limits say when to retry ------------------------------------------------------------------------


async def test_rate_limit_errors_carry_the_wait() -> None:
    core = core_with(sign_rate=4.0, sign_burst=1.0)
    h = await register(core)
    assert await code(core, "sign", handle=h, message=b"m") == "ok"
    r = await core.handle(req("sign", handle=h, message=b"m"), ME)
    assert r["error"]["code"] == QUOTA and r["error"]["retry_after_ms"] == 250
    assert "retry in 0.25 s" in r["error"]["message"]
    control = ApiCore(FakeBackend(), limits=Limits(control_rate=2.0, control_burst=1.0), clock=Clock())
    assert await code(control, "get_time") == "ok"
    r = await control.handle(req("get_time"), ME)
    assert (
        r["error"]["retry_after_ms"] == 500
        and f"too many requests from uid {ME.uid}" in r["error"]["message"]
    )
    # A quota that never refills says so, and gives no wait.
    spent = core_with(sign_rate=0.0, sign_burst=1.0)
    h = await register(spent)
    await spent.handle(req("sign", handle=h, message=b"m"), ME)
    r = await spent.handle(req("sign", handle=h, message=b"m"), ME)
    assert "retry_after_ms" not in r["error"] and "does not refill" in r["error"]["message"]


async def test_name_quota_message_says_how_to_recover() -> None:
    core = core_with(max_names=1)
    await register(core, "one")
    r = await core.handle(req("register", name="two", unique_id=b"u"), ME)
    assert r["error"]["code"] == QUOTA
    assert "owns 1 application names" in r["error"]["message"]
    assert "pst api registrations revoke NAME --release-name" in r["error"]["message"]


# The registration file ------------------------------------------------------------------------------


async def test_a_version_1_file_is_read_and_rewritten_as_version_2(tmp_path: Path) -> None:
    """An older server wrote one entry per handle and no times; its handles keep working."""
    handle = b"h" * 32
    digest = hashlib.sha256(b"pst/api/handle\x00" + handle).digest()
    v1 = {
        "v": 1,
        "owners": {"syslog": ME.uid},
        "registrations": [
            {
                "name": "syslog",
                "unique_id": b"u",
                "uid": ME.uid,
                "pid": 77,
                "handle_digest": digest,
                "tokens_milli": 1500,
                "verifier": None,
            }
        ],
    }
    store = RegistrationStore.in_state_dir(tmp_path)
    store.path.parent.mkdir(parents=True)
    store.path.write_bytes(encoding.encode(v1))
    clock = Clock()
    core = ApiCore(FakeBackend(), limits=Limits(sign_rate=0.0001), store=store, clock=clock, wall=clock)
    assert await code(core, "sign", handle=handle, message=b"m") == "ok"
    assert await code(core, "sign", handle=handle, message=b"m") == QUOTA  # 1.5 tokens were left
    await register(core, "syslog", b"u")
    core.flush()
    saved = encoding.decode(store.path.read_bytes())
    assert saved["v"] == FORMAT_VERSION == 2
    (entry,) = saved["registrations"]
    assert len(entry["handles"]) == 2 and entry["created_ms"] == 1_000_000


def test_registration_file_round_trip_keeps_handles_and_times() -> None:
    from appliance.api._registrations import SavedHandle, SavedRegistration, encode_registrations

    regs = [
        SavedRegistration(
            "app",
            b"default",
            1000,
            42,
            12.5,
            None,
            1.5,
            9.25,
            (SavedHandle(b"a" * 32, 42, 1.5, 9.25), SavedHandle(b"b" * 32, 43, 2.0, 3.0)),
        )
    ]
    saved = decode_registrations(encode_registrations(regs, {"app": 1000}), "file")
    assert saved.problems == [] and saved.owners == {"app": 1000}
    assert saved.registrations == regs


_entry = st.fixed_dictionaries(
    {
        "name": st.text(max_size=5) | st.integers(),
        "unique_id": st.binary(max_size=70) | st.none(),
        "uid": st.integers(-2, 2**33),
        "pid": st.integers(-2, 2**33) | st.booleans(),
        "tokens_milli": st.integers(-5, 2**40),
        "verifier": st.none() | st.binary(min_size=31, max_size=33),
        "created_ms": st.integers(-5, 2**64),
        "last_used_ms": st.integers(-5, 2**64),
        "handles": st.lists(
            st.fixed_dictionaries(
                {
                    "digest": st.binary(min_size=31, max_size=33) | st.sampled_from([b"d" * 32]),
                    "pid": st.integers(-1, 2**33),
                    "created_ms": st.integers(-1, 2**64),
                    "last_used_ms": st.integers(-1, 2**64),
                },
                optional={"extra": st.integers()},
            )
            | st.integers(),
            max_size=3,
        )
        | st.none(),
    },
    optional={"handle_digest": st.binary(max_size=33)},
)
_file = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 2, 2, 3]),
        "owners": st.dictionaries(st.text(max_size=4) | st.integers(), st.integers(-1, 2**33), max_size=3),
        "registrations": st.lists(_entry, max_size=4),
    }
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_file.map(encoding.encode) | st.binary(max_size=200))
def test_fuzz_registration_file_decoder(data: bytes) -> None:
    """Whatever the file holds: DecodeError, or entries that obey the rules plus named problems."""
    try:
        saved = decode_registrations(data, "FILE", now=5.0)
    except DecodeError as exc:
        assert str(exc)
        return
    for problem in saved.problems:
        assert problem.startswith("FILE")
    for r in saved.registrations:
        assert r.name and 0 <= r.uid < 2**32 and r.handles and len(r.unique_id) <= 64
        assert (r.verifier is None) == bool(r.unique_id)
        assert len({h.digest for h in r.handles}) == len(r.handles)
        assert all(len(h.digest) == 32 for h in r.handles)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {"v": st.just(1), "id": st.integers(0, 5), "op": st.sampled_from(["revoke", "registrations"])},
        optional={
            "name": st.text(max_size=8) | st.integers(),
            "uid": st.integers(-(2**33), 2**33) | st.booleans() | st.text(max_size=2),
            "release_name": st.booleans() | st.integers(0, 1) | st.none(),
            "handle": st.binary(max_size=3),
        },
    )
)
def test_fuzz_operator_requests_parse_or_name_the_field(obj: dict[str, Any]) -> None:
    try:
        request = parse_request(obj)
    except ApiError as exc:
        assert exc.code == BAD_REQUEST and "field" in exc.message
        return
    if request.op == "revoke":
        assert isinstance(request.args["name"], str)
        assert 0 <= request.args.get("uid", 0) < 2**32
        assert isinstance(request.args.get("release_name", False), bool)
    else:
        assert request.args == {}
