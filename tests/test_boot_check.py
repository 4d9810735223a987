"""The boot checks, in process: ROM -> M_i -> Vcert -> [Scert(M), M] -> C -> config -> code.

Each test runs against a private copy of the package (tests/bootutil.py), so that changing
a file never touches the repository.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
from bootutil import cluster_for, copy_package, flip_one_byte

from appliance.boot.check import (
    FAIL,
    OK,
    WARN,
    BootRefused,
    boot_check,
    code_mismatches,
    read_manifest,
    recheck_code,
)
from appliance.boot.manifest import CHANGED, DIGEST, EXTRA, Manifest
from appliance.host.config import NodeConfig
from appliance.host.files import atomic_write
from appliance.node.cluster import node_dir
from appliance.node.store import StateDir
from appliance.protocols.state import InvariantInfo


@pytest.fixture
def env(tmp_path: Path) -> tuple[Path, Path, dict[int, NodeConfig]]:
    code = copy_package(tmp_path / "code")
    root = tmp_path / "c"
    return root, code, cluster_for(root, code)


def public(root: Path, i: int) -> Path:
    return node_dir(root, i) / "state" / "public"


def alerts(root: Path, i: int) -> list[dict[str, object]]:
    path = public(root, i) / "alerts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def own_m(root: Path, i: int) -> InvariantInfo:
    m = StateDir(node_dir(root, i) / "state").load().public.m
    assert m is not None
    return m


def statuses(report_lines: list[str]) -> dict[str, str]:
    out = {}
    for line in report_lines[1:]:
        status, name = line.split()[:2]
        out[name.rstrip(":")] = status
    return out


def test_an_intact_server_passes_every_check(env: tuple[Path, Path, dict[int, NodeConfig]]) -> None:
    root, code, configs = env
    report = boot_check(configs[2], code_root=code)
    assert report.certified and report.mismatches == [] and report.warnings == []
    assert statuses(report.lines()) == {"ROM": OK, "M": OK, "C": OK, "code": OK}
    assert "M_2 verifies with Vstart" in report.lines()[2]
    assert f"files under {code} match the manifest" in report.lines()[-1]
    assert report.constants == own_m(root, 2).constants
    assert alerts(root, 2) == []
    assert recheck_code(configs[2], code_root=code) == []


def test_one_changed_byte_refuses_the_boot_naming_the_file(
    env: tuple[Path, Path, dict[int, NodeConfig]],
) -> None:
    root, code, configs = env
    target = code / "protocols" / "refresh.py"
    flip_one_byte(target)
    with pytest.raises(BootRefused, match=re.escape(f"{target}: changed")) as caught:
        boot_check(configs[1], code_root=code)
    assert statuses(caught.value.report.lines())["code"] == FAIL
    [alert] = alerts(root, 1)
    assert alert["kind"] == "code-mismatch" and alert["server"] == 1 and str(target) in str(alert["detail"])
    assert [(m.kind, m.path) for m in recheck_code(configs[1], code_root=code)] == [
        (CHANGED, "protocols/refresh.py")
    ]


def test_an_added_module_is_named(env: tuple[Path, Path, dict[int, NodeConfig]]) -> None:
    _, code, configs = env
    (code / "node" / "backdoor.py").write_text("print('hi')\n")
    with pytest.raises(BootRefused, match=re.escape(f"{code / 'node' / 'backdoor.py'}: extra")):
        boot_check(configs[1], code_root=code)
    assert [(m.kind, m.path) for m in recheck_code(configs[1], code_root=code)] == [
        (EXTRA, "node/backdoor.py")
    ]


def test_a_bad_m_i_is_an_alert_and_the_server_boots_as_recovering(
    env: tuple[Path, Path, dict[int, NodeConfig]],
) -> None:
    root, code, configs = env
    m = own_m(root, 1)
    forged = InvariantInfo(m.vcert, m.constants, {**m.m, 1: m.m[2]}, m.scert_signature)
    atomic_write(public(root, 1) / "M.cbor", forged.encode())
    report = boot_check(configs[1], code_root=code)  # Table 2: recover M from the peers
    assert not report.certified
    assert statuses(report.lines()) == {"ROM": OK, "M": WARN, "C": WARN, "code": OK}
    assert "M_1 does not verify with Vstart from ROM" in report.warnings[0]
    assert [a["kind"] for a in alerts(root, 1)] == ["invalid-invariant-information"]
    with pytest.raises(BootRefused, match=r"M: own copy of M rejected: .*M_1 does not verify with Vstart"):
        boot_check(configs[1], code_root=code, strict=True)


def test_a_bad_scert_signature_on_m_is_detected(env: tuple[Path, Path, dict[int, NodeConfig]]) -> None:
    root, code, configs = env
    m = own_m(root, 3)
    atomic_write(public(root, 3) / "M.cbor", dataclasses.replace(m, scert_signature=bytes(64)).encode())
    with pytest.raises(BootRefused, match=r"Scert\(M\) does not verify with Vcert"):
        boot_check(configs[3], code_root=code, strict=True)
    report = boot_check(configs[3], code_root=code)
    assert not report.certified and "Scert(M) does not verify" in report.warnings[0]


def test_without_a_valid_m_tampered_code_is_still_refused(
    env: tuple[Path, Path, dict[int, NodeConfig]],
) -> None:
    """No certified C: the code is checked against the config's C, which names the same code."""
    root, code, configs = env
    (public(root, 1) / "M.cbor").unlink()
    flip_one_byte(code / "crypto" / "frost.py")
    with pytest.raises(BootRefused, match=re.escape(f"{code / 'crypto' / 'frost.py'}: changed")):
        boot_check(configs[1], code_root=code)


