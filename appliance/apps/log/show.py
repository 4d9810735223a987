"""Log entries for people and scripts: what ``pst log tail`` and ``pst log show`` print (pure).

One line per entry: ``INDEX  RECEIVE-TIME  HOST  APP  MESSAGE``, the time in UTC (RFC 3339,
microseconds), HOST and APP from the syslog header (``-`` where the message has none; an entry
that is not syslog shows its peer as the host), the message with every control character
escaped (``\\n``, ``\\x1b``: nothing a sender wrote can move the cursor or fake a line), and
flags in brackets: ``[unparsed: why]``, ``[truncated from N octets]``. ``--json`` prints one
object per line (:func:`entry_json`): the entry's fields, the message as UTF-8 text with
invalid bytes replaced, and ``raw_b64`` with the exact bytes.

:func:`parse_since` reads ``--since``: Unix seconds, an ISO 8601 time (UTC unless it says
otherwise), or a duration back from now (``90s``, ``10m``, ``2h``, ``3d``).
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from typing import Any, Final

from appliance.apps.log.errors import LogDecodeError
from appliance.apps.log.syslog import Entry

__all__ = ["entry_json", "entry_line", "matches", "parse_since", "receive_time"]

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION: Final = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd])")


def receive_time(entry: Entry) -> str:
    when = dt.datetime.fromtimestamp(entry.received / 1_000_000, dt.UTC)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _printable(data: bytes) -> str:
    text = data.decode("utf-8", "replace")
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif not ch.isprintable():
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def host_of(entry: Entry) -> str | None:
    return entry.message.hostname if entry.message is not None else None


def app_of(entry: Entry) -> str | None:
    return entry.message.app_name if entry.message is not None else None


def entry_line(index: int, entry: Entry) -> str:
    host = host_of(entry) or ("-" if entry.message is not None else entry.peer)
    flags = ""
    if entry.error is not None:
        flags += f" [unparsed: {entry.error}]"
    if entry.truncated:
        flags += f" [truncated from {entry.size} octets]"
    app = app_of(entry) or "-"
    return (
        f"{index}  {receive_time(entry)}  {_printable(host.encode())}  {app}  {_printable(entry.msg)}{flags}"
    )


def entry_json(index: int, entry: Entry) -> dict[str, Any]:
    m = entry.message
    return {
        "index": index,
        "time": receive_time(entry),
        "time_us": entry.received,
        "transport": entry.transport,
        "peer": entry.peer,
        "host": host_of(entry),
        "app": app_of(entry),
        "format": m.format if m is not None else None,
        "pri": m.pri if m is not None else None,
        "timestamp": m.timestamp if m is not None else None,
        "procid": m.procid if m is not None else None,
        "msgid": m.msgid if m is not None else None,
        "message": entry.msg.decode("utf-8", "replace"),
        "raw_b64": base64.b64encode(entry.raw).decode("ascii"),
        "size": entry.size,
        "truncated": entry.truncated,
        "error": entry.error,
    }


def decode(data: bytes) -> Entry | None:
    """The entry, or None if the bytes are not an entry of this format."""
    try:
        return Entry.decode(data)
    except LogDecodeError:
        return None


def matches(entry: Entry, *, since_us: int | None, host: str | None, app: str | None) -> bool:
    if since_us is not None and entry.received < since_us:
        return False
    if host is not None and host_of(entry) != host:
        return False
    return app is None or app_of(entry) == app


def parse_since(text: str, now: float) -> float:
    """``--since`` as Unix seconds (ValueError with what is accepted)."""
    value = text.strip()
    m = _DURATION.fullmatch(value)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return float(value)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--since {text!r}: give Unix seconds, an ISO 8601 time (2026-11-30T12:00:00Z) "
            "or a duration back from now (90s, 10m, 2h, 3d)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()
