"""C2SP signed notes and checkpoints: known answers, strict parsing, fuzzing, FROST-signed notes."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey

from appliance.apps.log.checkpoint import (
    Checkpoint,
    Signature,
    Signer,
    Verifier,
    open_checkpoint,
    open_note,
    parse_note,
    sign_checkpoint,
    sign_note,
)
from appliance.apps.log.errors import LogDecodeError, NoteVerificationError, SignerError
from appliance.crypto import local
from appliance.crypto.groups import ED25519
from appliance.crypto.secret import DeterministicSource

# The example of golang.org/x/mod/sumdb/note (ExampleSign / ExampleOpen): a published known answer.
PETER_SEED = base64.b64decode("AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz")[1:]
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
PETER_TEXT = (
    "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
)
PETER_NOTE = (
    PETER_TEXT
    + "\n— PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb"
    "6KE6RyyBwJnAM=\n"
).encode()

ORIGIN = "log.example/pst"
ROOT = hashlib.sha256(b"root").digest()


def _signer(name: str, seed: bytes) -> Signer:
    key = SigningKey(seed)
    return Signer(name, bytes(key.verify_key), lambda m: bytes(key.sign(m).signature))


LOG = _signer(ORIGIN, hashlib.sha256(b"log key").digest())
OTHER = _signer("witness.example/w", hashlib.sha256(b"other key").digest())


def _note() -> bytes:
    return sign_checkpoint(Checkpoint(ORIGIN, 7, ROOT), [LOG])


# --- Known answers -----------------------------------------------------------------------------


def test_go_sumdb_note_example_is_reproduced() -> None:
    peter = _signer("PeterNeumann", PETER_SEED)
    assert peter.verifier.encode() == PETER_VKEY
    assert Verifier.parse(PETER_VKEY) == peter.verifier
    assert sign_note(PETER_TEXT, [peter]) == PETER_NOTE
    note = open_note(PETER_NOTE, [Verifier.parse(PETER_VKEY)])
    assert note.text == PETER_TEXT
    assert [(s.name, s.key_id) for s in note.signatures] == [("PeterNeumann", 0xC74F20A3)]


def test_checkpoint_text_is_the_c2sp_body() -> None:
    cp = Checkpoint(
        "example.com/behind-the-sofa",
        20852163,
        base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="),
    )
    text = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    assert cp.text() == text
    assert Checkpoint.parse(text) == cp
    with_ext = Checkpoint(ORIGIN, 0, ROOT, ("ext one", "ext two"))
    assert Checkpoint.parse(with_ext.text()) == with_ext


def test_signed_checkpoint_round_trip() -> None:
    note = _note()
    assert note.decode().startswith(f"{ORIGIN}\n7\n")
    assert open_checkpoint(note, ORIGIN, [LOG.verifier]) == Checkpoint(ORIGIN, 7, ROOT)
    with pytest.raises(LogDecodeError, match=r"not 'other\.example'"):
        open_checkpoint(note, "other.example", [LOG.verifier])


# --- Verification rules ------------------------------------------------------------------------


def test_unknown_keys_are_ignored_and_known_ones_must_verify() -> None:
    text = Checkpoint(ORIGIN, 7, ROOT).text()
    both = sign_note(text, [OTHER, LOG])
    note = open_note(both, [LOG.verifier])
    assert [s.name for s in note.signatures] == [ORIGIN]
    assert [s.name for s in note.unverified] == [OTHER.name]
    with pytest.raises(NoteVerificationError, match=r"no signature by a trusted key .*witness"):
        open_note(sign_note(text, [OTHER]), [LOG.verifier])
    # Same name, other key: its key ID differs, so the signature is by an unknown key.
    impostor = _signer(ORIGIN, hashlib.sha256(b"impostor").digest())
    with pytest.raises(NoteVerificationError, match="no signature by a trusted key"):
        open_note(sign_note(text, [impostor]), [LOG.verifier])
    # A bad signature by a known key rejects the whole note, even next to a good one.
    forged = Signature(ORIGIN, LOG.verifier.key_id, bytes(64))
    with pytest.raises(NoteVerificationError, match="does not verify"):
        open_note(sign_note(text, [], [forged, *parse_note(both)[1]]), [LOG.verifier])
    # A text changed after signing.
    tampered = _note().replace(b"\n7\n", b"\n8\n")
    with pytest.raises(NoteVerificationError, match="does not verify"):
        open_note(tampered, [LOG.verifier])


def test_a_signer_that_signs_wrong_is_caught_before_the_note_exists() -> None:
    bad = Signer(ORIGIN, LOG.public_key, lambda m: bytes(64))
    with pytest.raises(SignerError, match="does not verify"):
        sign_note("text\n", [bad])
    with pytest.raises(LogDecodeError, match="end with a newline"):
        sign_note("text", [LOG])


GOOD_SIG = _note().split(b"\n\n")[1]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"text\n\n", "no signature lines"),
        (b"text\n" + GOOD_SIG, "no blank line"),
        (b"text\n\n" + GOOD_SIG[:-1], "does not end with a newline"),
        (b"\xff\n\n" + GOOD_SIG, "not valid UTF-8"),
        (b"te\rxt\n\n" + GOOD_SIG, "control character"),
        (b"text\n\n" + GOOD_SIG.replace("\u2014".encode(), b"-"), "em dash"),
        (b"text\n\n" + GOOD_SIG.replace(ORIGIN.encode() + b" ", ORIGIN.encode()), "no space between"),
        (b"text\n\n" + GOOD_SIG.replace(ORIGIN.encode(), b"a+b"), "contains '\\+'"),
        (b"text\n\n" + GOOD_SIG.replace(ORIGIN.encode(), "a\u00a0b".encode()), "space"),
        (b"text\n\n" + GOOD_SIG.replace(b"=", b""), "not valid base64"),
        (b"text\n\n\xe2\x80\x94 name AAAAAA==\n", "shorter than a key ID"),
        (b"text\n\n\xe2\x80\x94 name AAAAAAB=\n", "not canonical"),
        (b"text\n\n" + GOOD_SIG * 101, "more than 100"),
        (b"x" * 70000, "longer than"),
    ],
)
def test_malformed_notes_are_refused_with_the_reason(data: bytes, message: str) -> None:
    with pytest.raises(LogDecodeError, match=message):
        open_note(data, [LOG.verifier])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("o\n1\n" + base64.b64encode(ROOT).decode() + "\n\n", "extension line 1"),
        ("o\n1\n", "at least three lines"),
        ("o\n01\n" + base64.b64encode(ROOT).decode() + "\n", "leading zeros"),
        ("o\n+1\n" + base64.b64encode(ROOT).decode() + "\n", "leading zeros"),
        ("o\n\u0661\n" + base64.b64encode(ROOT).decode() + "\n", "leading zeros"),
        ("o\n9223372036854775808\n" + base64.b64encode(ROOT).decode() + "\n", "2\\*\\*63"),
        ("o\n1\n" + base64.b64encode(ROOT[:31]).decode() + "\n", "not 32 bytes"),
        ("o\n1\n" + base64.b64encode(ROOT).decode(), "end with a newline"),
        ("\n1\n" + base64.b64encode(ROOT).decode() + "\n", "origin is empty"),
    ],
)
def test_malformed_checkpoints_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(LogDecodeError, match=message):
        Checkpoint.parse(text)


@pytest.mark.parametrize(
    ("vkey", "message"),
    [
        (PETER_VKEY.replace("c74f20a3", "c74f20a4"), "does not match"),
        (PETER_VKEY.replace("c74f20a3", "C74F20A3"), "lowercase hex"),
        (PETER_VKEY + "+x", "not valid base64"),
        ("PeterNeumann+c74f20a3", "<name>\\+<key ID>"),
        (PETER_VKEY.replace("+ARpc", "+Zpc"), "not valid base64|Ed25519"),
        ("Peter Neumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "space"),
        ("+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW", "empty"),
    ],
)
def test_malformed_verifier_keys_are_refused(vkey: str, message: str) -> None:
    with pytest.raises(LogDecodeError, match=message):
        Verifier.parse(vkey)


@given(
    name=st.from_regex(r"[a-z0-9./-]{1,30}", fullmatch=True), public_key=st.binary(min_size=32, max_size=32)
)
def test_verifier_keys_round_trip(name: str, public_key: bytes) -> None:
    # Base64 keys contain '+' about one time in three: the parser must split on the first two only.
    verifier = Verifier(name, public_key)
    assert Verifier.parse(verifier.encode()) == verifier


_line = st.text(st.characters(min_codepoint=0x20, exclude_categories=("Cs",)), min_size=1, max_size=30)


@given(
    origin=_line,
    size=st.integers(0, 2**63 - 1),
    root=st.binary(min_size=32, max_size=32),
    extensions=st.lists(_line, max_size=3),
)
def test_signed_checkpoints_round_trip(origin: str, size: int, root: bytes, extensions: list[str]) -> None:
    checkpoint = Checkpoint(origin, size, root, tuple(extensions))
    assert open_checkpoint(sign_checkpoint(checkpoint, [LOG]), origin, [LOG.verifier]) == checkpoint


# --- Fuzzing: any input opens or raises LogDecodeError, nothing else -----------------------------


@st.composite
def _mutated_notes(draw: st.DrawFn) -> bytes:
    base = bytearray(draw(st.sampled_from([_note(), PETER_NOTE, sign_note("a\n\nb\n", [LOG, OTHER])])))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "splice"]))
        pos = draw(st.integers(0, len(base)))
        if op == "flip" and pos < len(base):
            base[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "insert":
            base[pos:pos] = draw(
                st.sampled_from([b"\n", b" ", b"+", "\u2014 ".encode(), b"=", b"\x00", b"\xe2"])
            )
        elif op == "delete":
            del base[pos : pos + draw(st.integers(1, 8))]
        else:
            base[pos:pos] = draw(st.binary(max_size=16))
    return bytes(base)


@settings(max_examples=400, deadline=None)
@given(data=st.one_of(st.binary(max_size=200), _mutated_notes()))
def test_fuzz_open_note_raises_only_decode_errors(data: bytes) -> None:
    try:
        note = open_note(data, [LOG.verifier, Verifier.parse(PETER_VKEY), OTHER.verifier])
    except LogDecodeError:
        return
    assert note.signatures
    with contextlib.suppress(LogDecodeError):
        Checkpoint.parse(note.text)


@settings(max_examples=300, deadline=None)
@given(
    text=st.one_of(
        st.text(max_size=120),
        st.builds(lambda a, b: a + b, st.just(Checkpoint(ORIGIN, 7, ROOT).text()), st.text(max_size=20)),
    )
)
def test_fuzz_checkpoint_and_vkey_parsers_raise_only_decode_errors(text: str) -> None:
    for parse in (Checkpoint.parse, Verifier.parse):
        try:
            parsed: Any = parse(text)
        except LogDecodeError:
            continue
        assert isinstance(parsed, Checkpoint | Verifier)


# --- A threshold key signs notes ---------------------------------------------------------------


def test_frost_group_key_signs_a_checkpoint_that_verifies() -> None:
    keys = local.run_dkg(ED25519, 4, 1, DeterministicSource(b"log-note", ED25519.order)).keys
    group = Signer(ORIGIN, keys[1].public_key, lambda m: local.frost_sign(keys, [2, 4], m, os.urandom))
    note = sign_checkpoint(Checkpoint(ORIGIN, 3, ROOT), [group])
    assert open_checkpoint(note, ORIGIN, [Verifier.parse(group.verifier.encode())]).size == 3
