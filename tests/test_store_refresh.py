"""The store key is a secret of C like any other: the real refresh renews its shares, never its key."""

from __future__ import annotations

import pytest

from appliance.crypto import tdh2
from appliance.crypto.errors import CheatingError
from appliance.crypto.groups import P256
from appliance.crypto.keyshare import KeyShare
from appliance.crypto.secret import DeterministicSource, SecretScalar
from appliance.protocols.state import SCERT, Constants
from appliance.sim import scenarios

STORE = "store"


def test_a_secret_sealed_before_three_refreshes_opens_with_the_shares_after_them() -> None:
    c = Constants(
        n=4,
        t=1,
        period_length=scenarios.PERIOD,
        delta=0.05,
        genesis=0.5 - scenarios.PERIOD,
        secrets={SCERT: "ed25519", STORE: "p256"},
    )
    run = scenarios.build("store", 3, c, periods=3)
    rand = DeterministicSource(3, P256.order)
    before = run.servers[1].public.sharings[STORE]
    sealed = tdh2.seal(P256, before.public_key, b"vault/seed/1", b"kept by the network", rand)

    def key_of(i: int) -> KeyShare[object]:
        s = run.servers[i]
        assert s.private is not None
        share = s.private.shares[STORE]
        return KeyShare(i, SecretScalar(share.value, P256.order), s.public.sharings[STORE])

    old = {i: tdh2.decryption_share(P256, key_of(i), sealed.kem, rand) for i in c.ids}
    scenarios.run_periods(run)
    scenarios.check(run)
    after = run.servers[1].public.sharings[STORE]
    assert after.public_key == before.public_key and after.commitment != before.commitment
    assert all(run.servers[i].public.sharings[STORE] == after for i in c.ids)
    new = {i: tdh2.decryption_share(P256, key_of(i), sealed.kem, rand) for i in c.ids}
    for pair in ((1, 2), (3, 4)):
        key = tdh2.combine(P256, after, sealed.kem, {i: new[i] for i in pair})
        assert tdh2.open_sealed(sealed, key) == b"kept by the network"
    with pytest.raises(
        CheatingError
    ) as info:  # scenario A: shares of period 0 do not combine with period 3's
        tdh2.combine(P256, after, sealed.kem, {1: old[1], 2: new[2]})
    assert info.value.party == 1
