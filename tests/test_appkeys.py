"""Per-application DSS keys (crypto/appkeys.py): a tweak of the base secret of C, signed with the
base key's presignatures, refreshed and recovered with it; openssl's verifier accepts them."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.crypto import appkeys, dss, local
from appliance.crypto.errors import ParameterError
from appliance.crypto.groups import Group
from appliance.crypto.groups.dsa import DSA2048
from appliance.crypto.groups.p256 import P256
from appliance.crypto.keyshare import KeyShare
from appliance.crypto.secret import DeterministicSource

GROUPS = [pytest.param(P256, id="p256"), pytest.param(DSA2048, id="dsa2048")]
N, T = 4, 1
_KEYS: dict[str, dict[int, KeyShare[Any]]] = {}


def keys_of(group: Group[Any]) -> dict[int, KeyShare[Any]]:
    if group.name not in _KEYS:
        _KEYS[group.name] = local.run_dkg(group, N, T, DeterministicSource(b"appkeys", group.order)).keys
    return _KEYS[group.name]


def sign(
    group: Group[Any],
    keys: dict[int, KeyShare[Any]],
    message: bytes,
    d: int,
    signers: tuple[int, ...],
    seed: bytes = b"s",
) -> dss.DSSSignature:
    result = dss.run_presign(group, keys, DeterministicSource(seed, group.order), sid=b"test/" + seed)
    sharing = next(iter(keys.values())).public
    shares = [appkeys.sign_share(group, result.presignatures[j], message, sharing, d) for j in signers]
    return appkeys.combine(group, result.presignatures[signers[0]].public, message, shares, d)


@pytest.mark.parametrize("group", GROUPS)
def test_an_application_key_signs_and_only_its_own_public_key_verifies(group: Group[Any]) -> None:
    keys = keys_of(group)
    base = keys[1].public_key
    d = appkeys.tweak(group, base, "billing", "invoices")
    y = appkeys.app_public_key(group, base, "billing", "invoices")
    sig = sign(group, keys, b"invoice 17", d, (1, 3))
    assert dss.verify_with_cryptography(group, y, b"invoice 17", sig.der)
    assert not dss.verify_with_cryptography(group, y, b"invoice 18", sig.der)
    assert not dss.verify_with_cryptography(group, base, b"invoice 17", sig.der)
    other = appkeys.app_public_key(group, base, "billing", "receipts")
    assert other != y and not dss.verify_with_cryptography(group, other, b"invoice 17", sig.der)
    assert appkeys.app_public_key(group, base, "mail", "invoices") != y


@pytest.mark.parametrize("group", GROUPS)
def test_a_share_made_with_another_applications_tweak_is_named(group: Group[Any]) -> None:
    keys = keys_of(group)
    base = keys[1].public_key
    d = appkeys.tweak(group, base, "billing", "k")
    wrong = appkeys.tweak(group, base, "mallory", "k")
    result = dss.run_presign(group, keys, DeterministicSource(b"w", group.order), sid=b"test/w")
    sharing = keys[1].public
    shares = [
        appkeys.sign_share(group, result.presignatures[1], b"m", sharing, d),
        appkeys.sign_share(group, result.presignatures[2], b"m", sharing, wrong),
        appkeys.sign_share(group, result.presignatures[3], b"m", sharing, d),
    ]
    sig = appkeys.combine(group, result.presignatures[1].public, b"m", shares, d)
    assert set(sig.cheaters) == {2}
    assert dss.verify_with_cryptography(group, appkeys.derived_public(group, base, d), b"m", sig.der)


@pytest.mark.parametrize("group", GROUPS)
def test_the_key_survives_refresh_and_recovery_and_periods_never_mix(group: Group[Any]) -> None:
    keys = keys_of(group)
    base = keys[1].public_key
    d = appkeys.tweak(group, base, "tsa-like", "k1")
    y = appkeys.derived_public(group, base, d)
    old = dss.run_presign(group, keys, DeterministicSource(b"old", group.order), sid=b"test/old")
    refreshed = local.run_refresh(group, keys, DeterministicSource(b"r", group.order))
    _KEYS.pop(group.name)  # the cached shares were wiped by the refresh
    assert refreshed[1].public_key == base and refreshed[1].public != keys[1].public
    # Same public key after the refresh; the new shares sign.
    sig = sign(group, refreshed, b"after refresh", d, (2, 4), b"new")
    assert dss.verify_with_cryptography(group, y, b"after refresh", sig.der)
    # A presignature of the old sharing is refused with the new one.
    with pytest.raises(dss.StalePresignatureError):
        appkeys.sign_share(group, old.presignatures[1], b"x", refreshed[1].public, d)
    # Server 3 is wiped and recovered: with the others it signs under the same key.
    helpers = {i: k for i, k in refreshed.items() if i != 3}
    recovered = local.run_recovery(group, helpers, 3, DeterministicSource(b"rec", group.order))
    assert recovered.cheaters == {}
    after = {**helpers, 3: recovered.key}
    sig = sign(group, after, b"signed by a recovered server", d, (3, 4), b"rec-sign")
    assert dss.verify_with_cryptography(group, y, b"signed by a recovered server", sig.der)


names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=appkeys.MAX_NAME)


@settings(max_examples=60, deadline=None)
@given(app=names, name=names, other=names)
def test_tweaks_are_scalars_bound_to_application_and_name(app: str, name: str, other: str) -> None:
    base = P256.mul_base(12345)
    d = appkeys.tweak(P256, base, app, name)
    assert 0 <= d < P256.order
    assert d == appkeys.tweak(P256, base, app, name)
    assert appkeys.app_public_key(P256, base, app, name) == P256.add(base, P256.mul_base(d))
    if other != name:
        assert appkeys.tweak(P256, base, app, other) != d
    if other != app:
        assert appkeys.tweak(P256, base, other, name) != d
    assert appkeys.tweak(P256, P256.mul_base(54321), app, name) != d


@settings(max_examples=60, deadline=None)
@given(
    bad=st.one_of(
        st.just(""),
        st.text(min_size=appkeys.MAX_NAME + 1, max_size=appkeys.MAX_NAME + 20),
        st.text().filter(lambda s: not (s.isascii() and s.isprintable())),
    )
)
def test_names_that_are_empty_long_or_not_printable_ascii_are_refused(bad: str) -> None:
    with pytest.raises(ParameterError):
        appkeys.tweak(P256, P256.mul_base(7), bad, "k")
    with pytest.raises(ParameterError):
        appkeys.tweak(P256, P256.mul_base(7), "app", bad)


@pytest.mark.parametrize("group", GROUPS)
def test_openssl_dgst_verifies_an_application_keys_signature(group: Group[Any], tmp_path: Path) -> None:
    keys = keys_of(group)
    base = keys[1].public_key
    d = appkeys.tweak(group, base, "billing", "openssl")
    sig = sign(group, keys, b"checked by openssl\n", d, (2, 3), b"openssl")
    (tmp_path / "pub.pem").write_bytes(dss.public_key_pem(group, appkeys.derived_public(group, base, d)))
    (tmp_path / "msg").write_bytes(b"checked by openssl\n")
    (tmp_path / "sig.der").write_bytes(sig.der)
    cmd = ["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig.der", "msg"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert out.returncode == 0 and "Verified OK" in out.stdout, out.stdout + out.stderr
    (tmp_path / "pub.pem").write_bytes(dss.public_key_pem(group, base))  # the base key: no
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=False)
    assert out.returncode != 0
