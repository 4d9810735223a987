"""The status page (the paper's ServerGui): one HTML page, a script and a style sheet.

The page holds no data: its script asks ``/v1/network`` every two seconds and rebuilds the
tables with ``textContent`` only (nothing a server reports is ever parsed as HTML), so the
page refreshes by itself and works under ``Content-Security-Policy: default-src 'none'``
with the script and style sheet from this server.
"""

from __future__ import annotations

from typing import Final

INDEX_HTML: Final = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>pst: PServer network</title>
<link rel="stylesheet" href="/static/page.css">
<script src="/static/page.js" defer></script>
</head>
<body>
<header>
  <h1>PServer network <span id="observer"></span></h1>
  <p id="summary">loading&hellip;</p>
  <p id="updated" class="muted"></p>
</header>
<main>
<section>
  <h2>Servers</h2>
  <table id="servers">
    <thead><tr>
      <th>server</th><th>state</th><th>period</th><th>in KeyTable</th><th>last refresh</th>
      <th>recent refreshes</th><th>alerts</th><th>connections to peers</th><th>clock skew</th>
      <th>source</th>
    </tr></thead>
    <tbody></tbody>
  </table>
  <p class="muted" id="legend"></p>
</section>
<section>
  <h2>Connections</h2>
  <p class="muted">Row i, column j: server i's connection to server j, as server i reports it.
  &#10003; authenticated with the period's keys, ? open but unauthenticated, &ndash; none.</p>
  <table id="matrix"><thead></thead><tbody></tbody></table>
</section>
<section>
  <h2>Alerts</h2>
  <table id="alerts">
    <thead><tr><th>time</th><th>seen by</th><th>kind</th><th>about server</th><th>period</th>
    <th>detail</th></tr></thead>
    <tbody></tbody>
  </table>
