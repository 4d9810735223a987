"""The ROM backend a server's config names (``[rom]`` section): simulated, tpm or block."""

from __future__ import annotations

from appliance.boot.rom import Rom, RomError, SimulatedRom
from appliance.host.config import NodeConfig


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
