"""The network layer: framed TLS 1.3 channels between PServers, mutually authenticated when possible.

* :mod:`appliance.net._framing`: length-prefixed frames (sans-IO :class:`FrameDecoder`,
  :class:`FrameStream` over trio) and the :class:`Hello` that opens every connection.
* :mod:`appliance.net._tls`: per-period Ed25519 certificates, trust anchors built from the
  KeyTable's public keys, TLS 1.3-only SSL contexts (including the anonymous ones) and the
  post-handshake key check.
* :mod:`appliance.net._peers`: :class:`PeerNetwork`, which keeps a connection to every peer,
  authenticated with the period's keys when both sides hold them and otherwise (a server
  that missed a refresh, or one recovering without keys) unauthenticated and flagged so;
  it delivers frames as ``(peer_id, payload)`` and rekeys per period. Unauthenticated
  connections are safe because every protocol message is signed and private data sealed at
  the application layer; their number is bounded (see that module).

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
    ChannelIdentity,
    Credential,
    PeerCertificateError,
    anonymous_client_context,
    anonymous_server_context,
    certificate_period,
    channel_certificate_der,
    channel_identity,
    channel_sign,
    check_channel_signature,
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
    "ChannelIdentity",
    "ConnectionInfo",
    "Credential",
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
    "anonymous_client_context",
    "anonymous_server_context",
    "certificate_period",
    "channel_certificate_der",
    "channel_identity",
    "channel_sign",
    "check_channel_signature",
    "check_peer",
    "client_context",
    "encode_frame",
    "period_certificate",
    "server_context",
    "trust_anchor",
    "trust_anchors_pem",
]
