"""RFC 9162 Merkle trees: agreement with the RFC's definitions, proofs verify, bit flips fail."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.apps.log import merkle
from appliance.apps.log.errors import ProofError
from appliance.apps.log.merkle import EMPTY_ROOT, Frontier, MemoryTree

# --- The reference: RFC 9162 §2.1 written as the RFC writes it, on lists of entries -------------


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(d: list[bytes]) -> bytes:
    if not d:
        return hashlib.sha256(b"").digest()
    if len(d) == 1:
        return hashlib.sha256(b"\x00" + d[0]).digest()
    k = _k(len(d))
    return hashlib.sha256(b"\x01" + ref_mth(d[:k]) + ref_mth(d[k:])).digest()


def ref_path(m: int, d: list[bytes]) -> list[bytes]:
    if len(d) == 1:
        return []
    k = _k(len(d))
    if m < k:
        return [*ref_path(m, d[:k]), ref_mth(d[k:])]
    return [*ref_path(m - k, d[k:]), ref_mth(d[:k])]


def ref_subproof(m: int, d: list[bytes], b: bool) -> list[bytes]:
    n = len(d)
    if m == n:
        return [] if b else [ref_mth(d)]
    k = _k(n)
    if m <= k:
        return [*ref_subproof(m, d[:k], b), ref_mth(d[k:])]
    return [*ref_subproof(m - k, d[k:], False), ref_mth(d[:k])]


def _tree(entries: list[bytes]) -> MemoryTree:
    tree = MemoryTree()
    for e in entries:
        tree.append(e)
    return tree


def _flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


# Distinct entries: with equal leaves a proof for one index is a proof for another, legitimately.
_entries = st.lists(st.binary(max_size=8), min_size=1, max_size=70, unique=True)


# --- Known answers ---------------------------------------------------------------------------


def test_empty_tree_root_is_sha256_of_nothing() -> None:
    assert EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert MemoryTree().root() == EMPTY_ROOT
    assert merkle.root_hash(MemoryTree(), 0) == EMPTY_ROOT


def test_rfc6962_reference_roots() -> None:
    # The eight leaves of the RFC 6962 test data (certificate-transparency-go merkle tests).
    leaves = [
        bytes.fromhex(h)
        for h in [
            "",
            "00",
            "10",
            "2021",
            "3031",
            "40414243",
            "5051525354555657",
            "606162636465666768696a6b6c6d6e6f",
        ]
    ]
    roots = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ]
    tree = MemoryTree()
    for n, (leaf, root) in enumerate(zip(leaves, roots, strict=True), start=1):
        tree.append(leaf)
        assert tree.root().hex() == root
        assert merkle.root_hash(tree, n).hex() == root


# --- Agreement with the reference ------------------------------------------------------------


def test_every_small_case_agrees_with_the_rfc_definitions() -> None:
    entries = [i.to_bytes(2, "big") for i in range(40)]
    tree = _tree(entries)
    for n in range(0, 41):
        assert merkle.root_hash(tree, n) == ref_mth(entries[:n])
        for m in range(n):
            assert merkle.inclusion_proof(tree, m, n) == ref_path(m, entries[:n])
        for m in range(1, n):
            assert merkle.consistency_proof(tree, m, n) == ref_subproof(m, entries[:n], True)


@settings(max_examples=60, deadline=None)
@given(entries=_entries, data=st.data())
def test_roots_and_proofs_agree_with_the_rfc_definitions(entries: list[bytes], data: st.DataObject) -> None:
    tree = _tree(entries)
    n = data.draw(st.integers(1, len(entries)), label="size")
    m = data.draw(st.integers(0, n - 1), label="index")
    assert tree.root() == ref_mth(entries)
    assert merkle.root_hash(tree, n) == ref_mth(entries[:n])
    assert Frontier.from_reader(tree, n).root() == ref_mth(entries[:n])
    assert merkle.inclusion_proof(tree, m, n) == ref_path(m, entries[:n])
    if m > 0:
        assert merkle.consistency_proof(tree, m, n) == ref_subproof(m, entries[:n], True)


def test_frontier_append_reports_every_completed_subtree() -> None:
    frontier = Frontier()
    tree = _tree([bytes([i]) for i in range(13)])
    seen: set[tuple[int, int]] = set()
    for i in range(13):
        for level, index, digest in frontier.append(merkle.leaf_hash(bytes([i]))):
            assert tree.node_hash(level, index) == digest
            seen.add((level, index))
        assert frontier.levels == [b for b in range(4, -1, -1) if (i + 1) >> b & 1]
    assert len(seen) == sum(len(level) for level in tree.levels)


# --- Every proof verifies; any single-bit change fails -------------------------------------------


@settings(max_examples=60, deadline=None)
@given(entries=_entries, data=st.data())
def test_inclusion_proofs_verify_and_any_bit_flip_fails(entries: list[bytes], data: st.DataObject) -> None:
    tree = _tree(entries)
    n = data.draw(st.integers(1, len(entries)), label="size")
    m = data.draw(st.integers(0, n - 1), label="index")
    leaf = merkle.leaf_hash(entries[m])
    root = merkle.root_hash(tree, n)
    proof = merkle.inclusion_proof(tree, m, n)
    merkle.verify_inclusion(m, n, leaf, proof, root)

    bit = data.draw(st.integers(0, 255), label="bit")
    with pytest.raises(ProofError):
        merkle.verify_inclusion(m, n, _flip(leaf, bit), proof, root)
    with pytest.raises(ProofError):
        merkle.verify_inclusion(m, n, leaf, proof, _flip(root, bit))
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1), label="element")
        bad = [*proof[:i], _flip(proof[i], bit), *proof[i + 1 :]]
        with pytest.raises(ProofError):
            merkle.verify_inclusion(m, n, leaf, bad, root)
        with pytest.raises(ProofError):
            merkle.verify_inclusion(m, n, leaf, proof[:-1], root)
    with pytest.raises(ProofError):
        merkle.verify_inclusion(m, n, leaf, [*proof, root], root)
    index_bit = data.draw(st.integers(0, max(0, n.bit_length() - 1)), label="index bit")
    with pytest.raises(ProofError):
        merkle.verify_inclusion(m ^ (1 << index_bit), n, leaf, proof, root)


@settings(max_examples=60, deadline=None)
@given(entries=_entries, data=st.data())
def test_consistency_proofs_verify_and_any_bit_flip_fails(entries: list[bytes], data: st.DataObject) -> None:
    tree = _tree(entries)
    n = data.draw(st.integers(1, len(entries)), label="new size")
    m = data.draw(st.integers(0, n), label="old size")
    old, new = merkle.root_hash(tree, m), merkle.root_hash(tree, n)
    proof = merkle.consistency_proof(tree, m, n)
    merkle.verify_consistency(m, n, old, new, proof)

    bit = data.draw(st.integers(0, 255), label="bit")
    with pytest.raises(ProofError):
        merkle.verify_consistency(m, n, _flip(old, bit), new, proof)
    if m > 0:  # the empty tree's successor is any tree at all
        with pytest.raises(ProofError):
            merkle.verify_consistency(m, n, old, _flip(new, bit), proof)
    if proof:
        i = data.draw(st.integers(0, len(proof) - 1), label="element")
        bad = [*proof[:i], _flip(proof[i], bit), *proof[i + 1 :]]
        with pytest.raises(ProofError):
            merkle.verify_consistency(m, n, old, new, bad)
        with pytest.raises(ProofError):
            merkle.verify_consistency(m, n, old, new, proof[:-1])
    with pytest.raises(ProofError):
        merkle.verify_consistency(m, n, old, new, [*proof, new])


def test_consistency_edge_cases() -> None:
    tree = _tree([b"a", b"b", b"c"])
    r3 = tree.root()
    merkle.verify_consistency(0, 3, EMPTY_ROOT, r3, [])
    merkle.verify_consistency(3, 3, r3, r3, [])
    with pytest.raises(ProofError, match="same tree size"):
        merkle.verify_consistency(3, 3, r3, EMPTY_ROOT, [])
    with pytest.raises(ProofError, match="cannot extend"):
        merkle.verify_consistency(3, 2, r3, r3, [])
    with pytest.raises(ProofError, match="empty"):
        merkle.verify_consistency(1, 3, merkle.root_hash(tree, 1), r3, [])
    with pytest.raises(ValueError, match="smaller size"):
        merkle.consistency_proof(tree, 3, 2)


def test_bad_arguments_are_refused() -> None:
    tree = _tree([b"a", b"b"])
    with pytest.raises(ValueError, match="not in a tree of size 2"):
        merkle.inclusion_proof(tree, 2, 2)
    with pytest.raises(ValueError, match="non-negative"):
        merkle.root_hash(tree, -1)
    with pytest.raises(ProofError, match="not below the tree size"):
        merkle.verify_inclusion(2, 2, merkle.leaf_hash(b"a"), [], tree.root())
    with pytest.raises(ProofError, match="32-byte hash"):
        merkle.verify_inclusion(0, 2, b"short", [], tree.root())
    with pytest.raises(ValueError, match="no complete subtree"):
        tree.node_hash(1, 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 4), max_size=12))
def test_frontier_appending_whole_subtrees_equals_appending_their_leaves(heights: list[int]) -> None:
    """``append_subtree`` (a tile's root at once) gives the frontier of its leaves one by one, and
    reports the subtrees it completes; one that does not start at a multiple of its size is refused."""
    frontier, reference = Frontier(), MemoryTree()
    for height in heights:
        pad = (-reference.size) % (1 << height)
        for i in range(pad):
            leaf = merkle.leaf_hash(b"pad %d" % (reference.size + i))
            frontier.append(leaf)
        for _ in range(pad):
            reference.append(b"pad %d" % (reference.size))
        leaves = [b"leaf %d" % (reference.size + i) for i in range(1 << height)]
        sub = MemoryTree()
        for leaf in leaves:
            sub.append(leaf)
            reference.append(leaf)
        for level, index, digest in frontier.append_subtree(height, sub.node_hash(height, 0)):
            assert level >= height and reference.node_hash(level, index) == digest
        assert frontier.size == reference.size and frontier.root() == reference.root()
    if frontier.size % 2:
        with pytest.raises(ValueError, match="cannot start"):
            frontier.append_subtree(1, bytes(32))
