"""Data structures of the paper's password-based distributed registration (§5.1). NOT WIRED IN.

Theory of operation
-------------------
A distributed application runs one client next to each PServer. Every client registers
at its own PServer with the same ``(name, password)`` and gets a local handle. A request
of such an application is to be serviced only if a majority of the servers' clients asked
for (or approved) it: when Pserver_i gets ``Request(handle_i, protocol)`` it sends
``(verifier, name, protocol, request_id)`` to all servers; a server whose own client has not
made that request asks the client to approve it, after checking the verifier.

The paper sends ``hash(pswd)``. A bare hash lets every server (and anyone who breaks into
one) run a fast dictionary attack, so :func:`password_verifier` uses scrypt salted with
the application name: still the same value at every server, as the protocol requires, but
slow to guess. The password itself is never stored or sent.

This module only provides the pieces: :func:`password_verifier`, the
:class:`ApprovalRequest` that servers exchange (canonical CBOR, strict decoder) and the
:class:`MajorityTally` that decides when a request has a majority. The API operations
(``register_distributed``, ``request``, ``approve``) and the broadcast between PServers are
not implemented yet.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

from appliance.crypto import encoding
from appliance.crypto.errors import DecodeError

VERIFIER_SIZE = 32
REQUEST_ID_SIZE = 16
MAX_PROTOCOL_LENGTH = 64
_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1


def password_verifier(name: str, password: bytes) -> bytes:
    """What servers compare instead of the password: scrypt(password, salt = name)."""
    salt = b"pst/api/distributed-registration/v1\x00" + name.encode()
    return hashlib.scrypt(password, salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=VERIFIER_SIZE)


@dataclass(frozen=True)
class ApprovalRequest:
    """``(verifier, name, protocol)`` of §5.1 plus an id that makes each request distinct."""

    name: str
    verifier: bytes
    protocol: str
    request_id: bytes

    def encode(self) -> bytes:
        return encoding.encode(
            {"name": self.name, "verifier": self.verifier, "protocol": self.protocol, "rid": self.request_id}
        )

    @classmethod
    def decode(cls, data: bytes) -> ApprovalRequest:
        obj = encoding.decode(data, max_size=1024, what="approval request")
        f = encoding.expect_map(
            obj, {"name": str, "verifier": bytes, "protocol": str, "rid": bytes}, "approval request"
        )
        if len(f["verifier"]) != VERIFIER_SIZE or len(f["rid"]) != REQUEST_ID_SIZE:
            raise DecodeError("approval request: bad verifier or request id size")
        if not f["name"] or not 0 < len(f["protocol"]) <= MAX_PROTOCOL_LENGTH:
            raise DecodeError("approval request: empty name or bad protocol")
        return cls(f["name"], f["verifier"], f["protocol"], f["rid"])


@dataclass
class MajorityTally:
    """Which servers' clients approved each request; a strict majority of ``n`` services it."""

    n: int
    approvals: dict[ApprovalRequest, set[int]] = field(default_factory=dict)

    def approve(self, server: int, request: ApprovalRequest) -> bool:
        """Record that ``server``'s client approved ``request``; True once a majority did."""
        if not 1 <= server <= self.n:
            raise ValueError(f"server id {server} not in [1, {self.n}]")
        voters = self.approvals.setdefault(request, set())
        voters.add(server)
        return self.has_majority(request)

    def has_majority(self, request: ApprovalRequest) -> bool:
        return 2 * len(self.approvals.get(request, ())) > self.n

    def forget(self, request: ApprovalRequest) -> None:
        self.approvals.pop(request, None)
