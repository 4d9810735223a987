"""RFC 9162 Merkle trees: hashes, roots from stored hashes, inclusion and consistency proofs.

Theory of operation
-------------------
The log is the RFC 9162 §2.1.1 Merkle Tree Hash over its entries, with SHA-256:
``MTH({}) = SHA-256()``, a leaf is ``SHA-256(0x00 || d)``, and a tree of ``n > 1`` leaves is
``SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n]))`` with ``k`` the largest power of two below ``n``.

Nothing here holds the whole tree. A tree is read through a :class:`NodeReader`, which answers
one question: the hash of the *perfect* subtree of height ``level`` whose leaves are
``[index * 2**level, (index + 1) * 2**level)``. Those hashes never change once the leaves exist,
which is what lets the tile store (:mod:`appliance.apps.log.tiles`) keep them as immutable
files. Every other hash the RFC needs, the root of any size and the hashes of the ragged right
edge that proofs use, is computed from O(log n) perfect-subtree hashes (:func:`subtree_hash`).

Appending uses a :class:`Frontier` (a "compact range"): the perfect subtrees of the binary
decomposition of the tree size, largest first. Adding a leaf completes zero or more perfect
subtrees; :meth:`Frontier.append` returns them so that the store can write the ones it keeps,
and the root of the current size is the fold of the frontier, with no read at all.

Proof generation follows the RFC's recursive definitions, PATH (§2.1.3.1) and SUBPROOF
(§2.1.4.1); verification follows the RFC's iterative algorithms (§2.1.3.2 and §2.1.4.2) line by
line, so that a reader can hold the RFC beside them. A failed verification raises
:class:`~appliance.apps.log.errors.ProofError` naming the check that failed.

This module is pure: no I/O, no clock, no randomness.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from appliance.apps.log.errors import ProofError

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "Frontier",
    "MemoryTree",
    "NodeReader",
    "consistency_proof",
    "inclusion_proof",
    "leaf_hash",
    "node_hash",
    "root_hash",
    "subtree_hash",
    "verify_consistency",
    "verify_inclusion",
]

HASH_SIZE = 32
#: MTH({}): the root of the empty tree (RFC 9162 §2.1.1).
EMPTY_ROOT = hashlib.sha256(b"").digest()

#: A node is (level, index, hash): the perfect subtree of height ``level`` at position ``index``.
Node = tuple[int, int, bytes]


def leaf_hash(entry: bytes) -> bytes:
    """MTH({d}) = SHA-256(0x00 || d)."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """SHA-256(0x01 || left || right)."""
    return hashlib.sha256(b"\x01" + left + right).digest()


class NodeReader(Protocol):
    """Where the perfect-subtree hashes of a tree are kept (memory, tiles on disk, a peer's tiles)."""

    def node_hash(self, level: int, index: int) -> bytes:
        """The hash of leaves ``[index << level, (index + 1) << level)``; they must all exist."""
        ...


def _largest_power_of_two_below(n: int) -> int:
    """k of RFC 9162 §2.1.1: the largest power of two smaller than n (n > 1)."""
    return 1 << ((n - 1).bit_length() - 1)


def _check_size(size: int, what: str) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"{what} must be a non-negative integer, not {size!r}")


def subtree_hash(reader: NodeReader, start: int, end: int) -> bytes:
    """MTH(D[start:end]) for a range the RFC's recursion produces.

    ``start`` must be a multiple of the largest power of two not above ``end - start`` (true of
    every range in MTH, PATH and SUBPROOF): the range is then a perfect subtree, or a perfect
    left part followed by a smaller such range.
    """
    n = end - start
    if n <= 0:
        raise ValueError(f"empty or reversed range [{start}, {end})")
    if n & (n - 1) == 0:
        level = n.bit_length() - 1
        if start % n:
            raise ValueError(f"range [{start}, {end}) is not aligned to a subtree")
        return reader.node_hash(level, start >> level)
    k = _largest_power_of_two_below(n)
    return node_hash(subtree_hash(reader, start, start + k), subtree_hash(reader, start + k, end))


def root_hash(reader: NodeReader, size: int) -> bytes:
    """MTH of the first ``size`` leaves (RFC 9162 §2.1.1), from O(log size) stored hashes."""
    _check_size(size, "tree size")
    return EMPTY_ROOT if size == 0 else subtree_hash(reader, 0, size)


