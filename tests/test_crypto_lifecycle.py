"""The group key's life across periods: DKG, FROST signatures, refresh, recovery; same public key."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.crypto import local
from appliance.crypto.groups import ED25519 as G
from appliance.crypto.secret import DeterministicSource


@pytest.mark.parametrize(("n", "t"), [(4, 1), (5, 2), (7, 3)])
def test_group_key_signs_across_refresh_and_recovery(n: int, t: int) -> None:
    rand = DeterministicSource(n * 100 + t, G.order)
    keys = local.run_dkg(G, n, t, rand).keys
    verifier = Ed25519PublicKey.from_public_bytes(keys[1].public_key)
    verifier.verify(local.frost_sign(keys, list(range(1, t + 2)), b"period 0", os.urandom), b"period 0")
    for period in range(1, 4):
        keys = local.run_refresh(G, keys, rand)
        lost = (period % n) + 1
        expected = keys[lost].share.value
        recovered = local.run_recovery(G, {i: k for i, k in keys.items() if i != lost}, lost, rand)
        assert recovered.key.share.value == expected
        keys[lost] = recovered.key
        signers = list(range(n - t, n + 1))
        message = f"period {period}".encode()
        verifier.verify(local.frost_sign(keys, signers, message, os.urandom), message)
