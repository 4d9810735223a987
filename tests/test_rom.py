"""The ROM holding Vstart: write once, refuse anything writable or malformed, three real backends.

The TPM backend is tested against a real swtpm that each test starts on a free loopback port
with its own state directory; the block backend against real loop devices (skipped, with the
reason, where the machine forbids them); nothing is mocked.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from appliance.boot.backends import open_rom
from appliance.boot.block import BlockRom
from appliance.boot.rom import IMAGE_SIZE, MAGIC, RomError, SimulatedRom, decode_image
from appliance.cli import main
from appliance.host import config as node_config
from appliance.protocols.state import ConfigError

VSTART = bytes(SigningKey(b"\x07" * 32).verify_key)
OTHER = bytes(SigningKey(b"\x08" * 32).verify_key)
NV = 0x01500050


# --- configs -------------------------------------------------------------------------------


def write_config(tmp_path: Path, rom: str, name: str = "config.toml") -> Path:
    path = tmp_path / name
    path.write_text(
        f"""[server]
id = 1
listen = "127.0.0.1:7101"
state_dir = "{tmp_path / "state"}"
api_socket = "{tmp_path / "api.sock"}"

[rom]
{rom}

[network]
n = 4
t = 1
period_seconds = 30
round_ms = 100
genesis = 1764000000.0

