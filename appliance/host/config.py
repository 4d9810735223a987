"""One TOML file per server: who it is, where its state lives, and the constants C.

Example (``pst cluster init`` writes one per server)::

    [server]
    id = 1
    listen = "127.0.0.1:7101"
    state_dir = "/var/lib/pst"
    api_socket = "/run/pst/api.sock"

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

Errors name the file and the key, and say what is expected.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.protocols.state import ConfigError, Constants

#: The TPM NV index that holds the ROM image, and how to reach the TPM (appliance.boot.tpm).
DEFAULT_NV_INDEX = 0x01500050
DEFAULT_TCTI = "device:/dev/tpmrm0"


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

    @property
    def peers(self) -> dict[int, tuple[str, int]]:
        return {i: parse_address(a, f"network.peers.{i}", self.path) for i, a in self.constants.peers.items()}


def parse_address(value: Any, key: str, path: Path) -> tuple[str, int]:
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
    return NodeConfig(
        path=path,
        server_id=server_id,
        listen=parse_address(_get(server, "listen", str, path, "server"), "server.listen", path),
        state_dir=Path(_get(server, "state_dir", str, path, "server")),
        api_socket=Path(_get(server, "api_socket", str, path, "server")),
        constants=constants,
        **rom_settings,
    )


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
