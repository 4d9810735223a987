"""The replication lag in seconds: how long a server's copy of the log has lacked what a peer
had applied (LogNode.lag_seconds), in /v1/status, in /metrics and on the status page.

Four LogNodes joined by in-memory links (tests/test_log_node.py's Cluster). Server 4 hears
only where the others are (``at``) and nothing else, so it falls behind while servers 1-3 (a
quorum) log entries; its clock is moved on by 100 s: its lag is at least that, and back to
0 once it hears everything again and catches up.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families
from test_log_node import LOG_FRAME, Cluster

from appliance.crypto import encoding
from appliance.web._metrics import _log_metrics
from appliance.web._page import INDEX_HTML, PAGE_JS
from appliance.web._view import clean_log


async def test_a_server_that_hears_of_slots_it_lacks_counts_the_seconds_it_is_behind(tmp_path: Path) -> None:
    c = Cluster(tmp_path)
    offset = [0.0]
    c.nodes[4]._clock = lambda: time.monotonic() + offset[0]
    cut = [True]

    def only_where_we_are(to: int, data: bytes) -> bytes:
        if to != 4 or not cut[0] or encoding.decode(data[1:]).get("log") == "at":
            return data
        return LOG_FRAME + encoding.encode({"log": "nothing"})  # dropped by server 4 (a complaint)

    for i in (1, 2, 3):
        c.tamper[i] = only_where_we_are
    async with trio.open_nursery() as nursery:
        await c.start(nursery)
        assert c.nodes[4].lag_seconds() == 0.0
        with trio.fail_after(30):
            await c.nodes[1].append([b"one", b"two"])
            while c.nodes[4].lag_seconds() == 0.0:  # it hears that the others are at slot 1
                await trio.sleep(0.05)
        assert c.nodes[4].size == 0 and all(c.nodes[i].lag_seconds() == 0.0 for i in (1, 2, 3))
        offset[0] += 100.0
        lag = c.nodes[4].replication()["lag_seconds"]
        assert isinstance(lag, float) and lag >= 100.0
        cut[0] = False
        with trio.fail_after(30):
            while c.nodes[4].size < 2 or c.nodes[4].lag_seconds() != 0.0:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    assert c.nodes[4].replication()["lag_seconds"] == 0.0


def test_the_lag_is_in_the_status_metrics_and_page() -> None:
    status: dict[str, Any] = {"state": "running", "size": 5, "replication": {"slot": 3, "lag_seconds": 12.5}}
    assert clean_log(status)["replication"]["lag_seconds"] == 12.5  # type: ignore[index]
    assert clean_log({"replication": {"lag_seconds": "evil"}})["replication"]["lag_seconds"] is None  # type: ignore[index]
    text = "".join(
        f"# TYPE {m.name} {m.type}\n" + "".join(f"{m.name} {s.value}\n" for s in m.samples)
        for m in _log_metrics(status)
    )
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["pst_log_replication_lag_seconds"].samples[0].value == 12.5
    assert "<th>lag</th>" in INDEX_HTML and "r.lag_seconds" in PAGE_JS
