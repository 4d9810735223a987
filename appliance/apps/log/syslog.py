"""Syslog messages (RFC 5424 and RFC 3164) and the log entry that records one.

Theory of operation
-------------------
A message arrives as bytes (one UDP datagram, one TCP or RELP frame). The log keeps those
bytes *exactly*, whatever they are, and beside them what the parser made of them. Nothing
is dropped and nothing raises: :func:`receive` turns any bytes into an :class:`Entry`, and an
entry whose bytes are not syslog is flagged *unparsed* and says why.

Parsing (:func:`parse_message`, pure, no I/O) tries, after the ``<PRI>`` both formats share:

1. **RFC 5424** when the version is ``1``:
   ``<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID STRUCTURED-DATA [SP MSG]``, each header
   field printable US-ASCII within the RFC's lengths or the NILVALUE ``-``, the timestamp an
   RFC 3339 date-time with at most 6 fractional digits and an offset, structured data ``-`` or
   elements ``[id name="value" ...]`` whose values are UTF-8 with ``\\"``, ``\\\\`` and ``\\]``
   unescaped (any other backslash stays, as §6.3.3 requires), and a MSG that may start with
   the UTF-8 BOM (then :attr:`SyslogMessage.bom` is set and the BOM is not part of the text).
2. **RFC 3164** (BSD) otherwise, leniently, as rsyslog's pmrfc3164 does: an optional
   ``Mmm dd hh:mm:ss`` timestamp (or an RFC 3339 one, which rsyslog forwards), an optional
   hostname, an optional ``TAG[PID]:``; whatever does not fit is the message text. A 5424
   version that fails its grammar falls back here too.

Only bytes without a valid ``<PRI>`` (0 to 191, no leading zero) are unparsed. Both
formats fill the same :class:`SyslogMessage`; fields a format lacks are ``None``.

The entry (:class:`Entry`) is what goes into the Merkle tree: canonical CBOR
(:mod:`appliance.crypto.encoding`) of a map ::

    {"v": 1, "raw": bytes, "time": µs since the epoch (receive time), "transport": "udp" |
     "tcp" | "tls" | "relp" | "relp-tls" | "api", "peer": "ip:port" (for "api": "uid U app
     NAME", the local API client that appended it), "size": octets sent,
     "syslog": null | {"format", "pri", "version", "timestamp", "hostname", "app_name",
                       "procid", "msgid", "sd": null | [start, end], "msg": offset, "bom"},
     "error": null | "why the bytes are not syslog"}

``size`` exceeds ``len(raw)`` when the message was longer than the limit and only its first
:data:`MAX_MESSAGE_SIZE` octets were kept (the entry is *truncated*). The parse result holds
the header fields as text and locates the rest in ``raw``: the structured data as a span
(re-read on decoding) and the MSG as an offset, so an entry is little larger than its message
and any message of at most :data:`MAX_MESSAGE_SIZE` octets fits an entry bundle's 65,535
bytes. Decoding (:meth:`Entry.decode`) is strict and raises only
:class:`~appliance.apps.log.errors.LogDecodeError`.
"""

from __future__ import annotations

import datetime
import logging
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from appliance.apps.log.errors import EntryTooLargeError, LogDecodeError
from appliance.apps.log.tiles import MAX_ENTRY_SIZE
from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError

__all__ = [
    "ENTRY_VERSION",
    "MAX_MESSAGE_SIZE",
    "TRANSPORTS",
    "Entry",
    "SDElement",
    "SyslogMessage",
    "SyslogParseError",
    "build_rfc5424",
    "escape_param_value",
    "parse_message",
    "receive",
]

log = logging.getLogger("pst.log.syslog")

