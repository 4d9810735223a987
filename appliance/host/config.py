"""One TOML file per server: who it is, where its state lives, and the constants C.

Example (``pst cluster init`` writes one per server)::

    [server]
    id = 1
    listen = "127.0.0.1:7101"
    state_dir = "/var/lib/pst"
    api_socket = "/run/pst/api.sock"
    # distributed_ca = "/etc/pst/clients-ca.pem"  # distributed applications may register by
    #                               # certificate from this CA (docs/api.md, "register_certified")

    [rom]
    backend = "simulated"          # or "tpm", "block"
    path = "/var/lib/pst-rom/1"    # simulated ROM: a read-only file
    # backend = "tpm":   nv_index = 0x01500050, tcti = "device:/dev/tpmrm0" (or "swtpm:host=...,port=...")
    # backend = "block": exactly one of label = "PST-ROM" (partition label), id = "usb-..." (udev
    #                    ID_SERIAL, ID_WWN or a /dev/disk/by-id name), device = "/dev/disk/by-id/..."

    [network]                      # the constants C: identical on every server
    n = 5
    t = 1
    period_seconds = 30
    round_ms = 100
    genesis = 1764000000.0
    secrets = { scert = "ed25519" }
    code_digest = "9f86d0..."      # SHA-256 of the code manifest (pst manifest), part of C

    [network.peers]
    1 = "127.0.0.1:7101"
    2 = "127.0.0.1:7102"

    [http]                         # the status page, JSON API and /metrics (optional section)
    listen = "127.0.0.1:7201"      # default 127.0.0.1:7180; any other than loopback needs TLS:
    # cert = "/etc/pst/http.crt"   # PEM certificate chain and its key (both or neither)
    # key = "/etc/pst/http.key"
    # client_ca = "/etc/pst/operators-ca.pem"  # if set, clients must present a certificate it signed
    # ca = "/etc/pst/http-peers-ca.pem"        # verifies the peers' https:// pages (default: system CAs)
    # hosts = ["pst1.example.org"]  # Host headers accepted (default: loopback names when on loopback)
    # enabled = false              # no HTTP service at all

    [http.peers]                   # where this server fetches the others' /v1/status (not part of C)
    2 = "http://127.0.0.1:7202"

    [privsep]                      # optional: pst serve starts as root and splits (docs/security.md)
    server_user = "pst"            # the network-facing process: TLS, the API socket, HTTP
    keyholder_user = "pst-keys"    # the key-holder: alone owns private/ and public/

    [log]                          # the append-only log and its syslog ingest (optional section;
                                   # without it this server runs no log)
    origin = "log.example.org/pst" # the log's name in its checkpoints, the same on every server
                                   # (default "pst-<genesis>.invalid/log": set a name of yours)
    dir = "/var/lib/pst/log"       # the tiles and entry bundles (default <state_dir>/log)
    udp = "0.0.0.0:514"            # syslog over UDP (RFC 5426); each transport only if given
    tcp = "0.0.0.0:514"            # syslog over TCP (RFC 6587)
    relp = "0.0.0.0:2514"          # RELP (acknowledged once durable)
    # tls = "0.0.0.0:6514"         # syslog over TLS (RFC 5425) and
    # relp_tls = "0.0.0.0:2515"    # RELP over TLS: both need cert and key
    # cert = "/etc/pst/syslog.crt" # PEM certificate chain and its key (both or neither)
    # key = "/etc/pst/syslog.key"
    # max_message_size = 64512     # octets kept of a message (longer ones are cut and flagged)
    # max_connections = 1024       # TCP, TLS and RELP connections at a time
    # messages_per_second = 100000 # per connection (per source address for UDP)
    # bytes_per_second = 67108864
    # batch_entries = 1024         # entries appended together at most
    # batch_delay_ms = 10          # how long the first entry of a batch waits for others
    # tls_cert = "period"          # instead of cert/key: a P-256 key of this period with a leaf
                                   # of the group's CA (needs [ca] and "ca" in network.secrets)

    [ca]                           # the group's certificate authority (optional section; needs
                                   # ca = "ed25519" in network.secrets; the same on every server)
    grace_seconds = 60             # leaves are valid for their period plus this
    tls_names = ["pst1.example.org"]  # names the servers' TLS leaves may carry, beside the
                                   # hosts of network.peers
    tsa_names = ["tsa.example.org"]   # names of the timestamping authority's leaf (none: no TSA)

    [ca.apps.web-tunnel]           # an application's period certificates (the local API's
    names = ["tunnel.example.org", "*.vpn.example.org"]  # certificate operation, pst-keys):
                                   # the names application web-tunnel may get ("*.zone": one
                                   # label under zone, or the wildcard itself)
    # enroll_ca = "/etc/pst/web-tunnel-enroll-ca.pem"  # PEM CA certificate(s) whose enrollment
                                   # credentials (URI urn:pst:enroll:web-tunnel) may get this
                                   # application's certificates over HTTP (POST /ca/enroll)

    [tsa]                          # the RFC 3161 timestamping authority, POST /tsa on the HTTP
                                   # service (optional section; without it no authority)
    mode = "period-key"            # this server signs alone with the key below; or "threshold":
                                   # t+1 servers sign each token with the P-256 secret of C named
                                   # by secret (default "tsa"), each checking it first; its
                                   # certificate comes from the group's CA (needs ca in secrets and
                                   # [ca] tsa_names; no cert, no key); the same on every server
    # secret = "tsa"               # threshold mode: the P-256 secret of network.secrets
    policy = "1.3.6.1.4.1.99999.1.1" # the TSA policy OID put in every token
    cert = "/etc/pst/tsa.pem"      # PEM: the TSA certificate (P-256, EKU timeStamping critical),
                                   # then the intermediates if any (not the root)
    key = "/etc/pst/tsa.key"       # PEM: its private key (read by pst serve at start)
    # cert = "period"              # instead of cert and key: a fresh key each period, certified
                                   # by the group's CA (needs ca in secrets and [ca] tsa_names)
    # accuracy_ms = 1000           # the accuracy stated in every token

Errors name the file and the key, and say what is expected.
"""

