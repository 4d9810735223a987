"""``pst init``: the initialization of Table 3 over the real network, one process per server.

Every server runs this at the same agreed start time (``--start-at``, chosen by the
operators). There are no period keys yet, so the channels are unauthenticated TLS 1.3
("communication is secure - inactive adversary", the paper's assumption for this step);
from the second round on every message is signed with the fresh period keys. On success
the server's period-0 data is written to its state directory and the Sstart file is
overwritten and unlinked: Sstart is erased, as Table 3 demands.

Before signing M_i over C, the server checks that C names the code it runs: the installed
package must match the manifest whose digest is C.code_digest (a server never certifies
code it does not run); the manifest is kept in ``public/manifest.cbor`` (restored there if missing).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import trio
from nacl.signing import SigningKey

from appliance.boot.backends import announcement_key, open_rom
from appliance.boot.check import code_mismatches
from appliance.boot.rom import RomError
from appliance.host.config import NodeConfig
from appliance.host.files import erase
from appliance.net import PeerNetwork
from appliance.node.store import StateDir
from appliance.protocols.init import InitOutcome, InitProtocol

log = logging.getLogger("pst.init")


class CeremonyError(Exception):
    """The initialization cannot start or did not complete; the message says why."""


def read_sstart(path: Path, vstart: bytes) -> bytearray:
    try:
        seed = bytearray(path.read_bytes())
    except OSError as exc:
        raise CeremonyError(f"{path}: cannot read the start key: {exc.strerror}") from None
    if len(seed) != 32:
        raise CeremonyError(f"{path}: a start key seed is 32 bytes, this file has {len(seed)}")
    if bytes(SigningKey(bytes(seed)).verify_key) != vstart:
        raise CeremonyError(f"{path}: this Sstart does not match the Vstart in the ROM")
    return seed


def check_code(config: NodeConfig) -> None:
    """C must name the installed code: the manifest of the package has digest C.code_digest."""
    if not config.constants.code_digest:
        raise CeremonyError(
            f"{config.path}: [network] has no code_digest: C must name the code every server runs; "
            "put the output of `pst manifest` in network.code_digest on every server"
        )
    mismatches = code_mismatches(config.constants, config.state_dir)
    if mismatches:
        shown = "; ".join(str(m) for m in mismatches[:5])
        raise CeremonyError(f"the installed code is not the code C names: {shown}")


#: Seconds a server that finished init keeps answering peers that have not.
LINGER = 3.0


async def run_init(
    config: NodeConfig, sstart_path: Path, start: float, *, timeout: float = 120.0
) -> InitOutcome:
    try:
        vstart = open_rom(config).read_vstart()
    except RomError as exc:
        raise CeremonyError(str(exc)) from None
    store = StateDir(config.state_dir)
    if store.load().public.m is not None:
        raise CeremonyError(f"{config.state_dir}: this server is already initialized")
    check_code(config)
    seed = read_sstart(sstart_path, vstart)
    try:
        key = announcement_key(config)
        ann_public = key.public_key() if key is not None else None
    except RomError as exc:
        raise CeremonyError(str(exc)) from None
    protocol = InitProtocol(
        me=config.server_id,
        constants=config.constants,
        sstart=seed,
        start=start,
        rand=os.urandom,
        ann_public=ann_public,
        deadline=start + timeout,
    )
    inbox_send, inbox = trio.open_memory_channel[tuple[int, bytes]](10_000)

    async def on_frame(peer: int, data: bytes) -> None:
        try:
            inbox_send.send_nowait((peer, data))
        except trio.WouldBlock:
            log.warning("inbox full: dropped a message from server %d", peer)

    addresses = dict(config.peers)
    addresses[config.server_id] = config.listen
    net = PeerNetwork(config.server_id, addresses, None, None, None, on_frame=on_frame)
    async with trio.open_nursery() as nursery:
        await nursery.start(net.run)
        # No fixed rounds: the protocol proceeds as messages arrive, and fails by itself (no keys
        # kept) at its deadline. Once done, it lingers a little to answer peers still at work
        # (the decisions, M_i, the signatures they lack).
        linger: float | None = None
        with trio.fail_after(max(0.0, start - time.time()) + timeout + 10.0):
            while linger is None or time.time() < linger:
                now = time.time()
                if protocol.outcome is not None and linger is None:
                    linger = now + (LINGER if protocol.outcome.ok else 0.0)
                for out in protocol.tick(now):
                    net.send(out.to, out.data)
                wake = protocol.next_wakeup(now)
                until = wake if wake is not None else now + 0.5
                if linger is not None:
                    until = min(until, linger)
                with trio.move_on_after(max(0.0, until - time.time())):
                    peer, data = await inbox.receive()
                    protocol.receive(peer, data, time.time())
        nursery.cancel_scope.cancel()
    outcome = protocol.outcome
    assert outcome is not None  # the loop ends only once there is one
    for reason in protocol.rejected[:20]:
        log.warning("rejected a message: %s", reason)
    if outcome.ok and outcome.public is not None and outcome.private is not None:
        store.save(outcome.public, outcome.private)
        erase(sstart_path)
        log.info("initialized: Sstart erased (%s)", sstart_path)
    return outcome
