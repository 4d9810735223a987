"""The local API (paper §5): applications on the PServer's machine ask it for services.

* :mod:`appliance.api._core`: the sans-IO core. :class:`ApiCore` turns a decoded request
  and the caller's kernel credentials (:class:`PeerCred`) into a response; it owns the
  registrations (§5.1, centralized: handle bound to name, unique id and uid; distributed:
  name and password verifier, requests serviced only with a majority of the application's
  clients) and the quotas, and reaches the node only through the :class:`Backend` and
  :class:`DistributedBackend` protocols.
* :mod:`appliance.api._registrations`: the registrations on disk (they survive restarts).
* :mod:`appliance.api._node`: :class:`PServerBackend`, the Backend built from a running
  PServer's ``sign``, status file and :class:`DistributedNode`.
* :mod:`appliance.api._distributed`: the scrypt password verifier of distributed
  registration (the exchange between servers is :mod:`appliance.protocols.approvals`).
* :mod:`appliance.api._server`: :func:`serve_api`, the trio server on a Unix socket
  (mode 0660, ``SO_PEERCRED``, length-prefixed CBOR frames, timeouts, bounded frames,
  connections capped per uid).
* :mod:`appliance.api.commands`: ``pst api registrations list|revoke`` (the operator's).
* :mod:`appliance.api.client`: the client library and a small command line
  (``clients/pst_client.py``); ``clients/python`` is the same library without the server.

Wire format, error codes and the registration rules are described in
:mod:`appliance.api._core`; for application writers, in docs/api.md.
"""

from appliance.api._core import (
    API_VERSION,
    APP_SIGN_DOMAIN,
    BAD_REQUEST,
    ERROR_CODES,
    HANDLE_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_REQUEST_SIZE,
    NOT_PERMITTED,
    OPS,
    QUOTA,
    REFUSED,
    TOO_LARGE,
    UNAVAILABLE,
    UNKNOWN_HANDLE,
    UNKNOWN_REQUEST,
    ApiCore,
    ApiError,
    Backend,
    BackendRefused,
    BackendUnavailable,
    CertificateBackend,
    DistributedBackend,
    Limits,
    LinkBackend,
    LogBackend,
    PeerCred,
    Request,
    TokenBucket,
    app_digest_payload,
    app_signing_payload,
    parse_request,
)
from appliance.api._node import DistributedNode, LogAdapter, PServerBackend
from appliance.api._registrations import RegistrationStore
from appliance.api._server import ApiServer, bind_unix, peer_cred, serve_api
from appliance.protocols.approvals import distributed_sign_payload

__all__ = [
    "API_VERSION",
    "APP_SIGN_DOMAIN",
    "BAD_REQUEST",
    "ERROR_CODES",
    "HANDLE_SIZE",
    "MAX_MESSAGE_SIZE",
    "MAX_REQUEST_SIZE",
    "NOT_PERMITTED",
    "OPS",
    "QUOTA",
    "REFUSED",
    "TOO_LARGE",
    "UNAVAILABLE",
    "UNKNOWN_HANDLE",
    "UNKNOWN_REQUEST",
    "ApiCore",
    "ApiError",
    "ApiServer",
    "Backend",
    "BackendRefused",
    "BackendUnavailable",
    "CertificateBackend",
    "DistributedBackend",
    "DistributedNode",
    "Limits",
    "LinkBackend",
    "LogAdapter",
    "LogBackend",
    "PServerBackend",
    "PeerCred",
    "RegistrationStore",
    "Request",
    "TokenBucket",
    "app_digest_payload",
    "app_signing_payload",
    "bind_unix",
    "distributed_sign_payload",
    "parse_request",
    "peer_cred",
    "serve_api",
]
