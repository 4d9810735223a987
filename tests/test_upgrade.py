"""Code upgrades: a new C signed by the group key after t+1 operators approved it, never a local edit."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from bootutil import cluster_for, copy_package, flip_one_byte, group_sign
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from appliance.boot.check import BootRefused, boot_check, read_manifest
from appliance.boot.manifest import Manifest
from appliance.boot.upgrade import (
    APPROVAL_FILE,
    UPGRADES_FILE,
    Upgrade,
    apply_chain,
    approved,
    constants_digest,
    decode_chain,
    encode_chain,
    is_upgrade_payload,
    propose,
    read_approval,
    read_chain,
)
from appliance.cli import main
from appliance.crypto.errors import DecodeError
from appliance.host import config as node_config
from appliance.host.config import NodeConfig
from appliance.host.files import atomic_write
from appliance.node.cluster import node_dir
from appliance.node.store import StateDir
from appliance.protocols.signing import is_protocol_payload
from appliance.protocols.state import Constants, InvariantInfo


def public(root: Path, i: int) -> Path:
    return node_dir(root, i) / "state" / "public"


def own_m(root: Path, i: int) -> InvariantInfo:
    m = StateDir(node_dir(root, i) / "state").load().public.m
    assert m is not None
    return m


def set_code_digest(config: NodeConfig, digest: bytes) -> NodeConfig:
    text = config.path.read_text()
    text = re.sub(r'code_digest = "[0-9a-f]*"', f'code_digest = "{digest.hex()}"', text)
    config.path.write_text(text)
    return node_config.load(config.path)


@pytest.fixture
def net(tmp_path: Path) -> tuple[Path, Path, Path, dict[int, NodeConfig]]:
    """A cluster running the code under ``old``, and a new version of it under ``new``."""
    old = copy_package(tmp_path / "old")
    new = copy_package(tmp_path / "new")
    flip_one_byte(new / "protocols" / "state.py")
    root = tmp_path / "c"
    return root, old, new, cluster_for(root, old)


def test_an_upgrade_approved_by_t_plus_1_operators_and_signed_by_the_group_boots(
    net: tuple[Path, Path, Path, dict[int, NodeConfig]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, old, new, configs = net
    manifest_file = tmp_path / "new.cbor"
    assert main(["manifest", "--root", str(new), "--out", str(manifest_file)]) == 0
    new_digest = Manifest.build(new).digest()
    assert capsys.readouterr().out.strip() == new_digest.hex()

    # Operators 1 and 2 (t+1 = 2) approve the same upgrade; operator 3 does not.
    for i in (1, 2):
        assert (
            main(["upgrade", "approve", "--config", str(configs[i].path), "--manifest", str(manifest_file)])
            == 0
        )
    out = capsys.readouterr().out
    fingerprints = set(re.findall(r"upgrade fingerprint ([0-9a-f]+)", out))
    assert len(fingerprints) == 1  # both operators see the same upgrade
    upgrade = read_approval(public(root, 1))
    assert upgrade is not None and upgrade == read_approval(public(root, 2))
    assert upgrade.previous == constants_digest(own_m(root, 1).constants)
    assert upgrade.constants.code_digest == new_digest
    payload = upgrade.payload()
    # Clients can never have it signed (a protocol payload); a signer contributes only if approved.
    assert is_protocol_payload(payload) and is_upgrade_payload(payload)
    assert not is_upgrade_payload(own_m(root, 1).payload()) and not is_upgrade_payload(b"hello")
    assert approved(public(root, 1), payload) and approved(public(root, 2), payload)
    assert not approved(public(root, 3), payload)
    assert not approved(public(root, 1), payload + b"x")

    certificate = tmp_path / "upgrade.cbor"
    certificate.write_bytes(upgrade.signed(group_sign(root, [1, 2], payload)).encode())
    for i in (1, 2, 3):
        assert (
            main(["upgrade", "install", "--config", str(configs[i].path), "--certificate", str(certificate)])
            == 0
        )
    assert not (public(root, 1) / APPROVAL_FILE).exists()
    assert (
        main(["upgrade", "install", "--config", str(configs[3].path), "--certificate", str(certificate)]) == 1
    )
    assert "already installed" in capsys.readouterr().err

    # The old config no longer matches the C in force ...
    with pytest.raises(BootRefused, match=r"code_digest \(config [0-9a-f]+\.\., certified [0-9a-f]+\.\.\)"):
        boot_check(configs[1], code_root=new)
    # ... the new config and the new code boot ...
    config = set_code_digest(configs[1], new_digest)
    report = boot_check(config, code_root=new)
    assert report.certified and report.constants is not None and report.constants.code_digest == new_digest
    assert "and 1 network-signed upgrade(s)" in "\n".join(report.lines())
    assert read_manifest(public(root, 1)) == Manifest.build(new)
    # ... and the old code no longer does.
    with pytest.raises(BootRefused, match=re.escape(f"{old / 'protocols' / 'state.py'}: changed")):
        boot_check(config, code_root=old)


def test_a_locally_edited_config_without_a_network_signature_does_not_boot(
    net: tuple[Path, Path, Path, dict[int, NodeConfig]],
) -> None:
    _, _, new, configs = net
    config = set_code_digest(configs[1], Manifest.build(new).digest())
    with pytest.raises(BootRefused, match="pst upgrade install"):
        boot_check(config, code_root=new)


def test_bad_upgrades_are_refused_with_the_reason(
    net: tuple[Path, Path, Path, dict[int, NodeConfig]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, _, new, configs = net
    m = own_m(root, 1)
    good = propose(m.constants, Manifest.build(new))
    cases = {
        "Scert(U) does not verify": good.signed(SigningKey.generate().sign(good.payload()).signature),
        "may change code_digest only": dataclasses.replace(
            good, constants=dataclasses.replace(good.constants, period_length=1.0)
        ),
        "does not name the C in force": dataclasses.replace(good, previous=bytes(32)),
    }
    for why, upgrade in cases.items():
        (public(root, 1) / UPGRADES_FILE).unlink(missing_ok=True)
        if not upgrade.signature:
            upgrade = upgrade.signed(group_sign(root, [2, 3], upgrade.payload()))
        path = tmp_path / "bad.cbor"
        path.write_bytes(upgrade.encode())
        assert main(["upgrade", "install", "--config", str(configs[1].path), "--certificate", str(path)]) == 1
        assert why in capsys.readouterr().err
        # Planted in the chain file by hand, it is ignored and the boot check says so.
        atomic_write(public(root, 1) / UPGRADES_FILE, encode_chain([upgrade]))
        c, applied, problem = apply_chain(m, read_chain(public(root, 1))[0])
        assert (c, applied) == (m.constants, 0) and problem is not None and why in problem
        report = boot_check(configs[1])
        assert any(why in w for w in report.warnings)
    # A bad chain file does not block a good certificate: certificates authenticate themselves.
    signed = good.signed(group_sign(root, [1, 3], good.payload()))
    path = tmp_path / "good.cbor"
    path.write_bytes(signed.encode())
    assert main(["upgrade", "install", "--config", str(configs[1].path), "--certificate", str(path)]) == 0
    assert "ignoring the invalid rest of the stored chain" in capsys.readouterr().err
    assert read_chain(public(root, 1)) == ([signed], None)
    with pytest.raises(DecodeError):
        Upgrade.decode(b"garbage")


def test_an_upgrade_needs_a_valid_m_and_a_new_code(
    net: tuple[Path, Path, Path, dict[int, NodeConfig]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, old, _, configs = net
    same = tmp_path / "same.cbor"
    same.write_bytes(Manifest.build(old).encode())
    assert main(["upgrade", "approve", "--config", str(configs[1].path), "--manifest", str(same)]) == 1
    assert "nothing to upgrade" in capsys.readouterr().err
    (public(root, 2) / "M.cbor").unlink()
    assert main(["upgrade", "approve", "--config", str(configs[2].path), "--manifest", str(same)]) == 1
    assert "no usable ROM and M" in capsys.readouterr().err


SAMPLE = Upgrade(
    b"\x01" * 32, Constants(n=4, t=1, period_length=30.0, delta=0.1, code_digest=b"\x02" * 32), b"\x03" * 64
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_decode_or_raise_decode_error(data: bytes) -> None:
    for decode in (Upgrade.decode, decode_chain):
        try:
            decode(data)
        except DecodeError:
            continue


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=3))
def test_mutated_chains_decode_to_the_same_bytes_or_raise(flips: list[tuple[int, int]]) -> None:
    data = bytearray(encode_chain([SAMPLE, SAMPLE]))
    for at, mask in flips:
        data[at % len(data)] ^= mask
    try:
        chain = decode_chain(bytes(data))
    except DecodeError:
        return
    assert encode_chain(chain) == bytes(data)
