"""The log's notes, tiles and proofs checked by Go's golang.org/x/mod/sumdb/{note,tlog}.

tests/go/logcheck is built once per session from Debian's golang-go and
golang-golang-x-mod-dev (GOPATH mode, no network). A checkpoint signed by a plain Ed25519
key and by a FROST group key from an in-process DKG must open with note.Open; the tiles on
disk must be the ones tlog builds and authenticates against the root; our proofs must pass
tlog.CheckRecord / CheckTree and equal tlog.ProveRecord / ProveTree.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nacl.signing import SigningKey

from appliance.apps.log.checkpoint import Signer, sign_checkpoint
from appliance.apps.log.merkle import leaf_hash
from appliance.apps.log.tiles import MemoryStorage, PosixStorage, Tile, TileLog, tiles_for_size
from appliance.crypto import local
from appliance.crypto.groups import ED25519
from appliance.crypto.secret import DeterministicSource

pytestmark = pytest.mark.interop

GOPATH = Path("/usr/share/gocode")
SOURCE = Path(__file__).parent / "go" / "logcheck" / "main.go"
ORIGIN = "log.example/interop"
# Batches chosen to cross tile boundaries at every level: partial and full level-0 tiles,
# level-1 tiles, and (past 65,536 entries) a level-2 tile.
BATCHES = [1, 254, 1, 1, 700, 64_579, 1_000]


def _missing_go() -> str | None:
    if shutil.which("go") is None:
        return "go is not installed (Debian: apt-get install golang-go golang-golang-x-mod-dev)"
    if not (GOPATH / "src/golang.org/x/mod/sumdb/note").is_dir():
        return "golang.org/x/mod is not installed (Debian: apt-get install golang-golang-x-mod-dev)"
    return None


@pytest.fixture(scope="session")
def logcheck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _missing_go()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("go")
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": str(GOPATH),
        "GOCACHE": str(out / "cache"),
        "GOPROXY": "off",
        "GOFLAGS": "",
        "CGO_ENABLED": "0",
    }
    binary = out / "logcheck"
    subprocess.run(
        ["go", "build", "-o", str(binary), str(SOURCE)], env=env, check=True, capture_output=True, timeout=300
    )
    return binary


@dataclass
class Keys:
    plain: Signer
    group: Signer


@pytest.fixture(scope="module")
def keys() -> Keys:
    seed = hashlib.sha256(b"interop plain key").digest()
    sk = SigningKey(seed)
    plain = Signer("plain.example/key", bytes(sk.verify_key), lambda m: bytes(sk.sign(m).signature))
    shares = local.run_dkg(ED25519, 4, 1, DeterministicSource(b"interop", ED25519.order)).keys
    group = Signer(ORIGIN, shares[1].public_key, lambda m: local.frost_sign(shares, [1, 3], m, os.urandom))
    return Keys(plain, group)


@dataclass
class Built:
    log: TileLog
    directory: Path
    sizes: list[int]
    entries: list[bytes]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    # Built in memory and copied out: 530 files written one fsync'd rename at a time would take
    # seconds here; test_log_tiles covers PosixStorage's writes, and the log is reopened from
    # disk below, which reads every tile of the frontier back through PosixStorage.
    memory = MemoryStorage()
    log = TileLog.open(memory, ORIGIN)
    entries: list[bytes] = []
    sizes = []
    for count in BATCHES:
        batch = [
            f"<13>1 - host app - - - line {i}".encode() for i in range(len(entries), len(entries) + count)
        ]
        log.append(batch)
        entries += batch
        sizes.append(len(entries))
    directory = tmp_path_factory.mktemp("log")
    for path, data in memory.files.items():
        (directory / path).parent.mkdir(parents=True, exist_ok=True)
        (directory / path).write_bytes(data)
    yield Built(TileLog.open(PosixStorage(directory), ORIGIN), directory, sizes, entries)


def _b64(h: bytes) -> str:
    return base64.b64encode(h).decode()


def _flip(h: bytes) -> bytes:
    return bytes([h[0] ^ 1]) + h[1:]


def _request(built: Built, note: bytes, vkeys: list[str]) -> dict[str, Any]:
    log = built.log
    inclusion = []
    for size in built.sizes:
        for index in sorted({0, size // 3, size // 2, size - 1}):
            proof = log.inclusion_proof(index, size)
            item = {
                "index": index,
                "size": size,
                "root": _b64(log.root_at(size)),
                "leaf": _b64(leaf_hash(built.entries[index])),
                "proof": [_b64(p) for p in proof],
                "valid": True,
            }
            inclusion.append(item)
            inclusion.append({**item, "leaf": _b64(_flip(leaf_hash(built.entries[index]))), "valid": False})
            if proof:
                inclusion.append(
                    {**item, "proof": [_b64(_flip(proof[0])), *item["proof"][1:]], "valid": False}
                )
    consistency = []
    pairs = {(a, b) for a in built.sizes for b in built.sizes if a <= b} | {
        (1, 2),
        (3, 65_536),
        (65_536, 66_536),
    }
    for old, new in sorted(pairs):
        proof = log.consistency_proof(old, new)
        item = {
            "old": old,
            "new": new,
            "old_root": _b64(log.root_at(old)),
            "new_root": _b64(log.root_at(new)),
            "proof": [_b64(p) for p in proof],
            "valid": True,
        }
        consistency.append(item)
        consistency.append({**item, "old_root": _b64(_flip(log.root_at(old))), "valid": False})
        if proof:
            consistency.append(
                {**item, "proof": [*item["proof"][:-1], _b64(_flip(proof[-1]))], "valid": False}
            )
    return {
        "vkeys": vkeys,
        "note": note.decode(),
        "tiles_dir": str(built.directory),
        "size": log.size,
        "root": _b64(log.root()),
        "inclusion": inclusion,
        "consistency": consistency,
    }


def _run(logcheck: Path, request: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(logcheck)], input=json.dumps(request), capture_output=True, text=True, timeout=60, check=False
    )


def test_go_accepts_our_checkpoint_tiles_and_proofs(logcheck: Path, keys: Keys, built: Built) -> None:
    note = sign_checkpoint(built.log.checkpoint(), [keys.group, keys.plain])
    vkeys = [keys.group.verifier.encode(), keys.plain.verifier.encode()]
    request = _request(built, note, vkeys)
    result = _run(logcheck, request)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["signed_by"] == [
        f"{ORIGIN}+{keys.group.verifier.key_id:08x}",
        f"plain.example/key+{keys.plain.verifier.key_id:08x}",
    ]
    assert report["origin"] == ORIGIN
    assert report["tile_paths"] == [t.path for t in tiles_for_size(built.log.size)]
    assert any(path.startswith("tile/2/") for path in report["tile_paths"])
    assert report["inclusion_checked"] == sum(1 for c in request["inclusion"] if c["valid"])
    assert report["consistency_checked"] == sum(1 for c in request["consistency"] if c["valid"])
    assert report["rejected_bad"] > report["inclusion_checked"] + report["consistency_checked"]


def test_go_accepts_a_note_signed_by_the_threshold_key_alone(
    logcheck: Path, keys: Keys, built: Built
) -> None:
    note = sign_checkpoint(built.log.checkpoint(), [keys.group])
    request = {**_request(built, note, [keys.group.verifier.encode()]), "inclusion": [], "consistency": []}
    result = _run(logcheck, request)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["signed_by"] == [f"{ORIGIN}+{keys.group.verifier.key_id:08x}"]


def test_go_rejects_a_forged_note_and_a_tampered_tile(logcheck: Path, keys: Keys, built: Built) -> None:
    note = sign_checkpoint(built.log.checkpoint(), [keys.group])
    vkeys = [keys.group.verifier.encode()]
    text, sig = note.split(b"\n\n")
    forged = text.replace(str(built.log.size).encode(), str(built.log.size + 1).encode()) + b"\n\n" + sig
    result = _run(logcheck, {**_request(built, forged, vkeys), "inclusion": [], "consistency": []})
    assert result.returncode == 1
    assert "note.Open: invalid signature" in result.stderr

    for path, message in [
        (Tile(0, 3).path, "tile tile/0/003 differs from the one Go builds"),
        (Tile(1, 0).path, "tile tile/1/000 differs from the one Go builds"),
        ("tile/entries/100", "the root Go computes from the entry bundles is not the checkpoint's"),
    ]:
        file = built.directory / path
        original = file.read_bytes()
        file.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # a hash byte, an entry byte
        try:
            result = _run(logcheck, {**_request(built, note, vkeys), "inclusion": [], "consistency": []})
        finally:
            file.write_bytes(original)
        assert result.returncode == 1
        assert message in result.stderr


def test_go_accepts_a_checkpoint_the_servers_signed_with_the_logs_own_key(
    logcheck: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four ServerCores, each checking the checkpoint against its own log, sign with the FROST key
    ``log`` of C; Go opens the note with the log's verifier key and recomputes the tree."""
    from test_log_signing import ORIGIN as LOG_ORIGIN
    from test_log_signing import Net, entries

    from appliance.apps.log.checkpoint import Verifier
    from appliance.protocols import signing

    monkeypatch.setattr(signing, "BATCH", 16)
    monkeypatch.setattr(signing, "LOW_WATER", 4)
    net = Net(31)
    net.run(0.2)
    net.append(entries(300))
    body = net.logs[2].checkpoint()
    signature = net.sign(2, body)
    assert isinstance(signature, bytes), signature
    storage = net.storages[2]
    for path, data in storage.files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    vkey = Verifier(LOG_ORIGIN, net.log_key).encode()
    request = {
        "vkeys": [vkey],
        "note": net.note(body, signature).decode(),
        "tiles_dir": str(tmp_path),
        "size": body.size,
        "root": _b64(body.root),
        "inclusion": [],
        "consistency": [],
    }
    result = _run(logcheck, request)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["signed_by"] == [f"{LOG_ORIGIN}+{Verifier(LOG_ORIGIN, net.log_key).key_id:08x}"]
    assert report["origin"] == LOG_ORIGIN