from __future__ import annotations

import ipaddress
import pwd
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.protocols.state import ConfigError, Constants

if TYPE_CHECKING:
    import ssl

#: The TPM NV index that holds the ROM image, and how to reach the TPM (appliance.boot.tpm).
DEFAULT_NV_INDEX = 0x01500050
DEFAULT_TCTI = "device:/dev/tpmrm0"
#: Where the HTTP service listens when the config has no [http] section or no http.listen.
DEFAULT_HTTP_LISTEN = ("127.0.0.1", 7180)


@dataclass(frozen=True)
class HttpConfig:
    """The [http] section: the status page, the JSON API and /metrics, served by ``pst serve``.

    Public data only, and read-only. ``listen`` on anything but loopback requires ``cert`` and
    ``key`` (TLS); ``client_ca`` additionally requires client certificates. ``peers`` are the
    other servers' HTTP base URLs (``http://`` or ``https://``, verified with ``ca`` or the
    system's CAs), from which this server fetches their ``/v1/status`` for its network page.
    """

    enabled: bool = True
    listen: tuple[str, int] = DEFAULT_HTTP_LISTEN
    cert: Path | None = None
    key: Path | None = None
    client_ca: Path | None = None
    ca: Path | None = None
    hosts: tuple[str, ...] = ()
    peers: dict[int, str] = field(default_factory=dict)

    @property
    def tls(self) -> bool:
        return self.cert is not None

    @property
    def url(self) -> str:
        """This server's own base URL as seen from this machine."""
        host, port = self.listen
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.tls else 'http'}://{host}:{port}"


def is_loopback(host: str) -> bool:
    """Is ``host`` (an IP literal or ``localhost``) a loopback address?"""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Account:
    """A Unix account a process of the server runs as."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class Privsep:
    """The [privsep] section: which accounts ``pst serve`` and its key-holder drop to.

    Without it both run as whoever started ``pst serve`` (development clusters). With it,
    ``pst serve`` must start as root: it hands ``private/`` and ``public/`` to the
    key-holder's account, forks the key-holder, which drops to that account, and then drops
    to the server's account itself before it opens a socket (:mod:`appliance.node.privsep`).
    """

    server: Account
    keyholder: Account


#: The largest message the log keeps whole (appliance.apps.log.syslog.MAX_MESSAGE_SIZE).
LOG_MAX_MESSAGE_SIZE = 64_512
#: The transports of the [log] section's listen keys, in the order they are started.
LOG_TRANSPORTS = ("udp", "tcp", "relp", "tls", "relp_tls")


@dataclass(frozen=True)
class LogConfig:
    """The [log] section: the log's origin and directory, where its syslog servers listen
    (one ``(host, port)`` per configured transport), the TLS certificate and key, the
    ingest limits the config sets (by the name of their field of
    :class:`appliance.apps.log.ingest.Limits`, whose defaults hold for the others) and the
    batching (``batch_entries``, ``batch_delay`` in seconds: the Batcher's, None for its
    default), and the seconds between two audits of this server's copy of the log
    (``audit_interval``: appliance.apps.log.node.LogNode.audits)."""

    origin: str
    directory: Path
    listen: dict[str, tuple[str, int]] = field(default_factory=dict)
    cert: Path | None = None
    key: Path | None = None
    limits: dict[str, Any] = field(default_factory=dict)
    batching: dict[str, Any] = field(default_factory=dict)
    audit_interval: float = 600.0
    #: ``tls_cert = "period"``: TLS with a fresh P-256 key each period and a leaf of the group's CA
    #: for ``tls_names`` (default: this server's host in network.peers), instead of cert/key.
    period_cert: bool = False
    tls_names: tuple[str, ...] = ()


@dataclass(frozen=True)
class CaConfig:
    """The [ca] section: the certificate policy of the network's ``ca`` key (appliance.apps.ca),
    which every server checks the same way, so it must be the same on every server."""

    grace: float = 60.0
    tls_names: tuple[str, ...] = ()
    tsa_names: tuple[str, ...] = ()
    #: ``[ca.apps.NAME] names``: the names each application's period certificates may carry.
    apps: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: ``[ca.apps.NAME] enroll_ca``: the operator's CA of each application's enrollment
    #: credentials (POST /ca/enroll on the HTTP service; appliance.api._enroll).
    enroll: tuple[tuple[str, Path], ...] = ()

    def app_names(self, app: str) -> tuple[str, ...] | None:
        """The names application ``app`` may get (None: no profile for it)."""
        return dict(self.apps).get(app)


TSA_MODES = ("period-key", "threshold")


@dataclass(frozen=True)
class TsaConfig:
    """The [tsa] section: the timestamping authority's mode, policy OID, stated accuracy (ms),
    and in "period-key" mode the operator's certificate chain and key files, or none of them
    (``cert = "period"``): a fresh key each period, certified by the group's CA. In "threshold"
    mode the key is the P-256 secret ``secret`` of C and the certificate is the group CA's."""

    mode: str
    policy: str
    cert: Path | None
    key: Path | None
    accuracy_ms: int = 1000
    secret: str = "tsa"

    @property
    def threshold(self) -> bool:
        """Does the network sign each token (t+1 servers, threshold ECDSA)?"""
        return self.mode == "threshold"

    @property
    def period_cert(self) -> bool:
        """Is the certificate the group's, renewed each period (``cert = "period"``)?"""
        return self.cert is None


