"""Running one PServer process (``pst serve``) with the real TLS transport."""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
from collections.abc import Mapping
from pathlib import Path

import trio

from appliance.api import PServerBackend, serve_api
from appliance.net import PeerNetwork
from appliance.node import config as node_config
from appliance.node.config import NodeConfig
from appliance.node.sdnotify import Notifier
from appliance.node.server import Deliver, PServer, Transport, period_keys
from appliance.node.store import StateDir
from appliance.protocols.state import ConfigError

log = logging.getLogger("pst.server")


class NetTransport:
    """Adapts :class:`~appliance.net.PeerNetwork` to what the PServer needs."""

    def __init__(self, net: PeerNetwork) -> None:
        self.net = net

    def send(self, to: int, data: bytes) -> None:
        try:
            self.net.send(to, data)
        except ValueError as exc:  # e.g. a message larger than a frame: our bug, never the peer's
            log.error("could not send to %d: %s", to, exc)

    async def rekey(self, period: int, keys: Mapping[int, bytes], seed: bytes) -> None:
        try:
            self.net.rekey(period, keys, seed)
        except ValueError as exc:
            log.warning("channels not re-keyed for period %d: %s", period, exc)


async def net_transport(
    config: NodeConfig, server: PServer, nursery: trio.Nursery, deliver: Deliver
) -> Transport:
    loaded = StateDir(config.state_dir).load()
    table = loaded.public.key_table
    keys = period_keys(loaded.public)
    if table is None or loaded.private is None or config.server_id not in keys:
        log.warning(
            "server %d: no usable period key: starting unauthenticated; the next refresh recovers it",
            config.server_id,
        )
        period, seed, keys_or_none = None, None, None
    else:
        period, seed, keys_or_none = table.period, loaded.private.signing_seed, keys

    async def on_frame(peer: int, data: bytes) -> None:
        deliver(peer, data)

    addresses = dict(config.peers)
    addresses[config.server_id] = config.listen  # where we listen may differ from how peers reach us
    net = PeerNetwork(config.server_id, addresses, period, keys_or_none, seed, on_frame=on_frame)
    await nursery.start(net.run)
    return NetTransport(net)


async def _serve(config: NodeConfig) -> None:
    notifier = Notifier.from_env(unset=True)  # systemd Type=notify; children must not inherit it
    server = PServer(config, net_transport)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.run_watchdog)
        await nursery.start(server.run)
        backend = PServerBackend(
            server.sign,
            config.server_id,
            servers=config.constants.ids,
            status_file=server.store.public_dir / "status.json",
            time_vector=server.time_vector,
            random=server.random,
        )
        await nursery.start(functools.partial(serve_api, config.api_socket, backend))
        log.info("server %d: local API on %s", config.server_id, config.api_socket)
        notifier.ready(f"server {config.server_id}: serving, local API on {config.api_socket}")
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    _refresh_request(config, server)
                    continue
                log.info("server %d: %s received, stopping", config.server_id, signal.Signals(signum).name)
                notifier.stopping(f"{signal.Signals(signum).name} received")
                nursery.cancel_scope.cancel()
                break


def refresh_request_path(config: NodeConfig) -> Path:
    return config.path.parent / "refresh-request.json"


def _refresh_request(config: NodeConfig, server: PServer) -> None:
    """``pst refresh --now`` wrote {"period": p, "start": T} next to the config and sent SIGUSR1."""
    path = refresh_request_path(config)
    try:
        req = json.loads(path.read_text())
        period, start = int(req["period"]), float(req["start"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("refresh request in %s ignored: %s", path, exc)
        return
    if server.request_refresh(period, start):
        log.info("refresh of period %d requested for %.3f", period, start)
    else:
        log.warning(
            "refresh request for period %d at %.3f refused (already past, or too far ahead)", period, start
        )


def serve(path: Path) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    logging.getLogger("pst.net").setLevel(logging.WARNING)
    try:
        config = node_config.load(path)
    except ConfigError as exc:
        print(f"pst serve: {exc}", file=sys.stderr)
        return 2
    from appliance.boot.check import EXIT_BOOT_REFUSED, BootRefused, boot_check

    try:  # ROM -> M_i -> Vcert -> [Scert(M), M] -> C -> config -> code manifest (issue 4)
        for warning in boot_check(config).warnings:
            log.warning("boot check: %s", warning)
    except BootRefused as exc:
        print(f"pst serve: boot refused: {exc}", file=sys.stderr)
        return EXIT_BOOT_REFUSED
    trio.run(_serve, config)
    return 0