ENTRY_VERSION: Final = 1
#: The largest message kept whole. An entry bundle carries entries of at most 65,535 bytes;
#: 1 KiB of that is left for the entry's other fields (receive time, peer, parse result).
MAX_MESSAGE_SIZE: Final = MAX_ENTRY_SIZE + 1 - 1024
TRANSPORTS: Final = frozenset({"udp", "tcp", "tls", "relp", "relp-tls", "api"})
#: Peers are short ("[v6]:port" is at most 53 characters, "uid U app NAME" of the local API at most
#: 147); longer ones are refused.
MAX_PEER_LENGTH: Final = 160
MAX_ERROR_LENGTH: Final = 200

Format = Literal["rfc5424", "rfc3164"]

# RFC 5424 §6: field lengths.
MAX_HOSTNAME: Final = 255
MAX_APP_NAME: Final = 48
MAX_PROCID: Final = 128
MAX_MSGID: Final = 32
MAX_SD_NAME: Final = 32
BOM: Final = b"\xef\xbb\xbf"


class SyslogParseError(LogDecodeError):
    """Bytes that are not a syslog message of the format tried; the message says why."""


@dataclass(frozen=True)
class SDElement:
    """One structured data element: its SD-ID and its parameters (values unescaped), in order."""

    id: str
    params: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, init=False)
class SyslogMessage:
    """What the parser read from a message; ``None`` where the format or the sender had nothing.

    ``msg_offset`` is where the MSG starts in the raw bytes (after the BOM if there is one);
    ``sd_span`` is where the structured data is, ``None`` for the NILVALUE and RFC 3164.
    """

    format: Format
    pri: int
    version: int | None
    timestamp: str | None
    hostname: str | None
    app_name: str | None
    procid: str | None
    msgid: str | None
    structured_data: tuple[SDElement, ...]
    sd_span: tuple[int, int] | None
    msg_offset: int
    bom: bool

    def __init__(
        self,
        format: Format,
        pri: int,
        version: int | None = None,
        timestamp: str | None = None,
        hostname: str | None = None,
        app_name: str | None = None,
        procid: str | None = None,
        msgid: str | None = None,
        structured_data: tuple[SDElement, ...] = (),
        sd_span: tuple[int, int] | None = None,
        msg_offset: int = 0,
        bom: bool = False,
    ) -> None:
        # One update of the instance's dict rather than a frozen dataclass's object.__setattr__
        # per field (a microsecond per message at the ingest).
        self.__dict__.update(
            format=format,
            pri=pri,
            version=version,
            timestamp=timestamp,
            hostname=hostname,
            app_name=app_name,
            procid=procid,
            msgid=msgid,
            structured_data=structured_data,
            sd_span=sd_span,
            msg_offset=msg_offset,
            bom=bom,
        )

    @property
    def facility(self) -> int:
        return self.pri >> 3

    @property
    def severity(self) -> int:
        return self.pri & 7


# --- Parsing -------------------------------------------------------------------------------------

