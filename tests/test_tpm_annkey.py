"""The announcement key (issue 8): a P-256 key in a real swtpm, and its pure counterpart.

The swtpm fixture is test_rom's: a real TPM 2.0 simulator process on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given, settings
from hypothesis import strategies as st
from test_rom import NV, VSTART, Swtpm, write_config
from test_rom import swtpm as swtpm  # the fixture
from tpm2_pytss import ESAPI, ESYS_TR, TPM2B_DATA, TPMA_OBJECT, TPMT_SYM_DEF_OBJECT, TSS2_Exception

from appliance.boot.backends import announcement_key
from appliance.boot.rom import RomError
from appliance.boot.tpmkey import ATTRIBUTES, TpmAnnouncementKey, template
from appliance.cli import main
from appliance.crypto import annkey
from appliance.crypto.errors import DecodeError
from appliance.host import config as node_config


def _public_in_new_process(tcti: str, server: int) -> bytes:
    """The public key as a fresh process derives it: nothing shared with this one but the TPM."""
    code = (
        "import sys; from appliance.boot.tpmkey import TpmAnnouncementKey as K; "
        f"print(K({tcti!r}, {server}).public_key().hex())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )
    assert out.returncode == 0, out.stderr
    return bytes.fromhex(out.stdout.strip())


def _cryptography_verify(public: bytes, data: bytes, sig: bytes) -> None:
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), public)
    key.verify(sig, data, ec.ECDSA(hashes.SHA256()))


def test_the_key_is_derived_again_in_a_new_process_and_its_signatures_verify(swtpm: Swtpm) -> None:
    key = TpmAnnouncementKey(swtpm.tcti, 2)
    public = key.public_key()
    assert len(public) == 65 and public[0] == 4
    # A "wipe": another process, no file anywhere, the same TPM: the same key.
    assert _public_in_new_process(swtpm.tcti, 2) == public
    assert _public_in_new_process(swtpm.tcti, 3) != public  # one key per server id
    assert TpmAnnouncementKey(swtpm.tcti, 2, label="other appliance").public_key() != public
    data = b"period 7, previous KeyTable digest, announcement"
    sig = key.sign(data)
    _cryptography_verify(public, data, sig)
    assert annkey.verify(public, data, sig)
    with pytest.raises(InvalidSignature):
        _cryptography_verify(public, data + b"!", sig)
    # After a TPM restart (a reboot), the same key again.
    swtpm.stop()
    swtpm.start()
    again = TpmAnnouncementKey(swtpm.tcti, 2)
    assert again.public_key() == public
    _cryptography_verify(public, b"x", again.sign(b"x"))


def test_the_key_is_not_exportable(swtpm: Swtpm) -> None:
    with ESAPI(swtpm.tcti) as esapi:
        handle, public, *_ = esapi.create_primary(None, template("pst", 1), ESYS_TR.OWNER)
        attrs = TPMA_OBJECT(public.publicArea.objectAttributes)
        assert attrs == ATTRIBUTES
        assert attrs & TPMA_OBJECT.FIXEDTPM and attrs & TPMA_OBJECT.FIXEDPARENT
        assert attrs & TPMA_OBJECT.SENSITIVEDATAORIGIN  # the TPM made the private key
        assert not attrs & TPMA_OBJECT.DECRYPT  # it signs and does nothing else
        # The TPM refuses to duplicate it (the only way a private key leaves a TPM).
        with pytest.raises(TSS2_Exception):
            esapi.duplicate(handle, ESYS_TR.NONE, TPM2B_DATA(), TPMT_SYM_DEF_OBJECT())
        esapi.flush_context(handle)
    assert TpmAnnouncementKey(swtpm.tcti, 1).public_key() == annkey.public_from_xy(
        bytes(public.publicArea.unique.ecc.x), bytes(public.publicArea.unique.ecc.y)
    )


def test_a_persisted_key_still_signs_once_the_owner_hierarchy_has_an_authorization(swtpm: Swtpm) -> None:
    key = TpmAnnouncementKey(swtpm.tcti, 1)
    public = key.public_key()
    assert "kept at persistent handle" in key.persist()
    assert "already kept" in key.persist()
    with ESAPI(swtpm.tcti) as esapi:
        esapi.hierarchy_change_auth(ESYS_TR.OWNER, b"operator's secret")
    later = TpmAnnouncementKey(swtpm.tcti, 1)
    assert later.public_key() == public
    _cryptography_verify(public, b"m", later.sign(b"m"))
    # A server whose key was not persisted cannot derive it any more, and is told why.
    with pytest.raises(RomError, match=r"announcement key of server 2.*CreatePrimary"):
        TpmAnnouncementKey(swtpm.tcti, 2).public_key()


def test_pst_rom_provision_on_a_tpm_also_keeps_the_announcement_key(
    swtpm: Swtpm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, f'backend = "tpm"\nnv_index = {NV}\ntcti = "{swtpm.tcti}"')
    assert main(["rom", "provision", "--config", str(config), "--vstart", VSTART.hex()]) == 0
    out = capsys.readouterr().out
    key = announcement_key(node_config.load(config))
    assert key is not None
    assert "kept at persistent handle 0x81018101" in out and key.public_key().hex() in out
    with ESAPI(swtpm.tcti) as esapi:
        esapi.hierarchy_change_auth(ESYS_TR.OWNER, b"operator's secret")
    _cryptography_verify(key.public_key(), b"d", key.sign(b"d"))
    simulated = write_config(tmp_path, f'backend = "simulated"\npath = "{tmp_path / "rom"}"', "s.toml")
    assert announcement_key(node_config.load(simulated)) is None  # no TPM, no key: today's rule


def test_an_unreachable_tpm_is_a_rom_error_naming_the_tcti() -> None:
    with pytest.raises(RomError, match="cannot reach the TPM through tcti"):
        TpmAnnouncementKey("swtpm:host=127.0.0.1,port=1", 1).sign(b"x")


# The pure part -------------------------------------------------------------------------------------


def test_soft_key_signatures_verify_and_nothing_else_does() -> None:
    key = annkey.SoftAnnouncementKey(bytes(range(32)))
    other = annkey.SoftAnnouncementKey(bytes(range(1, 33)))
    sig = key.sign(b"data")
    assert annkey.verify(key.public, b"data", sig)
    _cryptography_verify(key.public, b"data", sig)
    assert not annkey.verify(other.public, b"data", sig)
    assert not annkey.verify(key.public, b"datA", sig)
    assert not annkey.verify(key.public, b"data", sig[:-1])
    assert not annkey.verify(b"\x04" + bytes(64), b"data", sig)
    assert "hidden" in repr(key) and key.public.hex()[:16] in repr(key)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=100))
def test_load_public_refuses_garbage_with_a_decode_error(data: bytes) -> None:
    try:
        annkey.load_public(data, "M's announcement key of server 3")
    except DecodeError as exc:
        assert "announcement key of server 3" in str(exc)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=80), st.binary(max_size=40))
def test_verify_never_raises_on_garbage(sig: bytes, data: bytes) -> None:
    key = annkey.SoftAnnouncementKey(b"k" * 32)
    assert annkey.verify(key.public, data, sig) is False


@given(st.binary(min_size=32, max_size=64), st.binary(max_size=64))
@settings(max_examples=30, deadline=None)
def test_any_soft_key_signs_and_verifies(seed: bytes, data: bytes) -> None:
    key = annkey.SoftAnnouncementKey(seed)
    assert annkey.verify(key.public, data, key.sign(data))
    assert annkey.public_from_xy(key.public[1:33], key.public[33:]) == key.public
