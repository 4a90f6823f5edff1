"""The operator page (``/ui``): pending approvals to approve or deny, and a session's timeline.

One HTML document and one script, no build step and nothing fetched from
elsewhere. The page itself needs no key: it asks for one and calls the API
with it (kept in the tab's sessionStorage only), so it sees exactly what that
key's tenant may see. Every value from the API is put on the page as text
(``textContent``), never as markup, and the Content-Security-Policy allows
only this origin's script.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; "
        "form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>sluicegate operator</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #222; }
  h1 { font-size: 1.3rem; } h2 { font-size: 1.1rem; margin-top: 2rem; }
  table { border-collapse: collapse; width: 100%; margin-top: .5rem; }
  th, td { border-bottom: 1px solid #ddd; padding: .3rem .5rem; text-align: left;
           vertical-align: top; }
  th { background: #f4f4f4; } code { font-size: 12px; }
  .status { margin: .5rem 0; color: #555; min-height: 1.2em; }
  .error { color: #b00020; } input[type=text], input[type=password] { padding: .2rem; }
</style>
</head>
<body>
<h1>sluicegate operator</h1>
<p>
  <label>API key <input id="key" type="password" size="60" autocomplete="off"></label>
  <button id="use-key">Use key</button>
</p>
<div id="status" class="status" role="status"></div>

<h2>Pending approvals</h2>
<button id="refresh">Refresh</button>
<table id="approvals">
  <thead><tr><th>id</th><th>session</th><th>task</th><th>tool</th><th>args</th>
  <th>reasons</th><th>deadline</th><th>decide</th></tr></thead>
  <tbody></tbody>
</table>

<h2>Session timeline</h2>
<p>
  <label>Session <input id="session" type="text" size="40"></label>
  <button id="show-timeline">Show</button>
</p>
<table id="timeline">
  <thead><tr><th>time</th><th>step</th><th>kind</th><th>event type</th><th>decision</th>
  <th>reasons</th><th>trace id</th></tr></thead>
  <tbody></tbody>
</table>
<script src="/ui/app.js"></script>
</body>
</html>
"""

SCRIPT = """"use strict";
const $ = (id) => document.getElementById(id);
const KEY = "sluicegate.key";

function say(text, error) {
  const box = $("status");
  box.textContent = text;
  box.className = error ? "status error" : "status";
}

async function api(method, path, body) {
  const key = sessionStorage.getItem(KEY);
  if (!key) { throw new Error("enter an API key first"); }
  const init = { method, headers: { "Authorization": "Bearer " + key } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  const data = await response.json().catch(() => ({}));
  if (!response.ok) { throw new Error(data.detail || ("HTTP " + response.status)); }
  return data;
}

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  row.appendChild(td);
  return td;
}

async function loadApprovals() {
  const body = $("approvals").tBodies[0];
  const data = await api("GET", "/v1/approvals");
  body.replaceChildren();
  for (const held of data.approvals) {
    const row = document.createElement("tr");
    row.dataset.id = held.id;
    cell(row, held.id);
    cell(row, held.session);
    cell(row, held.task_id);
    cell(row, held.tool);
    cell(row, JSON.stringify(held.args));
    cell(row, held.reasons.join(", "));
    cell(row, held.deadline);
    const decide = cell(row, "");
    const reason = document.createElement("input");
    reason.type = "text";
    reason.placeholder = "reason";
    reason.className = "reason";
    decide.appendChild(reason);
    for (const verb of ["approve", "deny"]) {
      const button = document.createElement("button");
      button.textContent = verb === "approve" ? "Approve" : "Deny";
      button.className = verb;
      button.addEventListener("click", () => decideOn(held.id, verb, reason.value));
      decide.appendChild(button);
    }
    body.appendChild(row);
  }
  say(data.approvals.length + " pending");
}

async function decideOn(id, verb, reason) {
  try {
    if (!reason.trim()) { throw new Error("give a reason to " + verb); }
    const done = await api("POST", "/v1/approvals/" + encodeURIComponent(id) + ":" + verb,
                           { reason });
    await loadApprovals();
    say(id + ": " + done.status);
  } catch (error) { say(error.message, true); }
}

async function showTimeline() {
  const session = $("session").value.trim();
  const body = $("timeline").tBodies[0];
  const data = await api("GET", "/v1/sessions/" + encodeURIComponent(session) + "/audit");
  body.replaceChildren();
  for (const event of data.events) {
    const row = document.createElement("tr");
    cell(row, event.time);
    cell(row, event.step);
    cell(row, event.kind);
    cell(row, event.event_type);
    cell(row, event.decision);
    cell(row, (event.reasons || []).join(", "));
    cell(row, event.trace_id).className = "trace";
    body.appendChild(row);
  }
  say(data.events.length + " audit rows for " + session);
}

function guarded(action) {
  return () => action().catch((error) => say(error.message, true));
}

$("use-key").addEventListener("click", () => {
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  guarded(loadApprovals)();
});
$("refresh").addEventListener("click", guarded(loadApprovals));
$("show-timeline").addEventListener("click", guarded(showTimeline));
if (sessionStorage.getItem(KEY)) { guarded(loadApprovals)(); }
"""


async def page(request: Request) -> Response:
    return Response(HTML, media_type="text/html", headers=SECURITY_HEADERS)


async def script(request: Request) -> Response:
    return Response(SCRIPT, media_type="text/javascript", headers=SECURITY_HEADERS)