_PRI = re.compile(rb"<(0|[1-9][0-9]{0,2})>")
_PRINT = rb"[\x21-\x7e]"
_HEADER_5424 = re.compile(rb"1 (%s+) (%s+) (%s+) (%s+) (%s+) " % ((_PRINT,) * 5))
_RFC3339 = re.compile(
    rb"([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]{1,6})?"
    rb"(Z|[+-]([0-9]{2}):([0-9]{2}))"
)
_SD_NAME = re.compile(rb"[\x21-\x3c\x3e-\x5c\x5e-\x7e]{1,%d}" % MAX_SD_NAME)  # printable but = ] " SP
_PARAM_VALUE = re.compile(rb'((?:[^"\\]|\\.)*)"', re.DOTALL)
_VALUE_ESCAPE = re.compile(rb'\\([\\"\]])')
_MONTHS = (b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec")
_BSD_TIMESTAMP = re.compile(rb"(%s) ([ 0-3][0-9]) ([0-9]{2}):([0-9]{2}):([0-9]{2})" % b"|".join(_MONTHS))
_TOKEN = re.compile(rb"[^ ]*")
_TAG = re.compile(rb"([^ :\[\]]{1,%d})(?:\[([\x21-\x5c\x5e-\x7e]{1,%d})\])?:" % (MAX_APP_NAME, MAX_PROCID))
_HOSTNAME = re.compile(rb"%s{1,%d}" % (_PRINT, MAX_HOSTNAME))


def _check_rfc3339(m: re.Match[bytes]) -> bool:
    month, day = int(m[2]), int(m[3])
    if not (1 <= month <= 12 and 1 <= day <= 28):  # else ask the calendar (a date object each)
        try:
            datetime.date(int(m[1]), month, day)
        except ValueError:
            return False
    if int(m[4]) > 23 or int(m[5]) > 59 or int(m[6]) > 59:
        return False
    if m.group(8) != b"Z":
        oh, om = int(m.group(9)), int(m.group(10))
        if oh > 23 or om > 59:
            return False
    return True


def _nil(value: bytes, limit: int, what: str) -> str | None:
    if value == b"-":
        return None
    if len(value) > limit:
        raise SyslogParseError(f"the {what} is longer than {limit} characters")
    return value.decode("ascii")


def parse_structured_data(raw: bytes, pos: int) -> tuple[tuple[SDElement, ...], int]:
    """The SD-ELEMENTs starting at ``pos`` (at least one) and where they end."""
    elements = []
    n = len(raw)
    while pos < n and raw[pos] == 0x5B:  # "["
        m = _SD_NAME.match(raw, pos + 1)
        if m is None:
            raise SyslogParseError(f"an SD-ID at offset {pos + 1} is not 1 to {MAX_SD_NAME} name characters")
        sd_id = m.group().decode("ascii")
        pos = m.end()
        params = []
        while pos < n and raw[pos] == 0x20:
            m = _SD_NAME.match(raw, pos + 1)
            if m is None or raw[m.end() : m.end() + 2] != b'="':
                raise SyslogParseError(f'a parameter at offset {pos + 1} of [{sd_id}] is not name="value"')
            name = m.group().decode("ascii")
            v = _PARAM_VALUE.match(raw, m.end() + 2)
            if v is None:
                raise SyslogParseError(f"the value of {sd_id}/{name} has no closing quote")
            try:
                value_raw = v.group(1)
                if b"\\" in value_raw:
                    value_raw = _VALUE_ESCAPE.sub(rb"\1", value_raw)
                value = value_raw.decode("utf-8")
            except UnicodeDecodeError:
                raise SyslogParseError(f"the value of {sd_id}/{name} is not UTF-8") from None
            params.append((name, value))
            pos = v.end()
        if pos >= n or raw[pos] != 0x5D:  # "]"
            raise SyslogParseError(f"the element [{sd_id}] is not closed by ']' at offset {pos}")
        pos += 1
        elements.append(SDElement(sd_id, tuple(params)))
    if not elements:
        raise SyslogParseError(f"no structured data at offset {pos}: neither '-' nor '['")
    return tuple(elements), pos


def _parse_5424(raw: bytes, pri: int, start: int) -> SyslogMessage:
    m = _HEADER_5424.match(raw, start)
    if m is None:
        raise SyslogParseError("the RFC 5424 header is not '1' and five fields separated by spaces")
    ts_raw = m.group(1)
    if ts_raw == b"-":
        timestamp = None
    else:
        t = _RFC3339.fullmatch(ts_raw)
        if t is None or not _check_rfc3339(t):
            raise SyslogParseError(f"the timestamp {ts_raw[:40]!r} is not an RFC 3339 date-time")
        timestamp = ts_raw.decode("ascii")
    hostname = _nil(m.group(2), MAX_HOSTNAME, "hostname")
    app_name = _nil(m.group(3), MAX_APP_NAME, "app-name")
    procid = _nil(m.group(4), MAX_PROCID, "procid")
    msgid = _nil(m.group(5), MAX_MSGID, "msgid")
    pos = m.end()
    sd_span = None
    elements: tuple[SDElement, ...] = ()
    if raw[pos : pos + 1] == b"-":
        pos += 1
    else:
        elements, end = parse_structured_data(raw, pos)
        sd_span = (pos, end)
        pos = end
    if pos < len(raw):
        if raw[pos] != 0x20:
            raise SyslogParseError(f"the structured data is followed by {raw[pos : pos + 1]!r}, not a space")
        pos += 1
    bom = raw.startswith(BOM, pos)
    return SyslogMessage(
        "rfc5424",
        pri,
        1,
        timestamp,
        hostname,
        app_name,
        procid,
        msgid,
        elements,
        sd_span,
        pos + 3 if bom else pos,
        bom,
    )


def _check_bsd_timestamp(m: re.Match[bytes]) -> bool:
    day = int(m.group(2).replace(b" ", b"0"))
    hour, minute, second = int(m.group(3)), int(m.group(4)), int(m.group(5))
    return 1 <= day <= 31 and hour <= 23 and minute <= 59 and second <= 59


def _parse_3164(raw: bytes, pri: int, pos: int) -> SyslogMessage:
    n = len(raw)
    timestamp = hostname = app_name = procid = None
    t = _BSD_TIMESTAMP.match(raw, pos)
    if t is not None and _check_bsd_timestamp(t) and (t.end() == n or raw[t.end()] == 0x20):
        timestamp = t.group().decode("ascii")
    else:
        token = _TOKEN.match(raw, pos)
        assert token is not None
        r = _RFC3339.fullmatch(token.group())
        if r is not None and _check_rfc3339(r):
            timestamp = token.group().decode("ascii")
            t = token
    if timestamp is not None:
        assert t is not None
        pos = min(t.end() + 1, n)
        token = _TOKEN.match(raw, pos)
        assert token is not None
        word = token.group()
        tag = _TAG.fullmatch(word)
        if tag is None and _HOSTNAME.fullmatch(word) and token.end() < n:
            hostname = word.decode("ascii")
            pos = token.end() + 1
    tag = _TAG.match(raw, pos)
    if tag is not None:
        app_name = tag.group(1).decode("latin-1")
        if not app_name.isprintable() or not app_name.isascii():
            app_name = None
        else:
            procid = tag.group(2).decode("ascii") if tag.group(2) else None
            pos = tag.end() + 1 if raw[tag.end() : tag.end() + 1] == b" " else tag.end()
    return SyslogMessage("rfc3164", pri, None, timestamp, hostname, app_name, procid, msg_offset=pos)


def parse_message(raw: bytes) -> SyslogMessage:
    """Parse one message; :class:`SyslogParseError` if it has no valid ``<PRI>``."""
    if not raw:
        raise SyslogParseError("the message is empty")
    m = _PRI.match(raw)
    if m is None:
        raise SyslogParseError("the message does not start with <PRI> (0 to 191, no leading zero)")
    pri = int(m.group(1))
    if pri > 191:
        raise SyslogParseError(f"PRI {pri} is above 191")
    if raw.startswith(b"1 ", m.end()):
        try:
            return _parse_5424(raw, pri, m.end())
        except SyslogParseError:
            pass
    return _parse_3164(raw, pri, m.end())


# --- Building (senders, tests) ---------------------------------------------------------------------


def escape_param_value(value: str) -> bytes:
    """A PARAM-VALUE as RFC 5424 §6.3.3 writes it: ``"``, ``\\`` and ``]`` escaped."""
    return value.encode("utf-8").replace(b"\\", b"\\\\").replace(b'"', b'\\"').replace(b"]", b"\\]")


def build_rfc5424(
    pri: int,
    timestamp: str | None,
    hostname: str | None,
    app_name: str | None,
    procid: str | None,
    msgid: str | None,
    structured_data: tuple[SDElement, ...] = (),
    msg: bytes | None = None,
    *,
    bom: bool = False,
) -> bytes:
    """An RFC 5424 message from its fields (no checks beyond what building needs)."""
    header = [f"<{pri}>1"] + [
        v if v is not None else "-" for v in (timestamp, hostname, app_name, procid, msgid)
    ]
    out = " ".join(header).encode("ascii") + b" "
    if structured_data:
        for element in structured_data:
            out += b"[" + element.id.encode("ascii")
            for name, value in element.params:
                out += b" " + name.encode("ascii") + b'="' + escape_param_value(value) + b'"'
            out += b"]"
    else:
        out += b"-"
    if msg is not None or bom:
        out += b" " + (BOM if bom else b"") + (msg or b"")
    return out


# --- The log entry -------------------------------------------------------------------------------


@dataclass(frozen=True, init=False)
class Entry:
    """One received message as the log records it (see the module docstring for the encoding).

    ``received`` is the receive time in microseconds since the Unix epoch; ``size`` the octets
    the sender sent, more than ``len(raw)`` if the message was truncated; ``message`` the parse
    result, or ``None`` with ``error`` saying why the bytes are not syslog.
    """

    raw: bytes
    received: int
    transport: str
    peer: str
    size: int
    message: SyslogMessage | None
    error: str | None

    def __init__(
        self,
        raw: bytes,
        received: int,
        transport: str,
        peer: str,
        size: int,
        message: SyslogMessage | None,
        error: str | None = None,
    ) -> None:
        self.__dict__.update(  # as SyslogMessage's
            raw=raw,
            received=received,
            transport=transport,
            peer=peer,
            size=size,
            message=message,
            error=error,
        )

    @property
    def unparsed(self) -> bool:
        return self.message is None

    @property
    def truncated(self) -> bool:
        return self.size > len(self.raw)

    @property
    def msg(self) -> bytes:
        """The MSG part (BOM excluded), or all the bytes of an unparsed entry."""
        return self.raw if self.message is None else self.raw[self.message.msg_offset :]

    def _syslog_map(self) -> dict[str, Any] | None:
        m = self.message
        if m is None:
            return None
        return {  # in canonical key order: encode() relies on it
            "sd": list(m.sd_span) if m.sd_span is not None else None,
            "bom": m.bom,
            "msg": m.msg_offset,
            "pri": m.pri,
            "msgid": m.msgid,
            "format": m.format,
            "procid": m.procid,
            "version": m.version,
            "app_name": m.app_name,
            "hostname": m.hostname,
            "timestamp": m.timestamp,
        }

    def to_obj(self) -> dict[str, Any]:
        """The entry as the CBOR map it is encoded as (in canonical key order)."""
        return {
            "v": ENTRY_VERSION,
            "raw": self.raw,
            "peer": self.peer,
            "size": self.size,
            "time": self.received,
            "error": self.error,
            "syslog": self._syslog_map(),
            "transport": self.transport,
        }

    def encode(self) -> bytes:
        """The entry's bytes, the leaf of the Merkle tree: canonical CBOR, at most 65,535 bytes.

        Written here field by field (the map's keys in canonical order, each value's shortest
        head), the bytes :func:`encoding.encode` gives for :meth:`to_obj` (property tests check
        it), at about half the cost of the generic encoder, which was the ingest's largest
        item after the parser."""
        m = self.message
        if m is None:
            syslog = _NULL
        else:
            span = m.sd_span
            syslog = b"".join(
                (
                    b"\xabbsd",
                    _NULL if span is None else b"\x82" + _int(span[0]) + _int(span[1]),
                    b"\x63bom\xf5" if m.bom else b"\x63bom\xf4",
                    b"\x63msg",
                    _int(m.msg_offset),
                    b"\x63pri",
                    _int(m.pri),
                    b"\x65msgid",
                    _text(m.msgid),
                    b"\x66format",
                    _text(m.format),
                    b"\x66procid",
                    _text(m.procid),
                    b"\x67version",
                    _NULL if m.version is None else _int(m.version),
                    b"\x68app_name",
                    _text(m.app_name),
                    b"\x68hostname",
                    _text(m.hostname),
                    b"\x69timestamp",
                    _text(m.timestamp),
                )
            )
        raw = self.raw
        data = b"".join(
            (
                _ENTRY_HEAD,
                _head(0x40, len(raw)),
                raw,
                b"\x64peer",
                _text(self.peer),
                b"\x64size",
                _int(self.size),
                b"\x64time",
                _int(self.received),
                b"\x65error",
                _text(self.error),
                b"\x66syslog",
                syslog,
                b"\x69transport",
                _text(self.transport),
            )
        )
        if len(data) > MAX_ENTRY_SIZE:
            raise EntryTooLargeError(
                f"an entry is at most {MAX_ENTRY_SIZE} bytes, this one {len(data)} "
                f"(messages are cut at {MAX_MESSAGE_SIZE} octets)"
            )
        return data

    @classmethod
    def decode(cls, data: bytes) -> Entry:
        """Read an entry's bytes strictly; :class:`LogDecodeError` names what is wrong."""
        try:
            return _decode_entry(data)
        except LogDecodeError:
            raise
        except DecodeError as exc:
            raise LogDecodeError(str(exc)) from None


_NULL = b"\xf6"
#: The heads of items of length (or value) below 24: one byte, major type and length.
_SMALL_HEADS = [bytes((i,)) for i in range(256)]


def _head(major: int, n: int) -> bytes:
    """The shortest CBOR head of major type ``major`` (shifted: 0x00, 0x20, 0x40, 0x60) and ``n``."""
    if n < 24:
        return _SMALL_HEADS[major | n]
    if n < 0x100:
        return bytes((major | 24, n))
    if n < 0x10000:
        return bytes((major | 25,)) + n.to_bytes(2, "big")
    if n < 0x100000000:
        return bytes((major | 26,)) + n.to_bytes(4, "big")
    return bytes((major | 27,)) + n.to_bytes(8, "big")


def _int(n: int) -> bytes:
    return _head(0x00, n) if n >= 0 else _head(0x20, -1 - n)


#: Encoded text strings: a sender's host, app, peer address and timestamps repeat.
_TEXTS: dict[str | None, bytes] = {None: _NULL}


def _text(s: str | None) -> bytes:
    data = _TEXTS.get(s)
    if data is None:
        assert s is not None
        b = s.encode("utf-8")
        data = _head(0x60, len(b)) + b
        if len(_TEXTS) >= 4096:
            _TEXTS.clear()
            _TEXTS[None] = _NULL
        _TEXTS[s] = data
    return data


#: The map of 8 pairs, "v": ENTRY_VERSION, then the key "raw" (its value's head follows).
_ENTRY_HEAD = b"\xa8\x61v" + _int(ENTRY_VERSION) + b"\x63raw"

_ENTRY_FIELDS: dict[str, type | tuple[type, ...]] = {
    "v": int,
    "raw": bytes,
    "time": int,
    "transport": str,
    "peer": str,
    "size": int,
    "syslog": (dict, type(None)),
    "error": (str, type(None)),
}
_OPT_STR = (str, type(None))
_SYSLOG_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str,
    "pri": int,
    "version": (int, type(None)),
    "timestamp": _OPT_STR,
    "hostname": _OPT_STR,
    "app_name": _OPT_STR,
    "procid": _OPT_STR,
    "msgid": _OPT_STR,
    "sd": (list, type(None)),
    "msg": int,
    "bom": bool,
}


