"""The log's fast paths (issue 11's speed): each gives exactly what the generic code gives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.apps.log.node import LOG_FRAME, batch_frame
from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError


def _strict(data: bytes) -> object:
    try:
        return encoding.decode(data[1:], max_size=1 << 22, what="log frame")
    except DecodeError:
        return None


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=70000), tag=st.sampled_from([LOG_FRAME, b"\x01"]))
def test_batch_frame_reads_exactly_the_canonical_batch_frames(payload: bytes, tag: bytes) -> None:
    frame = tag + encoding.encode({"log": "batch", "b": payload})
    assert batch_frame(frame) == payload
    assert _strict(frame) == {"log": "batch", "b": payload}


@settings(max_examples=500, deadline=None)
@given(
    payload=st.binary(max_size=300),
    cut=st.integers(0, 400),
    pos=st.integers(0, 400),
    byte=st.integers(0, 255),
    extra=st.binary(max_size=3),
)
def test_fuzz_batch_frame_never_disagrees_with_the_strict_decoder(
    payload: bytes, cut: int, pos: int, byte: int, extra: bytes
) -> None:
    """Mutated, truncated or extended frames: the fast path reads a frame only if the strict
    decoder reads the same batch frame from it; anything else is left to the strict decoder."""
    frame = bytearray(LOG_FRAME + encoding.encode({"log": "batch", "b": payload}))
    if pos < len(frame):
        frame[pos] = byte
    data = bytes(frame[: max(cut, 1)]) + extra
    fast = batch_frame(data)
    if fast is not None:
        assert _strict(data) == {"log": "batch", "b": fast}


@given(data=st.binary(max_size=64))
def test_fuzz_batch_frame_on_any_bytes(data: bytes) -> None:
    fast = batch_frame(data)
    if fast is not None:
        assert _strict(data) == {"log": "batch", "b": fast}


def test_non_shortest_lengths_are_not_read() -> None:
    body = b"x" * 10
    # The length 10 in one extra byte (0x58 0x0a): valid CBOR, not canonical.
    frame = LOG_FRAME + b"\xa2\x61b\x58\x0a" + body + b"\x63log\x65batch"
    assert batch_frame(frame) is None and _strict(frame) is None
    assert batch_frame(LOG_FRAME + encoding.encode({"log": "batch", "b": body})) == body


@settings(max_examples=300, deadline=None)
@given(
    parts=st.lists(
        st.one_of(
            st.binary(max_size=40).map(lambda m: str(len(m)).encode() + b" " + m),  # well counted
            st.binary(max_size=40),  # anything: LF framing, bad counts, digits without a space
            st.sampled_from([b"12", b"0 ", b"1234567890 ab", b"3 abc", b"999999999 x", b"\n"]),
        ),
        max_size=12,
    ),
    limit=st.integers(1, 50),
)
def test_the_deframers_one_step_octet_count_gives_what_byte_by_byte_gives(
    parts: list[bytes], limit: int
) -> None:
    """A whole octet-counted message in one chunk is read in one step; fed one byte at a time
    (the state machine only), the same stream gives the same frames and counters."""
    from appliance.apps.log.framing import StreamDeframer

    stream = b"".join(parts)
    whole, single = StreamDeframer(limit), StreamDeframer(limit)
    got_whole = whole.feed(stream) + whole.eof()
    got_single = [f for i in range(len(stream)) for f in single.feed(stream[i : i + 1])] + single.eof()
    assert got_whole == got_single
    assert (whole.framing_errors, whole.truncated) == (single.framing_errors, single.truncated)


_TEXTS = st.none() | st.text(max_size=30)


@settings(max_examples=400, deadline=None)
@given(
    raw=st.binary(max_size=300),
    received=st.integers(-(2**64), 2**64 - 1),
    size=st.integers(0, 2**40),
    peer=st.text(max_size=60),
    transport=st.sampled_from(["udp", "tcp", "tls", "relp", "api"]),
    error=_TEXTS,
    parsed=st.booleans(),
    pri=st.integers(0, 191),
    version=st.none() | st.integers(0, 2**20),
    fields=st.tuples(_TEXTS, _TEXTS, _TEXTS, _TEXTS, _TEXTS),
    span=st.none() | st.tuples(st.integers(0, 70000), st.integers(0, 70000)),
    offset=st.integers(0, 70000),
    bom=st.booleans(),
)
def test_the_entry_written_field_by_field_is_the_canonical_cbor_of_its_map(
    raw: bytes,
    received: int,
    size: int,
    peer: str,
    transport: str,
    error: str | None,
    parsed: bool,
    pri: int,
    version: int | None,
    fields: tuple[str | None, ...],
    span: tuple[int, int] | None,
    offset: int,
    bom: bool,
) -> None:
    from appliance.apps.log.syslog import Entry, SyslogMessage

    timestamp, hostname, app_name, procid, msgid = fields
    message = (
        SyslogMessage(
            "rfc5424" if version is not None else "rfc3164",
            pri,
            version,
            timestamp,
            hostname,
            app_name,
            procid,
            msgid,
            (),
            span,
            offset,
            bom,
        )
        if parsed
        else None
    )
    entry = Entry(raw, received, transport, peer, size, message, error)
    assert entry.encode() == encoding.encode(entry.to_obj())
    assert entry.encode() == entry.encode()  # (the second time from the cache of texts)


def _strict_batch(raw: bytes) -> object:
    try:
        return encoding.decode(raw, max_size=1 << 22, what="batch")
    except DecodeError:
        return None


@settings(max_examples=300, deadline=None)
@given(
    origin=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**64 - 1),
    entries=st.lists(st.binary(max_size=400), max_size=20),
)
def test_read_batch_reads_every_canonical_batch(origin: int, seq: int, entries: list[bytes]) -> None:
    from appliance.apps.log.replication import _read_batch

    raw = encoding.encode({"origin": origin, "seq": seq, "entries": entries})
    assert _read_batch(raw) == (origin, seq, entries)


@settings(max_examples=600, deadline=None)
@given(
    seq=st.integers(0, 70000),
    entries=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    pos=st.integers(0, 1400),
    byte=st.integers(0, 255),
    cut=st.integers(0, 1400),
    extra=st.binary(max_size=3),
)
def test_fuzz_read_batch_never_disagrees_with_the_strict_decoder(
    seq: int, entries: list[bytes], pos: int, byte: int, cut: int, extra: bytes
) -> None:
    """Mutated, truncated or extended batches: read only if the strict decoder reads the same."""
    from appliance.apps.log.replication import _read_batch

    data = bytearray(encoding.encode({"origin": 2, "seq": seq, "entries": entries}))
    if pos < len(data):
        data[pos] = byte
    raw = bytes(data[: max(cut, 1)]) + extra
    fast = _read_batch(raw)
    if fast is not None:
        origin, s, es = fast
        assert _strict_batch(raw) == {"origin": origin, "seq": s, "entries": es}


@given(raw=st.binary(max_size=80))
def test_fuzz_read_batch_on_any_bytes(raw: bytes) -> None:
    from appliance.apps.log.replication import _read_batch

    fast = _read_batch(b"\xa3\x63seq" + raw)
    if fast is not None:
        origin, s, es = fast
        assert _strict_batch(b"\xa3\x63seq" + raw) == {"origin": origin, "seq": s, "entries": es}
