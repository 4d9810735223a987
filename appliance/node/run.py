"""Running one PServer process (``pst serve``) with the real TLS transport."""

from __future__ import annotations

import datetime as dt
import functools
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from appliance.api import ApiServer, LogAdapter, PServerBackend, serve_api
from appliance.api._certreg import ClientCA
from appliance.host import config as node_config
from appliance.host.config import NodeConfig
from appliance.net import ChannelIdentity, PeerNetwork
from appliance.node._approvals import LinkApprovals
from appliance.node._plinks import ProactiveLinks
from appliance.node.ca import AppCertificates, GroupRoot, PeriodCertificate, period_names, tls_installer
from appliance.node.keyholder import start_zygote
from appliance.node.link import KeyHolderGone, KeyHolderLink
from appliance.node.sdnotify import Notifier
from appliance.node.store import StateDir
from appliance.protocols.links import is_link_frame
from appliance.protocols.signing import SigningRefused
from appliance.protocols.state import CA_SECRET, ConfigError, Constants

if TYPE_CHECKING:
    from appliance.apps.log.node import LogNode
    from appliance.apps.log.service import Listener, LogService
    from appliance.apps.store.node import StoreNode
    from appliance.apps.tsa.authority import Authority, TokenRecord
    from appliance.apps.tsa.rfc3161 import Signer

    #: The [tsa] section's authority, the signer of its period key (None: the network signs,
    #: threshold mode) and the holder of the certificate the group's CA renews each period.
    from appliance.apps.tsa.service import RenewedKey, ThresholdCertificate

    TsaService = tuple[Authority, Signer | None, RenewedKey | ThresholdCertificate | None]

log = logging.getLogger("pst.server")

#: For this long after a period boundary (or a requested refresh's start), at most half a
#: period, the channels log what a period change causes at INFO (appliance.net, "Period changes").
TRANSITION_GRACE = 10.0


class RefreshWindow:
    """Whether a refresh may be under way now: the first seconds of a period, when its refresh
    runs, or of a refresh that ``pst refresh --now`` asked for at another time."""

    def __init__(self, constants: Constants, clock: Callable[[], float] = time.time) -> None:
        self.constants = constants
        self.clock = clock
        self.grace = min(TRANSITION_GRACE, constants.period_length / 2)
        self.requested: float | None = None

    def __call__(self) -> bool:
        now, c = self.clock(), self.constants
        if now - c.period_start(c.period_at(now)) < self.grace:
            return True
        return self.requested is not None and 0 <= now - self.requested < self.grace


def bind_log(config: NodeConfig) -> list[Listener]:
    """The [log] section's syslog sockets, bound now: before privileges are dropped (port 514)
    and after the zygote's fork (the key-holder never holds them). ConfigError naming the key
    if one cannot be bound."""
    from appliance.apps.log.ingest import bind_tcp, bind_udp
    from appliance.apps.log.service import Listener

    if config.log is None:
        return []
    out: list[Listener] = []
    for transport, (host, port) in config.log.listen.items():
        try:
            sock = bind_udp(host, port) if transport == "udp" else bind_tcp(host, port)
        except OSError as exc:
            for listener in out:
                listener.sock.close()
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise ConfigError(
                f"{config.path}: log.{transport} = {where!r}: cannot bind: {exc.strerror or exc}"
            ) from None
        out.append(Listener(transport, host, port, sock))
    return out