</section>
<section>
  <h2>Applications</h2>
  <h3>The log</h3>
  <p class="muted">Every server holds the whole log, in the order the servers agreed; any server
  takes syslog and the local API's entries. "behind" is how many entries this server's copy lacks
  against the largest copy shown, and "lag" for how long it has lacked them (since a peer was
  known to be ahead, on this server's clock); the checkpoint is the last signed one this server
  published.
  Counters since the server started.</p>
  <table id="log">
    <thead><tr><th>server</th><th>log</th><th>entries</th><th>entries/s</th><th>behind</th>
    <th>lag</th><th>checkpoint</th><th>checkpoint age</th><th>listening</th>
    <th>connections</th><th>unparsed</th><th>truncated</th><th>framing errors</th><th>RELP errors</th>
    <th>UDP dropped</th><th>throttled</th></tr></thead>
    <tbody></tbody>
  </table>
</section>
<section>
  <h2>Where each figure comes from</h2>
  <ul id="sources"></ul>
  <p class="muted">JSON: <a href="/v1/network">/v1/network</a>, <a href="/v1/status">/v1/status</a>,
  <a href="/v1/health">/v1/health</a>, <a href="/v1/openapi.json">/v1/openapi.json</a>,
  <a href="/metrics">/metrics</a></p>
</section>
</main>
</body>
</html>
"""

PAGE_CSS: Final = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2430; background: #fafbfc; }
h1 { font-size: 1.5em; margin: 0 0 .3em; }
h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #d7dce3; padding: .3em .55em; text-align: left; vertical-align: top; }
th { background: #eef1f5; font-weight: 600; }
.muted { color: #6a7380; font-size: .92em; }
.state { display: inline-block; padding: .1em .5em; border-radius: .7em; font-weight: 600; color: #fff; }
.state-operational { background: #2e8540; }
.state-recovering { background: #c77c02; }
.state-behind { background: #c77c02; }
.state-stale { background: #8a6d3b; }
.state-stopped { background: #b3261e; }
tr.down td { background: #fdecea; }
.reason { display: block; font-size: .85em; color: #6a7380; max-width: 22em; }
.timeline { display: flex; align-items: flex-end; gap: 2px; height: 34px; }
.bar { width: 7px; background: #2e8540; min-height: 2px; }
.bar.recovering { background: #c77c02; }
.bar.other { background: #b3261e; }
.links span { display: inline-block; margin-right: .45em; white-space: nowrap; }
.ok { color: #2e8540; } .warn { color: #c77c02; } .bad { color: #b3261e; }
td.mono, .mono { font-family: ui-monospace, monospace; font-size: .9em; }
"""

PAGE_JS: Final = """
"use strict";
const POLL_MS = 2000;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function when(t) {
  if (t === null || t === undefined) return "-";
  return new Date(t * 1000).toLocaleTimeString();
}
function secs(x) { return (x === null || x === undefined) ? "-" : x.toFixed(3) + " s"; }
function cell(row, content, cls) {
  const td = el("td", null, cls);
  if (content instanceof Node) td.appendChild(content); else td.textContent = content;
  row.appendChild(td);
  return td;
}
function linkMark(link) {
  if (!link) return ["\\u2013", "bad"];
  if (link.state === "up" || (link.authenticated && link.state !== "down")) return ["\\u2713", "ok"];
  if (link.state === "anonymous") return ["?", "warn"];
  if (link.state === "connecting") return ["\\u2026", "warn"];
  return ["\\u2013", "bad"];
}

function renderServers(net) {
  const body = document.querySelector("#servers tbody");
  body.replaceChildren();
  for (const s of net.servers) {
    const tr = el("tr");
    tr.dataset.server = s.server;
    tr.dataset.state = s.state;
    if (s.state === "stopped") tr.className = "down";
    cell(tr, "server " + s.server + (s.self ? " (this one)" : ""));
    const st = el("td");
    st.appendChild(el("span", s.state === "stopped" ? "stopped (down)" : s.state, "state state-" + s.state));
    st.appendChild(el("span", s.reason, "reason"));
    tr.appendChild(st);
    const status = s.status || {};
    const seen = s.last_seen;
    cell(tr, status.period !== undefined && status.period !== null ? status.period
      : (seen && seen.period !== null ? "last seen " + seen.period : "-"));
    cell(tr, s.member === null || s.member === undefined ? "-" : (s.member ? "yes" : "no"));
    const last = status.last_refresh;
    cell(tr, last ? ("period " + last.period + ": " + last.status + " in " + secs(last.duration_s)
      + " at " + when(last.finished)) : "-");
    const line = el("div", null, "timeline");
    const recent = status.recent_refreshes || [];
    const longest = Math.max(0.001, ...recent.map(r => r.duration_s || 0));
    for (const r of recent) {
      const bar = el("div", null, "bar" + (r.status === "operational" ? "" :
        (r.status === "recovering" ? " recovering" : " other")));
      bar.style.height = Math.max(2, Math.round(32 * (r.duration_s || 0) / longest)) + "px";
      bar.title = "period " + r.period + ": " + r.status + " in " + secs(r.duration_s)
        + (r.failure ? " (" + r.failure + ")" : "");
      line.appendChild(bar);
    }
    cell(tr, line);
    const alerts = s.alerts;
    cell(tr, alerts ? String(alerts.total) : "-");
    const links = el("div", null, "links");
    if (s.peers) {
      for (const [peer, link] of Object.entries(s.peers)) {
        const [mark, cls] = linkMark(link);
        links.appendChild(el("span", "\\u2192" + peer + " " + mark + " " + link.state, cls));
      }
    } else links.textContent = s.state === "stopped" ? "unknown (down)" : "network not started";
    cell(tr, links);
    cell(tr, s.skew_s === null || s.skew_s === undefined ? "-" :
      (s.self ? "reference" : (s.skew_s >= 0 ? "+" : "") + s.skew_s.toFixed(3) + " s \\u00b1 "
        + (s.rtt_s / 2).toFixed(3)));
    cell(tr, s.source, "muted");
    body.appendChild(tr);
  }
}

function renderMatrix(net) {
  const head = document.querySelector("#matrix thead");
  const body = document.querySelector("#matrix tbody");
  const ids = net.servers.map(s => s.server).sort((a, b) => a - b);
  const hr = el("tr");
  hr.appendChild(el("th", "from \\\\ to"));
  for (const j of ids) hr.appendChild(el("th", j));
  head.replaceChildren(hr);
  body.replaceChildren();
  for (const i of ids) {
    const s = net.servers.find(x => x.server === i);
    const tr = el("tr");
    tr.appendChild(el("th", i));
    for (const j of ids) {
      if (i === j) { cell(tr, ""); continue; }
      if (!s.peers) { cell(tr, s.state === "stopped" ? "down" : "?", "muted"); continue; }
      const [mark, cls] = linkMark(s.peers[String(j)]);
      cell(tr, mark, cls);
    }
    body.appendChild(tr);
  }
}

function renderAlerts(net) {
  const body = document.querySelector("#alerts tbody");
  body.replaceChildren();
  const all = [];
  for (const s of net.servers) for (const a of ((s.alerts || {}).recent || [])) all.push([s.server, a]);
  all.sort((x, y) => (y[1].time || 0) - (x[1].time || 0));
  if (!all.length) {
    const tr = el("tr");
    const td = cell(tr, "no alerts", "muted");
    td.colSpan = 6;
    body.appendChild(tr);
  }
  for (const [by, a] of all.slice(0, 30)) {
    const tr = el("tr");
    cell(tr, when(a.time)); cell(tr, by); cell(tr, a.kind); cell(tr, a.server); cell(tr, a.period);
    cell(tr, a.detail);
    body.appendChild(tr);
  }
}

function renderLog(net) {
  const body = document.querySelector("#log tbody");
  body.replaceChildren();
  const sizes = net.servers.map((s) => (s.log && typeof s.log.size === "number" ? s.log.size : 0));
  const largest = Math.max(0, ...sizes);
  for (const s of net.servers) {
    const tr = el("tr");
    const g = s.log;
    cell(tr, "server " + s.server);
    if (!g) {
      const td = cell(tr, s.state === "stopped" ? "unknown (down)" : "no log", "muted");
      td.colSpan = 15;
      body.appendChild(tr);
      continue;
    }
    cell(tr, g.state === "unavailable" ? "unavailable: " + (g.error || "") : g.state + " (" + g.origin + ")",
      g.state === "running" ? "ok" : "bad");
    cell(tr, g.size === null || g.size === undefined ? "-" : g.size);
    cell(tr, g.entries_per_second === null || g.entries_per_second === undefined ? "-"
      : g.entries_per_second.toFixed(1));
    const behind = typeof g.size === "number" ? largest - g.size : null;
    cell(tr, behind === null ? "-" : behind);
    const r = g.replication || {};
    cell(tr, typeof r.lag_seconds === "number" ? r.lag_seconds.toFixed(1) + " s" : "-",
      typeof r.lag_seconds === "number" && r.lag_seconds >= 5 ? "warn" : undefined);
    cell(tr, r.checkpoint_size === null || r.checkpoint_size === undefined ? "-" : r.checkpoint_size);
    cell(tr, r.checkpoint_age === null || r.checkpoint_age === undefined ? "-" : r.checkpoint_age + " s");
    cell(tr, Object.entries(g.listening || {}).map(([t, a]) => t + " " + a).join(", ") || "-");
    const c = g.ingest || {};
    for (const k of ["connections", "unparsed", "truncated", "framing_errors", "relp_errors",
                     "udp_dropped", "throttled"]) {
      cell(tr, c[k] === null || c[k] === undefined ? "-" : c[k]);
    }
    body.appendChild(tr);
  }
}

function render(net) {
  document.getElementById("observer").textContent = "as seen by server " + net.observer;
  const counts = {};
  for (const s of net.servers) counts[s.state] = (counts[s.state] || 0) + 1;
  const parts = Object.entries(counts).map(([k, v]) => v + " " + k);
  const nr = net.clock.next_refresh;
  const kt = net.keytable;
  document.getElementById("summary").textContent =
    "n=" + net.constants.n + ", t=" + net.constants.t + ": " + parts.join(", ")
    + ". Clock period " + net.clock.period + "; next refresh: period " + nr.period + " at "
    + when(nr.at) + " (in " + Math.max(0, Math.round(nr.at - net.now)) + " s)."
    + (kt ? " KeyTable of period " + kt.period + " (" + kt.fingerprint + "), members "
      + (kt.members || []).join(", ") + "." : "");
  document.getElementById("updated").textContent = "updated " + when(net.now);
  renderServers(net);
  renderMatrix(net);
  renderAlerts(net);
  renderLog(net);
  const src = document.getElementById("sources");
  src.replaceChildren();
  for (const [k, v] of Object.entries(net.sources)) src.appendChild(el("li", k + ": " + v));
  document.body.dataset.loaded = "yes";
}

async function poll() {
  try {
    const answer = await fetch("/v1/network", {cache: "no-store"});
    if (!answer.ok) throw new Error("HTTP " + answer.status);
    render(await answer.json());
  } catch (err) {
    document.getElementById("updated").textContent =
      "this server does not answer (" + err.message + "); retrying";
  }
  setTimeout(poll, POLL_MS);
}
poll();
"""
