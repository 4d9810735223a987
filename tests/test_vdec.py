"""Verifiable encryption of sub-shares: round trips, and complaints any judge can decide."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl import bindings as sodium

from appliance.crypto import encoding, tvrf, vdec
from appliance.crypto.errors import CryptoError, DecodeError, ParameterError
from appliance.crypto.groups import ED25519 as G
from appliance.crypto.secret import DeterministicSource

CTX = b"pst/refresh/period=7/dealer=2/session=1"
N = 5

#: The small-order points libsodium lists (identity, orders 2, 4 and 8) and non-canonical
#: encodings of some of them (y >= p), plus sign-bit variants.
SMALL_ORDER = [
    bytes(32),
    b"\x01" + bytes(31),
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    b"\xec" + b"\xff" * 30 + b"\x7f",
    b"\xed" + b"\xff" * 30 + b"\x7f",
    b"\xee" + b"\xff" * 30 + b"\x7f",
]
BAD_POINTS = [*SMALL_ORDER, *(p[:31] + bytes([p[31] | 0x80]) for p in SMALL_ORDER)]
# A point on the curve outside the prime-order subgroup: G plus a point of order 8.
MIXED = bytes(sodium.crypto_core_ed25519_add(G.generator(), SMALL_ORDER[2]))
BAD_POINTS.append(MIXED)


def seed(i: int) -> bytes:
    return bytes([i]) * 32


def keys(n: int = N) -> dict[int, tuple[int, bytes]]:
    return {k: (vdec.secret_from_seed(seed(k)), vdec.public_from_seed(seed(k))) for k in range(1, n + 1)}


def plaintexts(n: int = N) -> dict[int, bytes]:
    return {k: encoding.encode({"sub_shares": {1: k * 1000 + 1, 2: k * 1000 + 2}}) for k in range(1, n + 1)}


def deal(
    n: int = N, r: int = 12345, context: bytes = CTX
) -> tuple[dict[int, tuple[int, bytes]], bytes, dict[int, bytes]]:
    kp = keys(n)
    eph, cts = vdec.encrypt_to({k: pub for k, (_, pub) in kp.items()}, plaintexts(n), r, context)
    return kp, eph, cts


def test_round_trip_for_n_recipients_and_keys_from_seeds() -> None:
    kp, eph, cts = deal()
    assert len(eph) == vdec.EPHEMERAL_SIZE and sorted(cts) == list(range(1, N + 1))
    for k, (e, pub) in kp.items():
        assert pub == G.mul_base(e) == vdec.public_key(e)
        assert vdec.decrypt(e, pub, k, eph, cts[k], CTX) == plaintexts()[k]
    assert len({pub for _, pub in kp.values()}) == N
    assert vdec.check_ephemeral(eph, CTX) == G.mul_base(12345)
    # Deterministic: same inputs, same dealing.
    assert deal() == (kp, eph, cts)


def test_a_recipient_cannot_decrypt_another_ones_ciphertext() -> None:
    kp, eph, cts = deal()
    e2, pub2 = kp[2]
    for claimed in (2, 3):
        with pytest.raises(vdec.DecryptionError):
            vdec.decrypt(e2, pub2, claimed, eph, cts[3], CTX)
    e3, pub3 = kp[3]
    with pytest.raises(vdec.DecryptionError):  # its own key, another recipient's id
        vdec.decrypt(e3, pub3, 2, eph, cts[3], CTX)
    with pytest.raises(ParameterError):  # a secret that does not match the public key
        vdec.decrypt(e2, pub3, 3, eph, cts[3], CTX)


def test_wrong_context_fails() -> None:
    kp, eph, cts = deal()
    e, pub = kp[1]
    # The ephemeral's proof of knowledge is bound to the context: it no longer checks.
    with pytest.raises(DecodeError):
        vdec.decrypt(e, pub, 1, eph, cts[1], CTX + b"x")
    # With an ephemeral made for the other context, the key and associated data differ.
    other_eph, _ = vdec.encrypt_to({1: pub}, {1: b"x"}, 12345, CTX + b"x")
    assert other_eph[:32] == eph[:32]
    with pytest.raises(vdec.DecryptionError):
        vdec.decrypt(e, pub, 1, other_eph, cts[1], CTX + b"x")


def test_garbled_or_truncated_ciphertexts_do_not_decrypt() -> None:
    kp, eph, cts = deal()
    e, pub = kp[1]
    flipped = bytes([cts[1][0] ^ 1]) + cts[1][1:]
    for bad in (flipped, cts[1][:-1], b"", b"\x00" * 15, cts[2]):
        with pytest.raises(vdec.DecryptionError):
            vdec.decrypt(e, pub, 1, eph, bad, CTX)


def test_a_true_recipients_reveal_opens_its_plaintext() -> None:
    kp, eph, cts = deal()
    rand = DeterministicSource(1, G.order)
    for k, (e, pub) in kp.items():
        rev = vdec.reveal(e, pub, k, eph, CTX, rand)
        assert vdec.Reveal.from_bytes(rev.to_bytes()) == rev
        assert len(rev.to_bytes()) == vdec.REVEAL_SIZE
        # Proof valid and decrypts: if the value checks against the commitments, the
        # complaint was false (the caller checks the value).
        assert vdec.open_revealed(pub, k, eph, rev, cts[k], CTX) == plaintexts()[k]


def test_a_garbled_ciphertext_is_judged_against_the_dealer() -> None:
    kp, eph, cts = deal()
    e, pub = kp[4]
    garbled = cts[4][:-1] + bytes([cts[4][-1] ^ 0x80])
    with pytest.raises(vdec.DecryptionError):
        vdec.decrypt(e, pub, 4, eph, garbled, CTX)
    rev = vdec.reveal(e, pub, 4, eph, CTX, DeterministicSource(2, G.order))
    assert vdec.open_revealed(pub, 4, eph, rev, garbled, CTX) is None
    assert vdec.open_revealed(pub, 4, eph, rev, cts[1], CTX) is None  # another recipient's
    assert vdec.open_revealed(pub, 4, eph, rev, b"short", CTX) is None


def test_a_dealer_that_encrypts_a_bad_value_is_exposed_by_the_reveal() -> None:
    kp = keys()
    pubs = {k: pub for k, (_, pub) in kp.items()}
    bad = {**plaintexts(), 3: b"not the sub-shares the commitments promise"}
    eph, cts = vdec.encrypt_to(pubs, bad, 999, CTX)
    e, pub = kp[3]
    rev = vdec.reveal(e, pub, 3, eph, CTX, DeterministicSource(3, G.order))
    assert (
        vdec.open_revealed(pub, 3, eph, rev, cts[3], CTX)
        == bad[3]
        == vdec.decrypt(e, pub, 3, eph, cts[3], CTX)
    )


def test_forged_reveals_are_refused() -> None:
    kp, eph, cts = deal()
    rand = DeterministicSource(4, G.order)
    e, pub = kp[1]
    good = vdec.reveal(e, pub, 1, eph, CTX, rand)
    c, z = good.proof[:32], good.proof[32:]
    z_plus_1 = G.encode_scalar(G.decode_scalar(z) + 1)
    forgeries = [
        vdec.Reveal(G.mul(2, good.K), good.proof),  # wrong K
        vdec.Reveal(G.generator(), good.proof),
        vdec.Reveal(good.K, c + z_plus_1),  # wrong proof
        vdec.Reveal(good.K, z + c),
        vdec.Reveal(good.K, bytes(64)),
    ]
    # A proof made for another dealing's R.
    _, eph2, _ = deal(r=777)
    forgeries.append(vdec.reveal(e, pub, 1, eph2, CTX, rand))
    # Another server's honest reveal presented as recipient 1's.
    e2, pub2 = kp[2]
    forgeries.append(vdec.reveal(e2, pub2, 2, eph, CTX, rand))
    for rev in forgeries:
        with pytest.raises(vdec.InvalidRevealError):
            vdec.open_revealed(pub, 1, eph, rev, cts[1], CTX)
    # The right reveal under another id, or by the right key with the wrong id.
    for k in (2, 3):
        with pytest.raises(vdec.InvalidRevealError):
            vdec.open_revealed(pub, k, eph, good, cts[1], CTX)
    with pytest.raises(vdec.InvalidRevealError):
        vdec.open_revealed(pub2, 1, eph, good, cts[1], CTX)
    # Malformed fields in a Reveal built by hand: still the accuser's fault, never a crash.
    for k_bytes in [*BAD_POINTS, b"", b"\x00" * 31]:
        with pytest.raises(vdec.InvalidRevealError):
            vdec.open_revealed(pub, 1, eph, vdec.Reveal(k_bytes, good.proof), cts[1], CTX)
    unreduced = (G.order).to_bytes(32, "little")
    for proof in (b"", good.proof[:63], unreduced + z, c + unreduced, b"\xff" * 64):
        with pytest.raises(vdec.InvalidRevealError):
            vdec.open_revealed(pub, 1, eph, vdec.Reveal(good.K, proof), cts[1], CTX)
    assert vdec.open_revealed(pub, 1, eph, good, cts[1], CTX) == plaintexts()[1]


def test_a_copied_or_related_ephemeral_cannot_make_a_recipient_a_dh_oracle() -> None:
    """Dealer 3 reuses honest dealer 2's R (or 2R) to make recipient 1 reveal e_1 * R."""
    kp, honest_eph, _ = deal(context=CTX)
    e, pub = kp[1]
    ctx3 = CTX.replace(b"dealer=2", b"dealer=3")
    copied = honest_eph  # R and its proof, which is bound to dealer 2's context
    doubled = G.mul(2, honest_eph[:32]) + honest_eph[32:]
    for eph in (copied, doubled):
        with pytest.raises(DecodeError):
            vdec.check_ephemeral(eph, ctx3)
        with pytest.raises(DecodeError):
            vdec.reveal(e, pub, 1, eph, ctx3, DeterministicSource(5, G.order))


