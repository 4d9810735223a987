"""``make demo`` for the crypto core: an in-process network of n servers, step by step.

Every server is simulated in turn in this one process; the protocols are the same
functions the real servers run. What it shows: a DKG with no trusted dealer, a FROST
group signature that OpenSSL verifies, a refresh that changes every share but not the
public key, the recovery of a wiped share, and a threshold DSA signature.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from appliance.crypto import dss, local
from appliance.crypto.groups import DSA2048, ED25519
from appliance.crypto.keyshare import KeyShare
from appliance.crypto.secret import system_scalar_source


def _fingerprint(key: KeyShare[bytes]) -> str:
    """A short fingerprint of a server's public verification share x_i * G (public data, not the share)."""
    return hashlib.sha256(key.public.verification_share(ED25519, key.index)).hexdigest()[:12]


@contextmanager
def _step(title: str) -> Iterator[None]:
    print(f"\n== {title}")
    start = time.perf_counter()
    yield
    print(f"   ({(time.perf_counter() - start) * 1000:.1f} ms)")


def _openssl_verify_ed25519(public_key: bytes, message: bytes, signature: bytes) -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        return "openssl not installed: skipped"
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        pem = Ed25519PublicKey.from_public_bytes(public_key).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        (d / "pub.pem").write_bytes(pem)
        (d / "msg").write_bytes(message)
        (d / "sig").write_bytes(signature)
        args = ["pkeyutl", "-verify", "-pubin", "-inkey", str(d / "pub.pem"), "-rawin"]
        args += ["-in", str(d / "msg"), "-sigfile", str(d / "sig")]
        proc = subprocess.run(
            [openssl, *args],
            capture_output=True,
            text=True,
            check=False,
        )
        return (proc.stdout + proc.stderr).strip()


def _openssl_verify_dss(pem: bytes, message: bytes, der: bytes) -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        return "openssl not installed: skipped"
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "pub.pem").write_bytes(pem)
        (d / "msg").write_bytes(message)
        (d / "sig.der").write_bytes(der)
        args = [
            "dgst",
            "-sha256",
            "-verify",
            str(d / "pub.pem"),
            "-signature",
            str(d / "sig.der"),
            str(d / "msg"),
        ]
        proc = subprocess.run([openssl, *args], capture_output=True, text=True, check=False)
        return (proc.stdout + proc.stderr).strip()


def run_crypto_demo(n: int = 5, t: int = 1) -> int:
    print(f"Proactive Security Toolkit: crypto core demo with n={n} servers, threshold t={t}")
    print("(all servers simulated in this process; real servers on loopback come with the network issue)")
    rand = system_scalar_source(ED25519.order)

    with _step(f"1. DKG: {n} servers generate the group key (Scert, Vcert) with no trusted dealer"):
        result = local.run_dkg(ED25519, n, t, rand)
        keys = result.keys
        vcert = keys[1].public_key
        print(f"   qualified dealers: {sorted(result.qualification.qual)}")
        print(f"   Vcert (Ed25519 public key): {vcert.hex()}")
        for i in sorted(keys):
            print(f"   server {i}: verification share {_fingerprint(keys[i])}  (shares are never shown)")

    message = b"period 0: invariant information M"
    with _step(f"2. FROST: servers 1..{t + 1} sign a message with the group key"):
        signature = local.frost_sign(keys, list(range(1, t + 2)), message, os.urandom)
        print(f"   signature: {signature.hex()}")
        Ed25519PublicKey.from_public_bytes(vcert).verify(signature, message)
        print("   cryptography's Ed25519 verifier: OK")
        print(f"   openssl pkeyutl -verify -rawin: {_openssl_verify_ed25519(vcert, message, signature)}")

    with _step("3. Refresh: every share changes, the public key does not"):
        before = {i: _fingerprint(k) for i, k in keys.items()}
        keys = local.run_refresh(ED25519, keys, rand)
        for i in sorted(keys):
            print(f"   server {i}: {before[i]} -> {_fingerprint(keys[i])}")
        assert keys[1].public_key == vcert
        print(f"   Vcert unchanged: {keys[1].public_key == vcert}")

    lost = n
    with _step(f"4. Recovery: server {lost}'s share is wiped; the others rebuild it without learning it"):
        expected = _fingerprint(keys[lost])
        keys[lost].wipe()
        helpers = {i: k for i, k in keys.items() if i != lost}
        recovered = local.run_recovery(ED25519, helpers, lost, rand)
        keys[lost] = recovered.key
        print(f"   recovered verification share {_fingerprint(recovered.key)} (expected {expected})")
        print(f"   matches server {lost}'s public verification share: {recovered.key.check(ED25519)}")

    message = b"period 1: signed after refresh and recovery"
    with _step(f"5. FROST again with servers {n - t}..{n}, including the recovered one"):
        signature = local.frost_sign(keys, list(range(n - t, n + 1)), message, os.urandom)
        print(f"   openssl pkeyutl -verify -rawin: {_openssl_verify_ed25519(vcert, message, signature)}")

    dss_t = (n - 1) // 2
    with _step("6. Threshold DSA (FIPS 186-4, 2048/256): DKG, presignature, one-round online signature"):
        drand = system_scalar_source(DSA2048.order)
        dkeys = local.run_dkg(DSA2048, n, dss_t, drand).keys
        presigs = dss.run_presign(DSA2048, dkeys, drand, sid=os.urandom(16)).presignatures
        message = b"a document to timestamp"
        start = time.perf_counter()
        dss_signature = dss.run_sign(DSA2048, presigs, message, dkeys[1].public)
        online_ms = (time.perf_counter() - start) * 1000
        pem = dss.public_key_pem(DSA2048, dkeys[1].public_key)
        print(f"   t={dss_t}; online step (all shares, combine, verify): {online_ms:.1f} ms")
        print(f"   DER signature: {dss_signature.der.hex()[:48]}...")
        print(f"   openssl dgst -sha256 -verify: {_openssl_verify_dss(pem, message, dss_signature.der)}")

    print("\nDone. The real network of servers arrives with the next issue.")
    return 0