@dataclass(frozen=True)
class NodeConfig:
    path: Path
    server_id: int
    listen: tuple[str, int]
    state_dir: Path
    api_socket: Path
    rom_backend: str
    rom_path: Path | None
    constants: Constants
    rom_nv_index: int = DEFAULT_NV_INDEX
    rom_tcti: str = DEFAULT_TCTI
    rom_label: str | None = None
    rom_id: str | None = None
    rom_device: Path | None = None
    http: HttpConfig = field(default_factory=HttpConfig)
    privsep: Privsep | None = None
    log: LogConfig | None = None
    tsa: TsaConfig | None = None
    #: The CA of distributed applications' client certificates (§5.1, option 2), if any.
    distributed_ca: Path | None = None
    #: The certificate authority's policy; None when C has no ``ca`` key.
    ca: CaConfig | None = None

    @property
    def peers(self) -> dict[int, tuple[str, int]]:
        return {i: parse_address(a, f"network.peers.{i}", self.path) for i, a in self.constants.peers.items()}


def parse_address(value: Any, key: str, path: Path, *, ipv6: bool = False) -> tuple[str, int]:
    """``"host:port"`` (with ``ipv6``, also ``"[v6 address]:port"``)."""
    if ipv6 and isinstance(value, str) and value.startswith("[") and "]:" in value:
        host, port = value[1:].split("]:", 1)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{path}: {key} has an invalid IPv6 address {host!r}") from None
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{path}: {key} has an invalid port {port!r}")
        return host, int(port)
    if not isinstance(value, str) or value.count(":") != 1:
        raise ConfigError(f'{path}: {key} must be "host:port", got {value!r}')
    host, port = value.rsplit(":", 1)
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{path}: {key} has an invalid port {port!r}")
    return host, int(port)


def _get(table: dict[str, Any], key: str, typ: type | tuple[type, ...], path: Path, where: str) -> Any:
    if key not in table:
        raise ConfigError(f"{path}: missing {where}.{key}")
    value = table[key]
    if (isinstance(value, bool) and typ is not bool) or not isinstance(value, typ):
        raise ConfigError(
            f"{path}: {where}.{key} must be of type {getattr(typ, '__name__', typ)}, got {value!r}"
        )
    return value


def load(path: Path) -> NodeConfig:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(raw, path)


