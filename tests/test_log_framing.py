"""Syslog framing over TCP (RFC 6587 octet counting and LF, detected per frame) and UDP."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.apps.log.framing import Frame, StreamDeframer, datagram_frame
from appliance.apps.log.syslog import MAX_MESSAGE_SIZE


def _deframe(stream: bytes, chunks: list[int] | None = None, limit: int = MAX_MESSAGE_SIZE) -> list[Frame]:
    d = StreamDeframer(limit)
    frames: list[Frame] = []
    pos = 0
    for size in chunks or []:
        frames += d.feed(stream[pos : pos + size])
        pos += size
    frames += d.feed(stream[pos:])
    return frames + d.eof()


def _octets(msg: bytes) -> bytes:
    return b"%d %s" % (len(msg), msg)


def test_octet_counted_messages_may_contain_line_feeds() -> None:
    stream = _octets(b"<13>1 - - - - - - two\nlines") + _octets(b"<13>x")
    assert _deframe(stream) == [Frame(b"<13>1 - - - - - - two\nlines", 27), Frame(b"<13>x", 5)]


def test_lf_framed_messages_and_a_last_one_without_lf() -> None:
    assert _deframe(b"<13>a\n<13>b\n\n<13>c") == [Frame(b"<13>a", 5), Frame(b"<13>b", 5), Frame(b"<13>c", 5)]


def test_each_frame_chooses_its_framing_as_rsyslog_does() -> None:
    stream = _octets(b"<1>counted") + b"<2>lf\n" + _octets(b"<3>again") + b"\n" + b"<4>crlf\r\n"
    assert [f.data for f in _deframe(stream)] == [b"<1>counted", b"<2>lf", b"<3>again", b"<4>crlf\r"]


def test_a_malformed_octet_count_is_read_as_an_lf_framed_message() -> None:
    d = StreamDeframer()
    assert d.feed(b"12x<13>a\n1234567890 <13>b\n0 zero\n") == [
        Frame(b"12x<13>a", 8),
        Frame(b"1234567890 <13>b", 16),
        Frame(b"0 zero", 6),
    ]
    assert d.framing_errors == 2


def test_an_oversize_message_is_cut_and_the_stream_stays_in_step() -> None:
    limit = 100
    big = b"<13>" + b"x" * 1000
    stream = _octets(big) + _octets(b"<13>next") + big + b"\n" + b"<13>after\n"
    d = StreamDeframer(limit)
    frames = d.feed(stream)
    assert frames == [
        Frame(big[:limit], 1004),
        Frame(b"<13>next", 8),
        Frame(big[:limit], 1004),
        Frame(b"<13>after", 9),
    ]
    assert d.truncated == 2


def test_the_deframer_holds_at_most_one_message() -> None:
    d = StreamDeframer(100)
    d.feed(b"999999999 ")
    for _ in range(100):
        assert d.feed(b"y" * 10_000) == [] and d.buffered <= 100
    d = StreamDeframer(100)
    for _ in range(100):
        assert d.feed(b"z" * 10_000) == [] and d.buffered <= 100
    assert d.eof() == [Frame(b"z" * 100, 1_000_000)]


def test_a_stream_ending_inside_a_message() -> None:
    d = StreamDeframer()
    assert d.feed(b"20 <13>only part") == []
    assert d.eof() == [Frame(b"<13>only part", 20)]  # truncated: 20 announced
    d = StreamDeframer()
    d.feed(b"<13>a\n123")
    assert d.eof() == [Frame(b"123", 3)] and d.framing_errors == 1
    d = StreamDeframer()
    assert d.feed(b"\n\n") == [] and d.eof() == []
    with pytest.raises(ValueError):
        d.feed(b"x")


def test_udp_one_message_per_datagram() -> None:
    assert datagram_frame(b"<13>a\n<13>b") == Frame(b"<13>a\n<13>b", 11)
    assert datagram_frame(b"") is None
    assert datagram_frame(b"x" * 500, 100) == Frame(b"x" * 100, 500)


_MESSAGES = st.lists(st.binary(min_size=1, max_size=200), max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    messages=_MESSAGES,
    counted=st.lists(st.booleans(), min_size=12, max_size=12),
    cuts=st.lists(st.integers(0, 50)),
)
def test_well_framed_messages_come_out_whole_however_the_stream_is_cut(
    messages: list[bytes], counted: list[bool], cuts: list[int]
) -> None:
    stream = b""
    expected = []
    for msg, oc in zip(messages, counted, strict=False):
        if oc:
            stream += _octets(msg)
            expected.append(msg)
        elif b"\n" not in msg and not msg[:1].isdigit():
            stream += msg + b"\n"
            expected.append(msg)
    frames = _deframe(stream, cuts)
    assert [f.data for f in frames] == expected and not any(f.truncated for f in frames)


_GAP = re.compile(rb"\n*(?:[1-9][0-9]{0,8} )?")


@settings(max_examples=300, deadline=None)
@given(stream=st.binary(max_size=600), cuts=st.lists(st.integers(0, 40)))
def test_any_stream_splits_into_messages_and_framing_without_losing_a_byte(
    stream: bytes, cuts: list[int]
) -> None:
    frames = _deframe(stream)
    assert _deframe(stream, cuts) == frames
    # The messages, in order, with only framing (LFs, an octet count) between them, are the stream.
    pos = 0
    for i, f in enumerate(frames):
        for start in range(pos, len(stream) + 1):
            if _GAP.fullmatch(stream, pos, start) and stream.startswith(f.data, start):
                break
        else:
            pytest.fail(f"frame {i} is not where the stream continues")
        if f.size != len(f.data):
            # Only the last frame may be short (the stream ended inside it), and then it is
            # everything after its framing.
            assert i == len(frames) - 1
            start = len(stream) - len(f.data)
            assert stream.endswith(f.data) and _GAP.fullmatch(stream, pos, start)
        pos = start + len(f.data)
    assert re.fullmatch(rb"\n*", stream[pos:])


@settings(max_examples=300, deadline=None)
@given(stream=st.binary(max_size=600), cuts=st.lists(st.integers(0, 40)), limit=st.integers(1, 64))
def test_a_limit_cuts_messages_and_changes_nothing_else(stream: bytes, cuts: list[int], limit: int) -> None:
    whole = _deframe(stream)
    cut = _deframe(stream, cuts, limit)
    assert [(f.data, f.size) for f in cut] == [(f.data[:limit], f.size) for f in whole]