def test_bad_points_and_parameters_are_refused_cleanly() -> None:
    kp, eph, cts = deal()
    e, pub = kp[1]
    proof = eph[32:]
    for bad in BAD_POINTS:
        with pytest.raises(DecodeError):
            vdec.decode_public_key(bad)
        with pytest.raises(DecodeError):
            vdec.check_ephemeral(bad + proof, CTX)
        with pytest.raises(DecodeError):
            vdec.encrypt_to({1: bad}, {1: b"x"}, 5, CTX)
        with pytest.raises(DecodeError):
            vdec.decrypt(e, bad, 1, eph, cts[1], CTX)
        with pytest.raises(DecodeError):
            vdec.open_revealed(bad, 1, eph, vdec.Reveal(pub, proof), cts[1], CTX)
        with pytest.raises(DecodeError):
            vdec.Reveal.from_bytes(bad + proof)
    with pytest.raises(ParameterError):
        vdec.encrypt_to({1: pub}, {1: b"x"}, G.order, CTX)  # r = 0 mod L
    with pytest.raises(ParameterError):
        vdec.encrypt_to({1: pub}, {2: b"x"}, 5, CTX)
    with pytest.raises(ParameterError):
        vdec.encrypt_to({0: pub}, {0: b"x"}, 5, CTX)
    with pytest.raises(ParameterError):
        vdec.public_key(0)
    with pytest.raises(ParameterError):
        vdec.secret_from_seed(b"short")
    with pytest.raises(ParameterError):
        vdec.reveal(e + 1, pub, 1, eph, CTX, DeterministicSource(6, G.order))


