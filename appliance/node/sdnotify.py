"""Readiness, status and watchdog messages to systemd (``sd_notify``), for ``Type=notify`` units.

Theory of operation
-------------------
systemd passes ``$NOTIFY_SOCKET`` to a service started with ``Type=notify``: the address of a
Unix *datagram* socket, either a path or, when it starts with ``@``, a name in the abstract
namespace (the ``@`` stands for the leading NUL byte). Each message is one datagram of
newline-separated ``KEY=VALUE`` assignments:

* ``READY=1``    start-up finished (here: the local API accepts connections); until then
  ``systemctl start`` waits, and dependent units are held back;
* ``STATUS=...`` one line shown by ``systemctl status``;
* ``WATCHDOG=1`` "still alive"; with ``WatchdogSec=`` set, systemd passes ``$WATCHDOG_USEC``
  (and ``$WATCHDOG_PID``, the pid meant to ping) and kills and restarts the service when no
  ping arrives within that time. We ping every half of it from a trio task, so a blocked
  event loop (a hung task that never yields) stops the pings and gets the server restarted;
* ``STOPPING=1`` shutdown began.

Without ``$NOTIFY_SOCKET`` (``pst serve`` in a terminal, ``pst cluster up``) every call is a
no-op. Sending never blocks the event loop (the socket is non-blocking) and never raises:
a failed send is logged once and reported by the return value, since the server must keep
serving whether or not systemd hears about it.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping, MutableMapping

import trio

log = logging.getLogger("pst.sdnotify")

NOTIFY_SOCKET = "NOTIFY_SOCKET"
WATCHDOG_USEC = "WATCHDOG_USEC"
WATCHDOG_PID = "WATCHDOG_PID"


def socket_address(value: str) -> str:
    """The ``sendto`` address for a ``$NOTIFY_SOCKET`` value (``@name`` is abstract)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if not value.startswith("/"):
        raise ValueError(f"${NOTIFY_SOCKET}={value!r}: neither an absolute path nor an abstract @name")
    return value


def watchdog_interval(environ: Mapping[str, str], pid: int | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None for no watchdog.

    None when ``$WATCHDOG_USEC`` is unset, or when ``$WATCHDOG_PID`` names another process (the
    variables were inherited by a child, which must not ping on the main process's behalf).
    """
    raw = environ.get(WATCHDOG_USEC)
    if raw is None:
        return None
    owner = environ.get(WATCHDOG_PID)
    if owner is not None:
        if not owner.isdigit():
            log.warning("$%s=%r is not a pid: watchdog pings disabled", WATCHDOG_PID, owner)
            return None
        if int(owner) != (os.getpid() if pid is None else pid):
            return None
    if not raw.isdigit() or int(raw) == 0:
        log.warning(
            "$%s=%r is not a positive number of microseconds: watchdog pings disabled", WATCHDOG_USEC, raw
        )
        return None
    return int(raw) / 2_000_000


class Notifier:
    """Sends ``sd_notify`` messages to one address; a no-op without an address."""

    def __init__(self, address: str | None, *, watchdog: float | None = None) -> None:
        self.address = None if address is None else socket_address(address)
        self.watchdog = watchdog if self.address is not None else None
        self._warned = False

    @classmethod
    def from_env(cls, environ: MutableMapping[str, str] | None = None, *, unset: bool = False) -> Notifier:
        """The notifier systemd asked for through the environment (``os.environ`` by default).

        ``unset=True`` removes the variables afterwards, so that child processes (the
        key-holder) neither inherit the socket nor believe they own the watchdog.
        """
        env = os.environ if environ is None else environ
        address = env.get(NOTIFY_SOCKET) or None
        interval = watchdog_interval(env)
        if unset:
            for name in (NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID):
                env.pop(name, None)
        if address is not None and not address.startswith(("@", "/")):
            log.warning(
                "$%s=%r is not a socket address: systemd will not be notified", NOTIFY_SOCKET, address
            )
            return cls(None)
        return cls(address, watchdog=interval)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; True if it was sent (False when disabled)."""
        if self.address is None:
            return False
        lines = []
        for key, value in fields.items():
            text = str(value).replace("\n", " ")  # one assignment per line: a newline would forge another
            lines.append(f"{key}={text}")
        data = "\n".join(lines).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(data, self.address)
        except OSError as exc:
            if not self._warned:
                log.warning("could not notify systemd at %r: %s", self.address.replace("\0", "@"), exc)
                self._warned = True
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        if status is None:
            return self.send(READY=1)
        return self.send(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def ping(self) -> bool:
        return self.send(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        if status is None:
            return self.send(STOPPING=1)
        return self.send(STOPPING=1, STATUS=status)

    async def run_watchdog(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ping every ``watchdog`` seconds until cancelled; returns at once without a watchdog."""
        task_status.started()
        if self.watchdog is None:
            return
        while True:
            self.ping()
            await trio.sleep(self.watchdog)
