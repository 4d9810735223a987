"""``pst log verify`` (appliance.apps.log.verify) against a real server, run as a subprocess.

A log of 2,956 real entries signed with a plain Ed25519 key is served by the web service on
loopback; ``python -m appliance.cli log verify`` must accept it (inclusion by index and by
entry, consistency with an older checkpoint, a full audit), and must fail, naming the tile or
the entry, when one byte of a tile or an entry bundle is changed on disk, when the checkpoint
is signed by another key, and when an older checkpoint of a fork is given.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest
import trio
from logread import ORIGIN, SignedLog, build, copy, serving, signer

from appliance.apps.log.checkpoint import sign_checkpoint
from appliance.apps.log.tiles import Bundle, decode_bundle
from appliance.apps.log.verify import run

# Sizes 1, 255, 256, 956, 2956: eleven full level-0 tiles and 11.p/140, a level-1 tile 000.p/11.
BATCHES = [1, 254, 1, 700, 2000]
SIZE = sum(BATCHES)


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> SignedLog:
    return build(tmp_path_factory.mktemp("log"), BATCHES)


async def pst_log_verify(*args: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        [sys.executable, "-m", "appliance.cli", "log", "verify", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


async def test_a_good_log_verifies_over_http(tmp_path: Path, signed: SignedLog) -> None:
    old = tmp_path / "old.note"
    old.write_bytes(signed.notes[1])
    entry = tmp_path / "entry.bin"
    entry.write_bytes(signed.entries[1234])
    key_file = tmp_path / "log.vkey"
    key_file.write_text(signed.vkey + "\n")
    async with serving(tmp_path, signed.reader()) as url:
        code, out, err = await pst_log_verify(
            "--key", signed.vkey, "--url", url, "--index", "700", "--old", str(old), "--audit"
        )
        assert code == 0, out + err
        assert f"OK: checkpoint of {ORIGIN}, size {SIZE}" in out
        assert f"OK: entry 700 is in the signed tree of size {SIZE}" in out
        assert f"OK: the latest checkpoint (size {SIZE}) extends the old one (size 255)" in out
        assert f"OK: audit: the {SIZE} entries and 13 tiles give the signed root" in out
        assert f"audit: {SIZE:,}/{SIZE:,} entries" in err  # progress, on stderr
        # An entry given as a file is found by its leaf hash; the key may be a file.
        code, out, err = await pst_log_verify(
            "--key", str(key_file), "--url", url + "/", "--entry", str(entry)
        )
        assert code == 0, out + err
        assert "OK: entry 1234 is in" in out
        code, out, err = await pst_log_verify(
            "--key", signed.vkey, "--url", url, "--entry", str(entry), "--index", "1233"
        )
        assert code == 1 and "FAILED: entry 1233 of the log (tile/entries/004) is not the given entry" in out
        code, out, _ = await pst_log_verify("--key", signed.vkey, "--url", url, "--index", str(SIZE))
        assert code == 1 and f"FAILED: entry {SIZE} is not in the signed tree of size {SIZE}" in out
        entry.write_bytes(signed.entries[1234] + b"x")
        code, out, _ = await pst_log_verify("--key", signed.vkey, "--url", url, "--entry", str(entry))
        assert code == 1 and "the entry is not in the log's signed tree" in out
    # The same checks on the log's directory, in process.
    lines: list[str] = []
    assert (
        run(
            signed.vkey,
            directory=signed.directory,
            index=0,
            old=old,
            audit=True,
            out=lines.append,
            err=lines.append,
        )
        == 0
    )
    assert lines[-1] == f"OK: audit: the {SIZE} entries and 13 tiles give the signed root"


@pytest.mark.parametrize(
    ("path", "offset", "says"),
    [
        # Leaf 17 of tile 3 (entry 785), a full level-0 tile.
        ("tile/0/003", 17 * 32 + 5, "tile/0/003: hash 17 (entry 785) is wrong"),
        # The partial level-0 tile of the signed size: leaf 139 (entry 2955).
        ("tile/0/011.p/140", 139 * 32, "tile/0/011.p/140: hash 139 (entry 2955) is wrong"),
        # The level-1 tile: hash 4 covers entries 1024..1279.
        ("tile/1/000.p/11", 4 * 32 + 31, "tile/1/000.p/11: hash 4 (entries 1024..1279) is wrong"),
    ],
)
async def test_a_changed_byte_in_a_tile_is_named(
    tmp_path: Path, signed: SignedLog, path: str, offset: int, says: str
) -> None:
    log = copy(signed, tmp_path / "log")
    flip(log.directory / path, offset)
    async with serving(tmp_path, log.reader()) as url:
        code, out, err = await pst_log_verify("--key", log.vkey, "--url", url, "--audit")
    assert code == 1, out + err
    assert out.startswith(f"OK: checkpoint of {ORIGIN}, size 2956"), out  # the signature is fine
    assert "\nFAILED: audit of the signed tree of size 2956:\n" in out, out
    assert says in out, out
    assert out.count("\n  ") == 1, out  # that one difference, nothing else


async def test_a_changed_byte_in_an_entry_bundle_is_named(tmp_path: Path, signed: SignedLog) -> None:
    log = copy(signed, tmp_path / "log")
    bundle = Bundle(3)
    path = log.directory / bundle.path
    entries = decode_bundle(bundle, path.read_bytes())
    # The last byte of entry 1000 (number 232 in bundle 3), not its length.
    offset = sum(2 + len(e) for e in entries[:233]) - 1
    flip(path, offset)
    async with serving(tmp_path, log.reader()) as url:
        code, out, err = await pst_log_verify("--key", log.vkey, "--url", url, "--audit")
        assert code == 1, out + err
        assert (
            "tile/entries/003: entry 1000 (number 232 in the bundle) does not hash to leaf 232 of tile/0/003 "
            "(the tiles give the signed root)"
        ) in out
        code, out, _ = await pst_log_verify("--key", log.vkey, "--url", url, "--index", "1000")
        assert code == 1 and "FAILED: entry 1000 (tile/entries/003) is not proven in the signed tree" in out
        # Entries elsewhere still verify.
        code, out, _ = await pst_log_verify("--key", log.vkey, "--url", url, "--index", "5")
        assert code == 0, out


async def test_a_checkpoint_signed_by_another_key_fails(tmp_path: Path, signed: SignedLog) -> None:
    log = copy(signed, tmp_path / "log")
    other = signer(seed=b"not the log's key")
    log.publish(sign_checkpoint(log.log.checkpoint(), [other]))
    async with serving(tmp_path, None) as url:  # a server without the log: nothing to verify
        code, out, _ = await pst_log_verify("--key", log.vkey, "--url", url)
        assert code == 1 and "FAILED: the log serves no checkpoint" in out
    lines: list[str] = []
    code = run(log.vkey, directory=log.directory, out=lines.append, err=lines.append)
    assert code == 1
    assert lines == [
        f"FAILED: the latest checkpoint does not verify with {log.vkey}: no signature by a trusted key "
        f"(the note is signed by ['{ORIGIN}'])"
    ]
    # The other key's checkpoint, verified with the other key's name, is not this log's either.
    lines = []
    assert run(other.verifier.encode(), directory=signed.directory, out=lines.append, err=lines.append) == 1


async def test_a_fork_and_a_truncation_fail(tmp_path: Path, signed: SignedLog) -> None:
    # The same key signed a log whose entries from 300 on differ: its checkpoint of 956 entries
    # is not a prefix of the log's 2,956.
    fork = build(tmp_path / "fork", BATCHES[:4], signed.signer, salt=" (forked)", fork_at=300)
    forked = tmp_path / "forked.note"
    forked.write_bytes(fork.notes[-1])
    below = tmp_path / "below.note"
    below.write_bytes(fork.notes[2])  # size 256: before the fork, the same tree
    async with serving(tmp_path, signed.reader()) as url:
        code, out, err = await pst_log_verify("--key", signed.vkey, "--url", url, "--old", str(forked))
        assert code == 1, out + err
        assert f"FAILED: the latest checkpoint (size {SIZE}) does not extend the old one (size 956)" in out
        assert "the log forked" in out
        code, out, _ = await pst_log_verify("--key", signed.vkey, "--url", url, "--old", str(below))
        assert code == 0, out
    # The log served at a smaller size than a checkpoint the client holds: truncated.
    log = copy(signed, tmp_path / "log")
    newest = tmp_path / "newest.note"
    newest.write_bytes(signed.notes[-1])
    log.publish(signed.notes[3])
    lines: list[str] = []
    assert run(log.vkey, directory=log.directory, old=newest, out=lines.append, err=lines.append) == 1
    assert f"FAILED: the old checkpoint (size {SIZE}) is larger than the latest (size 956)" in lines[-1]
    # An old checkpoint by another key is not evidence of anything.
    stranger = tmp_path / "stranger.note"
    stranger.write_bytes(sign_checkpoint(signed.log.checkpoint(), [signer(seed=b"stranger")]))
    lines = []
    assert run(log.vkey, directory=signed.directory, old=stranger, out=lines.append, err=lines.append) == 1
    assert "FAILED: the old checkpoint does not verify" in lines[-1]


async def test_usage_and_io_errors_exit_2(tmp_path: Path, signed: SignedLog) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"  # bound, not listening: refused
        for args, says in [
            (["--key", "log.example/read+00000000+AAAA", "--dir", str(signed.directory)], "bad verifier key"),
            (["--key", str(tmp_path / "nope"), "--dir", str(signed.directory)], "not a verifier key"),
            (["--key", signed.vkey, "--url", closed], "ConnectError"),
            (["--key", signed.vkey, "--url", "ftp://x"], "not an http:// or https:// URL"),
            (["--key", signed.vkey, "--dir", str(tmp_path / "none")], "not a directory"),
            (["--key", signed.vkey, "--dir", str(signed.directory), "--old", str(tmp_path / "none")], "none"),
            (
                ["--key", signed.vkey, "--dir", str(signed.directory), "--index", "-1"],
                "--index must be 0 or more",
            ),
            (["--key", signed.vkey], "one of the arguments --url --dir is required"),
            (["--key", signed.vkey, "--url", closed, "--dir", "x"], "not allowed with argument"),
        ]:
            code, out, err = await pst_log_verify(*args)
            assert code == 2, (args, out, err)
            assert says in err, (args, err)
            assert "Traceback" not in err


def test_when_neither_entries_nor_tiles_give_the_root_both_differences_are_listed(
    tmp_path: Path, signed: SignedLog
) -> None:
    log = copy(signed, tmp_path / "log")
    flip(log.directory / "tile/0/001", 3 * 32)  # leaf 259
    bundle = Bundle(5)
    entries = decode_bundle(bundle, (log.directory / bundle.path).read_bytes())
    flip(log.directory / bundle.path, 2 + len(entries[0]) - 1)  # entry 1280
    lines: list[str] = []
    assert run(log.vkey, directory=log.directory, audit=True, out=lines.append, err=lines.append) == 1
    report = lines[-1].split("\n  ")
    assert report == [
        "FAILED: audit of the signed tree of size 2956:",
        "neither the entries nor the tiles give the signed root",
        "tile/0/001: hash 3 (entry 259) differs from its entries",
        "tile/0/005: hash 0 (entry 1280) differs from its entries",
        "tile/1/000.p/11: hash 5 (entries 1280..1535) differs from its entries",
        "tile/1/000.p/11: hash 1 (entries 256..511) differs from the tile below",
    ]