def open_log(
    config: NodeConfig, listeners: list[Listener], send: Callable[[int, bytes], None] | None = None
) -> LogService:
    """The log of the [log] section, opened (blocking: run it in a thread), replicated with the
    other servers through ``send`` (appliance.apps.log.node; without it, this server's copy
    alone); unavailable, with the reason, if its directory cannot be opened
    (appliance.apps.log.service)."""
    from appliance.apps.log.ingest import Limits, LocalSink
    from appliance.apps.log.node import LogNode, open_node
    from appliance.apps.log.service import LogService
    from appliance.apps.log.tiles import PosixStorage, TileLog
    from appliance.boot.check import append_alert
    from appliance.host.files import make_dirs

    settings = config.log
    assert settings is not None
    context = None
    if settings.cert is not None and settings.key is not None:
        context = node_config.server_tls_context(settings.cert, settings.key, "log", config.path)
    elif settings.period_cert:  # its certificate comes each period (appliance.node.ca)
        import ssl

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)

    def replicated(directory: Path, origin: str) -> LogNode:
        assert send is not None
        replica = StateDir(config.state_dir).serve_dir / "log-replica"  # our vote keys: ours alone
        make_dirs(replica, 0o700)
        # A tree too damaged to open is set aside and rebuilt from the peers (open_node).
        return open_node(directory, origin, functools.partial(node, replica))

    def node(replica: Path, tree: TileLog, rebuild: str | None) -> LogNode:
        assert send is not None
        c = config.constants
        return LogNode(
            server_id=config.server_id,
            n=c.n,
            t=c.t,
            log=tree,
            rebuild=rebuild,
            storage=PosixStorage(replica),
            send=send,
            on_alert=lambda alert: append_alert(  # pst serve's own file (privsep: public/ is not ours)
                StateDir(config.state_dir).serve_dir,
                alert.kind,
                alert.server,
                alert.period,
                alert.detail,
                time.time(),
            ),
            base_timeout=max(0.2, 2 * c.delta),
        )

    return LogService.open(
        settings.directory,
        settings.origin,
        sink=replicated if send is not None else LocalSink,
        listeners=listeners,
        ssl_context=context,
        limits=Limits(**settings.limits),
        batching=settings.batching,
    )


async def _log_checkpoints(
    service: LogService, node: LogNode, link: KeyHolderLink, keys: list[bytes]
) -> None:
    """Once the key-holder knows the log's key: publish checkpoints (LogNode.checkpoints)."""
    from appliance.apps.log.checkpoint import Verifier

    while True:
        try:
            key = await link.log_key()
        except (SigningRefused, trio.TooSlowError):
            key = None
        if key is not None:
            break
        await trio.sleep(1.0)
    keys.append(key)
    service.verifier = Verifier(service.origin, key).encode()
    log.info("log: checkpoints are signed with %s", service.verifier)
    await node.checkpoints(lambda text: link.sign_checkpoint(text), key)


