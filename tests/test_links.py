"""Proactively secure links (paper §5.4): messages between clients of one application at two servers.

Four LinkServices exchange frames in process with seeded delays, losses and a partition; the
clients are played by calls on each service and its inboxes. Real servers across a refresh, with
the client library, are in test_links_cluster.py.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.crypto import encoding
from appliance.protocols.links import (
    ATTEMPT_TIMEOUT,
    LINK_FRAME,
    MAX_DATA,
    Inboxes,
    LinkError,
    LinkService,
)

APP = "tunnel"


def _member(names: set[str]) -> Callable[[str], bool]:
    return lambda app: app in names


class Net:
    def __init__(self, seed: int = 1, clients: dict[int, set[str]] | None = None, loss: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.loss = loss
        self.down: set[int] = set()
        clients = clients if clients is not None else {i: {APP} for i in range(1, 5)}
        self.links = {
            i: LinkService(me=i, n=4, has_client=_member(clients.get(i, set()))) for i in range(1, 5)
        }
        self._queue: list[tuple[float, int, int, int, bytes]] = []
        self._seq = 0

    def run(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            for i, service in self.links.items():
                service.tick(self.now)
                for to, frame in service.drain():
                    if i in self.down or to in self.down or self.rng.random() < self.loss:
                        continue
                    self._seq += 1
                    heapq.heappush(
                        self._queue, (self.now + self.rng.uniform(0.001, 0.05), self._seq, to, i, frame)
                    )
            self.now = min(end, self._queue[0][0] if self._queue else end, self.now + 0.05)
            while self._queue and self._queue[0][0] <= self.now:
                _, _, to, sender, frame = heapq.heappop(self._queue)
                self.links[to].receive(sender, frame, period=7)

    def send(
        self, i: int, to: int, data: bytes, msg_id: bytes | None = None, timeout: float = 10.0
    ) -> str | None:
        msg_id = msg_id or self.rng.randbytes(16)
        self.links[i].send(APP, to, data, msg_id, self.now, timeout)
        for _ in range(int(timeout / 0.05) + 10):
            self.run(0.05)
            if msg_id in self.links[i].results:
                return self.links[i].results.pop(msg_id)
        return "never settled"


def test_messages_reach_the_other_servers_client_in_order() -> None:
    net = Net()
    for k in range(5):
        assert net.send(1, 3, b"hello %d" % k) is None
    got = net.links[3].inboxes.take(APP, 10)
    assert [(m.sender, m.period, m.data) for m in got] == [(1, 7, b"hello %d" % k) for k in range(5)]
    assert net.links[3].inboxes.take(APP, 10) == []
    assert net.links[2].inboxes.count(APP) == 0  # only the destination holds it


def test_no_client_of_that_application_at_the_destination_is_a_clear_refusal() -> None:
    net = Net(clients={1: {APP}, 2: {"other"}})
    assert net.send(1, 2, b"anyone?") == f"server 2: no client of {APP!r} is registered at server 2"
    assert net.links[2].inboxes.count(APP) == 0 and net.links[2].inboxes.count("other") == 0


def test_a_full_inbox_refuses_until_its_client_receives() -> None:
    net = Net()
    net.links[2].inboxes.max_messages = 3
    for k in range(3):
        assert net.send(1, 2, b"m%d" % k) is None
    why = net.send(4, 2, b"one too many")
    assert why is not None and why.startswith(f"server 2: the inbox of {APP!r} is full (3 messages")
    assert [m.data for m in net.links[2].inboxes.take(APP, 1)] == [b"m0"]
    assert net.send(4, 2, b"now there is room") is None
    assert [m.data for m in net.links[2].inboxes.take(APP, 10)] == [b"m1", b"m2", b"now there is room"]


def test_an_unreachable_server_fails_the_send_at_its_deadline() -> None:
    net = Net()
    net.down.add(4)
    assert net.send(1, 4, b"are you there?", timeout=3.0) == "server 4 did not answer before the deadline"


def test_lost_frames_are_sent_again_and_queued_once() -> None:
    """Half of all frames lost (a channel re-keyed at a refresh loses some): every message still
    arrives once, in order of first success, and the sender learns it."""
    net = Net(seed=3, loss=0.5)
    for k in range(10):
        assert net.send(1, 2, b"m%d" % k, timeout=60.0) is None, k
    assert sorted(m.data for m in net.links[2].inboxes.take(APP, 100)) == sorted(
        b"m%d" % k for k in range(10)
    )


def test_a_partition_that_heals_before_the_deadline_delivers() -> None:
    net = Net()
    net.down.add(2)
    net.links[1].send(APP, 2, b"later", b"\x05" * 16, net.now, 20.0)
    net.run(3 * ATTEMPT_TIMEOUT)
    assert b"\x05" * 16 not in net.links[1].results
    net.down.clear()
    net.run(ATTEMPT_TIMEOUT + 1)
    assert net.links[1].results.pop(b"\x05" * 16) is None
    assert [m.data for m in net.links[2].inboxes.take(APP, 10)] == [b"later"]


def test_bad_sends_are_refused_before_anything_goes_out() -> None:
    links = Net().links[1]
    with pytest.raises(LinkError, match=r"server 1 is not another server of this network \(1..4, not 1\)"):
        links.send(APP, 1, b"x", b"\x00" * 16, 0.0, 5.0)
    with pytest.raises(LinkError, match="server 9 is not another server"):
        links.send(APP, 9, b"x", b"\x00" * 16, 0.0, 5.0)
    with pytest.raises(LinkError, match=f"at most {MAX_DATA} bytes"):
        links.send(APP, 2, b"x" * (MAX_DATA + 1), b"\x00" * 16, 0.0, 5.0)
    with pytest.raises(LinkError, match="application name"):
        links.send("", 2, b"x", b"\x00" * 16, 0.0, 5.0)
    links.send(APP, 2, b"x", b"\x00" * 16, 0.0, 5.0)
    with pytest.raises(LinkError, match="not already in flight"):
        links.send(APP, 3, b"y", b"\x00" * 16, 0.0, 5.0)


def test_an_answer_from_another_server_than_the_destination_settles_nothing() -> None:
    net = Net()
    net.links[1].send(APP, 2, b"x", b"\x09" * 16, 0.0, 5.0)
    net.links[1].receive(
        3, LINK_FRAME + encoding.encode({"k": "nack", "id": b"\x09" * 16, "reason": "lie"}), 7
    )
    assert net.links[1].results == {}


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        st.builds(
            lambda obj: LINK_FRAME + encoding.encode(obj),
            st.dictionaries(
                st.sampled_from(["k", "id", "app", "data", "reason", "x"]),
                st.one_of(
                    st.sampled_from(["msg", "ack", "nack"]),
                    st.binary(max_size=40),
                    st.text(max_size=80),
                    st.integers(),
                ),
            ),
        ),
    )
)
def test_any_frame_is_answered_or_rejected_never_raised(frame: bytes) -> None:
    service = LinkService(me=2, n=4, has_client=lambda app: True)
    service.receive(1, frame, 3)
    answers = service.drain()
    assert len(answers) + len(service.rejected) <= 1
    assert service.inboxes.count(APP) <= 1 and not service.results


def test_inboxes_bound_bytes_and_remember_ids() -> None:
    boxes = Inboxes(max_messages=100, max_bytes=10)
    assert boxes.put(APP, 1, b"a" * 16, 0, b"12345") is None
    assert boxes.put(APP, 1, b"b" * 16, 0, b"123456") is not None  # 11 bytes > 10
    assert boxes.put(APP, 1, b"c" * 16, 0, b"12345") is None
    assert boxes.put(APP, 1, b"a" * 16, 0, b"12345") is None and boxes.count(APP) == 2  # a repeat
    assert boxes.put(APP, 2, b"a" * 16, 0, b"1") is not None  # another sender's id: a new message, no room
    assert [m.data for m in boxes.take(APP, 5)] == [b"12345", b"12345"]
    assert boxes.put(APP, 1, b"b" * 16, 0, b"123456") is None  # room again
