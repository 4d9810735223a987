"""A local cluster: n servers on loopback, each with its config, simulated ROM and state directory.

``pst cluster init`` lays out::

    D/cluster.toml            n, t, ports (for the pst commands)
    D/node-<i>/config.toml    the server's config (constants C identical everywhere)
    D/node-<i>/rom            the simulated ROM holding Vstart (read-only)
    D/node-<i>/state/         the state directory (public/ and private/; log/: the log)

Ports of server i (``base`` is ``--base-port``): base+i between the servers, base+100+i its
status page, base+200+i its syslog over UDP and over TCP, base+300+i its RELP (all on
127.0.0.1; :func:`check_ports`).

C names the code it runs: ``code_digest`` is the digest of the manifest of the environment
this interpreter runs in (the venv with its site-packages, ``bin/`` and ``pyvenv.cfg``, and
the ``appliance`` package: :mod:`appliance.boot.manifest`), and each state directory keeps
the full manifest (``public/manifest.cbor``) so that the boot check can name a changed file.
The servers must run in that same environment: ``pst cluster up`` starts each one with
:func:`appliance.boot.bootstrap.command`, which measures it before anything of it runs.

The period-0 data comes from a local initialization ceremony run in this one process
(dealerless DKG, M signed with each Sstart which is then dropped, [Scert(M), M] and
KeyTable(0) signed with FROST). It is meant for local clusters, where every server is
on this machine anyway; a network of machines runs Table 3 over the network.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from appliance.boot.check import store_manifest
from appliance.boot.manifest import Manifest, installed
from appliance.boot.rom import SimulatedRom
from appliance.host.config import DEFAULT_NV_INDEX, default_log_origin
from appliance.host.files import atomic_write
from appliance.node.store import StateDir
from appliance.protocols.state import APP_KEY_SECRETS, CA_SECRET, LOG_SECRET, SCERT, ConfigError, Constants
from appliance.sim.setup import make_network


def node_dir(root: Path, i: int) -> Path:
    return root / f"node-{i}"


#: Server i's HTTP service (status page, /v1, /metrics) listens on base_port + HTTP_PORT_OFFSET + i.
HTTP_PORT_OFFSET = 100


#: Server i's syslog over UDP and over TCP listen on base_port + SYSLOG_PORT_OFFSET + i, its
#: RELP on base_port + RELP_PORT_OFFSET + i.
SYSLOG_PORT_OFFSET = 200
RELP_PORT_OFFSET = 300


def http_url(base_port: int, i: int) -> str:
    return f"http://127.0.0.1:{base_port + HTTP_PORT_OFFSET + i}"


def check_ports(n: int, base_port: int) -> None:
    """Every port the cluster uses (base+1..base+n, base+101..base+100+n, base+201..base+200+n,
    base+301..base+300+n) is a port, 1..65535."""
    highest = base_port + RELP_PORT_OFFSET + n
    if not 1 <= base_port <= 65535 or highest > 65535:
        raise ConfigError(
            f"--base-port {base_port}: the servers listen on base+1..base+{n}, their status pages "
            f"on base+{HTTP_PORT_OFFSET + 1}..base+{HTTP_PORT_OFFSET + n}, their syslog on "
            f"base+{SYSLOG_PORT_OFFSET + 1}.. and RELP up to base+{RELP_PORT_OFFSET + n}, so it must be "
            f"in 1..{65535 - RELP_PORT_OFFSET - n} (ports go up to 65535)"
        )


#: ``pst cluster init --log``: the log with its own key in C, the log with checkpoints signed by
#: the group key, or no log at all (tests of other things; every secret of C adds to each refresh).
LOG_MODES = ("key", "group", "off")
#: ``pst cluster init --store``: the groups the store key (TDH2) may be on.
STORE_GROUPS = ("p256", "ed25519")


def _secrets(
    log: str, ca: bool = False, store: str | None = None, dss_keys: Sequence[str] = ()
) -> dict[str, str]:
    if log not in LOG_MODES:
        raise ConfigError(f"--log {log!r}: one of {', '.join(LOG_MODES)}")
    # The log's own key signs checkpoints and nothing else (issue 11).
    secrets = {SCERT: "ed25519", LOG_SECRET: "ed25519"} if log == "key" else {SCERT: "ed25519"}
    if ca:  # the group's certificate authority (appliance.apps.ca): certificates and nothing else
        secrets[CA_SECRET] = "ed25519"
    if store is not None:  # the data storage API's key (appliance.apps.store): TDH2 on this group
        if store not in STORE_GROUPS:
            raise ConfigError(f"--store {store!r}: one of {', '.join(STORE_GROUPS)}")
        secrets["store"] = store
    for group in dss_keys:  # per-application DSS keys (appliance.apps.dsskeys): tweaks of this secret
        if group not in APP_KEY_SECRETS:
            raise ConfigError(f"--dss-keys {group!r}: one of {', '.join(sorted(APP_KEY_SECRETS))}")
        secrets[APP_KEY_SECRETS[group]] = group
    return secrets


def config_text(
    root: Path, i: int, c: Constants, base_port: int, *, log: bool = True, tcti: str | None = None
) -> str:
    d = node_dir(root, i).resolve()
    peers = "\n".join(f'{j} = "127.0.0.1:{base_port + j}"' for j in c.ids)
    http_peers = "\n".join(f'{j} = "{http_url(base_port, j)}"' for j in c.ids if j != i)
    secrets = ""
    if c.secrets != {SCERT: "ed25519"}:
        secrets = "secrets = { " + ", ".join(f'{k} = "{v}"' for k, v in sorted(c.secrets.items())) + " }\n"
    return f"""# PServer {i} of a local cluster (written by pst cluster init)
