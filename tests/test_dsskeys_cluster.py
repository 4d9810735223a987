"""Per-application DSS keys through a real cluster: four `pst serve` processes on loopback
(`pst cluster init --store --dss-keys p256`); `pst dss keygen|sign|pubkey` and the client
library; openssl verifies every signature, before and after a refresh."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clusterutil import init_cluster, pst, status

from appliance.api.client import PstClient, PstError

APP = "billing"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("dsskeys") / "c"
    init_cluster(root, n=4, period=600, round_ms=80, extra=("--store", "--dss-keys", "p256"))
    up = pst("cluster", "up", "--dir", str(root), "--detach")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not all(r.get("status") == "operational" for r in status(root)):
            time.sleep(0.5)
        yield root
    finally:
        pst("cluster", "down", "--dir", str(root))


def _retrying(call, *args, **kwargs):  # type: ignore[no-untyped-def]
    """While the network starts or refreshes (no store key yet, no presignature yet): again."""
    deadline = time.monotonic() + 40
    while True:
        try:
            return call(*args, **kwargs)
        except PstError as exc:
            if exc.code not in ("unavailable", "not-found") or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _openssl_verifies(tmp: Path, pem: bytes, message: bytes, der: bytes) -> bool:
    (tmp / "pub.pem").write_bytes(pem)
    (tmp / "msg").write_bytes(message)
    (tmp / "sig.der").write_bytes(der)
    cmd = ["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "sig.der", "msg"]
    result = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False)
    return result.returncode == 0 and "Verified OK" in result.stdout


def _alerts(root: Path, kind: str) -> list[dict[str, object]]:
    found = []
    for path in sorted(root.glob("node-*/state/*/alerts.jsonl")):
        for line in path.read_text().splitlines():
            obj = json.loads(line)
            if obj.get("kind") == kind:
                found.append(obj)
    return found


def test_an_application_key_is_made_signs_through_the_network_and_survives_a_refresh(
    cluster: Path, tmp_path: Path
) -> None:
    with (
        PstClient(cluster / "node-1" / "api.sock", timeout=60) as one,
        PstClient(cluster / "node-3" / "api.sock", timeout=60) as three,
        PstClient(cluster / "node-2" / "api.sock", timeout=60) as other,
    ):
        one.register(APP, "signer")
        three.register(APP, "signer")  # the same client, on another server
        other.register(APP, "someone-else")
        pem = _retrying(one.generate_dss_key, "invoices")
        assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
        assert one.generate_dss_key("invoices") == pem  # asked again: the same key
        assert _retrying(three.dss_key_public_key, "invoices") == pem
        with pytest.raises(PstError) as taken:
            other.generate_dss_key("invoices")
        assert taken.value.code == "exists"

        first = b"invoice 17: 120 EUR"
        der = _retrying(one.dss_sign_with_key, "invoices", first)
        assert _openssl_verifies(tmp_path, pem, first, der)
        assert not _openssl_verifies(tmp_path, pem, first + b"0", der)
        # The base secret's own public key does not verify it.
        with pytest.raises(PstError):
            one.dss_sign("appkeys-p256", first)
        second = b"invoice 18, signed at server 3"
        assert _openssl_verifies(
            tmp_path, pem, second, _retrying(three.dss_sign_with_key, "invoices", second)
        )

        # Another client of the application does not own the key: refused before any share.
        with pytest.raises(PstError) as refused:
            other.dss_sign_with_key("invoices", b"pay me")
        assert refused.value.code == "not-permitted"
        with pytest.raises(PstError) as missing:
            one.dss_sign_with_key("no-such-key", b"x")
        assert missing.value.code == "not-found"

        # A refresh: new shares of the base secret, the old presignatures wiped; same key.
        before = min(int(r.get("period") or 0) for r in status(cluster))
        out = pst("refresh", "--now", "--dir", str(cluster))
        assert out.returncode == 0, out.stdout + out.stderr
        assert all(int(r.get("period") or 0) > before for r in status(cluster))
        later = b"signed after a refresh"
        assert _openssl_verifies(tmp_path, pem, later, _retrying(one.dss_sign_with_key, "invoices", later))
        assert _retrying(one.dss_key_public_key, "invoices") == pem
    assert not _alerts(cluster, "app-key-refused")


def test_pst_dss_keygen_sign_pubkey_and_openssl(cluster: Path, tmp_path: Path) -> None:
    node = ["--config", str(cluster / "node-2" / "config.toml")]
    who = ["--app", "cli-app", "--unique-id", "me"]
    out = pst("dss", "keygen", *node, *who, "receipts", "--out", str(tmp_path / "pub.pem"))
    deadline = time.monotonic() + 40
    while out.returncode != 0 and "unavailable" in out.stderr and time.monotonic() < deadline:
        time.sleep(0.5)
        out = pst("dss", "keygen", *node, *who, "receipts", "--out", str(tmp_path / "pub.pem"))
    assert out.returncode == 0, out.stdout + out.stderr
    (tmp_path / "doc.txt").write_bytes(b"a receipt\n")
    out = pst(
        "dss",
        "sign",
        *node,
        *who,
        "receipts",
        "--file",
        str(tmp_path / "doc.txt"),
        "--out",
        str(tmp_path / "s.der"),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    verify = subprocess.run(
        ["openssl", "dgst", "-sha256", "-verify", "pub.pem", "-signature", "s.der", "doc.txt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0 and "Verified OK" in verify.stdout, verify.stdout + verify.stderr
    out = pst("dss", "pubkey", *node, *who, "receipts")
    assert out.returncode == 0 and out.stdout.encode() == (tmp_path / "pub.pem").read_bytes()
    out = pst(
        "dss",
        "sign",
        *node,
        "--app",
        "cli-app",
        "--unique-id",
        "not-me",
        "receipts",
        "--out",
        str(tmp_path / "x"),
    )
    assert out.returncode == 1 and "not-permitted" in out.stderr
