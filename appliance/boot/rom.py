"""ROM backends that hold Vstart. Only the simulated ROM exists so far.

The simulated ROM of ``firmware-sim/`` is a file holding Vstart that is made read-only
after provisioning; ``pst status`` says plainly that it is simulated. The TPM 2.0 NV
index and read-only block device backends arrive with the appliance issue.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

MAGIC = b"PST-ROM-V1\n"


class RomError(Exception):
    """The ROM is missing, malformed, or writable when it must not be."""


class SimulatedRom:
    """A read-only file holding Vstart (32 bytes), standing in for a real ROM."""

    kind = "simulated"

    def __init__(self, path: Path) -> None:
        self.path = path

    def provision(self, vstart: bytes) -> None:
        """Write Vstart once; a second provisioning fails."""
        if len(vstart) != 32:
            raise RomError("Vstart must be a 32-byte Ed25519 public key")
        if self.path.exists():
            raise RomError(f"{self.path}: ROM already provisioned; it is write-once")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            os.write(fd, MAGIC + vstart)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_vstart(self) -> bytes:
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise RomError(f"{self.path}: cannot read the simulated ROM: {exc.strerror}") from None
        if stat.S_IMODE(self.path.stat().st_mode) & 0o222:
            raise RomError(f"{self.path}: the simulated ROM is writable; refusing it")
        if not data.startswith(MAGIC) or len(data) != len(MAGIC) + 32:
            raise RomError(f"{self.path}: not a provisioned ROM")
        return data[len(MAGIC) :]

    def describe(self) -> str:
        return f"SIMULATED ROM (a read-only file, not hardware): {self.path}"