[server]
id = {i}
listen = "127.0.0.1:{base_port + i}"
state_dir = "{d / "state"}"
api_socket = "{d / "api.sock"}"

[rom]
{_rom_section(d, tcti)}

[network]
n = {c.n}
t = {c.t}
period_seconds = {c.period_length:g}
round_ms = {round(c.delta * 1000)}
genesis = {c.genesis!r}
code_digest = "{c.code_digest.hex()}"
{secrets}
[network.peers]
{peers}

# The status page, JSON API and /metrics of this server (public data, loopback only).
[http]
listen = "127.0.0.1:{base_port + HTTP_PORT_OFFSET + i}"

# Where this server fetches the others' /v1/status for its network page.
[http.peers]
{http_peers}

{_log_section(c, i, base_port) if log else ""}"""


def _rom_section(d: Path, tcti: str | None) -> str:
    if tcti is None:
        return f'backend = "simulated"\npath = "{d / "rom"}"'
    return f'backend = "tpm"\nnv_index = {DEFAULT_NV_INDEX:#010x}\ntcti = "{tcti}"'


def _log_section(c: Constants, i: int, base_port: int) -> str:
    return f"""
# The append-only log: this server's copy in state/log, syslog on loopback.
[log]
origin = "{default_log_origin(c)}"
udp = "127.0.0.1:{base_port + SYSLOG_PORT_OFFSET + i}"
tcp = "127.0.0.1:{base_port + SYSLOG_PORT_OFFSET + i}"
relp = "127.0.0.1:{base_port + RELP_PORT_OFFSET + i}"
"""


def prepare_network_ceremony(
    root: Path,
    *,
    n: int,
    t: int,
    period_seconds: float = 30.0,
    round_ms: int = 100,
    base_port: int = 7100,
    progress: Callable[[str], None] = print,
    code: Manifest | None = None,
    log: str = "key",
    ca: bool = False,
    store: str | None = None,
    dss_keys: Sequence[str] = (),
) -> Constants:
    """Configs, simulated ROMs (Vstart), Sstart files and manifests; the state comes from ``pst init``."""
    from nacl.signing import SigningKey

    check_ports(n, base_port)
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root}: directory exists and is not empty; choose a new one or remove it")
    code = code if code is not None else installed()
    c = Constants(
        n=n,
        t=t,
        period_length=period_seconds,
        delta=round_ms / 1000,
        genesis=time.time(),
        peers={i: f"127.0.0.1:{base_port + i}" for i in range(1, n + 1)},
        code_digest=code.digest(),
        secrets=_secrets(log, ca, store, dss_keys),
    )
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / "cluster.toml", f"n = {n}\nt = {t}\nbase_port = {base_port}\n".encode())
    for i in c.ids:
        d = node_dir(root, i)
        d.mkdir(parents=True, exist_ok=True)
        seed = os.urandom(32)
        atomic_write(d / "sstart", seed, private=True)
        SimulatedRom(d / "rom").provision(bytes(SigningKey(seed).verify_key))
        store_manifest(d / "state", code)
        atomic_write(d / "config.toml", config_text(root, i, c, base_port, log=log != "off").encode())
        progress(f"  server {i}: config, Sstart (erasable disk) and Vstart (simulated ROM) written")
    return c


def init_cluster(
    root: Path,
    *,
    n: int,
    t: int,
    period_seconds: float = 30.0,
    round_ms: int = 100,
    base_port: int = 7100,
    progress: Callable[[str], None] = print,
    randbytes: Callable[[int], bytes] = os.urandom,
    code: Manifest | None = None,
    secrets: dict[str, str] | None = None,
    log: str = "key",
    ca: bool = False,
    store: str | None = None,
    dss_keys: Sequence[str] = (),
    tpm: Mapping[int, str] | None = None,
) -> Constants:
    """One-process ceremony; ``code`` is the manifest C names (default: this environment's);
    ``secrets`` the long-lived secrets of C (default: the group key, and the log's key when
    ``log`` is "key"); ``log``: one of :data:`LOG_MODES`; ``tpm``: server id -> tcti of the
    TPM that is that server's ROM (Vstart in its NV index, its announcement key in M), for the
    servers that have one (tests with swtpm)."""
    check_ports(n, base_port)
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{root}: directory exists and is not empty; choose a new one or remove it")
    code = code if code is not None else installed()
    genesis = time.time()
    c = Constants(
        n=n,
        t=t,
        period_length=period_seconds,
        delta=round_ms / 1000,
        genesis=genesis,
        peers={i: f"127.0.0.1:{base_port + i}" for i in range(1, n + 1)},
        code_digest=code.digest(),
        secrets=dict(secrets) if secrets is not None else _secrets(log, ca, store, dss_keys),
    )
    progress(f"code manifest: {len(code)} files, digest {code.digest().hex()} (in C)")
    progress(f"initialization ceremony for n={n}, t={t}: DKG of (Scert, Vcert), M, KeyTable(0) ...")
    tpm = dict(tpm or {})
    ann_public: dict[int, bytes] = {}
    if tpm:  # tpm2-pytss is loaded only where a TPM is used
        from appliance.boot.tpm import TpmRom
        from appliance.boot.tpmkey import TpmAnnouncementKey

        ann_public = {i: TpmAnnouncementKey(tcti, i).public_key() for i, tcti in tpm.items()}
    setups = make_network(c, randbytes=randbytes, ann_public=ann_public)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / "cluster.toml", f"n = {n}\nt = {t}\nbase_port = {base_port}\n".encode())
    for i, setup in setups.items():
        d = node_dir(root, i)
        d.mkdir(parents=True, exist_ok=True)
        if i in tpm:
            TpmRom(DEFAULT_NV_INDEX, tpm[i]).provision(setup.vstart)
            TpmAnnouncementKey(tpm[i], i).persist()
        else:
            SimulatedRom(d / "rom").provision(setup.vstart)
        StateDir(d / "state").save(setup.public, setup.private)
        store_manifest(d / "state", code)
        text = config_text(root, i, c, base_port, log=log != "off", tcti=tpm.get(i))
        atomic_write(d / "config.toml", text.encode())
        rom = "TPM ROM (Vstart, announcement key)" if i in tpm else "simulated ROM (Vstart)"
        progress(f"  server {i}: config, {rom}, state directory written")
    vcert = setups[1].public.m.vcert if setups[1].public.m is not None else b""
    progress(f"group public key (Vcert): {vcert.hex()}")
    return c
