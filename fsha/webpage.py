"""The status page a browser gets at ``/`` on a node's status address.

It is made on the server from the same status and the same words as ``fsha status``
(:func:`fsha.status.problems`, :func:`fsha.status.event_text`): nodes, slots, networks,
problems, recent history. A few lines of script fetch ``/view`` (the page's body, as HTML)
every ``REFRESH_S`` seconds and swap it in: the page stays live without any logic of its
own. ``/`` still answers JSON to anything that does not ask for HTML (``curl``, scripts),
and ``/status`` is always JSON.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from html import escape
from typing import Any

from twisted.web import resource
from twisted.web.server import Request

from fsha.status import config_label, event_text, problems

JSON = dict[str, Any]
REFRESH_S = 2.0

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1b1f23;background:#fafbfc}
h1{font-size:20px;margin:0 0 .2em}h2{font-size:15px;margin:1.2em 0 .4em}
table{border-collapse:collapse;background:#fff}
td,th{border:1px solid #d0d7de;padding:3px 9px;text-align:left}th{background:#f0f3f6}
.ok{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}.dim{color:#6e7781}
ul.problems li{color:#cf222e}code{font-size:13px}#age{float:right}
"""

SCRIPT = """
let refreshes = 0;
async function refresh() {
  try {
    const r = await fetch('view', {cache: 'no-store'});
    if (r.ok) {
      document.getElementById('view').innerHTML = await r.text();
      refreshes += 1;
      document.body.dataset.refreshes = refreshes;
      document.getElementById('age').textContent = 'live: updated ' +
        new Date().toLocaleTimeString();
    } else { document.getElementById('age').textContent = 'node answered ' + r.status; }
  } catch (e) { document.getElementById('age').textContent = 'node not answering'; }
}
setInterval(refresh, %d);
"""


def _cell(text: Any, cls: str = "") -> str:
    return f"<td class=\"{cls}\">{escape(str(text))}</td>" if cls else \
        f"<td>{escape(str(text))}</td>"


def _table(header: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def render_view(status: JSON, history: list[JSON] | None = None) -> str:
    """The page's live part (what ``/view`` serves)."""
    q = status["quorum"]
    parts = [f"<h1>cluster {escape(status['cluster'])} &middot; seen from "
             f"{escape(status['node'])} ({escape(status['role'])}"
             + (f" of {escape(status['slot'])}" if status.get("slot") else "") + ")</h1>",
             f"<div>quorum <span class=\"{'ok' if q['ok'] else 'bad'}\">"
             f"{'ok' if q['ok'] else 'LOST'}</span> ({q['alive']} seen, {q['required']} "
             f"needed) &middot; config <code>{escape(config_label(status))}</code>"
             f" &middot; view <code>{escape(status['view_digest'])}</code></div>"]
    nets = [n["name"] for n in status.get("networks", [])]
    rows = []
    for node in status["nodes"]:
        alive = node["alive"]
        cells = [_cell(node["name"] + (" (this node)" if node["self"] else "")),
                 _cell(node["role"] if alive else "DOWN", "" if alive else "bad"),
                 _cell("-" if node["rank"] is None else node["rank"] + 1),
                 _cell(node["slot"] or "-"),
                 _cell("-" if not node["slot"] else node["epoch"])]
        for net in nets:
            if node["self"]:
                cells.append(_cell("self", "dim"))
                continue
            info = node["networks"].get(net, {})
            heard = info.get("last_heard_ms")
            text = ("up" if info.get("up") else "DOWN") + \
                (f" {heard:.0f} ms" if heard is not None else "")
            cells.append(_cell(text, "ok" if info.get("up") else "bad"))
        cells.append(_cell(", ".join(node["flags"]) or "-"))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    parts += ["<h2>Nodes</h2>", _table(["node", "role", "rank", "slot", "epoch",
                                        *[f"network {n}" for n in nets], "flags"], rows)]
    rows = [f"<tr>{_cell(s['name'])}{_cell(s['owner'] or 'NONE', '' if s['owner'] else 'bad')}"
            f"{_cell(s['epoch'])}{_cell(' '.join(s['ips']))}{_cell(' '.join(s['profiles']))}"
            "</tr>" for s in status["slots"]]
    parts += ["<h2>Slots</h2>", _table(["slot", "master", "epoch", "floating IPs",
                                        "profiles"], rows)]
    rows = [f"<tr>{_cell(n['name'])}{_cell(n['sent'])}"
            f"{_cell(n['send_errors'], 'bad' if n['send_errors'] else '')}"
            f"{_cell(n.get('last_error') or '-')}</tr>" for n in status.get("networks", [])]
    parts += ["<h2>Networks</h2>", _table(["network", "sent", "send errors", "last error"],
                                          rows)]
    found = problems(status)
    parts.append("<h2>Problems</h2>")
    parts.append("<p class=\"ok\">none</p>" if not found else
                 "<ul class=\"problems\">" + "".join(f"<li>{escape(p)}</li>" for p in found)
                 + "</ul>")
    recent = history if history is not None else status.get("events", [])
    rows = [f"<tr>{_cell(_when(e.get('time')))}{_cell(e.get('node', status['node']))}"
            f"{_cell(event_text({k: v for k, v in e.items() if k not in ('node', 'takeover')}))}"
            f"{_cell(e.get('takeover') or '')}</tr>" for e in reversed(recent[-20:])]
    parts += ["<h2>Recent history</h2>", _table(["time", "node", "event", "takeover"], rows)
              if rows else "<p class=\"dim\">nothing yet</p>"]
    return "\n".join(parts)


def _when(t: Any) -> str:
    if not isinstance(t, (int, float)):
        return "?"
    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t * 1000) % 1000:03d}"


def render_page(status: JSON, history: list[JSON] | None = None) -> str:
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>fsha {escape(status['cluster'])}: {escape(status['node'])}</title>"
            f"<style>{STYLE}</style></head><body data-refreshes=\"0\">"
            "<div id=\"age\" class=\"dim\">live</div>"
            f"<div id=\"view\">{render_view(status, history)}</div>"
            f"<script>{SCRIPT % int(REFRESH_S * 1000)}</script></body></html>")


def wants_html(request: Request) -> bool:
    accept = (request.getHeader(b"accept") or b"").decode("latin-1").lower()
    return "text/html" in accept


class PageResource(resource.Resource):
    """``/``: the page for a browser, the status JSON for anything else."""

    isLeaf = True

    def __init__(self, status: Callable[[], JSON], json_resource: resource.Resource,
                 history: Callable[[], list[JSON] | None] = lambda: None) -> None:
        super().__init__()
        self._status = status
        self._json = json_resource
        self._history = history

    def render_GET(self, request: Request) -> bytes:
        if not wants_html(request):
            return self._json.render(request)  # type: ignore[no-any-return]
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return render_page(self._status(), self._history()).encode()


class ViewResource(resource.Resource):
    """``/view``: the page's live part."""

    isLeaf = True

    def __init__(self, status: Callable[[], JSON],
                 history: Callable[[], list[JSON] | None] = lambda: None) -> None:
        super().__init__()
        self._status = status
        self._history = history

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        return render_view(self._status(), self._history()).encode()