def _decode_entry(data: bytes) -> Entry:
    obj = encoding.expect_map(
        encoding.decode(data, max_size=MAX_ENTRY_SIZE, what="log entry"), _ENTRY_FIELDS, "log entry"
    )
    if obj["v"] != ENTRY_VERSION:
        raise LogDecodeError(f"log entry: version {obj['v']}, not {ENTRY_VERSION}")
    raw: bytes = obj["raw"]
    if obj["transport"] not in TRANSPORTS:
        raise LogDecodeError(f"log entry: unknown transport {obj['transport'][:20]!r}")
    if len(obj["peer"]) > MAX_PEER_LENGTH:
        raise LogDecodeError("log entry: the peer address is too long")
    if obj["time"] < 0 or obj["size"] < len(raw):
        raise LogDecodeError("log entry: a negative time, or a size below the raw bytes' length")
    if (obj["syslog"] is None) == (obj["error"] is None):
        raise LogDecodeError("log entry: exactly one of a parse result and an error")
    message = None
    if obj["syslog"] is not None:
        message = _decode_syslog(obj["syslog"], raw)
    elif len(obj["error"]) > MAX_ERROR_LENGTH:
        raise LogDecodeError("log entry: the error is too long")
    return Entry(raw, obj["time"], obj["transport"], obj["peer"], obj["size"], message, obj["error"])