def from_dict(raw: dict[str, Any], path: Path) -> NodeConfig:
    for section in ("server", "rom", "network"):
        if not isinstance(raw.get(section), dict):
            raise ConfigError(f"{path}: missing [{section}] section")
    server, rom, net = raw["server"], raw["rom"], raw["network"]
    peers_raw = _get(net, "peers", dict, path, "network")
    peers: dict[int, str] = {}
    for k, v in peers_raw.items():
        if not str(k).isdigit():
            raise ConfigError(f"{path}: network.peers keys must be server ids, got {k!r}")
        parse_address(v, f"network.peers.{k}", path)
        peers[int(k)] = v
    secrets = net.get("secrets", {"scert": "ed25519"})
    if not isinstance(secrets, dict) or not all(isinstance(v, str) for v in secrets.values()):
        raise ConfigError(f"{path}: network.secrets must map secret ids to group names")
    code_digest = net.get("code_digest", "")
    if not isinstance(code_digest, str) or (
        code_digest and (len(code_digest) != 64 or not all(ch in "0123456789abcdef" for ch in code_digest))
    ):
        raise ConfigError(
            f"{path}: network.code_digest must be 64 lowercase hex digits (pst manifest), got {code_digest!r}"
        )
    try:
        constants = Constants(
            n=_get(net, "n", int, path, "network"),
            t=_get(net, "t", int, path, "network"),
            period_length=float(_get(net, "period_seconds", (int, float), path, "network")),
            delta=_get(net, "round_ms", int, path, "network") / 1000,
            genesis=float(_get(net, "genesis", (int, float), path, "network")),
            peers=peers,
            secrets=dict(secrets),
            code_digest=bytes.fromhex(code_digest),
        )
    except ConfigError as exc:
        raise ConfigError(f"{path}: [network]: {exc}") from None
    server_id = _get(server, "id", int, path, "server")
    if server_id not in constants.ids:
        raise ConfigError(f"{path}: server.id {server_id} is not one of 1..{constants.n}")
    rom_settings = _rom_settings(rom, path)
    state_dir = Path(_get(server, "state_dir", str, path, "server"))
    tsa, ca = _tsa_settings(raw.get("tsa"), path), _ca_settings(raw.get("ca"), path, constants)
    if tsa is not None and tsa.period_cert and (ca is None or not ca.tsa_names):
        what = 'tsa.mode = "threshold"' if tsa.threshold else 'tsa.cert = "period"'
        raise ConfigError(
            f'{path}: {what} needs the network\'s CA: ca = "ed25519" in network.secrets '
            "and the authority's names in [ca] tsa_names"
        )
    if tsa is not None and tsa.threshold and constants.secrets.get(tsa.secret) != "p256":
        raise ConfigError(
            f'{path}: tsa.mode = "threshold" signs with the P-256 secret {tsa.secret!r} of C: '
            f'add {tsa.secret} = "p256" to network.secrets (at init) or name another in tsa.secret'
        )
    return NodeConfig(
        path=path,
        server_id=server_id,
        listen=parse_address(_get(server, "listen", str, path, "server"), "server.listen", path),
        state_dir=state_dir,
        api_socket=Path(_get(server, "api_socket", str, path, "server")),
        distributed_ca=_file_key(server, "distributed_ca", path, "server"),
        constants=constants,
        http=_http_settings(raw.get("http"), path, constants.ids),
        privsep=_privsep_settings(raw.get("privsep"), path),
        log=_log_settings(raw.get("log"), path, state_dir, constants),
        tsa=tsa,
        ca=ca,
        **rom_settings,
    )


_HTTP_KEYS = {"enabled", "listen", "cert", "key", "client_ca", "ca", "hosts", "peers"}


def _file_key(table: dict[str, Any], key: str, path: Path, section: str = "http") -> Path | None:
    if key not in table:
        return None
    value = table[key]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{path}: {section}.{key} must be a file path, got {value!r}")
    file = Path(value)
    if not file.is_absolute():
        file = path.parent / file
    if not file.is_file():
        raise ConfigError(f"{path}: {section}.{key}: no such file {file}")
    return file


