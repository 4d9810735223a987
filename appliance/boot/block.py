"""Vstart on a read-only block device, found through udev.

Theory of operation. The device (a partition, a small USB stick or SD card with a write-protect
switch, an eMMC boot partition) holds the ROM image at offset 0: the magic and Vstart, then
zeros to the end of the first 512-byte sector. It is named in the config by

* ``label``: a partition label (GPT name, udev ID_PART_ENTRY_NAME, /dev/disk/by-partlabel) or a
  filesystem label (ID_FS_LABEL); the kernel's own PARTNAME is matched as well;
* ``id``: udev ID_SERIAL, ID_SERIAL_SHORT, ID_WWN, ID_PATH, or a name under /dev/disk/by-id;
* ``device``: a device path, the fallback where udev does not run (then there is no udev
  database, and labels and ids that only udev knows cannot be found).

The boot path refuses a device that the kernel lets anybody write: both the sysfs ``ro``
attribute and the BLKROGET ioctl must say read-only. Provisioning goes the other way round: it
writes to a writable, blank device once (a device holding the magic, or any non-zero byte in its
first 4 KiB, is refused) and then tells the operator to make the device read-only. Software
read-only (``blockdev --setro``) stops mistakes and unprivileged code, not root, and is lost at
reboot; a hardware write-protect switch is the real thing.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from pathlib import Path
from typing import Any

import pyudev

from appliance.boot.rom import IMAGE_SIZE, MAGIC, RomError, decode_image, encode_image

SECTOR = 512
BLANK_CHECK = 4096
BLKROGET = 0x125E
BLKGETSIZE64 = 0x80081272
UDEV_DATABASE = Path("/run/udev/data")
LABEL_KEYS = ("ID_PART_ENTRY_NAME", "ID_FS_LABEL", "PARTNAME")
ID_KEYS = ("ID_SERIAL", "ID_SERIAL_SHORT", "ID_WWN", "ID_PATH")


def _ioctl_int(fd: int, request: int, fmt: str) -> int:
    buf = fcntl.ioctl(fd, request, bytes(struct.calcsize(fmt)))
    value: int = struct.unpack(fmt, buf)[0]
    return value


class BlockRom:
    """Vstart at offset 0 of a read-only block device named by label, id or device path."""

    kind = "block"

    def __init__(self, *, label: str | None = None, dev_id: str | None = None, device: Path | None = None):
        if [label, dev_id, device].count(None) != 2:
            raise RomError("a block ROM is named by exactly one of a label, an id or a device path")
        self.label = label
        self.dev_id = dev_id
        self.device = device
        self.found: Path | None = None

    @property
    def _wanted(self) -> str:
        if self.label is not None:
            return f"label {self.label!r}"
        if self.dev_id is not None:
            return f"id {self.dev_id!r}"
        return f"device {self.device}"

    def _find(self) -> Any:
        """The pyudev Device of the ROM; RomError naming what was searched if there is not exactly one."""
        context = pyudev.Context()
        if self.device is not None:
            try:
                mode = os.stat(self.device).st_mode
            except OSError as exc:
                raise RomError(f"{self.device}: {exc.strerror}; check rom.device in the config") from None
            if not stat.S_ISBLK(mode):
                raise RomError(f"{self.device}: not a block device; check rom.device in the config")
            device = pyudev.Devices.from_device_file(context, str(self.device))
        else:
            matches = [d for d in context.list_devices(subsystem="block") if self._matches(d)]
            if not matches:
                hint = (
                    ""
                    if UDEV_DATABASE.is_dir()
                    else f" This machine has no udev database ({UDEV_DATABASE} is missing: udev is not "
                    "running), so only the kernel's partition names were searched; name the device "
                    'with rom.device = "/dev/..." instead.'
                )
                raise RomError(f"no block device with {self._wanted} found.{hint}")
            if len(matches) > 1:
                names = ", ".join(str(d.device_node) for d in matches)
                raise RomError(f"several block devices carry {self._wanted}: {names}; use rom.device")
            device = matches[0]
        if device.device_node is None:
            raise RomError(f"block device with {self._wanted} has no device node under /dev")
        self.found = Path(device.device_node)
        return device

    def _matches(self, device: Any) -> bool:
        props = device.properties
        if self.label is not None:
            return any(props.get(key) == self.label for key in LABEL_KEYS)
        if any(props.get(key) == self.dev_id for key in ID_KEYS):
            return True
        links = props.get("DEVLINKS", "").split()
        return any(link == f"/dev/disk/by-id/{self.dev_id}" for link in links)

    @staticmethod
    def _read_only(device: Any, fd: int) -> tuple[bool, str]:
        """Whether the kernel refuses writes to the device, and the evidence."""
        try:
            sysfs_ro = device.attributes.asint("ro")
        except (KeyError, ValueError):
            sysfs_ro = 0
        ioctl_ro = _ioctl_int(fd, BLKROGET, "i")
        return bool(sysfs_ro and ioctl_ro), f"sysfs ro={sysfs_ro}, BLKROGET={ioctl_ro}"

    def provision(self, vstart: bytes) -> str:
        sector = encode_image(vstart).ljust(SECTOR, b"\0")
        device = self._find()
        node = self.found
        fd = self._open(node, os.O_RDONLY)
        try:
            read_only, evidence = self._read_only(device, fd)
            head = os.pread(fd, BLANK_CHECK, 0)
            size = _ioctl_int(fd, BLKGETSIZE64, "Q")
        finally:
            os.close(fd)
        if head.startswith(MAGIC):
            raise RomError(f"{node}: ROM already provisioned; it is write-once (`pst rom show` reads it)")
        if read_only:
            raise RomError(
                f"{node}: the device is read-only ({evidence}) and holds no Vstart; make it writable "
                "(`blockdev --setrw` or the write-protect switch) to provision it"
            )
        if any(head):
            raise RomError(
                f"{node}: the device holds data in its first {BLANK_CHECK} bytes; refusing to overwrite it. "
                f"If this really is the ROM device, wipe it first (`dd if=/dev/zero of={node} "
                f"bs={BLANK_CHECK} count=1`)"
            )
        if size < SECTOR:
            raise RomError(f"{node}: the device has {size} bytes, fewer than one {SECTOR}-byte sector")
        fd = self._open(node, os.O_RDWR | os.O_EXCL)
        try:
            os.pwrite(fd, sector, 0)
            os.fsync(fd)
            written = os.pread(fd, SECTOR, 0)
        finally:
            os.close(fd)
        if written != sector:
            raise RomError(f"{node}: read back different bytes after writing Vstart")
        return (
            f"{node}: Vstart written. Now make the device read-only: the hardware write-protect switch, or "
            f"`blockdev --setro {node}` at every boot (e.g. a udev rule); the boot path refuses it until then"
        )

    @staticmethod
    def _open(node: Path | None, flags: int) -> int:
        try:
            return os.open(str(node), flags)
        except OSError as exc:
            raise RomError(
                f"{node}: cannot open the ROM device: {exc.strerror} (run as root or a user of the "
                "device's group; unmount it if it is mounted)"
            ) from None

    def read_vstart(self) -> bytes:
        device = self._find()
        node = self.found
        fd = self._open(node, os.O_RDONLY)
        try:
            read_only, evidence = self._read_only(device, fd)
            sector = os.pread(fd, SECTOR, 0)
        finally:
            os.close(fd)
        if not read_only:
            raise RomError(
                f"{node}: the ROM device is writable ({evidence}); refusing it. Make it read-only with "
                f"the hardware write-protect switch or `blockdev --setro {node}`"
            )
        if not sector.startswith(MAGIC):
            decode_image(sector, str(node))  # raises: names the wrong magic
        if len(sector) < SECTOR or any(sector[IMAGE_SIZE:]):
            raise RomError(
                f"{node}: malformed ROM: the first sector must hold the magic, the 32-byte Vstart and "
                "zeros, and there is data after Vstart (or the device is shorter than a sector); it was "
                "not written by `pst rom provision`"
            )
        return decode_image(sector[:IMAGE_SIZE], str(node))

    def describe(self) -> str:
        where = f" ({self.found})" if self.found is not None else ""
        return f"read-only block device with {self._wanted}{where}"
