"""The RELP server session: framing, open/syslog/close, and acknowledgement only after durability."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.apps.log.relp import (
    NEED_DATA,
    PAUSED,
    CloseRequested,
    ConnectionEnded,
    LocalProtocolError,
    Message,
    Opened,
    ProtocolError,
    RelpServer,
    State,
)

# What librelp's client (rsyslog's omrelp) sends first.
OPEN = b"1 open 86 relp_version=0\nrelp_software=librelp,1.11.0,http://librelp.adiscon.com\ncommands=syslog\n"
OPEN_ANSWER = b"1 rsp 65 200 OK\nrelp_version=0\nrelp_software=pst-appliance\ncommands=syslog\n"


def _frame(txnr: int, command: str, data: bytes = b"") -> bytes:
    if not data:
        return b"%d %s 0\n" % (txnr, command.encode())
    return b"%d %s %d %s\n" % (txnr, command.encode(), len(data), data)


def _events(server: RelpServer, data: bytes = b"") -> list[object]:
    """Feed ``data`` and pull events until the machine wants more, pauses or stops."""
    if data:
        server.receive_data(data)
    events: list[object] = []
    while server.state in (State.AWAIT_OPEN, State.OPEN):
        event = server.next_event()
        events.append(event)
        if event is NEED_DATA or event is PAUSED:
            break
    return events


def _opened() -> RelpServer:
    server = RelpServer()
    events = _events(server, OPEN)
    assert isinstance(events[0], Opened) and events[0].offers["commands"] == ["syslog"]
    assert server.data_to_send() == OPEN_ANSWER
    return server


def test_open_is_answered_with_the_version_and_the_syslog_command() -> None:
    server = RelpServer()
    assert _events(server, OPEN[:10]) == [NEED_DATA]
    events = _events(server, OPEN[10:])
    assert events == [
        Opened(
            1,
            {
                "relp_version": ["0"],
                "relp_software": ["librelp", "1.11.0", "http://librelp.adiscon.com"],
                "commands": ["syslog"],
            },
        ),
        NEED_DATA,
    ]
    assert server.state is State.OPEN and server.data_to_send() == OPEN_ANSWER


def test_a_message_is_answered_only_once_acknowledged_and_in_order() -> None:
    server = _opened()
    events = _events(server, _frame(2, "syslog", b"<13>one") + _frame(3, "syslog", b"<13>two"))
    assert events == [Message(2, b"<13>one", 7), Message(3, b"<13>two", 7), NEED_DATA]
    assert server.pending == 2 and server.data_to_send() == b""
    with pytest.raises(LocalProtocolError, match="oldest unacknowledged message is 2"):
        server.acknowledge(3)
    server.acknowledge(2)
    assert server.data_to_send() == b"2 rsp 6 200 OK\n" and server.data_to_send() == b""
    server.acknowledge(3)
    assert server.data_to_send() == b"3 rsp 6 200 OK\n"
    with pytest.raises(LocalProtocolError, match="no message is waiting"):
        server.acknowledge(4)


def test_close_is_answered_after_the_messages_before_it() -> None:
    server = _opened()
    events = _events(server, _frame(2, "syslog", b"<13>a") + _frame(3, "close"))
    assert events == [Message(2, b"<13>a", 5), CloseRequested(3)]
    assert server.data_to_send() == b"" and not server.done
    server.acknowledge(2)
    assert server.data_to_send() == b"2 rsp 6 200 OK\n3 rsp 0\n" and server.done


def test_server_close_keeps_the_acknowledgements_and_drops_the_rest() -> None:
    server = _opened()
    events = _events(server, _frame(2, "syslog", b"<13>a") + _frame(3, "syslog", b"<13>b") + b"4 sys")
    assert events == [Message(2, b"<13>a", 5), Message(3, b"<13>b", 5), NEED_DATA]
    server.acknowledge(2)
    server.server_close()  # 3 is never answered: the client resends it on its next session
    assert server.state is State.SERVER_CLOSED and server.pending == 0
    assert server.data_to_send() == b"2 rsp 6 200 OK\n0 serverclose 0\n" and server.done
    with pytest.raises(LocalProtocolError, match="no message is waiting"):
        server.acknowledge(3)
    server.server_close()  # once is enough
    assert server.data_to_send() == b""
    failed = _opened()
    _events(failed, b"x")
    failed.server_close()  # a session that failed already sent its serverclose
    assert failed.state is State.FAILED and failed.data_to_send().count(b"serverclose") == 1


def test_the_window_pauses_reading_until_acknowledgements() -> None:
    server = RelpServer(window=2)
    stream = OPEN + b"".join(_frame(t, "syslog", b"<13>m%d" % t) for t in range(2, 6))
    events = _events(server, stream)
    assert [type(e).__name__ for e in events] == ["Opened", "Message", "Message", "_Sentinel"]
    assert events[-1] is PAUSED and server.pending == 2
    server.acknowledge(2)
    assert _events(server) == [Message(4, b"<13>m4", 6), PAUSED]


def test_a_message_over_the_limit_is_cut_and_says_its_size() -> None:
    server = RelpServer(max_message_size=10)
    _events(server, OPEN)
    assert _events(server, _frame(2, "syslog", b"<13>" + b"x" * 100)) == [
        Message(2, b"<13>xxxxxx", 104),
        NEED_DATA,
    ]


@pytest.mark.parametrize(
    ("stream", "answer", "reason"),
    [
        (b"GET / HTTP/1.1\r\n", b"", "TXNR"),
        (b"1234567890 open 0\n", b"", "TXNR"),
        (b"1 op3n 0\n", b"1 rsp", "command"),
        (b"1 open x\n", b"1 rsp", "data length"),
        (b"1 open 3 abcd\n", b"1 rsp", "no LF after"),
        (b"1 open 0 \n", b"1 rsp", "LF right after"),
        (b"1 open 3\n", b"1 rsp", "no data"),
        (b"2 open 14 relp_version=0\n", b"2 rsp", "expected 1"),
        (b"1 syslog 4 <13>\n", b"1 rsp", "syslog before open"),
        (b"1 open 15 commands=syslog\n", b"1 rsp", "relp_version"),
        (b"1 open 14 relp_version=0\n", b"1 rsp", "syslog command"),
        (b"1 starttls 0\n", b"1 rsp", "'starttls' is not supported"),
        (b"1 rsp 6 200 OK\n", b"1 rsp", "'rsp' is not supported"),
        (b"1 open 999999 ", b"1 rsp", "exceeds the limit of 131072"),
    ],
)
def test_a_malformed_frame_is_answered_500_with_the_reason_and_closes(
    stream: bytes, answer: bytes, reason: str
) -> None:
    server = RelpServer()
    events = _events(server, stream)
    assert len(events) == 1 and isinstance(events[0], ProtocolError) and reason in events[0].reason
    out = server.data_to_send()
    assert out.startswith(answer) and out.endswith(b"0 serverclose 0\n") and server.done
    if answer:
        assert b" 500 " in out and reason.encode() in out
    with pytest.raises(LocalProtocolError):
        server.next_event()


def test_an_error_is_answered_after_the_messages_before_it() -> None:
    server = _opened()
    events = _events(server, _frame(2, "syslog", b"<13>a") + b"3 syslog 1 ab\n")
    assert events[0] == Message(2, b"<13>a", 5) and isinstance(events[1], ProtocolError)
    assert server.data_to_send() == b""  # nothing overtakes message 2
    server.acknowledge(2)
    assert server.data_to_send() == (
        b"2 rsp 6 200 OK\n3 rsp 44 500 no LF after the frame's 1 octets of data\n0 serverclose 0\n"
    )


def test_transaction_numbers_must_follow_each_other() -> None:
    server = _opened()
    events = _events(server, _frame(2, "syslog", b"x") + _frame(2, "syslog", b"y"))
    assert isinstance(events[1], ProtocolError) and "transaction number 2, expected 3" in events[1].reason


def test_the_end_of_the_stream() -> None:
    server = _opened()
    server.receive_data(_frame(2, "syslog", b"<13>a") + b"3 sys")
    server.receive_data(b"")
    assert _events(server) == [Message(2, b"<13>a", 5), ConnectionEnded(clean=False)]
    assert not server.done  # message 2 still to acknowledge
    server.acknowledge(2)
    assert server.data_to_send() == b"2 rsp 6 200 OK\n" and server.done
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"x")


@settings(max_examples=300, deadline=None)
@given(count=st.integers(0, 20), cuts=st.lists(st.integers(1, 30), max_size=40))
def test_a_session_cut_anywhere_gives_the_same_events(count: int, cuts: list[int]) -> None:
    stream = OPEN + b"".join(_frame(t, "syslog", b"<13>msg %d\n" % t) for t in range(2, count + 2))
    stream += _frame(count + 2, "close")
    server = RelpServer()
    events: list[object] = []
    pos = 0
    for size in [*cuts, len(stream)]:
        events += [e for e in _events(server, stream[pos : pos + size]) if e is not NEED_DATA]
        pos += size
        if server.state is State.CLOSING:
            break
    assert [e.txnr for e in events if isinstance(e, Message)] == list(range(2, count + 2))
    assert isinstance(events[-1], CloseRequested)
    for t in range(2, count + 2):
        server.acknowledge(t)
    out = server.data_to_send()
    assert out.count(b"200 OK") == count + 1 and out.endswith(b"%d rsp 0\n" % (count + 2)) and server.done


@settings(max_examples=500, deadline=None)
@given(tail=st.binary(max_size=200), prefix=st.booleans(), cuts=st.lists(st.integers(1, 50), max_size=5))
def test_any_bytes_give_events_or_a_500_never_an_exception(
    tail: bytes, prefix: bool, cuts: list[int]
) -> None:
    stream = (OPEN if prefix else b"") + tail
    server = RelpServer(window=2)
    waiting: list[int] = []
    pos = 0
    for size in [*cuts, len(stream), 0]:
        server.receive_data(stream[pos : pos + size])
        pos += size
        while server.state in (State.AWAIT_OPEN, State.OPEN):
            event = server.next_event()
            if isinstance(event, Message):
                waiting.append(event.txnr)
            elif event is PAUSED:
                for txnr in waiting:
                    server.acknowledge(txnr)
                waiting.clear()
            elif event is NEED_DATA:
                break
        if server.state not in (State.AWAIT_OPEN, State.OPEN):
            break
    for txnr in waiting:
        server.acknowledge(txnr)
    out = server.data_to_send()
    assert server.done
    assert (server.state is State.FAILED) == out.endswith(b"0 serverclose 0\n")
