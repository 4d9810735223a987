"""Syslog messages (RFC 5424, RFC 3164) and the log entry that records one."""

from __future__ import annotations

import string

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.apps.log.errors import EntryTooLargeError, LogDecodeError
from appliance.apps.log.syslog import (
    MAX_MESSAGE_SIZE,
    Entry,
    SDElement,
    SyslogMessage,
    SyslogParseError,
    build_rfc5424,
    parse_message,
    receive,
)
from appliance.apps.log.tiles import MAX_ENTRY_SIZE
from appliance.crypto import encoding


def _entry(raw: bytes, **kw: object) -> Entry:
    args: dict[str, object] = {"received": 1_700_000_000_000_000, "transport": "udp", "peer": "192.0.2.7:514"}
    args.update(kw)
    return receive(raw, **args)  # type: ignore[arg-type]


# --- RFC 5424 --------------------------------------------------------------------------------------


def test_rfc5424_examples_from_the_rfc() -> None:
    # RFC 5424 §6.5, examples 1 to 4 (the BOM written as bytes).
    m = parse_message(
        b"<34>1 2003-10-11T22:14:15.003Z mymachine.example.com su - ID47 - "
        b"\xef\xbb\xbf'su root' failed for lonvick on /dev/pts/8"
    )
    assert (m.format, m.facility, m.severity, m.version) == ("rfc5424", 4, 2, 1)
    assert (m.timestamp, m.hostname, m.app_name, m.procid, m.msgid) == (
        "2003-10-11T22:14:15.003Z",
        "mymachine.example.com",
        "su",
        None,
        "ID47",
    )
    assert m.bom and m.structured_data == () and m.sd_span is None

    raw = (
        b"<165>1 2003-08-24T05:14:15.000003-07:00 192.0.2.1 myproc 8710 - - %% It's time to make the do-nuts."
    )
    m = parse_message(raw)
    assert (m.facility, m.severity, m.procid, m.msgid, m.bom) == (20, 5, "8710", None, False)
    assert raw[m.msg_offset :] == b"%% It's time to make the do-nuts."

    raw = (
        b'<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut="3" '
        b'eventSource="Application" eventID="1011"] \xef\xbb\xbfAn application event log entry...'
    )
    m = parse_message(raw)
    assert m.structured_data == (
        SDElement("exampleSDID@32473", (("iut", "3"), ("eventSource", "Application"), ("eventID", "1011"))),
    )
    assert m.bom and raw[m.msg_offset :] == b"An application event log entry..."

    raw = (
        b'<165>1 2003-10-11T22:14:15.003Z mymachine.example.com evntslog - ID47 [exampleSDID@32473 iut="3" '
        b'eventSource="Application" eventID="1011"][examplePriority@32473 class="high"]'
    )
    m = parse_message(raw)
    assert [e.id for e in m.structured_data] == ["exampleSDID@32473", "examplePriority@32473"]
    assert m.sd_span == (raw.index(b"["), len(raw)) and m.msg_offset == len(raw)


def test_structured_data_escapes() -> None:
    # §6.3.3: '"', '\' and ']' are escaped; any other backslash stays as it is.
    m = parse_message(rb'<13>1 - - - - - [a@1 q="say \"hi\"" b="x\\y" c="[\]" d="C:\temp" e=""] m')
    assert m.structured_data[0].params == (
        ("q", 'say "hi"'),
        ("b", "x\\y"),
        ("c", "[]"),
        ("d", "C:\\temp"),
        ("e", ""),
    )
    assert parse_message(b'<13>1 - - - - - [a x="\xc3\xa9"]').structured_data[0].params == (("x", "é"),)


