"""ROM backends that hold Vstart, behind one interface.

Theory of operation. Vstart, the 32-byte Ed25519 start public key of a server, must be
readable by the boot path and by an attacker, and writable by nobody once provisioned. Three
backends give that property with different strength:

* ``tpm``: an NV index of a TPM 2.0, written once and then write-locked for good
  (TPMA_NV_WRITEDEFINE + TPM2_NV_WriteLock; :mod:`appliance.boot.tpm`);
* ``block``: a block device made read-only after provisioning (``blockdev --setro`` or a
  hardware write-protect switch), found through udev (:mod:`appliance.boot.block`);
* ``simulated``: a read-only file, for the demo and the tests; it protects nothing against root
  and says so in :meth:`Rom.describe`.

Every backend stores the same image: :data:`MAGIC` followed by the 32 bytes of Vstart, and
refuses to read anything else (wrong magic, wrong size, writable medium). ``provision`` writes
once and fails the second time; it returns what the operator must do next.
:func:`appliance.boot.backends.open_rom` picks the backend a server's config names.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Protocol

MAGIC = b"PST-ROM-V1\n"
VSTART_SIZE = 32
IMAGE_SIZE = len(MAGIC) + VSTART_SIZE


class RomError(Exception):
    """The ROM is missing, malformed, or writable when it must not be; the message says what to do."""


class Rom(Protocol):
    """Where Vstart lives: written once, then read at every boot and every refresh."""

    kind: str

    def provision(self, vstart: bytes) -> str:
        """Write Vstart once (a second call fails); returns what the operator must do next."""
        ...

    def read_vstart(self) -> bytes:
        """Vstart, or RomError if the ROM is missing, malformed or still writable."""
        ...

    def describe(self) -> str:
        """One line for ``pst status`` and ``pst rom show``: which backend, where, how strong."""
        ...


def encode_image(vstart: bytes) -> bytes:
    if not isinstance(vstart, bytes) or len(vstart) != VSTART_SIZE:
        raise RomError("Vstart must be a 32-byte Ed25519 public key")
    return MAGIC + vstart


def decode_image(data: bytes, source: str) -> bytes:
    """Vstart from a ROM image; ``source`` names the medium in the error."""
    if not data.startswith(MAGIC):
        raise RomError(
            f"{source}: not a provisioned ROM (expected it to start with {MAGIC!r}, "
            f"found {data[: len(MAGIC)]!r}); provision it with `pst rom provision`"
        )
    if len(data) != IMAGE_SIZE:
        raise RomError(
            f"{source}: malformed ROM: {len(data)} bytes where {IMAGE_SIZE} (magic + 32-byte Vstart) "
            "are expected; it was not written by `pst rom provision`"
        )
    return data[len(MAGIC) :]


class SimulatedRom:
    """A read-only file holding Vstart, standing in for a real ROM (demo and tests only)."""

    kind = "simulated"

    def __init__(self, path: Path) -> None:
        self.path = path

    def provision(self, vstart: bytes) -> str:
        image = encode_image(vstart)
        if self.path.exists():
            raise RomError(f"{self.path}: ROM already provisioned; it is write-once")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        except FileExistsError:
            raise RomError(f"{self.path}: ROM already provisioned; it is write-once") from None
        try:
            os.write(fd, image)
            os.fsync(fd)
        finally:
            os.close(fd)
        return f"{self.path}: Vstart written to the simulated ROM (a read-only file; not hardware)"

    def read_vstart(self) -> bytes:
        try:
            data = self.path.read_bytes()
            mode = self.path.stat().st_mode
        except OSError as exc:
            raise RomError(
                f"{self.path}: cannot read the simulated ROM: {exc.strerror}; "
                "provision it with `pst rom provision`"
            ) from None
        if stat.S_IMODE(mode) & 0o222:
            raise RomError(
                f"{self.path}: the simulated ROM is writable; refusing it (chmod a-w to accept it)"
            )
        return decode_image(data, str(self.path))

    def describe(self) -> str:
        return f"SIMULATED ROM (a read-only file, not hardware; root can rewrite it): {self.path}"


class ReadRom:
    """Vstart as read once, by a process that could read the ROM (root, under [privsep]).

    The key-holder's account may not be allowed to open the ROM device; its zygote reads
    Vstart before it drops to that account and hands this copy to every key-holder child.
    """

    def __init__(self, rom: Rom) -> None:
        self.kind = getattr(rom, "kind", "rom")
        self._vstart = rom.read_vstart()
        self._describe = rom.describe()

    def provision(self, vstart: bytes) -> str:
        raise RomError("a ROM read at start cannot be provisioned")

    def read_vstart(self) -> bytes:
        return self._vstart

    def describe(self) -> str:
        return self._describe