async def _serve(
    config: NodeConfig,
    zygote: int,
    control: socket.socket,
    listeners: list[Listener] | None = None,
    tsa: TsaService | None = None,
    client_ca: ClientCA | None = None,
) -> None:
    """The network-facing process: TLS to the peers, the local API, the key-holder link, the log."""
    from appliance.apps.log.node import LogNode, is_log_frame  # after the zygote's fork
    from appliance.apps.store.node import is_store_frame
    from appliance.apps.store.service import STORE_SECRET

    started = _process_start()
    notifier = Notifier.from_env(unset=True)  # systemd Type=notify; children must not inherit it
    addresses = dict(config.peers)
    addresses[config.server_id] = config.listen  # where we listen may differ from how peers reach us
    net: PeerNetwork | None = None
    window = RefreshWindow(config.constants)

    log_node: LogNode | None = None
    store_node: StoreNode | None = None
    api: ApiServer | None = None
    links = ProactiveLinks(
        config.server_id,
        config.constants.n,
        has_client=lambda app: api is not None and api.core.has_registration(app),
        send=lambda to, data: on_send(to, data),
        authenticated=lambda peer: net is not None and net.is_authenticated(peer),
        period=lambda: net.period if net is not None else None,
    )
    period_cert: PeriodCertificate | None = None
    tsa_cert: PeriodCertificate | None = None

    async def on_frame(peer: int, data: bytes) -> None:
        if is_log_frame(data):
            # The log takes nothing from a channel its period key did not authenticate.
            if log_node is not None and net is not None and net.is_authenticated(peer):
                await log_node.frame(peer, data)
            return
        if is_store_frame(data):
            # Nor does the store (its writes' order and its read protocol).
            if store_node is not None and net is not None and net.is_authenticated(peer):
                await store_node.frame(peer, data)
            return
        if is_link_frame(data):
            # Nor do the proactive links (paper §5.4): their security is the period channel's.
            if net is not None and net.is_authenticated(peer):
                links.frame(peer, data)
            return
        link.deliver(peer, data)

    def on_send(to: int, data: bytes) -> None:
        if net is None:
            return
        try:
            net.send(to, data)
        except ValueError as exc:  # e.g. a message larger than a frame: our bug, never the peer's
            log.error("could not send to %d: %s", to, exc)

    async def on_identity(
        period: int | None, keys: Mapping[int, bytes], ident: ChannelIdentity | None
    ) -> None:
        nonlocal net
        if net is None:
            if period is None or ident is None:
                log.warning(
                    "server %d: no usable period key: starting unauthenticated; the next refresh recovers it",
                    config.server_id,
                )
                net = PeerNetwork(
                    config.server_id, addresses, None, None, None, on_frame=on_frame, transition=window
                )
            else:
                net = PeerNetwork(
                    config.server_id, addresses, period, keys, ident, on_frame=on_frame, transition=window
                )
            await nursery.start(net.run)
        elif period is not None and ident is not None and (net.period is None or period > net.period):
            try:
                net.rekey(period, keys, ident)
            except ValueError as exc:
                log.warning("channels not re-keyed for period %d: %s", period, exc)
        if log_node is not None:
            await log_node.identity(period, keys, ident)
        if store_node is not None:
            await store_node.identity(period, keys, ident)
        if period_cert is not None:
            period_cert.new_period(period)
        if tsa_cert is not None:
            tsa_cert.new_period(period)

    link = KeyHolderLink(config, on_send=on_send, on_identity=on_identity)
    group_root: GroupRoot | None = None
    if CA_SECRET in config.constants.secrets:
        group_root = GroupRoot(link.call, config.http.peers, _no_fetch)
    log_service: LogService | None = None
    log_keys: list[bytes] = []  # the log's verifier key, once the key-holder told us
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.run_watchdog)
        if config.log is not None:  # before the key-holder hands over the period's identity
            log_service = await trio.to_thread.run_sync(open_log, config, listeners or [], on_send)
            if isinstance(log_service.sink, LogNode):
                log_node = log_service.sink
                await nursery.start(log_node.run)
        if STORE_SECRET in config.constants.secrets:  # before the period's identity, as the log
            store_node = _store_node(config, on_send, lambda: link)
            await nursery.start(store_node.run)
        if config.log is not None and config.log.period_cert and log_service is not None:
            period_cert = PeriodCertificate(
                link.call,
                tls_installer(log_service.ssl_context),
                period_names(config),
                StateDir(config.state_dir).serve_dir,
                config.constants,
                time.time,
            )
            nursery.start_soon(period_cert.run)
        if tsa is not None and tsa[2] is not None and config.ca is not None:
            network_key = None
            if config.tsa is not None and config.tsa.threshold:
                secret = config.tsa.secret

                async def network_key() -> bytes | None:  # the TSA key is the network's
                    return await link.dss_public_key(secret)

            tsa_cert = PeriodCertificate(
                link.call,
                _tsa_installer(tsa[2]),
                config.ca.tsa_names,
                StateDir(config.state_dir).serve_dir,
                config.constants,
                time.time,
                profile="tsa",
                files=None,  # the key stays in this process's memory
                what="timestamping",
                public_key=network_key,
            )
            nursery.start_soon(tsa_cert.run)
        await nursery.start(link.run, zygote, control)
        if log_service is not None:
            await nursery.start(log_service.run)
            if log_node is not None:
                nursery.start_soon(_log_checkpoints, log_service, log_node, link, log_keys)
                assert config.log is not None
                every = config.log.audit_interval
                nursery.start_soon(functools.partial(log_node.audits, first=min(30.0, every), interval=every))
        backend = PServerBackend(
            link.sign,
            config.server_id,
            servers=config.constants.ids,
            status_file=StateDir(config.state_dir).public_dir / "status.json",
            time_vector=link.time_vector,
            random=link.random,
            distributed=LinkApprovals(link),
            sign_upgrade=link.sign_upgrade,
            dss_sign=link.sign_dss,
            dss_key=link.dss_public_key,
            app_dss=link,
            timestamp=_tsa_respond(config, link, tsa, log_service),
        )
        await nursery.start(links.run)
        app_certificates = (
            AppCertificates(
                link.call,
                group_root,
                config,
                log_service.log_append if log_service is not None else None,
            )
            if group_root is not None
            else None
        )
        api = await nursery.start(
            functools.partial(
                serve_api,
                config.api_socket,
                backend,
                state_dir=config.state_dir,
                log_backend=LogAdapter(log_service) if log_service is not None else None,
                links=links,
                data_store=store_node,
                client_ca=client_ca,
                server_id=config.server_id,
                certificates=app_certificates,
            )
        )
        assert api is not None
        log.info("server %d: local API on %s", config.server_id, config.api_socket)
        if config.http.enabled:  # in the background: the signal receiver below must come at once
            nursery.start_soon(
                _run_web,
                config,
                link,
                backend,
                api,
                lambda: net,
                log_service,
                log_keys,
                tsa,
                group_root,
                app_certificates,
                store_node,
            )
        notifier.ready(f"server {config.server_id}: serving, local API on {config.api_socket}")
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
            if _request_since(config, started):  # asked for while we were starting
                nursery.start_soon(_refresh_request, config, link, window)
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    nursery.start_soon(_refresh_request, config, link, window)
                    continue
                log.info("server %d: %s received, stopping", config.server_id, signal.Signals(signum).name)
                notifier.stopping(f"{signal.Signals(signum).name} received")
                if log_service is not None:  # stop taking entries, append what was taken
                    await log_service.stop()
                nursery.cancel_scope.cancel()
                break