@pytest.mark.parametrize(
    "raw",
    [
        b"<13>1 2003-13-11T22:14:15Z h a p m - x",  # month 13
        b"<13>1 2003-02-29T22:14:15Z h a p m - x",  # not a leap year
        b"<13>1 2003-10-11T24:00:00Z h a p m - x",  # hour 24
        b"<13>1 2003-10-11T22:14:15.1234567Z h a p m - x",  # 7 fractional digits
        b"<13>1 2003-10-11T22:14:15 h a p m - x",  # no offset
        b'<13>1 - h a p m [a x="1"x',  # element not closed
        b'<13>1 - h a p m [a x="1] m',  # value not closed
        b"<13>1 - h a p m [a x=1] m",  # value not quoted
        b'<13>1 - h a p m [a x="\xff"] m',  # value not UTF-8
        b"<13>1 - h a p m -x",  # no space after the structured data
        b"<13>1 - h " + b"a" * 49 + b" p m - x",  # app-name over 48
        b"<13>1 - h a p " + b"m" * 33 + b" - x",  # msgid over 32
        b"<13>1 - h a p m",  # no structured data
    ],
)
def test_a_broken_rfc5424_message_is_read_as_bsd_text(raw: bytes) -> None:
    m = parse_message(raw)
    assert m.format == "rfc3164" and m.timestamp is None and raw[m.msg_offset :] == raw[4:]


def test_timestamps_with_offsets_and_leap_days() -> None:
    for ts in ("2024-02-29T00:00:00+05:30", "1985-04-12T23:20:50.52Z", "2003-08-24T05:14:15.000003-07:00"):
        assert parse_message(f"<0>1 {ts} - - - - -".encode()).timestamp == ts


# --- RFC 3164 --------------------------------------------------------------------------------------


def test_rfc3164_messages() -> None:
    m = parse_message(b"<34>Oct 11 22:14:15 mymachine su: 'su root' failed for lonvick on /dev/pts/8")
    assert (m.format, m.pri, m.timestamp, m.hostname, m.app_name, m.procid) == (
        "rfc3164",
        34,
        "Oct 11 22:14:15",
        "mymachine",
        "su",
        None,
    )
    raw = b"<13>Feb  5 17:32:18 10.0.0.99 Use the BFG!"
    m = parse_message(raw)
    assert (m.timestamp, m.hostname, m.app_name, raw[m.msg_offset :]) == (
        "Feb  5 17:32:18",
        "10.0.0.99",
        None,
        b"Use the BFG!",
    )
    # No hostname (what a local syslog() call sends), a tag with a PID.
    raw = b"<30>Nov 30 09:15:11 sshd[4242]: Accepted publickey"
    m = parse_message(raw)
    assert (m.hostname, m.app_name, m.procid, raw[m.msg_offset :]) == (
        None,
        "sshd",
        "4242",
        b"Accepted publickey",
    )
    # rsyslog's forwarding format: an RFC 3339 timestamp in a BSD header.
    m = parse_message(b"<13>2026-11-30T09:15:11.123456+00:00 vm postfix/smtpd[7]: connect")
    assert (m.timestamp, m.hostname, m.app_name, m.procid) == (
        "2026-11-30T09:15:11.123456+00:00",
        "vm",
        "postfix/smtpd",
        "7",
    )
    # Only a PRI: the rest is the text (RFC 3164 §4.3.3).
    m = parse_message(b"<13>just text")
    assert (m.timestamp, m.hostname, m.app_name, m.msg_offset) == (None, None, None, 4)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty"),
        (b"hello", "<PRI>"),
        (b"<192>x", "above 191"),
        (b"<013>x", "<PRI>"),
        (b"<>x", "<PRI>"),
        (b"<1234>x", "<PRI>"),
        (b"\x00\xff<13>x", "<PRI>"),
    ],
)
def test_bytes_without_a_valid_pri_are_logged_unparsed_with_the_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(SyslogParseError, match=reason):
        parse_message(raw)
    entry = _entry(raw)
    assert entry.unparsed and entry.raw == raw and reason in (entry.error or "")
    assert entry.msg == raw
    assert Entry.decode(entry.encode()) == entry


# --- Entries ---------------------------------------------------------------------------------------


def test_an_entry_keeps_the_raw_bytes_and_says_where_it_came_from() -> None:
    raw = b'<13>1 2026-11-30T09:15:11Z vm app 1 - [timeQuality tzKnown="1"] \xef\xbb\xbfh\xc3\xa9llo\n'
    entry = _entry(raw, transport="relp", peer="[2001:db8::1]:40000")
    assert entry.raw == raw and entry.msg == "héllo\n".encode() and not entry.truncated
    data = entry.encode()
    obj = encoding.decode(data)
    assert obj["raw"] == raw and obj["transport"] == "relp" and obj["peer"] == "[2001:db8::1]:40000"
    start = raw.index(b"[")
    assert (
        obj["syslog"]["sd"] == [start, start + 25] and raw[start : start + 25] == b'[timeQuality tzKnown="1"]'
    )
    assert Entry.decode(data) == entry