def _http_settings(http: Any, path: Path, ids: range) -> HttpConfig:
    """The [http] section (optional: without it, plain HTTP on 127.0.0.1:7180)."""
    if http is None:
        return HttpConfig()
    if not isinstance(http, dict):
        raise ConfigError(f"{path}: [http] must be a section")
    for key in http:
        if key not in _HTTP_KEYS:
            raise ConfigError(
                f"{path}: http.{key} is not a known key (known: {', '.join(sorted(_HTTP_KEYS))})"
            )
    enabled = http.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{path}: http.enabled must be true or false, got {enabled!r}")
    listen = DEFAULT_HTTP_LISTEN
    if "listen" in http:
        listen = parse_address(http["listen"], "http.listen", path, ipv6=True)
    cert, key = _file_key(http, "cert", path), _file_key(http, "key", path)
    if (cert is None) != (key is None):
        raise ConfigError(f"{path}: http.cert and http.key go together: give both or neither")
    if cert is None and enabled and not is_loopback(listen[0]):
        raise ConfigError(
            f"{path}: http.listen = {http['listen']!r} is not a loopback address: "
            "set http.cert and http.key (TLS), or listen on 127.0.0.1"
        )
    client_ca = _file_key(http, "client_ca", path)
    if client_ca is not None and cert is None:
        raise ConfigError(f"{path}: http.client_ca needs TLS: set http.cert and http.key too")
    hosts = http.get("hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError(f'{path}: http.hosts must be a list of host names, e.g. ["pst1.example.org"]')
    peers_raw = http.get("peers", {})
    if not isinstance(peers_raw, dict):
        raise ConfigError(f"{path}: [http.peers] must map server ids to URLs")
    peers: dict[int, str] = {}
    for k, v in peers_raw.items():
        where = f"http.peers.{k}"
        if not str(k).isdigit() or int(k) not in ids:
            raise ConfigError(f"{path}: {where}: keys must be server ids 1..{len(ids)}, got {k!r}")
        peers[int(k)] = _peer_url(v, where, path)
    return HttpConfig(
        enabled=enabled,
        listen=listen,
        cert=cert,
        key=key,
        client_ca=client_ca,
        ca=_file_key(http, "ca", path),
        hosts=tuple(h.lower() for h in hosts),
        peers=peers,
    )


_LOG_KEYS = {
    "origin",
    "dir",
    *LOG_TRANSPORTS,
    "cert",
    "key",
    "tls_cert",
    "tls_names",
    "max_message_size",
    "max_connections",
    "messages_per_second",
    "relp_window",
    "bytes_per_second",
    "batch_entries",
    "batch_delay_ms",
    "audit_interval",
}


def default_log_origin(constants: Constants) -> str:
    """The origin of a log whose config names none: the same on every server of a network."""
    return f"pst-{int(constants.genesis)}.invalid/log"


def _number(table: dict[str, Any], key: str, path: Path, low: float, high: float, *, integer: bool) -> Any:
    """``log.key`` if the section sets it (checked), else None."""
    if key not in table:
        return None
    value = table[key]
    number = isinstance(value, int) or (not integer and isinstance(value, float))
    if isinstance(value, bool) or not number or not low <= value <= high:
        what = "an integer" if integer else "a number"
        raise ConfigError(f"{path}: log.{key} must be {what} in {low:.15g}..{high:.15g}, got {value!r}")
    return value


def _log_settings(section: Any, path: Path, state_dir: Path, constants: Constants) -> LogConfig | None:
    """The [log] section (optional: without it, no log)."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [log] must be a section")
    for key in section:
        if key not in _LOG_KEYS:
            raise ConfigError(f"{path}: log.{key} is not a known key (known: {', '.join(sorted(_LOG_KEYS))})")
    origin = section.get("origin", default_log_origin(constants))
    if (
        not isinstance(origin, str)
        or not origin
        or len(origin) > 255
        or "+" in origin
        or any(ch.isspace() or not ch.isprintable() for ch in origin)
    ):
        raise ConfigError(
            f'{path}: log.origin must be a name without spaces, "+" or control characters '
            f'(such as "log.example.org/pst"), got {origin!r}'
        )
    directory = state_dir / "log"
    if "dir" in section:
        value = section["dir"]
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{path}: log.dir must be a directory path, got {value!r}")
        directory = Path(value) if Path(value).is_absolute() else path.parent / value
    listen: dict[str, tuple[str, int]] = {}
    for transport in LOG_TRANSPORTS:
        if transport in section:
            listen[transport] = parse_address(section[transport], f"log.{transport}", path, ipv6=True)
    streams = [t for t in LOG_TRANSPORTS if t != "udp" and t in listen]
    for i, first in enumerate(streams):
        for second in streams[i + 1 :]:
            if listen[first] == listen[second]:
                raise ConfigError(
                    f"{path}: log.{first} and log.{second} are the same TCP address {section[first]!r}"
                )
    cert, key = _file_key(section, "cert", path, "log"), _file_key(section, "key", path, "log")
    if (cert is None) != (key is None):
        raise ConfigError(f"{path}: log.cert and log.key go together: give both or neither")
    period_cert, tls_names = _period_cert(section, path, constants, cert is not None)
    for transport in ("tls", "relp_tls"):
        if transport in listen and cert is None and not period_cert:
            raise ConfigError(
                f"{path}: log.{transport} needs log.cert and log.key (its TLS certificate), "
                'or log.tls_cert = "period"'
            )
    limits: dict[str, Any] = {}
    for name, low, high, integer in (
        ("max_message_size", 480, LOG_MAX_MESSAGE_SIZE, True),
        ("max_connections", 1, 1_000_000, True),
        ("messages_per_second", 1, 1e9, False),
        ("bytes_per_second", 1024, 1e12, False),
        ("relp_window", 1, 16384, True),
    ):
        if (value := _number(section, name, path, low, high, integer=integer)) is not None:
            limits[name] = value
    batching: dict[str, Any] = {}
    if (entries := _number(section, "batch_entries", path, 1, 16384, integer=True)) is not None:
        batching["batch_entries"] = entries
    if (delay := _number(section, "batch_delay_ms", path, 0, 10_000, integer=False)) is not None:
        batching["batch_delay"] = delay / 1000
    audit_interval = _number(section, "audit_interval", path, 1, 7 * 86400, integer=False)
    return LogConfig(
        origin=origin,
        directory=directory,
        listen=listen,
        cert=cert,
        key=key,
        limits=limits,
        batching=batching,
        audit_interval=600.0 if audit_interval is None else float(audit_interval),
        period_cert=period_cert,
        tls_names=tls_names,
    )


def _period_cert(
    section: dict[str, Any], path: Path, constants: Constants, has_files: bool
) -> tuple[bool, tuple[str, ...]]:
    """``log.tls_cert`` ("period" or absent) and ``log.tls_names``."""
    from appliance.protocols.state import CA_SECRET

    value = section.get("tls_cert")
    if value is None:
        if "tls_names" in section:
            raise ConfigError(f'{path}: log.tls_names goes with log.tls_cert = "period"')
        return False, ()
    if value != "period":
        raise ConfigError(
            f'{path}: log.tls_cert must be "period" (or absent: log.cert and log.key), got {value!r}'
        )
    if has_files:
        raise ConfigError(
            f'{path}: log.tls_cert = "period" replaces log.cert and log.key: give one or the other'
        )
    if CA_SECRET not in constants.secrets:
        raise ConfigError(f'{path}: log.tls_cert = "period" needs ca = "ed25519" in network.secrets')
    # Empty: this server's own host in network.peers (appliance.node.ca.period_names).
    return True, _names_list(section, "tls_names", path, "log")


_CA_KEYS = {"grace_seconds", "tls_names", "tsa_names", "apps"}


def _ca_apps(
    section: Any, path: Path
) -> tuple[tuple[tuple[str, tuple[str, ...]], ...], tuple[tuple[str, Path], ...]]:
    """``[ca.apps.NAME] names = [...]``: each application's allowed names (policy.check_pattern),
    and ``enroll_ca``, the file of its enrollment CA, where given."""
    from appliance.apps.ca.policy import PolicyError, check_app_name, check_pattern

    if section is None:
        return (), ()
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: ca.apps must be a table of [ca.apps.NAME] sections")
    out = []
    enroll = []
    for app, body in section.items():
        where = f"{path}: ca.apps.{app}"
        try:
            check_app_name(app)
        except PolicyError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if not isinstance(body, dict) or set(body) - {"names", "enroll_ca"}:
            raise ConfigError(f"{where} must be a section with the keys names (and enroll_ca)")
        names = body.get("names")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{where}.names must be a non-empty list of DNS names, IP addresses or *.zone")
        try:
            out.append((app, tuple(check_pattern(n) for n in names)))
        except PolicyError as exc:
            raise ConfigError(f"{where}.names: {exc}") from None
        ca_file = _file_key(body, "enroll_ca", path, f"ca.apps.{app}")
        if ca_file is not None:
            enroll.append((app, ca_file))
    return tuple(sorted(out)), tuple(sorted(enroll))


def _names_list(section: dict[str, Any], key: str, path: Path, where: str = "ca") -> tuple[str, ...]:
    value = section.get(key, [])
    if not isinstance(value, list) or not all(
        isinstance(v, str) and v and len(v) <= 253 and all(ch.isprintable() and not ch.isspace() for ch in v)
        for v in value
    ):
        raise ConfigError(f"{path}: ca.{key} must be a list of DNS names or IP addresses, got {value!r}")
    return tuple(v.lower() for v in value)


def _ca_settings(section: Any, path: Path, constants: Constants) -> CaConfig | None:
    """The [ca] section; None when C has no ``ca`` key (then the section must be absent)."""
    from appliance.protocols.state import CA_SECRET

    if CA_SECRET not in constants.secrets:
        if section is not None:
            raise ConfigError(f'{path}: [ca] needs ca = "ed25519" in network.secrets (the network\'s CA key)')
        return None
    if section is None:
        return CaConfig()
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [ca] must be a section")
    for key in section:
        if key not in _CA_KEYS:
            raise ConfigError(f"{path}: ca.{key} is not a known key (known: {', '.join(sorted(_CA_KEYS))})")
    grace = section.get("grace_seconds", 60.0)
    if isinstance(grace, bool) or not isinstance(grace, int | float) or not 0 <= grace <= 7 * 86400:
        raise ConfigError(f"{path}: ca.grace_seconds must be a number in 0..604800, got {grace!r}")
    apps, enroll = _ca_apps(section.get("apps"), path)
    return CaConfig(
        float(grace),
        _names_list(section, "tls_names", path),
        _names_list(section, "tsa_names", path),
        apps,
        enroll,
    )


_TSA_KEYS = {"mode", "policy", "cert", "key", "accuracy_ms", "secret"}


def _tsa_settings(section: Any, path: Path) -> TsaConfig | None:
    """The [tsa] section (optional: without it, no timestamping authority)."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [tsa] must be a section")
    for key in section:
        if key not in _TSA_KEYS:
            raise ConfigError(f"{path}: tsa.{key} is not a known key (known: {', '.join(sorted(_TSA_KEYS))})")
    mode = section.get("mode", "period-key")
    if mode not in TSA_MODES:
        raise ConfigError(f"{path}: tsa.mode must be one of {', '.join(TSA_MODES)}, got {mode!r}")
    policy = _get(section, "policy", str, path, "tsa")
    arcs = policy.split(".")
    if not (
        len(arcs) >= 2
        and all(a.isascii() and a.isdigit() and (a == "0" or not a.startswith("0")) for a in arcs)
        and int(arcs[0]) <= 2
        and (int(arcs[0]) == 2 or int(arcs[1]) < 40)
    ):
        raise ConfigError(
            f'{path}: tsa.policy must be an OID such as "1.3.6.1.4.1.99999.1.1", got {policy!r}'
        )
    accuracy = section.get("accuracy_ms", 1000)
    if isinstance(accuracy, bool) or not isinstance(accuracy, int) or not 1 <= accuracy <= 3_600_000:
        raise ConfigError(f"{path}: tsa.accuracy_ms must be an integer in 1..3600000, got {accuracy!r}")
    if mode == "threshold":
        for key in ("cert", "key"):
            if key in section:
                raise ConfigError(
                    f'{path}: tsa.{key} is not used with tsa.mode = "threshold" (the key is the '
                    "network's, its certificate the group CA's)"
                )
        secret = section.get("secret", "tsa")
        if not isinstance(secret, str) or not secret:
            raise ConfigError(f"{path}: tsa.secret must be the name of a secret of network.secrets")
        return TsaConfig(mode=mode, policy=policy, cert=None, key=None, accuracy_ms=accuracy, secret=secret)
    if "secret" in section:
        raise ConfigError(f'{path}: tsa.secret is used only with tsa.mode = "threshold"')
    if section.get("cert") == "period":
        if "key" in section:
            raise ConfigError(
                f'{path}: tsa.key is not used with tsa.cert = "period" (the key is made each period)'
            )
        return TsaConfig(mode=mode, policy=policy, cert=None, key=None, accuracy_ms=accuracy)
    cert, key = _file_key(section, "cert", path, "tsa"), _file_key(section, "key", path, "tsa")
    if cert is None or key is None:
        raise ConfigError(
            f'{path}: tsa.mode = "period-key" needs tsa.cert and tsa.key, or tsa.cert = "period" '
            "(a key each period, certified by the group's CA)"
        )
    return TsaConfig(mode=mode, policy=policy, cert=cert, key=key, accuracy_ms=accuracy)