def _store_node(
    config: NodeConfig, send: Callable[[int, bytes], None], link: Callable[[], KeyHolderLink]
) -> StoreNode:
    """The store of a network whose C has a store key (appliance.apps.store.node)."""
    from appliance.apps.store.node import StoreNode
    from appliance.boot.check import append_alert

    c = config.constants
    return StoreNode(
        server_id=config.server_id,
        n=c.n,
        t=c.t,
        directory=StateDir(config.state_dir).serve_dir / "store",
        send=send,
        store_key=lambda: link().store_key(),
        store_share=lambda parts, reader: link().store_share(parts, reader),
        on_alert=lambda alert: append_alert(
            StateDir(config.state_dir).serve_dir,
            alert.kind,
            alert.server,
            alert.period,
            alert.detail,
            time.time(),
        ),
        base_timeout=max(0.2, 2 * c.delta),
    )


async def _no_fetch(url: str) -> tuple[int, bytes]:
    """The peers' roots before the HTTP service (and its client) runs: none."""
    raise OSError("the HTTP service is not running")


def _peer_links(net: PeerNetwork | None) -> dict[int, Any] | None:
    """Each peer's connection state as the web service shows it (public: no key, no address)."""
    from appliance.web import PeerLink

    if net is None:
        return None
    links = {}
    for peer in net.peers:
        connections = tuple(
            {
                "direction": c.direction,
                "authenticated": c.authenticated,
                "period": c.period,
                "tls": c.tls_version,
            }
            for c in net.connections(peer)
        )
        links[peer] = PeerLink(net.state(peer).value, net.is_authenticated(peer), connections)
    return links