[network.peers]
1 = "127.0.0.1:7101"
2 = "127.0.0.1:7102"
3 = "127.0.0.1:7103"
4 = "127.0.0.1:7104"
"""
    )
    return path


@pytest.mark.parametrize(
    ("rom", "expected"),
    [
        ('backend = "floppy"', "rom.backend must be simulated, tpm or block"),
        ('backend = "simulated"', "missing rom.path"),
        (
            'backend = "simulated"\npath = "/x"\nnv_index = 1',
            'rom.nv_index is not used by rom.backend = "simulated"',
        ),
        ('backend = "tpm"\nnv_index = 0x81000001', "rom.nv_index must be a TPM NV index handle"),
        ('backend = "tpm"\nnv_index = "0x15zz"', "rom.nv_index must be a TPM NV index handle"),
        ('backend = "tpm"\nnv_index = true', "rom.nv_index must be a TPM NV index handle"),
        ('backend = "tpm"\ntcti = ""', "rom.tcti must be a TCTI string"),
        ('backend = "tpm"\npath = "/x"', 'rom.path is not used by rom.backend = "tpm"'),
        ('backend = "block"', "needs exactly one of rom.label, rom.id or rom.device"),
        ('backend = "block"\nlabel = "A"\ndevice = "/dev/sda"', "needs exactly one of rom.label"),
        ('backend = "block"\ndevice = "sda"', "rom.device must be a device path under /dev/"),
        ('backend = "block"\nlabel = ""', "rom.label is empty"),
        ('backend = "block"\nid = 7', "rom.id must be of type str"),
    ],
)
def test_rom_config_errors_name_the_file_and_the_key(tmp_path: Path, rom: str, expected: str) -> None:
    path = write_config(tmp_path, rom)
    with pytest.raises(ConfigError) as exc:
        node_config.load(path)
    assert str(path) in str(exc.value)
    assert expected in str(exc.value)


def test_rom_config_picks_the_backend(tmp_path: Path) -> None:
    tpm = node_config.load(write_config(tmp_path, 'backend = "tpm"\nnv_index = "0x01500051"', "t.toml"))
    assert (tpm.rom_backend, tpm.rom_nv_index, tpm.rom_tcti) == ("tpm", 0x01500051, "device:/dev/tpmrm0")
    assert type(open_rom(tpm)).__name__ == "TpmRom"
    block = node_config.load(write_config(tmp_path, 'backend = "block"\nid = "usb-ROM_1"', "b.toml"))
    rom = open_rom(block)
    assert isinstance(rom, BlockRom) and rom.dev_id == "usb-ROM_1"
    sim = node_config.load(
        write_config(tmp_path, f'backend = "simulated"\npath = "{tmp_path / "r"}"', "s.toml")
    )
    assert isinstance(open_rom(sim), SimulatedRom)


# --- the simulated ROM ---------------------------------------------------------------------


def test_simulated_rom_is_write_once_and_says_it_is_simulated(tmp_path: Path) -> None:
    rom = SimulatedRom(tmp_path / "rom")
    rom.provision(VSTART)
    assert rom.read_vstart() == VSTART
    assert stat.S_IMODE((tmp_path / "rom").stat().st_mode) == 0o444
    with pytest.raises(RomError, match="already provisioned; it is write-once"):
        rom.provision(OTHER)
    assert rom.read_vstart() == VSTART
    assert rom.describe().startswith("SIMULATED ROM")
    assert "not hardware" in rom.describe()


def test_simulated_rom_refuses_a_writable_file(tmp_path: Path) -> None:
    rom = SimulatedRom(tmp_path / "rom")
    rom.provision(VSTART)
    os.chmod(tmp_path / "rom", 0o644)
    with pytest.raises(RomError, match="writable; refusing it"):
        rom.read_vstart()


def test_missing_rom_says_how_to_provision(tmp_path: Path) -> None:
    with pytest.raises(RomError, match="pst rom provision"):
        SimulatedRom(tmp_path / "none").read_vstart()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "not a provisioned ROM"),
        (b"PST-ROM-V2\n" + VSTART, "not a provisioned ROM"),
        (MAGIC + VSTART[:31], "42 bytes where 43"),
        (MAGIC + VSTART + b"\0", "44 bytes where 43"),
    ],
)
def test_rom_with_wrong_magic_or_size_is_refused(tmp_path: Path, data: bytes, expected: str) -> None:
    path = tmp_path / "rom"
    path.write_bytes(data)
    os.chmod(path, 0o444)
    with pytest.raises(RomError, match=expected) as exc:
        SimulatedRom(path).read_vstart()
    assert str(path) in str(exc.value)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=80))
def test_garbage_images_are_refused_with_a_rom_error(data: bytes) -> None:
    try:
        vstart = decode_image(data, "fuzz")
    except RomError as exc:
        assert str(exc).startswith("fuzz: ")
    else:
        assert data == MAGIC + vstart and len(vstart) == 32


def test_provision_takes_only_a_32_byte_key(tmp_path: Path) -> None:
    with pytest.raises(RomError, match="32-byte"):
        SimulatedRom(tmp_path / "rom").provision(b"\x01" * 31)
    assert not (tmp_path / "rom").exists()


# --- the TPM 2.0 backend against swtpm -----------------------------------------------------


def _free_port_pair() -> int:
    """A port P on 127.0.0.1 with P+1 free too (swtpm's server and control channels)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return int(port)
    raise RuntimeError("no two adjacent free ports on 127.0.0.1")


class Swtpm:
    """A swtpm TPM 2.0 simulator process on loopback, with its state in ``state``."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def start(self) -> None:
        binary = shutil.which("swtpm")
        if binary is None:
            pytest.fail("swtpm is not installed: `make deps` installs the Debian packages swtpm, swtpm-tools")
        self.state.mkdir(parents=True, exist_ok=True)
        self.port = _free_port_pair()
        self.proc = subprocess.Popen(
            [
                binary,
                "socket",
                "--tpm2",
                "--server",
                f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                "--ctrl",
                f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                "--tpmstate",
                f"dir={self.state}",
                "--flags",
                "not-need-init,startup-clear",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    self.stop()
                    pytest.fail(f"swtpm did not start on port {self.port}: {err}")
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stderr:
                self.proc.stderr.close()
            self.proc = None


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    tpm = Swtpm(tmp_path / "swtpm-state")
    tpm.start()
    try:
        yield tpm
    finally:
        tpm.stop()


def _define(tcti: str, attributes: int, size: int, data: bytes | None, lock: bool, index: int = NV) -> None:
    """Make an NV index the way some other program (or an interrupted provisioning) would."""
    from tpm2_pytss import ESAPI, TPM2_ALG, TPM2B_NV_PUBLIC, TPMA_NV, TPMS_NV_PUBLIC

    public = TPM2B_NV_PUBLIC(
        nvPublic=TPMS_NV_PUBLIC(
            nvIndex=index, nameAlg=TPM2_ALG.SHA256, attributes=TPMA_NV(attributes), dataSize=size
        )
    )
    with ESAPI(tcti) as esapi:
        handle = esapi.nv_define_space(b"", public)
        if data is not None:
            esapi.nv_write(handle, data)
        if lock:
            esapi.nv_write_lock(handle)


def _raw_write(tcti: str, data: bytes, index: int = NV) -> None:
    from tpm2_pytss import ESAPI

    with ESAPI(tcti) as esapi:
        esapi.nv_write(esapi.tr_from_tpmpublic(index), data)


def test_tpm_rom_is_written_once_and_locked_in_the_tpm(swtpm: Swtpm) -> None:
    from tpm2_pytss import TPM2_RC, TSS2_Exception

    from appliance.boot.tpm import TpmRom

    rom = TpmRom(NV, swtpm.tcti)
    note = rom.provision(VSTART)
    assert "write-locked" in note and "tpm2_changeauth" in note
    assert rom.read_vstart() == VSTART
    assert rom.describe().startswith("TPM 2.0 NV index 0x01500050")
    with pytest.raises(RomError, match="already provisioned and write-locked; it is write-once"):
        rom.provision(OTHER)
    # The TPM itself refuses the write, not only our code.
    with pytest.raises(TSS2_Exception) as exc:
        _raw_write(swtpm.tcti, MAGIC + OTHER)
    assert exc.value.error == TPM2_RC.NV_LOCKED
    assert rom.read_vstart() == VSTART


def test_tpm_write_lock_survives_a_tpm_restart(swtpm: Swtpm) -> None:
    from tpm2_pytss import TPM2_RC, TSS2_Exception

    from appliance.boot.tpm import TpmRom

    TpmRom(NV, swtpm.tcti).provision(VSTART)
    swtpm.stop()
    swtpm.start()  # same state directory: a reboot with TPM2_Startup(CLEAR)
    rom = TpmRom(NV, swtpm.tcti)
    assert rom.read_vstart() == VSTART
    with pytest.raises(TSS2_Exception) as exc:
        _raw_write(swtpm.tcti, MAGIC + OTHER)
    assert exc.value.error == TPM2_RC.NV_LOCKED


def test_tpm_index_that_is_not_write_locked_is_refused(swtpm: Swtpm) -> None:
    from appliance.boot.tpm import ATTRIBUTES, TpmRom

    _define(swtpm.tcti, ATTRIBUTES, IMAGE_SIZE, MAGIC + VSTART, lock=False)  # an interrupted provisioning
    rom = TpmRom(NV, swtpm.tcti)
    with pytest.raises(RomError, match="refusing it as a ROM: it lacks writelocked") as exc:
        rom.read_vstart()
    assert "0x01500050" in str(exc.value)
    with pytest.raises(RomError, match=r"exists but is not write-locked.*tpm2_nvundefine 0x01500050"):
        rom.provision(VSTART)


def test_tpm_index_with_wrong_size_or_attributes_is_refused(swtpm: Swtpm) -> None:
    from tpm2_pytss import TPMA_NV

    from appliance.boot.tpm import ATTRIBUTES, TpmRom

    _define(swtpm.tcti, ATTRIBUTES, 64, MAGIC + VSTART + bytes(21), lock=True, index=NV)
    with pytest.raises(RomError, match="its size is 64 bytes, not 43"):
        TpmRom(NV, swtpm.tcti).read_vstart()
    # A lock that the next TPM2_Startup(CLEAR) lifts is no ROM.
    stclear = (ATTRIBUTES & ~TPMA_NV.WRITEDEFINE) | TPMA_NV.WRITE_STCLEAR
    _define(swtpm.tcti, stclear, IMAGE_SIZE, MAGIC + VSTART, lock=True, index=NV + 1)
    with pytest.raises(RomError, match=r"it lacks writedefine.*it has write_stclear"):
        TpmRom(NV + 1, swtpm.tcti).read_vstart()
    # Locked for good, but writable by policy: no ROM either.
    policy = ATTRIBUTES | TPMA_NV.POLICYWRITE
    _define(swtpm.tcti, policy, IMAGE_SIZE, MAGIC + VSTART, lock=True, index=NV + 2)
    with pytest.raises(RomError, match="it has policywrite"):
        TpmRom(NV + 2, swtpm.tcti).read_vstart()


def test_tpm_index_with_garbage_is_refused(swtpm: Swtpm) -> None:
    from appliance.boot.tpm import ATTRIBUTES, TpmRom

    _define(swtpm.tcti, ATTRIBUTES, IMAGE_SIZE, b"X" * IMAGE_SIZE, lock=True)
    with pytest.raises(RomError, match=r"0x01500050.*not a provisioned ROM \(expected it to start with"):
        TpmRom(NV, swtpm.tcti).read_vstart()


def test_tpm_without_the_index_or_unreachable_says_what_to_do(swtpm: Swtpm) -> None:
    from appliance.boot.tpm import TpmRom

    with pytest.raises(RomError, match="no such index; provision it with `pst rom provision`"):
        TpmRom(NV, swtpm.tcti).read_vstart()
    port = swtpm.port
    swtpm.stop()
    with pytest.raises(RomError, match=r"cannot reach the TPM through tcti.*check rom.tcti"):
        TpmRom(NV, f"swtpm:host=127.0.0.1,port={port}").read_vstart()


# --- the read-only block device backend on real loop devices -------------------------------


class Loop:
    def __init__(self) -> None:
        self.devices: list[str] = []

    def attach(self, image: Path, *, read_only: bool = False) -> Path:
        cmd = ["losetup", "--find", "--show", *(["--read-only"] if read_only else []), str(image)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            pytest.skip(f"this machine forbids loop devices: {' '.join(cmd)}: {out.stderr.strip()}")
        device = out.stdout.strip()
        self.devices.append(device)
        if not read_only:  # the kernel keeps a `blockdev --setro` flag across detach and attach
            subprocess.run(["blockdev", "--setrw", device], check=True)
        return Path(device)


@pytest.fixture
def loop() -> Iterator[Loop]:
    if os.geteuid() != 0:
        pytest.skip("loop devices need root (losetup); run the tests as root to exercise the block ROM")
    if shutil.which("losetup") is None or not Path("/dev/loop-control").exists():
        pytest.skip("no losetup or /dev/loop-control on this machine: loop devices are not available")
    loops = Loop()
    try:
        yield loops
    finally:
        for device in loops.devices:
            subprocess.run(["blockdev", "--setrw", device], check=False)
            subprocess.run(["losetup", "--detach", device], check=False)


def _image(tmp_path: Path, head: bytes = b"") -> Path:
    image = tmp_path / "rom.img"
    image.write_bytes(head.ljust(64 * 1024, b"\0"))
    return image


def test_block_rom_provision_then_read_only_then_read(tmp_path: Path, loop: Loop) -> None:
    device = loop.attach(_image(tmp_path))
    rom = BlockRom(device=device)
    note = rom.provision(VSTART)
    assert f"blockdev --setro {device}" in note
    with pytest.raises(RomError, match=r"writable \(sysfs ro=0, BLKROGET=0\); refusing it"):
        rom.read_vstart()
    subprocess.run(["blockdev", "--setro", str(device)], check=True)
    assert rom.read_vstart() == VSTART
    assert rom.describe() == f"read-only block device with device {device} ({device})"
    with pytest.raises(RomError, match="already provisioned; it is write-once"):
        rom.provision(OTHER)
    assert (tmp_path / "rom.img").read_bytes()[:IMAGE_SIZE] == MAGIC + VSTART


def test_block_rom_read_only_loop_device_reads_and_cannot_be_provisioned(tmp_path: Path, loop: Loop) -> None:
    device = loop.attach(_image(tmp_path, MAGIC + VSTART), read_only=True)
    rom = BlockRom(device=device)
    assert rom.read_vstart() == VSTART
    with pytest.raises(RomError, match="already provisioned"):
        rom.provision(OTHER)
    (tmp_path / "blank").mkdir()
    blank = loop.attach(_image(tmp_path / "blank"), read_only=True)
    with pytest.raises(RomError, match=r"read-only \(sysfs ro=1, BLKROGET=1\) and holds no Vstart"):
        BlockRom(device=blank).provision(VSTART)


def test_second_provision_of_a_writable_device_fails(tmp_path: Path, loop: Loop) -> None:
    device = loop.attach(_image(tmp_path))
    BlockRom(device=device).provision(VSTART)
    with pytest.raises(RomError, match="already provisioned; it is write-once"):
        BlockRom(device=device).provision(OTHER)


def test_block_device_with_other_data_is_neither_overwritten_nor_read(tmp_path: Path, loop: Loop) -> None:
    device = loop.attach(_image(tmp_path, b"\xebX\x90mkfs.fat"))
    with pytest.raises(RomError, match="holds data in its first 4096 bytes; refusing to overwrite"):
        BlockRom(device=device).provision(VSTART)
    assert (tmp_path / "rom.img").read_bytes()[:3] == b"\xebX\x90"
    subprocess.run(["blockdev", "--setro", str(device)], check=True)
    with pytest.raises(RomError, match="not a provisioned ROM"):
        BlockRom(device=device).read_vstart()


def test_block_rom_with_data_after_vstart_is_refused(tmp_path: Path, loop: Loop) -> None:
    device = loop.attach(_image(tmp_path, MAGIC + VSTART + b"\x01"), read_only=True)
    with pytest.raises(RomError, match=r"malformed ROM: .* data after Vstart"):
        BlockRom(device=device).read_vstart()


def test_block_rom_lookup_by_label_or_id_names_what_it_searched(tmp_path: Path) -> None:
    for rom, wanted in [
        (BlockRom(label="PST-ROM-no-such-label"), "label 'PST-ROM-no-such-label'"),
        (BlockRom(dev_id="no-such-serial-4711"), "id 'no-such-serial-4711'"),
    ]:
        with pytest.raises(RomError, match=f"no block device with {wanted} found") as exc:
            rom.read_vstart()
        if not Path("/run/udev/data").is_dir():
            assert "no udev database" in str(exc.value) and "rom.device" in str(exc.value)
    with pytest.raises(RomError, match=r"not a block device; check rom.device"):
        BlockRom(device=tmp_path).read_vstart()


# --- pst rom -------------------------------------------------------------------------------


def test_cli_provision_twice_fails_and_show_prints_vstart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, f'backend = "simulated"\npath = "{tmp_path / "rom"}"')
    assert main(["rom", "provision", "--config", str(config), "--vstart", VSTART.hex()]) == 0
    assert main(["rom", "provision", "--config", str(config), "--vstart", OTHER.hex()]) == 1
    err = capsys.readouterr().err
    assert "pst rom provision:" in err and "already provisioned; it is write-once" in err
    assert main(["rom", "show", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "SIMULATED ROM" in out and f"Vstart {VSTART.hex()}" in out


def test_cli_provision_from_state_makes_sstart_on_erasable_disk(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, f'backend = "simulated"\npath = "{tmp_path / "rom"}"')
    assert main(["rom", "provision", "--config", str(config), "--from-state"]) == 0
    sstart = tmp_path / "state" / "sstart"
    assert stat.S_IMODE(sstart.stat().st_mode) == 0o600
    vstart = bytes(SigningKey(sstart.read_bytes()).verify_key)
    out = capsys.readouterr().out
    assert f"Vstart {vstart.hex()}" in out and sstart.read_bytes().hex() not in out
    assert SimulatedRom(tmp_path / "rom").read_vstart() == vstart
    before = sstart.read_bytes()
    assert main(["rom", "provision", "--config", str(config), "--from-state"]) == 1
    assert sstart.read_bytes() == before  # an existing Sstart is kept when the ROM refuses


def test_cli_provision_failure_erases_the_sstart_it_made(tmp_path: Path) -> None:
    config = write_config(tmp_path, f'backend = "simulated"\npath = "{tmp_path / "rom"}"')
    SimulatedRom(tmp_path / "rom").provision(VSTART)
    assert main(["rom", "provision", "--config", str(config), "--from-state"]) == 1
    assert not (tmp_path / "state" / "sstart").exists()


def test_cli_bad_input_exits_2_naming_the_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, 'backend = "tpm"\nnv_index = 5')
    assert main(["rom", "show", "--config", str(config)]) == 2
    assert f"{config}: rom.nv_index" in capsys.readouterr().err
    good = write_config(tmp_path, f'backend = "simulated"\npath = "{tmp_path / "rom"}"', "good.toml")
    assert main(["rom", "provision", "--config", str(good), "--vstart", "abcd"]) == 2
    assert "--vstart must be 64 hex digits" in capsys.readouterr().err
    assert not (tmp_path / "rom").exists()


def test_cli_provisions_a_tpm_once(tmp_path: Path, swtpm: Swtpm, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, f'backend = "tpm"\nnv_index = 0x01500050\ntcti = "{swtpm.tcti}"')
    assert main(["rom", "provision", "--config", str(config), "--vstart", VSTART.hex()]) == 0
    assert main(["rom", "provision", "--config", str(config), "--vstart", OTHER.hex()]) == 1
    assert "write-once" in capsys.readouterr().err
    assert main(["rom", "show", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "TPM 2.0" in out and f"Vstart {VSTART.hex()}" in out