def _decode_syslog(obj: Any, raw: bytes) -> SyslogMessage:
    s = encoding.expect_map(obj, _SYSLOG_FIELDS, "log entry's parse result")
    fmt = s["format"]
    if fmt not in ("rfc5424", "rfc3164"):
        raise LogDecodeError(f"log entry: unknown format {fmt[:20]!r}")
    if not 0 <= s["pri"] <= 191:
        raise LogDecodeError("log entry: PRI out of range")
    if fmt == "rfc5424" and not (s["version"] == 1 and type(s["version"]) is int):
        raise LogDecodeError("log entry: an RFC 5424 message has version 1")
    if fmt == "rfc3164" and (s["version"], s["msgid"], s["sd"], s["bom"]) != (None, None, None, False):
        raise LogDecodeError("log entry: an RFC 3164 message has no version, msgid, structured data or BOM")
    if not 0 <= s["msg"] <= len(raw):
        raise LogDecodeError("log entry: the MSG offset is outside the raw bytes")
    for key, limit in (
        ("hostname", MAX_HOSTNAME),
        ("app_name", MAX_APP_NAME),
        ("procid", MAX_PROCID),
        ("msgid", MAX_MSGID),
        ("timestamp", 64),
    ):
        if s[key] is not None and len(s[key]) > limit:
            raise LogDecodeError(f"log entry: the {key} is longer than {limit}")
    span = s["sd"]
    elements: tuple[SDElement, ...] = ()
    if span is not None:
        if len(span) != 2 or not all(type(x) is int for x in span) or not 0 <= span[0] < span[1] <= len(raw):
            raise LogDecodeError("log entry: the structured data span is not [start, end] in the raw bytes")
        try:
            elements, end = parse_structured_data(raw, span[0])
        except SyslogParseError as exc:
            raise LogDecodeError(f"log entry: the structured data does not parse: {exc}") from None
        if end != span[1]:
            raise LogDecodeError("log entry: the structured data span ends in the wrong place")
        span = (span[0], span[1])
    return SyslogMessage(
        fmt,
        s["pri"],
        s["version"],
        s["timestamp"],
        s["hostname"],
        s["app_name"],
        s["procid"],
        s["msgid"],
        elements,
        span,
        s["msg"],
        s["bom"],
    )


def receive(raw: bytes, *, received: int, transport: str, peer: str, size: int | None = None) -> Entry:
    """The entry for bytes received: parsed, or flagged unparsed with the reason. Never raises
    for any ``raw`` (the arguments the server supplies must be right: a known transport, a
    short peer address, ``size >= len(raw)``)."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}")
    if len(peer) > MAX_PEER_LENGTH:
        raise ValueError("peer address too long")
    size = len(raw) if size is None else size
    if size < len(raw):
        raise ValueError("size is below the message's length")
    raw = bytes(raw[:MAX_MESSAGE_SIZE])
    try:
        return Entry(raw, received, transport, peer, size, parse_message(raw))
    except SyslogParseError as exc:
        return Entry(raw, received, transport, peer, size, None, str(exc)[:MAX_ERROR_LENGTH])
    except Exception as exc:  # a parser bug must not lose a message: log it raw, and say so
        log.exception("syslog parser failed on a message from %s", peer)
        return Entry(raw, received, transport, peer, size, None, f"parser error ({type(exc).__name__})")