async def _run_web(
    config: NodeConfig,
    link: KeyHolderLink,
    backend: PServerBackend,
    api: ApiServer,
    network: Callable[[], PeerNetwork | None],
    log_service: LogService | None = None,
    log_keys: Sequence[bytes] = (),
    tsa: TsaService | None = None,
    group_root: GroupRoot | None = None,
    certificates: AppCertificates | None = None,
    store_node: StoreNode | None = None,
) -> None:
    """The HTTP service (status page, /v1, /metrics, and POST /tsa with a [tsa] section) until
    cancelled. A port it cannot bind is logged, not fatal: the status page must never take the
    key service down with it."""
    from appliance.apps.log.checkpoint import Verifier
    from appliance.apps.log.reader import LogReader
    from appliance.apps.log.tiles import PosixStorage
    from appliance.web import Sources, WebService  # after the zygote's fork: the key-holder never has it

    public = StateDir(config.state_dir).public_dir
    sources = Sources(
        server_id=config.server_id,
        constants=config.constants,
        status_file=public / "status.json",
        alerts_file=public / "alerts.jsonl",
        serve_alerts_file=StateDir(config.state_dir).serve_dir / "alerts.jsonl",
        peer_urls=config.http.peers,
        own_url=config.http.url,
        peer_links=lambda: _peer_links(network()),
        rejections=lambda: net.rejections if (net := network()) is not None else (),
        api_counts=lambda: api.core.counts,
        signature_counts=lambda: backend.signatures,
        keyholder_pid=lambda: link.child_pid,
        log_status=(lambda: log_service.status()) if log_service is not None else (lambda: None),
        store_status=(lambda: store_node.status()) if store_node is not None else (lambda: None),
    )
    reader = None
    if log_service is not None and log_service.available and config.log is not None:
        origin = config.log.origin
        reader = LogReader(
            PosixStorage(config.log.directory), origin, lambda: [Verifier(origin, k) for k in log_keys]
        )
    route = None
    if tsa is not None and log_service is None:
        log.warning(
            "tsa: no [log] section: issued tokens are recorded in this journal only, not the secure log"
        )
    if tsa is not None:
        from appliance.web._tsa import timestamp_route

        route = timestamp_route(
            tsa[0],
            _tsa_signer(config, link, tsa),
            on_record=functools.partial(_log_token, config, log_service),
        )
    ca_root = None
    if group_root is not None:
        root = group_root

        async def ca_root(stored: bool) -> bytes | None:
            return await root.get(stored_only=stored)

    enroll = _enroll_routes(config, certificates)
    service = WebService(sources, config.http, log_reader=reader, tsa=route, ca_root=ca_root, enroll=enroll)
    if group_root is not None:
        group_root.fetch = service.fetch
    try:
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(service.run)
            log.info("server %d: status page on %s", config.server_id, ", ".join(binds))
    except* OSError as group:
        log.error(
            "server %d: HTTP service on %s:%d stopped or not started: %s (the server runs without it)",
            config.server_id,
            *config.http.listen,
            "; ".join(str(exc) for exc in _leaves(group)),
        )


def _tsa_signer(config: NodeConfig, link: KeyHolderLink, tsa: TsaService) -> Any:
    """The authority's signer: its period key, or in threshold mode the network (t+1 servers
    sign each token with the TSA secret, each checking the TSTInfo first)."""
    from appliance.apps.tsa.issuing import local_signer, network_signer

    sign = tsa[1]
    if sign is not None:
        return local_signer(sign)
    assert config.tsa is not None
    secret = config.tsa.secret

    async def sign_dss(payload: bytes, timeout: float) -> bytes:
        return await link.sign_dss(secret, payload, timeout=timeout)

    return network_signer(sign_dss)


def _tsa_respond(
    config: NodeConfig, link: KeyHolderLink, tsa: TsaService | None, log_service: LogService | None
) -> Callable[[bytes], Awaitable[bytes]] | None:
    """The local API's ``timestamp``: a DER TimeStampReq in, the TimeStampResp out (as POST /tsa)."""
    if tsa is None:
        return None
    from appliance.apps.tsa.issuing import respond

    signer = _tsa_signer(config, link, tsa)
    on_record = functools.partial(_log_token, config, log_service)

    async def timestamp(query: bytes) -> bytes:
        return (await respond(tsa[0], signer, query, on_record)).body

    return timestamp


