"""The network layer: framed, mutually authenticated TLS 1.3 channels between PServers.

* :mod:`appliance.net._framing`: length-prefixed frames (sans-IO :class:`FrameDecoder`,
  :class:`FrameStream` over trio) and the :class:`Hello` that opens every connection.
* :mod:`appliance.net._tls`: per-period Ed25519 certificates, trust anchors built from the
  KeyTable's public keys, TLS 1.3-only SSL contexts and the post-handshake key check.
* :mod:`appliance.net._peers`: :class:`PeerNetwork`, which keeps one authenticated
  connection to every peer, delivers frames as ``(peer_id, payload)`` and rekeys per period.

The protocols' ``Outgoing(to, data)`` maps directly onto ``PeerNetwork.send(to, data)``
(``to == 0`` broadcasts), and received ``(peer_id, payload)`` pairs feed their
``(sender_id, bytes, now)`` inputs.
"""

from appliance.net._framing import (
    DEFAULT_MAX_FRAME_SIZE,
    FrameDecoder,
    FrameStream,
    FramingError,
    Hello,
    HelloError,
    encode_frame,
)
from appliance.net._peers import (
    EVERYONE,
    ConnectionInfo,
    FrameHandler,
    PeerNetwork,
    PeerState,
    Rejection,
)
from appliance.net._tls import (
    PeerCertificateError,
    certificate_period,
    check_peer,
    client_context,
    period_certificate,
    server_context,
    trust_anchor,
    trust_anchors_pem,
)

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "EVERYONE",
    "ConnectionInfo",
    "FrameDecoder",
    "FrameHandler",
    "FrameStream",
    "FramingError",
    "Hello",
    "HelloError",
    "PeerCertificateError",
    "PeerNetwork",
    "PeerState",
    "Rejection",
    "certificate_period",
    "check_peer",
    "client_context",
    "encode_frame",
    "period_certificate",
    "server_context",
    "trust_anchor",
    "trust_anchors_pem",
]