def test_an_oversize_message_is_cut_and_flagged_not_dropped() -> None:
    raw = b"<13>1 - - - - - - " + b"x" * (2 * MAX_MESSAGE_SIZE)
    entry = _entry(raw)
    assert entry.truncated and entry.size == len(raw) and entry.raw == raw[:MAX_MESSAGE_SIZE]
    assert entry.message is not None and entry.message.format == "rfc5424"
    assert Entry.decode(entry.encode()) == entry


def test_the_largest_entry_fits_a_bundle() -> None:
    # Every header field at its longest, the largest message, the longest peer address.
    raw = build_rfc5424(
        191, "2026-11-30T09:15:11.123456+05:30", "h" * 255, "a" * 48, "p" * 128, "m" * 32, msg=b""
    )
    raw += b"x" * (MAX_MESSAGE_SIZE - len(raw))
    peer = "[ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255]:65535"
    entry = _entry(raw, size=10**9, peer=peer, transport="relp-tls", received=2**63 - 1)
    assert entry.message is not None and entry.message.hostname == "h" * 255
    assert len(entry.encode()) <= MAX_ENTRY_SIZE
    bsd = b"<191>Nov 30 09:15:11 " + b"h" * 255 + b" " + b"t" * 48 + b"[" + b"p" * 128 + b"]: "
    entry = _entry(bsd + b"x" * MAX_MESSAGE_SIZE, size=10**9, peer=peer)
    assert entry.message is not None and entry.message.procid == "p" * 128
    assert len(entry.encode()) <= MAX_ENTRY_SIZE


def test_an_entry_that_cannot_fit_is_refused() -> None:
    entry = Entry(b"x" * MAX_ENTRY_SIZE, 0, "udp", "a", MAX_ENTRY_SIZE, None, "no")
    with pytest.raises(EntryTooLargeError):
        entry.encode()


def _reencode(entry: Entry, **changes: object) -> bytes:
    obj = encoding.decode(entry.encode())
    for key, value in changes.items():
        if key.startswith("syslog."):
            obj["syslog"][key[7:]] = value
        else:
            obj[key] = value
    return encoding.encode(obj)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"v": 2}, "version"),
        ({"transport": "carrier-pigeon"}, "transport"),
        ({"size": 3}, "size"),
        ({"time": -1}, "time"),
        ({"error": "also"}, "exactly one"),
        ({"peer": "p" * 161}, "peer"),
        ({"extra": 1}, "wrong fields"),
        ({"syslog.pri": 192}, "PRI"),
        ({"syslog.pri": True}, "pri"),
        ({"syslog.format": "rfc3195"}, "format"),
        ({"syslog.msg": 10_000}, "MSG offset"),
        ({"syslog.sd": [16, 18]}, "structured data"),
        ({"syslog.sd": [16, 10_000]}, "span"),
        ({"syslog.sd": [16]}, "span"),
        ({"syslog.version": None}, "version 1"),
        ({"syslog.hostname": "h" * 256}, "hostname"),
    ],
)
def test_decoding_an_entry_is_strict(changes: dict[str, object], reason: str) -> None:
    entry = _entry(b'<13>1 - - - - - [a b="c"] text')
    with pytest.raises(LogDecodeError, match=reason):
        Entry.decode(_reencode(entry, **changes))


def test_decoding_refuses_non_cbor_and_non_canonical_bytes() -> None:
    data = _entry(b"<13>x").encode()
    for bad in (b"", b"\xff", data + b"\x00", data[:-1]):
        with pytest.raises(LogDecodeError):
            Entry.decode(bad)


