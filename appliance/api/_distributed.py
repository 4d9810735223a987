"""The password verifier of the paper's password-based distributed registration (§5.1).

Every client of a distributed application registers at its own PServer with the same
``(name, password)``. The paper has the servers compare ``hash(pswd)``; a bare hash lets
anyone who obtains it (every server, and whoever breaks into one) run a fast dictionary
attack, so the servers keep and compare :func:`password_verifier` instead: scrypt
(N = 2^14, r = 8, p = 1: 16 MiB and some 0.1 s per guess here) salted with the application
name. It is the same value at every server, as the protocol requires, but slow to guess;
the password itself is never stored or sent. The exchange between servers is
:mod:`appliance.protocols.approvals`; it uses the verifier only as an HMAC key.
"""

from __future__ import annotations

import hashlib
from typing import Final

VERIFIER_SIZE: Final = 32
_SCRYPT_N: Final = 2**14
_SCRYPT_R: Final = 8
_SCRYPT_P: Final = 1


def password_verifier(name: str, password: bytes) -> bytes:
    """What servers keep instead of the password: scrypt(password, salt = name)."""
    salt = b"pst/api/distributed-registration/v1\x00" + name.encode()
    return hashlib.scrypt(password, salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=VERIFIER_SIZE)