def _enroll_routes(config: NodeConfig, certificates: AppCertificates | None) -> list[Any]:
    """``GET /ca/enroll/challenge`` and ``POST /ca/enroll`` when an application of ``[ca.apps]``
    has an ``enroll_ca`` (appliance.web._enroll); a CA file that cannot be read is logged and
    its application cannot enroll over HTTP (the rest of the service runs)."""
    if certificates is None or config.ca is None or not config.ca.enroll:
        return []
    from appliance.api._enroll import EnrollCA
    from appliance.web._enroll import EnrollService

    cas = {}
    for app, path in config.ca.enroll:
        try:
            cas[app] = EnrollCA.load(app, path)
        except ValueError as exc:
            log.error("ca: application %r cannot enroll over HTTP: ca.apps.%s.enroll_ca: %s", app, app, exc)
    if not cas:
        return []
    log.info("ca: applications %s may enroll over HTTP (POST /ca/enroll)", ", ".join(sorted(cas)))
    return EnrollService(config.server_id, cas, certificates).routes()


def _tsa_installer(renewed: RenewedKey | ThresholdCertificate) -> Any:
    """Install each period's TSA key and its leaf (PEM from the group's CA) into the authority."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    def install(key: Any, leaf: bytes, files: Any) -> None:
        der = x509.load_pem_x509_certificate(leaf).public_bytes(serialization.Encoding.DER)
        renewed.install(key, der)

    return install


def _load_client_ca(config: NodeConfig) -> ClientCA | None:
    """``[server] distributed_ca``: the CA of distributed applications' client certificates."""
    if config.distributed_ca is None:
        return None
    try:
        ca = ClientCA.load(config.distributed_ca)
    except ValueError as exc:
        raise ConfigError(f"{config.path}: server.distributed_ca: {exc}") from None
    log.info("api: distributed applications may register with certificates of %s", config.distributed_ca)
    return ca


def _load_tsa(config: NodeConfig) -> TsaService | None:
    """The [tsa] section's authority and its period key, loaded before privileges are dropped."""
    if config.tsa is None or not config.http.enabled:
        return None
    from appliance.apps.tsa.service import authority_from_config

    return authority_from_config(
        config.tsa, config.path, config.server_id, StateDir(config.state_dir).serve_dir
    )


def _preload_web() -> None:
    """Import the HTTP stack now, after the zygote's fork (the key-holder never has it) and
    before trio runs: imported inside the event loop, it held the loop for over a second on a
    busy machine, while the first refresh's announcements were due."""
    import appliance.apps.log.reader
    import appliance.web
    import appliance.web._tsa  # noqa: F401