def test_the_generic_same_log_proof_verifies_tvrf_partials() -> None:
    """tvrf's DLEQ transcript is the two-base case of vdec.prove_same_log, so it could share it."""
    share = 424242
    rand = DeterministicSource(7, G.order)
    part = tvrf.partial(G, 1, share, b"msg", rand)
    bases, images = [G.generator(), tvrf.point(G, b"msg")], [G.mul_base(share), part.y]
    assert vdec.verify_same_log(G, tvrf.PROOF_DST, bases, images, part.c, part.z)
    assert not vdec.verify_same_log(G, tvrf.PROOF_DST, bases, images, part.c, part.z, (b"x",))
    assert not vdec.verify_same_log(G, tvrf.PROOF_DST, bases, images, part.c, part.z + G.order)
    c, z = vdec.prove_same_log(G, tvrf.PROOF_DST, share, bases, images, rand())
    assert tvrf.verify_partial(G, images[0], b"msg", tvrf.Partial(1, part.y, c, z))


@settings(max_examples=15, deadline=None)
@given(
    st.dictionaries(st.integers(1, 40), st.binary(max_size=200), min_size=1, max_size=4),
    st.binary(min_size=32, max_size=32),
    st.integers(1, G.order - 1),
    st.binary(max_size=40),
)
def test_round_trip_for_random_plaintexts_and_seeds(
    msgs: dict[int, bytes], master: bytes, r: int, context: bytes
) -> None:
    seeds = {k: bytes(a ^ (k & 0xFF) for a in master) for k in msgs}
    pubs = {k: vdec.public_from_seed(s) for k, s in seeds.items()}
    eph, cts = vdec.encrypt_to(pubs, msgs, r, context)
    rand = DeterministicSource(r % 2**64, G.order)
    for k, s in seeds.items():
        e = vdec.secret_from_seed(s)
        assert vdec.decrypt(e, pubs[k], k, eph, cts[k], context) == msgs[k]
        assert len(cts[k]) == len(msgs[k]) + vdec.TAG_SIZE
        rev = vdec.reveal(e, pubs[k], k, eph, context, rand)
        assert vdec.open_revealed(pubs[k], k, eph, rev, cts[k], context) == msgs[k]


