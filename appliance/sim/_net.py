"""The simulated network and event loop.

Theory of operation
-------------------
Virtual time only. A heap of events (deliveries and ticks) ordered by (time, sequence
number); every random choice (delays, drops, reordering) comes from one
``random.Random(seed)``, so a run is a pure function of its seed and replays exactly.
Nodes are sans-IO objects: ``receive(sender, data, now)`` and ``tick(now)`` returning
:class:`~appliance.protocols._core.Outgoing` messages. A node that is crashed gets no
events; a restart replaces it with a fresh object built by the scenario (from what it
had persisted). Faults are hooks on the wire: a :class:`Fault` may drop, delay, alter,
duplicate or replay any message from a server it controls.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from appliance.protocols._core import EVERYONE, Outgoing


class SimNode(Protocol):
    def receive(self, sender: int, data: bytes, now: float) -> None: ...

    def tick(self, now: float) -> list[Outgoing]: ...


class WakingNode(SimNode, Protocol):
    """A node that says when it next needs a tick (else it is ticked every ``tick_interval``)."""

    def next_wakeup(self, now: float) -> float | None: ...


@dataclass
class NetworkConfig:
    """Delays are uniform in [min_delay, max_delay]; ``drop_rate`` applies to every message."""

    min_delay: float = 0.001
    max_delay: float = 0.02
    drop_rate: float = 0.0
    tick_interval: float = 0.025


Fault = Callable[[int, int, bytes, float, random.Random], list[tuple[float, bytes]]]
"""fault(sender, to, data, now, rng) -> [(extra_delay, data)]: what actually goes on the wire."""


_Event = tuple[float, int, str, int, int, bytes]
"""(time, sequence number, kind, node, sender, data): tuples order fastest in the heap."""


class Simulation:
    """Runs nodes 1..n in virtual time; everything is decided by ``seed``."""

    def __init__(self, nodes: dict[int, SimNode], seed: int, config: NetworkConfig | None = None) -> None:
        self.nodes: dict[int, SimNode | None] = dict(nodes)
        self.n = len(nodes)
        self.config = config or NetworkConfig()
        self.rng = random.Random(seed)
        self.now = 0.0
        self._seq = 0
        self._events: list[_Event] = []
        self.faults: dict[int, Fault] = {}
        self.partitioned: set[frozenset[int]] = set()
        self.sent = 0
        self.delivered = 0
        self.trace: list[str] = []
        self._next_tick: dict[int, float] = {}
        for i in nodes:
            self._next_tick[i] = 0.0
            self._push(0.0, "tick", i)

    def _push(self, time: float, kind: str, node: int, sender: int = 0, data: bytes = b"") -> None:
        self._seq += 1
        heapq.heappush(self._events, (time, self._seq, kind, node, sender, data))

    # Control ---------------------------------------------------------------------

    def crash(self, i: int) -> None:
        self.nodes[i] = None
        self.trace.append(f"{self.now:.3f} crash {i}")

    def restart(self, i: int, node: SimNode) -> None:
        self.nodes[i] = node
        self.trace.append(f"{self.now:.3f} restart {i}")
        self._next_tick[i] = self.now
        self._push(self.now, "tick", i)

    def partition(self, a: int, b: int) -> None:
        self.partitioned.add(frozenset((a, b)))

    def heal(self) -> None:
        self.partitioned.clear()

    # Running -----------------------------------------------------------------------

    def _send(self, sender: int, out: Outgoing) -> None:
        targets = [j for j in self.nodes if j != sender] if out.to == EVERYONE else [out.to]
        for to in targets:
            if to not in self.nodes or to == sender:
                continue
            self.sent += 1
            if frozenset((sender, to)) in self.partitioned:
                continue
            if self.config.drop_rate and self.rng.random() < self.config.drop_rate:
                continue
            wire: list[tuple[float, bytes]] = [(0.0, out.data)]
            fault = self.faults.get(sender)
            if fault is not None:
                wire = fault(sender, to, out.data, self.now, self.rng)
            for extra, data in wire:
                delay = self.rng.uniform(self.config.min_delay, self.config.max_delay) + extra
                self._push(self.now + delay, "deliver", to, sender, data)

    def _schedule_tick(self, target: int, node: SimNode, time: float, *, after_tick: bool) -> None:
        """Tick again when the node asks (or every ``tick_interval``); never later than it needs."""
        wake = node.next_wakeup(time) if hasattr(node, "next_wakeup") else None
        when = max(time + 1e-6, wake) if wake is not None else time + self.config.tick_interval
        pending = self._next_tick.get(target)
        if after_tick or pending is None or when < pending:
            self._next_tick[target] = when
            self._push(when, "tick", target)

    def run_until(self, end: float, stop: Callable[[], bool] | None = None) -> None:
        events = self._events
        while events and events[0][0] <= end:
            time, _seq, kind, target, sender, data = heapq.heappop(events)
            self.now = time
            node = self.nodes.get(target)
            if node is None:
                continue
            if kind == "tick":
                if self._next_tick.get(target) not in (None, time):
                    continue  # superseded by an earlier wakeup
                for out in node.tick(time):
                    self._send(target, out)
                self._schedule_tick(target, node, time, after_tick=True)
            elif kind == "deliver":
                self.delivered += 1
                node.receive(sender, data, time)
                for out in node.tick(time):
                    self._send(target, out)
                self._schedule_tick(target, node, time, after_tick=False)
            if stop is not None and stop():
                return
        self.now = max(self.now, end)
