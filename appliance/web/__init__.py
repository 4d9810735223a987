"""The HTTP service of a PServer: the status page (the paper's ServerGui), a JSON API, /metrics.

Served by ``pst serve``, the network-facing process, never by the key-holder: it reads only
public data (the server's status.json and alerts.jsonl, the connections of its
PeerNetwork, the local API's counters) and the peers' own ``/v1/status``. It runs on
hypercorn's trio worker with a Starlette application, in the same trio loop as the peer
network and the local API, and answers read-only requests only.

* :mod:`appliance.web._view`: what is shown and how a server is judged (operational,
  recovering, stale, stopped); the peer poller.
* :mod:`appliance.web._app`: the routes, JSON errors, the Host check, the OpenAPI document.
* :mod:`appliance.web._metrics`: the Prometheus metrics.
* :mod:`appliance.web._page`: the page, its script and its style sheet.
* :mod:`appliance.web._serve`: :class:`WebService`, run in the node's nursery.
* :mod:`appliance.web._log`: the secure log's read side under ``/log/`` (c2sp.org/tlog-tiles and
  JSON proofs, entries, search), over a :class:`~appliance.apps.log.reader.LogReader` the caller
  passes in (``WebService(..., log_reader=...)``); without one those paths are 404s.

Layering: crypto -> protocols/net -> host -> api -> boot -> **web** -> node -> cli; this
package imports nothing from node or cli (the node hands it a :class:`Sources`), and from the
applications only the log's read side (which imports nothing from web).
"""

from appliance.web._app import WebApp, openapi
from appliance.web._metrics import Metrics
from appliance.web._serve import POLL_INTERVAL, WebService
from appliance.web._view import (
    API_NAME,
    STATES,
    LocalView,
    PeerLink,
    PeerPoller,
    Sources,
    clean_peer_document,
    clean_status,
    judge,
    network_document,
    stale_after,
)

__all__ = [
    "API_NAME",
    "POLL_INTERVAL",
    "STATES",
    "LocalView",
    "Metrics",
    "PeerLink",
    "PeerPoller",
    "Sources",
    "WebApp",
    "WebService",
    "clean_peer_document",
    "clean_status",
    "judge",
    "network_document",
    "openapi",
    "stale_after",
]