def check_log_tls(config: NodeConfig) -> None:
    """Load the syslog TLS certificate and key once, so that a bad file stops ``pst serve`` at
    start with its name (the key file is read here and by the ingest only)."""

    log = config.log
    if log is not None and log.period_cert and config.ca is None:
        raise ConfigError(f'{config.path}: log.tls_cert = "period" needs the [ca] of the network')
    if log is not None and log.cert is not None and log.key is not None:
        server_tls_context(log.cert, log.key, "log", config.path)


def server_tls_context(cert: Path, key: Path, section: str, path: Path) -> ssl.SSLContext:
    """A server-side TLS context with ``cert`` and ``key`` loaded; ConfigError naming them."""
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"{path}: {section}.cert / {section}.key: cannot load {cert} with {key}: "
            f"{getattr(exc, 'reason', None) or exc.strerror or type(exc).__name__}"
        ) from None
    return context


def check_http_tls(config: NodeConfig) -> None:
    """Load the HTTP service's certificate, key and CAs once, so a bad file stops ``pst serve``
    at start with its name and key (the key file is read here and by the HTTP service only)."""
    import ssl

    http = config.http
    if not http.enabled or http.cert is None or http.key is None:
        return
    context = server_tls_context(http.cert, http.key, "http", config.path)
    for key, file in (("client_ca", http.client_ca), ("ca", http.ca)):
        if file is None:
            continue
        try:
            context.load_verify_locations(str(file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"{config.path}: http.{key}: cannot load {file} as PEM certificates: "
                f"{getattr(exc, 'reason', None) or exc.strerror or type(exc).__name__}"
            ) from None


def _peer_url(value: Any, where: str, path: Path) -> str:
    """``http://host:port`` or ``https://host:port``, no path: a peer's HTTP service."""
    if not isinstance(value, str):
        raise ConfigError(f'{path}: {where} must be a URL such as "https://pst2.example.org:7180"')
    scheme, sep, rest = value.partition("://")
    if not sep or scheme not in ("http", "https"):
        raise ConfigError(f"{path}: {where} must start with http:// or https://, got {value!r}")
    rest = rest.rstrip("/")
    if "/" in rest or "?" in rest or "@" in rest or "#" in rest:
        raise ConfigError(f"{path}: {where} must be scheme://host:port with no path, got {value!r}")
    host, port = parse_address(rest, where, path, ipv6=True)
    if scheme == "http" and not is_loopback(host):
        raise ConfigError(f"{path}: {where} = {value!r}: a peer off this machine is reached over https://")
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def _account(value: Any, key: str, path: Path) -> Account:
    """A user name, or a number (uid, and the group of that number); names are looked up
    when ``pst serve`` starts (:func:`resolve_account`), so a config can be checked anywhere."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 < value < 2**31 - 1 or value == 65534:
            raise ConfigError(f"{path}: privsep.{key} = {value}: not a usable uid (not root, not nobody)")
        return Account(str(value), value, value)
    if not isinstance(value, str) or not value or value == "root":
        raise ConfigError(
            f'{path}: privsep.{key} must be a user name such as "pst" (not root), got {value!r}'
        )
    return Account(value, -1, -1)


def resolve_account(account: Account, key: str, path: Path) -> Account:
    """``account`` with its uid and gid from the passwd database (a number stays as it is)."""
    if account.uid >= 0:
        return account
    try:
        entry = pwd.getpwnam(account.name)
    except KeyError:
        raise ConfigError(
            f"{path}: privsep.{key}: no user {account.name!r} on this machine (create it first)"
        ) from None
    if entry.pw_uid == 0:
        raise ConfigError(
            f"{path}: privsep.{key}: {account.name!r} is root; privilege separation needs other users"
        )
    return Account(account.name, entry.pw_uid, entry.pw_gid)


def _privsep_settings(section: Any, path: Path) -> Privsep | None:
    """The [privsep] section (optional: without it, no privilege separation)."""
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [privsep] must be a section")
    for key in section:
        if key not in ("server_user", "keyholder_user"):
            raise ConfigError(
                f"{path}: privsep.{key} is not a known key (known: keyholder_user, server_user)"
            )
    for key in ("server_user", "keyholder_user"):
        if key not in section:
            raise ConfigError(f"{path}: missing privsep.{key}")
    server = _account(section["server_user"], "server_user", path)
    keyholder = _account(section["keyholder_user"], "keyholder_user", path)
    if server.name == keyholder.name or (server.uid >= 0 and server.uid == keyholder.uid):
        raise ConfigError(
            f"{path}: privsep.server_user and privsep.keyholder_user are the same uid {server.uid}: "
            "the key-holder needs an account of its own"
        )
    return Privsep(server=server, keyholder=keyholder)


_ROM_KEYS = {
    "simulated": {"backend", "path"},
    "tpm": {"backend", "nv_index", "tcti"},
    "block": {"backend", "label", "id", "device"},
}


def _rom_settings(rom: dict[str, Any], path: Path) -> dict[str, Any]:
    """The [rom] section: which backend holds Vstart and how to reach it."""
    backend = _get(rom, "backend", str, path, "rom")
    if backend not in _ROM_KEYS:
        raise ConfigError(f"{path}: rom.backend must be simulated, tpm or block, got {backend!r}")
    for key in rom:
        if key not in _ROM_KEYS[backend]:
            raise ConfigError(f'{path}: rom.{key} is not used by rom.backend = "{backend}"; remove it')
    out: dict[str, Any] = {"rom_backend": backend, "rom_path": None}
    if backend == "simulated":
        out["rom_path"] = Path(_get(rom, "path", str, path, "rom"))
    elif backend == "tpm":
        index = rom.get("nv_index", DEFAULT_NV_INDEX)
        if isinstance(index, str) and index[:2] in ("0x", "0X") and index[2:].isalnum():
            index = int(index, 16) if all(c in "0123456789abcdefABCDEF" for c in index[2:]) else index
        if isinstance(index, bool) or not isinstance(index, int) or not 0x01000000 <= index <= 0x01FFFFFF:
            raise ConfigError(
                f"{path}: rom.nv_index must be a TPM NV index handle 0x01000000..0x01FFFFFF, got {index!r}"
            )
        tcti = rom.get("tcti", DEFAULT_TCTI)
        if not isinstance(tcti, str) or not tcti:
            raise ConfigError(
                f'{path}: rom.tcti must be a TCTI string such as "device:/dev/tpmrm0" or '
                f'"swtpm:host=127.0.0.1,port=2321", got {tcti!r}'
            )
        out["rom_nv_index"], out["rom_tcti"] = index, tcti
    else:
        given = [k for k in ("label", "id", "device") if k in rom]
        if len(given) != 1:
            raise ConfigError(
                f'{path}: rom.backend = "block" needs exactly one of rom.label, rom.id or rom.device, '
                f"got {given or 'none'}"
            )
        value = _get(rom, given[0], str, path, "rom")
        if not value:
            raise ConfigError(f"{path}: rom.{given[0]} is empty")
        if given[0] == "device" and not value.startswith("/dev/"):
            raise ConfigError(f"{path}: rom.device must be a device path under /dev/, got {value!r}")
        out[{"label": "rom_label", "id": "rom_id", "device": "rom_device"}[given[0]]] = (
            Path(value) if given[0] == "device" else value
        )
    return out