# --- Appending ---------------------------------------------------------------------------------


@dataclass
class Frontier:
    """The perfect subtrees covering the first ``size`` leaves, largest first (a compact range).

    ``hashes[i]`` is the subtree of height ``levels[i]``; the levels are the set bits of
    ``size`` in decreasing order.
    """

    size: int = 0
    hashes: list[bytes] = field(default_factory=list)

    @property
    def levels(self) -> list[int]:
        return [b for b in range(self.size.bit_length() - 1, -1, -1) if self.size >> b & 1]

    @classmethod
    def from_reader(cls, reader: NodeReader, size: int) -> Frontier:
        """The frontier of a stored tree: one read per set bit of ``size``."""
        _check_size(size, "tree size")
        hashes = []
        start = 0
        for level in range(size.bit_length() - 1, -1, -1):
            if size >> level & 1:
                hashes.append(reader.node_hash(level, start >> level))
                start += 1 << level
        return cls(size, hashes)

    def copy(self) -> Frontier:
        return Frontier(self.size, list(self.hashes))

    def append(self, leaf: bytes) -> list[Node]:
        """Add one leaf hash; returns the subtrees it completes, the leaf itself first."""
        if len(leaf) != HASH_SIZE:
            raise ValueError(f"a leaf hash is {HASH_SIZE} bytes, not {len(leaf)}")
        return self.append_subtree(0, leaf)

    def append_subtree(self, height: int, digest: bytes) -> list[Node]:
        """Add the root of a perfect subtree of ``2**height`` leaves that starts at the current
        size (which must be a multiple of it); returns the subtrees it completes, itself first."""
        if self.size & ((1 << height) - 1):
            raise ValueError(f"a subtree of height {height} cannot start at leaf {self.size}")
        self.size += 1 << height
        completed: list[Node] = [(height, (self.size >> height) - 1, digest)]
        current = digest
        level = height
        # The new subtree merges with the frontier's smallest subtrees while they have its
        # height: as many times as there are one bits above it in the old size.
        while (self.size >> level) & 1 == 0:
            current = node_hash(self.hashes.pop(), current)
            level += 1
            completed.append((level, (self.size >> level) - 1, current))
        self.hashes.append(current)
        return completed

    def root(self) -> bytes:
        """MTH of the first ``size`` leaves: the frontier folded from the right."""
        if not self.hashes:
            return EMPTY_ROOT
        root = self.hashes[-1]
        for left in reversed(self.hashes[:-1]):
            root = node_hash(left, root)
        return root


class MemoryTree:
    """Every perfect-subtree hash of a tree, in memory: for tests and small trees."""

    def __init__(self) -> None:
        self.levels: list[list[bytes]] = [[]]
        self.frontier = Frontier()

    @property
    def size(self) -> int:
        return self.frontier.size

    def append(self, entry: bytes) -> None:
        self.append_hash(leaf_hash(entry))

    def append_hash(self, leaf: bytes) -> None:
        for level, index, digest in self.frontier.append(leaf):
            if level == len(self.levels):
                self.levels.append([])
            assert len(self.levels[level]) == index
            self.levels[level].append(digest)

    def node_hash(self, level: int, index: int) -> bytes:
        try:
            return self.levels[level][index]
        except IndexError:
            raise ValueError(f"no complete subtree at level {level}, index {index}") from None

    def root(self) -> bytes:
        return self.frontier.root()


# --- Proof generation (RFC 9162 §2.1.3.1 and §2.1.4.1) ---------------------------------------


def inclusion_proof(reader: NodeReader, index: int, size: int) -> list[bytes]:
    """PATH(index, D[0:size]): the audit path of leaf ``index`` in the tree of ``size`` leaves."""
    _check_size(index, "leaf index")
    _check_size(size, "tree size")
    if index >= size:
        raise ValueError(f"leaf index {index} is not in a tree of size {size}")
    path: list[bytes] = []
    start, end = 0, size
    # PATH(m, D[n]) recurses into the half holding m and appends the other half's MTH; the
    # loop walks down and the result is reversed, so the deepest sibling comes first.
    while end - start > 1:
        k = _largest_power_of_two_below(end - start)
        if index < start + k:
            path.append(subtree_hash(reader, start + k, end))
            end = start + k
        else:
            path.append(subtree_hash(reader, start, start + k))
            start += k
    path.reverse()
    return path


