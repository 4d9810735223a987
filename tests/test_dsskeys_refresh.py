"""An application's DSS key through the real refresh (the simulation of appliance.sim): its base
secret ``appkeys-p256`` of C is refreshed every period and recovered by a wiped server; the key
(a public tweak of it) keeps its public key, signs with the shares of any period including the
recovered server's, and shares of two periods never combine."""

from __future__ import annotations

from typing import Any

import pytest

from appliance.crypto import appkeys, dss
from appliance.crypto.groups import P256
from appliance.crypto.keyshare import KeyShare
from appliance.crypto.secret import DeterministicSource, SecretScalar
from appliance.protocols.state import APP_KEY_SECRETS, SCERT, Constants
from appliance.sim import scenarios

BASE = APP_KEY_SECRETS["p256"]


def _keys(run: scenarios.Run, ids: list[int]) -> dict[int, KeyShare[Any]]:
    keys = {}
    for i in ids:
        s = run.servers[i]
        assert s.private is not None
        share = s.private.shares[BASE]
        keys[i] = KeyShare(i, SecretScalar(share.value, P256.order), s.public.sharings[BASE])
    return keys


def _sign(
    keys: dict[int, KeyShare[Any]], message: bytes, d: int, signers: tuple[int, ...], seed: int
) -> dss.DSSSignature:
    result = dss.run_presign(P256, keys, DeterministicSource(seed, P256.order), sid=b"sim/%d" % seed)
    sharing = next(iter(keys.values())).public
    shares = [appkeys.sign_share(P256, result.presignatures[j], message, sharing, d) for j in signers]
    return appkeys.combine(P256, result.presignatures[signers[0]].public, message, shares, d)


@pytest.mark.parametrize("seed", [1, 2])
def test_an_application_key_is_refreshed_for_periods_and_recovered_by_a_wiped_server(seed: int) -> None:
    c = Constants(
        n=4,
        t=1,
        period_length=scenarios.PERIOD,
        delta=0.05,
        genesis=0.5 - scenarios.PERIOD,
        secrets={SCERT: "ed25519", BASE: "p256"},
    )
    run = scenarios.build("appkeys", seed, c, periods=1)
    base = run.servers[1].public.sharings[BASE].public_key
    d = appkeys.tweak(P256, base, "billing", "invoices")
    y = appkeys.derived_public(P256, base, d)
    scenarios.run_periods(run)
    scenarios.check(run)
    period1 = _keys(run, [1, 2, 3, 4])
    sig = _sign(period1, b"period 1", d, (1, 2), seed)
    assert dss.verify_with_cryptography(P256, y, b"period 1", sig.der)
    old_presig = dss.run_presign(P256, period1, DeterministicSource(seed + 10, P256.order), sid=b"old")

    # Server 3 loses its shares and public sharings (scenario B); two more periods.
    victim = run.servers[3]
    victim.public.sharings = {}
    victim.private = None
    run.alertable.add(3)
    run.periods = 3
    scenarios.run_periods(run)
    scenarios.check(run)
    after = run.servers[1].public.sharings[BASE]
    assert after.public_key == base and after != period1[1].public
    assert all(run.servers[i].public.sharings[BASE] == after for i in c.ids)
    recovered_in = [p for p in (2, 3) if 3 in (run.servers[1].outcomes[p].public.key_table.recovering)]
    assert recovered_in, "server 3 was never recovering"
    period3 = _keys(run, [1, 2, 3, 4])
    assert period3[3].check(P256)  # the wiped server got its share back
    sig = _sign(period3, b"period 3, with the recovered server", d, (3, 4), seed + 1)
    assert dss.verify_with_cryptography(P256, y, b"period 3, with the recovered server", sig.der)
    # A presignature of period 1 does not combine with period 3's sharing.
    with pytest.raises(dss.StalePresignatureError):
        appkeys.sign_share(P256, old_presig.presignatures[1], b"x", after, d)