# --- Properties ------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300) | st.builds(lambda b: b"<13>" + b, st.binary(max_size=300)))
def test_any_bytes_make_an_entry_that_decodes_to_itself(raw: bytes) -> None:
    entry = _entry(raw)
    assert entry.raw == raw and entry.size == len(raw)
    assert entry.unparsed == (entry.error is not None)
    data = entry.encode()
    assert Entry.decode(data) == entry
    # encode() builds its maps in canonical order instead of sorting them: the same bytes.
    assert encoding.encode(cbor2.loads(data)) == data


_SD_TEXT = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '=]" ')
_PRINTABLE = "".join(chr(c) for c in range(0x21, 0x7F))


def _field(limit: int) -> st.SearchStrategy[str | None]:
    return st.none() | st.text(alphabet=_PRINTABLE, min_size=1, max_size=limit).filter(lambda s: s != "-")


_TIMESTAMPS = st.builds(
    lambda d, frac, off: f"{d.year:04d}-" + d.strftime("%m-%dT%H:%M:%S") + frac + off,
    st.datetimes(),
    st.sampled_from(["", ".1", ".123456"]),
    st.sampled_from(["Z", "+00:00", "-07:00", "+05:30"]),
)
_SD = st.lists(
    st.builds(
        SDElement,
        st.text(alphabet=_SD_TEXT, min_size=1, max_size=32),
        st.lists(
            st.tuples(st.text(alphabet=_SD_TEXT, min_size=1, max_size=32), st.text(max_size=20)), max_size=3
        ).map(tuple),
    ),
    max_size=3,
).map(tuple)


@settings(max_examples=300, deadline=None)
@given(
    pri=st.integers(0, 191),
    timestamp=st.none() | _TIMESTAMPS,
    hostname=_field(255),
    app_name=_field(48),
    procid=_field(128),
    msgid=_field(32),
    sd=_SD,
    msg=st.none() | st.binary(max_size=100),
    bom=st.booleans(),
)
def test_a_well_formed_rfc5424_message_parses_to_its_fields(
    pri: int,
    timestamp: str | None,
    hostname: str | None,
    app_name: str | None,
    procid: str | None,
    msgid: str | None,
    sd: tuple[SDElement, ...],
    msg: bytes | None,
    bom: bool,
) -> None:
    raw = build_rfc5424(pri, timestamp, hostname, app_name, procid, msgid, sd, msg, bom=bom)
    m = parse_message(raw)
    assert (m.format, m.pri, m.version, m.timestamp, m.hostname, m.app_name, m.procid, m.msgid) == (
        "rfc5424",
        pri,
        1,
        timestamp,
        hostname,
        app_name,
        procid,
        msgid,
    )
    assert m.structured_data == sd and m.bom == bom
    assert raw[m.msg_offset :] == (msg or b"")
    entry = _entry(raw)
    data = entry.encode()
    assert entry.msg == (msg or b"") and Entry.decode(data) == entry
    assert encoding.encode(cbor2.loads(data)) == data  # canonical, every field present


_TAG_TEXT = "".join(c for c in string.ascii_letters + string.digits + "._-/")


@settings(max_examples=200, deadline=None)
@given(
    pri=st.integers(0, 191),
    when=st.datetimes(),
    hostname=st.none() | st.text(alphabet=_TAG_TEXT + ".", min_size=1, max_size=60),
    tag=st.text(alphabet=_TAG_TEXT, min_size=1, max_size=48),
    pid=st.none() | st.integers(0, 2**32),
    msg=st.binary(max_size=100),
)
def test_a_well_formed_rfc3164_message_parses_to_its_fields(
    pri: int, when: object, hostname: str | None, tag: str, pid: int | None, msg: bytes
) -> None:
    stamp = when.strftime("%b %e %H:%M:%S")  # type: ignore[attr-defined]
    head = (
        f"<{pri}>{stamp} "
        + (f"{hostname} " if hostname else "")
        + tag
        + (f"[{pid}]" if pid is not None else "")
    )
    raw = head.encode() + b": " + msg
    m = parse_message(raw)
    assert (m.format, m.pri, m.timestamp, m.hostname, m.app_name) == ("rfc3164", pri, stamp, hostname, tag)
    assert m.procid == (None if pid is None else str(pid)) and raw[m.msg_offset :] == msg
    assert isinstance(m, SyslogMessage) and Entry.decode(_entry(raw).encode()) == _entry(raw)
