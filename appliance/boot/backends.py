"""The ROM backend a server's config names (``[rom]`` section): simulated, tpm or block."""

from __future__ import annotations

from typing import TYPE_CHECKING

from appliance.boot.rom import Rom, RomError, SimulatedRom
from appliance.host.config import NodeConfig

if TYPE_CHECKING:
    from appliance.boot.tpmkey import TpmAnnouncementKey


def announcement_key(config: NodeConfig) -> TpmAnnouncementKey | None:
    """The server's announcement key (issue 8): in the TPM where the ROM is a TPM, else none."""
    if config.rom_backend != "tpm":
        return None
    from appliance.boot.tpmkey import TpmAnnouncementKey

    return TpmAnnouncementKey(config.rom_tcti, config.server_id)


def open_rom(config: NodeConfig) -> Rom:
    """The ROM backend of a server's config (``[rom]`` section)."""
    if config.rom_backend == "simulated":
        if config.rom_path is None:
            raise RomError(f'{config.path}: rom.path is required for backend "simulated"')
        return SimulatedRom(config.rom_path)
    if config.rom_backend == "tpm":
        from appliance.boot.tpm import TpmRom  # tpm2-pytss is loaded only where a TPM is used

        return TpmRom(config.rom_nv_index, config.rom_tcti)
    if config.rom_backend == "block":
        from appliance.boot.block import BlockRom  # pyudev likewise

        return BlockRom(label=config.rom_label, dev_id=config.rom_id, device=config.rom_device)
    raise RomError(f"{config.path}: rom.backend {config.rom_backend!r} is not simulated, tpm or block")