def consistency_proof(reader: NodeReader, old_size: int, new_size: int) -> list[bytes]:
    """PROOF(m, D[0:n]) of RFC 9162 §2.1.4.1; empty when ``m`` is 0 or ``m == n``."""
    _check_size(old_size, "old tree size")
    _check_size(new_size, "new tree size")
    if old_size > new_size:
        raise ValueError(f"no consistency proof from size {old_size} to the smaller size {new_size}")
    if old_size in (0, new_size):
        return []
    proof: list[bytes] = []
    start, end, m, whole = 0, new_size, old_size, True
    # SUBPROOF(m, D[start:end], whole), unrolled the same way as PATH.
    while m != end - start:
        k = _largest_power_of_two_below(end - start)
        if m <= k:
            proof.append(subtree_hash(reader, start + k, end))
            end = start + k
        else:
            proof.append(subtree_hash(reader, start, start + k))
            start, m, whole = start + k, m - k, False
    if not whole:
        proof.append(subtree_hash(reader, start, end))
    proof.reverse()
    return proof


# --- Proof verification (RFC 9162 §2.1.3.2 and §2.1.4.2) ---------------------------------------


def _check_hash(value: bytes, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise ProofError(f"{what} is not a {HASH_SIZE}-byte hash")


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """Check that ``leaf`` (a leaf hash) is leaf ``index`` of the tree of ``size`` with ``root``.

    Raises :class:`ProofError` if not. The root is what binds the tree size: a checkpoint signs
    both together.
    """
    _check_size(index, "leaf index")
    _check_size(size, "tree size")
    _check_hash(leaf, "the leaf hash")
    _check_hash(root, "the root hash")
    for i, p in enumerate(proof):
        _check_hash(p, f"proof element {i}")
    # 1. leaf_index < tree_size.
    if index >= size:
        raise ProofError(f"leaf index {index} is not below the tree size {size}")
    # 2-3. fn = leaf_index, sn = tree_size - 1, r = hash.
    fn, sn, r = index, size - 1, leaf
    # 4. For each p in the inclusion path:
    for p in proof:
        if sn == 0:
            raise ProofError("the inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    # 5. sn is 0 and r equals the root.
    if sn != 0:
        raise ProofError("the inclusion proof is shorter than the tree is deep")
    if r != root:
        raise ProofError(f"the inclusion proof of leaf {index} does not lead to the root of size {size}")


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of ``new_size`` with ``new_root`` extends the one of ``old_size``.

    Raises :class:`ProofError` if not. Sizes 0 and equal sizes take an empty proof (the RFC
    leaves them to the caller): the empty tree precedes every tree, and a tree only extends
    itself.
    """
    _check_size(old_size, "old tree size")
    _check_size(new_size, "new tree size")
    _check_hash(old_root, "the old root hash")
    _check_hash(new_root, "the new root hash")
    for i, c in enumerate(proof):
        _check_hash(c, f"proof element {i}")
    if old_size > new_size:
        raise ProofError(f"a tree of size {new_size} cannot extend one of size {old_size}")
    if old_size == 0 or old_size == new_size:
        if proof:
            raise ProofError(f"the consistency proof from {old_size} to {new_size} must be empty")
        if old_size == 0 and old_root != EMPTY_ROOT:
            raise ProofError("the old root is not the root of the empty tree")
        if old_size == new_size and old_root != new_root:
            raise ProofError(f"two different roots for the same tree size {new_size}")
        return
    # 1. An empty path fails.
    if not proof:
        raise ProofError(f"the consistency proof from {old_size} to {new_size} is empty")
    path = list(proof)
    # 2. If first_size is an exact power of 2, prepend first_hash.
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    # 3-4. fn = first_size - 1, sn = second_size - 1; shift both while LSB(fn) is set.
    fn, sn = old_size - 1, new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 5. fr = sr = the first value of the path.
    fr = sr = path[0]
    # 6. For each subsequent value c:
    for c in path[1:]:
        if sn == 0:
            raise ProofError("the consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while not fn & 1 and fn != 0:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # 7. fr equals first_hash, sr equals second_hash, sn is 0.
    if sn != 0:
        raise ProofError("the consistency proof is shorter than the tree is deep")
    if fr != old_root:
        raise ProofError(f"the consistency proof does not lead to the root of the old size {old_size}")
    if sr != new_root:
        raise ProofError(f"the consistency proof does not lead to the root of the new size {new_size}")
