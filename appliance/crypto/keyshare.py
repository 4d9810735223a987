"""A server's share of a long-lived secret together with the public sharing data.

The public part (``commitment``) is the same at every server: its constant term is
the group public key and ``verification_share(i)`` is server i's public share
Y_i = x_i * G, against which anything server i computes with its share is checked.
Refresh changes ``share`` and ``commitment`` but never ``public_key``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from appliance.crypto.groups import Group
from appliance.crypto.secret import SecretScalar
from appliance.crypto.vss import Commitment

E = TypeVar("E")


@dataclass(frozen=True)
class PublicSharing(Generic[E]):
    """Public data of a sharing: n, t and the Feldman commitment to the polynomial."""

    n: int
    t: int
    commitment: Commitment[E]

    @property
    def public_key(self) -> E:
        return self.commitment.points[0]

    def verification_share(self, group: Group[E], i: int) -> E:
        return self.commitment.evaluate(group, i)


@dataclass(frozen=True)
class KeyShare(Generic[E]):
    """Server ``index``'s secret share with the public sharing it belongs to."""

    index: int
    share: SecretScalar
    public: PublicSharing[E]

    @property
    def public_key(self) -> E:
        return self.public.public_key

    @property
    def n(self) -> int:
        return self.public.n

    @property
    def t(self) -> int:
        return self.public.t

    def check(self, group: Group[E]) -> bool:
        """Does the secret share match this server's verification share?"""
        return group.mul_base(self.share.value) == self.public.verification_share(group, self.index)

    def wipe(self) -> None:
        self.share.wipe()
