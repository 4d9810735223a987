"""Run the initialization (Table 3) for n servers in the deterministic simulator.

Every server gets a start key pair drawn from the seed (V_start is what its ROM would
hold); :func:`run_init` returns each server's :class:`~appliance.protocols.init.InitOutcome`,
and :meth:`InitRun.setups` turns successful outcomes into the
:class:`~appliance.sim.setup.ServerSetup` objects that simulated refreshes start from
(the same shape as :func:`~appliance.sim.setup.make_network` builds in-process).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, field

from nacl.signing import SigningKey

from appliance.crypto.annkey import SoftAnnouncementKey
from appliance.protocols._core import Outgoing
from appliance.protocols.init import InitOutcome, InitProtocol, default_deadline
from appliance.protocols.state import Constants
from appliance.sim._net import Fault, NetworkConfig, Simulation
from appliance.sim.setup import ServerSetup, seeded_bytes


class InitNode:
    """A simulated server during initialization: just its protocol engine."""

    def __init__(self, engine: InitProtocol) -> None:
        self.engine = engine

    def receive(self, sender: int, data: bytes, now: float) -> None:
        self.engine.receive(sender, data, now)

    def tick(self, now: float) -> list[Outgoing]:
        return self.engine.tick(now)

    def next_wakeup(self, now: float) -> float | None:
        return self.engine.next_wakeup(now)


@dataclass
class InitRun:
    constants: Constants
    seed: int
    sim: Simulation
    engines: dict[int, InitProtocol]
    vstarts: dict[int, bytes]
    ann_keys: Mapping[int, SoftAnnouncementKey] = field(default_factory=dict)

    @property
    def outcomes(self) -> dict[int, InitOutcome | None]:
        return {i: e.outcome for i, e in self.engines.items()}

    def setups(self) -> dict[int, ServerSetup]:
        """Each server's period-0 data, ready for refresh; raises if some server's init failed."""
        out = {}
        for i, engine in sorted(self.engines.items()):
            o = engine.outcome
            if o is None or o.public is None or o.private is None:
                why = o.failure if o is not None else "no outcome"
                raise RuntimeError(f"server {i}: initialization did not complete: {why}")
            out[i] = ServerSetup(i, self.vstarts[i], o.public, o.private, self.ann_keys.get(i))
        return out


def run_init(
    constants: Constants,
    seed: int,
    *,
    start: float = 0.0,
    engines: Mapping[int, type[InitProtocol]] | None = None,
    config: NetworkConfig | None = None,
    ann_keys: Mapping[int, SoftAnnouncementKey] | None = None,
    faults: Mapping[int, Fault] | None = None,
    partition: tuple[int, int] | None = None,
    heal_at: float = 0.0,
) -> InitRun:
    """Initialize a network of ``constants.n`` servers from ``seed``; ``engines`` swaps in variants;
    the servers in ``ann_keys`` have announcement keys (their ROMs are TPMs); ``faults`` act on
    the wire; ``partition`` cuts the link between two servers until ``heal_at``."""
    rng = random.Random(seed)
    seeds = {i: bytearray(rng.randbytes(32)) for i in constants.ids}
    vstarts = {i: bytes(SigningKey(bytes(s)).verify_key) for i, s in seeds.items()}
    protocols: dict[int, InitProtocol] = {}
    for i in constants.ids:
        cls = (engines or {}).get(i, InitProtocol)
        protocols[i] = cls(
            me=i,
            constants=constants,
            sstart=seeds[i],
            start=start,
            rand=seeded_bytes(f"init/{seed}/{i}".encode()),
            ann_public=ann_keys[i].public if ann_keys and i in ann_keys else None,
        )
    cfg = config or NetworkConfig(
        min_delay=0.001,
        max_delay=rng.uniform(0.005, 0.6) * constants.delta,
        tick_interval=constants.delta / 4,
    )
    sim = Simulation({i: InitNode(p) for i, p in protocols.items()}, seed, cfg)
    sim.faults.update(faults or {})
    if partition is not None:
        sim.partition(*partition)
        sim.run_until(heal_at)
        sim.heal()
    sim.run_until(
        start + default_deadline(constants) + constants.delta,
        stop=lambda: all(p.outcome is not None for p in protocols.values()),
    )
    return InitRun(constants, seed, sim, protocols, vstarts, dict(ann_keys or {}))
