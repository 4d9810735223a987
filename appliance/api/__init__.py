"""The local API (paper §5): applications on the PServer's machine ask it for services.

* :mod:`appliance.api._core`: the sans-IO core. :class:`ApiCore` turns a decoded request
  and the caller's kernel credentials (:class:`PeerCred`) into a response; it owns the
  registrations (§5.1, centralized: handle bound to name, unique id and uid) and the
  quotas, and reaches the node only through the :class:`Backend` protocol.
* :mod:`appliance.api._node`: :class:`PServerBackend`, the Backend built from a running
  PServer's ``sign`` and status file.
* :mod:`appliance.api._distributed`: data structures of the password-based distributed
  registration (§5.1); not wired into the API yet.
* :mod:`appliance.api._server`: :func:`serve_api`, the trio server on a Unix socket
  (mode 0660, ``SO_PEERCRED``, length-prefixed CBOR frames, timeouts, bounded frames).

The client library is ``clients/pst_client.py``. Wire format, error codes and the
registration rules are described in :mod:`appliance.api._core`.
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
    TOO_LARGE,
    UNAVAILABLE,
    UNKNOWN_HANDLE,
    ApiCore,
    ApiError,
    Backend,
    BackendUnavailable,
    Limits,
    PeerCred,
    Request,
    TokenBucket,
    app_signing_payload,
    parse_request,
)
from appliance.api._node import PServerBackend
from appliance.api._server import ApiServer, bind_unix, peer_cred, serve_api

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
    "TOO_LARGE",
    "UNAVAILABLE",
    "UNKNOWN_HANDLE",
    "ApiCore",
    "ApiError",
    "ApiServer",
    "Backend",
    "BackendUnavailable",
    "Limits",
    "PServerBackend",
    "PeerCred",
    "Request",
    "TokenBucket",
    "app_signing_payload",
    "bind_unix",
    "parse_request",
    "peer_cred",
    "serve_api",
]