def _bytes_and_bad_points(size: int) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=2 * size),
        st.binary(min_size=size, max_size=size),
        st.tuples(st.sampled_from(BAD_POINTS), st.binary(min_size=size - 32, max_size=size - 32)).map(
            lambda t: t[0] + t[1]
        ),
    )


@settings(max_examples=60, deadline=None)
@given(_bytes_and_bad_points(vdec.REVEAL_SIZE))
def test_reveal_decoder_raises_only_decode_error(data: bytes) -> None:
    try:
        rev = vdec.Reveal.from_bytes(data)
    except DecodeError:
        return
    assert rev.to_bytes() == data


@settings(max_examples=60, deadline=None)
@given(_bytes_and_bad_points(vdec.EPHEMERAL_SIZE), _bytes_and_bad_points(32))
def test_point_inputs_raise_only_decode_error(eph: bytes, point: bytes) -> None:
    with pytest.raises(DecodeError):  # a random proof of knowledge never verifies
        vdec.check_ephemeral(eph, CTX)
    with contextlib.suppress(DecodeError):
        assert vdec.decode_public_key(point) == point


@settings(max_examples=40, deadline=None)
@given(_bytes_and_bad_points(32), _bytes_and_bad_points(vdec.REVEAL_SIZE), st.binary(max_size=40))
def test_judging_arbitrary_bytes_raises_only_crypto_errors(pub: bytes, rev: bytes, ct: bytes) -> None:
    kp, eph, _ = deal(n=1)
    e, _ = kp[1]
    reveal = vdec.Reveal(rev[:32], rev[32:])
    with contextlib.suppress(CryptoError):
        assert vdec.open_revealed(pub, 1, eph, reveal, ct, CTX) is None
    with pytest.raises(CryptoError):
        vdec.decrypt(e, pub, 1, eph, ct, CTX)