def test_a_server_with_no_state_at_all_boots(env: tuple[Path, Path, dict[int, NodeConfig]]) -> None:
    import shutil

    root, code, configs = env
    shutil.rmtree(node_dir(root, 2) / "state")
    report = boot_check(configs[2], code_root=code)
    assert not report.certified and "no M in" in report.warnings[0]
    assert "restored" in report.lines()[-1]  # the manifest file comes back from the installed code
    assert read_manifest(public(root, 2)) == Manifest.build(code)
    with pytest.raises(BootRefused, match="M: no M in"):
        boot_check(configs[2], code_root=code, strict=True)


def test_a_config_that_differs_from_the_certified_c_is_refused(
    env: tuple[Path, Path, dict[int, NodeConfig]],
) -> None:
    root, code, configs = env
    config = dataclasses.replace(
        configs[1], constants=dataclasses.replace(configs[1].constants, period_length=31.0)
    )
    with pytest.raises(BootRefused, match=r"period_length_ms \(config 31000, certified 600000\)"):
        boot_check(config, code_root=code)
    assert [a["kind"] for a in alerts(root, 1)] == ["constants-mismatch"]


def test_a_config_naming_other_code_is_refused_with_a_hint(
    env: tuple[Path, Path, dict[int, NodeConfig]],
) -> None:
    _, code, configs = env
    config = dataclasses.replace(
        configs[1], constants=dataclasses.replace(configs[1].constants, code_digest=bytes(32))
    )
    with pytest.raises(BootRefused, match=r"code_digest .*pst upgrade install"):
        boot_check(config, code_root=code)


def test_a_manifest_that_is_not_cs_cannot_vouch_for_tampered_code(
    env: tuple[Path, Path, dict[int, NodeConfig]],
) -> None:
    """The attacker changes a module and writes a manifest of the changed tree: not trusted."""
    root, code, configs = env
    flip_one_byte(code / "node" / "store.py")
    atomic_write(public(root, 1) / "manifest.cbor", Manifest.build(code).encode())
    with pytest.raises(BootRefused, match="cannot be named") as caught:
        boot_check(configs[1], code_root=code)
    assert [m.kind for m in caught.value.report.mismatches] == [DIGEST]
    assert "not C's manifest" in str(caught.value)
    assert [a["kind"] for a in alerts(root, 1)] == ["code-mismatch"]


def test_a_corrupt_manifest_file_is_restored_when_the_code_is_intact(
    env: tuple[Path, Path, dict[int, NodeConfig]],
) -> None:
    root, code, configs = env
    (public(root, 1) / "manifest.cbor").write_bytes(b"garbage")
    report = boot_check(configs[1], code_root=code)
    assert report.warnings == [] and "restored" in report.lines()[-1]
    assert read_manifest(public(root, 1)) == Manifest.build(code)
    assert code_mismatches(configs[1].constants, configs[1].state_dir, code) == []


def test_a_c_without_code_digest_is_a_warning_or_refused_when_strict(
    env: tuple[Path, Path, dict[int, NodeConfig]],
) -> None:
    import shutil

    root, code, configs = env
    shutil.rmtree(node_dir(root, 1) / "state")
    config = dataclasses.replace(
        configs[1], constants=dataclasses.replace(configs[1].constants, code_digest=b"")
    )
    report = boot_check(config, code_root=code)
    assert "code NOT checked" in report.warnings[-1]
    assert recheck_code(config, code_root=code) == []
    with pytest.raises(BootRefused):
        boot_check(config, code_root=code, strict=True)


def test_an_unreadable_rom_refuses_the_boot(env: tuple[Path, Path, dict[int, NodeConfig]]) -> None:
    root, code, configs = env
    rom = node_dir(root, 1) / "rom"
    rom.chmod(0o644)
    rom.unlink()
    with pytest.raises(BootRefused, match=r"ROM: .*rom"):
        boot_check(configs[1], code_root=code)


def test_an_alert_that_cannot_be_written_does_not_hide_the_refusal(
    env: tuple[Path, Path, dict[int, NodeConfig]],
) -> None:
    root, code, configs = env
    (public(root, 1) / "alerts.jsonl").mkdir()  # unwritable as a file, even for root
    flip_one_byte(code / "cli.py")
    with pytest.raises(BootRefused, match=re.escape(f"{code / 'cli.py'}: changed")) as caught:
        boot_check(configs[1], code_root=code)
    assert any("alert" in line and "not written" in line for line in caught.value.report.lines())
