"""Datasette plugin hooks for the dashboard home's live card: "Playing now", refreshed in place.

A chart with `library: live-table` in datasette_metadata.yml names the canned query this plugin
adds (projectionist.live_activity, the same query as the admin UI's overview). datasette-dashboards
draws no such library, so the page's script here does: it fetches the query's rows as the other
charts do (`/<db>.json?sql=NAME`, answered as the canned query by projectionist/dashboard_charts.py)
every `display.refresh_seconds` (5 by default) and writes them with textContent only, since titles
and client names come from upstream answers.
"""

from __future__ import annotations

import json

from datasette import hookimpl

from .dashboard import DASHBOARDS_PLUGIN, DATABASE
from .live_activity import DASHBOARD_QUERIES

LIBRARY = "live-table"
DEFAULT_REFRESH_SECONDS = 5

_SCRIPT = """
(() => {
  const cards = %(cards)s;
  const columns = [["User", r => r.username || "unknown"], ["Title", r => r.title || "unknown"],
    ["State", r => r.state || ""], ["Progress", progress], ["Delivery", r => r.delivery || ""],
    ["Client", r => r.client || ""], ["Last report", r => ago(r.last_seen_at)]];
  function clock(ms) {
    const s = Math.floor(ms / 1000), h = Math.floor(s / 3600), m = Math.floor(s / 60) %% 60, sec = s %% 60;
    const pad = n => String(n).padStart(2, "0");
    return h ? `${h}:${pad(m)}:${pad(sec)}` : `${m}:${pad(sec)}`;
  }
  function progress(r) {
    if (r.position_ms == null) return "";
    return r.duration_ms ? `${clock(r.position_ms)} / ${clock(r.duration_ms)}` : clock(r.position_ms);
  }
  function ago(seconds) {
    return `${Math.max(0, Math.round(Date.now() / 1000 - seconds))} s ago`;
  }
  function draw(el, rows) {
    const table = document.createElement("table");
    table.className = "live-activity";
    const head = table.createTHead().insertRow();
    for (const [name] of columns) {
      const th = document.createElement("th");
      th.scope = "col";
      th.textContent = name;
      head.appendChild(th);
    }
    const body = table.createTBody();
    for (const row of rows) {
      const tr = body.insertRow();
      tr.dataset.playId = row.play_id;
      for (const [, value] of columns) tr.insertCell().textContent = value(row);
    }
    const empty = document.createElement("p");
    empty.className = "live-activity-empty";
    empty.textContent = "Nothing is playing.";
    empty.hidden = rows.length > 0;
    table.hidden = rows.length === 0;
    el.replaceChildren(table, empty);
    el.dataset.refreshedAt = String(Date.now());
  }
  async function refresh(el, card) {
    try {
      const answer = await fetch(card.url, {credentials: "same-origin", headers: {Accept: "application/json"}});
      if (!answer.ok) throw new Error(`HTTP ${answer.status}`);
      draw(el, (await answer.json()).rows || []);
    } catch (error) {
      const p = document.createElement("p");
      p.className = "live-activity-error";
      p.textContent = `Could not load what is playing (${error.message}); trying again.`;
      el.replaceChildren(p);
    }
  }
  for (const card of cards) {
    const el = document.getElementById(`chart-${card.slug}`);
    if (!el) continue;
    el.setAttribute("aria-live", "polite");
    refresh(el, card);
    setInterval(() => refresh(el, card), card.refresh_seconds * 1000);
  }
})();
"""


def live_cards(dashboards: dict, json_url: str) -> list[dict]:
    """The live-table charts of every dashboard: slug, where their rows come from, how often."""
    cards = []
    for dashboard in (dashboards or {}).values():
        for slug, chart in ((dashboard or {}).get("charts") or {}).items():
            if (chart or {}).get("library") == LIBRARY and chart.get("query") in DASHBOARD_QUERIES:
                refresh = ((chart.get("display") or {}).get("refresh_seconds")) or DEFAULT_REFRESH_SECONDS
                cards.append({"slug": slug, "url": f"{json_url}?sql={chart['query']}&_shape=objects",
                              "refresh_seconds": max(1, float(refresh))})
    return cards


@hookimpl
def canned_queries(datasette, database):
    if database == DATABASE:
        return {name: dict(query) for name, query in DASHBOARD_QUERIES.items()}
    return None


@hookimpl
def extra_body_script(template, datasette):
    if template not in ("dashboard_view.html", "dashboard_chart.html"):
        return None
    cards = live_cards(datasette.plugin_config(DASHBOARDS_PLUGIN) or {}, datasette.urls.path(f"/{DATABASE}.json"))
    if not cards:
        return None
    # json.dumps escapes no "</": a value closing the script tag would end it early.
    return _SCRIPT % {"cards": json.dumps(cards).replace("</", "<\\/")}