async def _log_token(config: NodeConfig, log_service: LogService | None, record: TokenRecord) -> None:
    """Every token goes to the secure log before it is released (issue 12): an RFC 5424 entry of
    application ``pst-tsa``, message id ``TST``, with the serial, genTime and SHA-256 of the
    TSTInfo as structured data. Without a log the journal keeps it (pst serve said so at start)."""
    from appliance.apps.log.syslog import SDElement, build_rfc5424
    from appliance.apps.tsa.rfc3161 import format_gen_time

    text = record.encode()
    if log_service is None:
        log.info("tsa: issued %s", text.decode())
        return
    when = format_gen_time(record.gen_time)
    params = (
        ("serial", f"{record.serial:x}"),
        ("genTime", when),
        ("tstinfo-sha256", record.tst_info_sha256.hex()),
    )
    stamp = record.gen_time.astimezone(dt.UTC)
    line = build_rfc5424(
        110,  # facility 13 (log audit), severity 6 (informational)
        f"{stamp:%Y-%m-%dT%H:%M:%S}.{stamp.microsecond // 1000:03d}Z",  # RFC 5424 wants RFC 3339
        f"pst-server-{config.server_id}",
        "pst-tsa",
        None,
        "TST",
        (SDElement("tst@32473", params),),
        text,
    )
    await log_service.log_append(f"tsa of server {config.server_id}", [line])


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    """The exceptions of a (nested) group, without the groups."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def refresh_request_path(config: NodeConfig) -> Path:
    return config.path.parent / "refresh-request.json"


def _process_start() -> float:
    """When this process started (wall clock, to within a second; now if /proc cannot tell)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        lines = Path("/proc/stat").read_text().splitlines()
        boot = next(int(line.split()[1]) for line in lines if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK") - 1.0
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


def _request_since(config: NodeConfig, started: float) -> bool:
    """Was a refresh requested (its file written) since ``started`` (wall-clock seconds)?"""
    try:
        return refresh_request_path(config).stat().st_mtime >= started
    except OSError:
        return False


async def _refresh_request(config: NodeConfig, link: KeyHolderLink, window: RefreshWindow) -> None:
    """``pst refresh --now`` wrote {"period": p, "start": T} next to the config and sent SIGUSR1."""
    path = refresh_request_path(config)
    try:
        req = json.loads(path.read_text())
        period, start = int(req["period"]), float(req["start"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("refresh request in %s ignored: %s", path, exc)
        return
    try:
        accepted = await link.request_refresh(period, start)
    except (SigningRefused, trio.TooSlowError) as exc:
        log.warning("refresh request for period %d not delivered to the key-holder: %s", period, exc)
        return
    if accepted:
        window.requested = start
        log.info("refresh of period %d requested for %.3f", period, start)
    else:
        log.warning(
            "refresh request for period %d at %.3f refused (already past, or too far ahead)", period, start
        )


def serve(path: Path) -> int:
    # `pst refresh --now` signals a running server: until the signal receiver is open, SIGUSR1's
    # default action would end this process without a word. A request that comes meanwhile is
    # picked up from its file once we serve (_serve).
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr
    )
    logging.getLogger("pst.net").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per poll of the peers' status
    try:
        config = node_config.load(path)
        node_config.check_http_tls(config)
        node_config.check_log_tls(config)
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
    from appliance.api._registrations import move_registrations
    from appliance.node import privsep as ps

    try:
        separated = ps.require_root(config)
        moved = move_registrations(config.state_dir)
        if moved:
            log.info("%s", moved)
        if separated is not None:
            ps.prepare(config, separated)
        elif os.geteuid() == 0:
            log.warning(
                "running as root without [privsep]: pst serve and its key-holder share root's "
                "powers; a compromised pst serve could read the shares (docs/security.md)"
            )
    except (ConfigError, ps.PrivsepError, OSError) as exc:
        print(f"pst serve: {exc}", file=sys.stderr)
        return 2
    zygote, control = start_zygote(config, separated)  # before trio: single-threaded, no secret held
    try:  # after the zygote's fork, before the drop: port 514 needs root
        listeners = bind_log(config)
        tsa = _load_tsa(config)  # and the TSA key file may be readable by root only
        client_ca = _load_client_ca(config)
    except ConfigError as exc:
        print(f"pst serve: {exc}", file=sys.stderr)
        control.close()
        return 2
    if separated is not None:
        try:  # for good, before a socket is opened or a byte read from anyone
            ps.drop(separated.server, umask=0o027)
        except ps.PrivsepError as exc:
            print(f"pst serve: {exc}", file=sys.stderr)
            control.close()
            for listener in listeners:
                listener.sock.close()
            return 2
        log.info(
            "privilege separation: pst serve runs as %s, its key-holder as %s",
            separated.server.name,
            separated.keyholder.name,
        )
    if config.http.enabled:
        _preload_web()
    gone: list[str] = []
    try:
        trio.run(_serve, config, zygote, control, listeners, tsa, client_ca)
    except* KeyHolderGone as group:
        gone = [str(exc) for exc in group.exceptions]
    for reason in gone:
        print(f"pst serve: stopping: {reason}; see the log above", file=sys.stderr)
    return 1 if gone else 0
