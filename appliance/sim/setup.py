"""Initial data of a simulated network (period 0), without running Table 3 over a network.

Runs the dealerless DKG of the crypto core in one process, signs every M_i with the
server's Sstart and [Scert(M), M] and KeyTable(0) with FROST, all from a seed. The
protocol of Table 3 (``appliance.protocols.init``) produces the same data over the
network; simulations of refresh start from here so that each seed is cheap.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from nacl.public import PrivateKey
from nacl.signing import SigningKey

from appliance.crypto import local
from appliance.crypto.annkey import SoftAnnouncementKey
from appliance.crypto.groups import ED25519
from appliance.crypto.keyshare import KeyShare
from appliance.crypto.secret import DeterministicSource, system_scalar_source
from appliance.protocols.refresh import PrivateData, PublicData
from appliance.protocols.state import (
    SCERT,
    Constants,
    InvariantInfo,
    KeyEntry,
    KeyTable,
    encryption_key_payload,
    m_i_payload,
    sharing_digest,
)


@dataclass
class ServerSetup:
    me: int
    vstart: bytes
    public: PublicData
    private: PrivateData
    #: The stand-in for the server's TPM announcement key (issue 8): survives every wipe.
    ann_key: SoftAnnouncementKey | None = None


def seeded_bytes(seed: bytes) -> Any:
    """A deterministic random-bytes source (SHAKE-256 counter mode) for simulations only."""
    counter = 0

    def draw(n: int) -> bytes:
        nonlocal counter
        counter += 1
        return hashlib.shake_256(b"pst/sim/bytes" + seed + counter.to_bytes(8, "big")).digest(n)

    return draw


def make_network(
    constants: Constants,
    seed: int | None = None,
    *,
    randbytes: Callable[[int], bytes] | None = None,
    tpm: frozenset[int] = frozenset(),
    ann_public: Mapping[int, bytes] | None = None,
) -> dict[int, ServerSetup]:
    """Period-0 data for every server: from ``seed`` (simulations) or from ``randbytes`` (os.urandom).

    The servers in ``tpm`` have ROMs that are TPMs: each gets an announcement key (a software
    P-256 key here, from its own seed so that the other keys stay those of a network without),
    fixed in M. ``ann_public``: announcement keys held elsewhere (real TPMs), put into M as given."""
    n, t = constants.n, constants.t
    if randbytes is None:
        randbytes = random.Random(seed).randbytes
    rand: Callable[[], int] = (
        DeterministicSource(randbytes(16), ED25519.order)
        if seed is not None
        else system_scalar_source(ED25519.order)
    )
    keys: dict[int, KeyShare[bytes]] = local.run_dkg(ED25519, n, t, rand, context=b"pst/sim/dkg").keys
    # Every other long-lived secret of C (a log's own key, a DSS key) from a DKG of its own.
    others: dict[str, dict[int, KeyShare[Any]]] = {
        sid: local.run_dkg(constants.group(sid), n, t, rand, context=b"pst/sim/dkg/" + sid.encode()).keys
        for sid in sorted(constants.secrets)
        if sid != SCERT
    }
    vcert = keys[1].public_key
    sstart = {i: SigningKey(randbytes(32)) for i in constants.ids}
    ann = {
        i: SoftAnnouncementKey(
            seeded_bytes(f"annkey/{seed}/{i}".encode())(32) if seed is not None else randbytes(32)
        )
        for i in sorted(tpm)
    }
    ann_keys = {**dict(ann_public or {}), **{i: k.public for i, k in ann.items()}}
    m = {
        i: bytes(sstart[i].sign(m_i_payload(vcert, constants, i, ann_keys.get(i))).signature)
        for i in constants.ids
    }
    info = InvariantInfo(vcert, constants, m, b"", ann_keys)
    signers = list(range(1, t + 2))
    info = info.signed(local.frost_sign(keys, signers, info.payload(), randbytes))
    seeds = {i: (randbytes(32), randbytes(32)) for i in constants.ids}
    entries = {}
    for i, (sseed, eseed) in seeds.items():
        sk = SigningKey(sseed)
        e = bytes(PrivateKey(eseed).public_key)
        entries[i] = KeyEntry(
            bytes(sk.verify_key), e, bytes(sk.sign(encryption_key_payload(i, 0, e)).signature)
        )
    sharing = keys[1].public
    sharings: dict[str, Any] = {SCERT: sharing, **{sid: k[1].public for sid, k in others.items()}}
    digests = {sid: sharing_digest(constants.group(sid), s) for sid, s in sharings.items()}
    table = KeyTable(0, entries, digests, frozenset())
    table = table.signed(local.frost_sign(keys, signers, table.payload(), randbytes))
    out = {}
    for i in constants.ids:
        public = PublicData(info, table, dict(sharings))
        shares = {SCERT: keys[i].share, **{sid: k[i].share for sid, k in others.items()}}
        private = PrivateData(0, seeds[i][0], seeds[i][1], shares)
        out[i] = ServerSetup(i, bytes(sstart[i].verify_key), public, private, ann.get(i))
    return out
