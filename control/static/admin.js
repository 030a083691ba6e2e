// The admin pages: one shell, the tab from the URL, everything through the JSON API; every write
// carries the session's CSRF token (X-CSRF-Token). The server sends this page to admins only.
"use strict";

const state = { csrf: null, me: null, timers: [] };
const $ = (id) => document.getElementById(id);

function errorText(result) {
  return (result.data && result.data.message) || `request failed (${result.status})`;
}

function say(id, text, error = false) {
  const box = $(id);
  box.textContent = text;
  box.classList.toggle("error", error);
}

function when(value) {
  return value ? new Date(value).toLocaleString() : "";
}

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== undefined && value !== null && value !== false) node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.appendChild(typeof child === "string" || typeof child === "number" ? document.createTextNode(String(child)) : child);
  }
  return node;
}

function badge(text, kind) {
  return el("span", { class: `badge ${kind}` }, text);
}

function button(id, label, action, extra = {}) {
  return el("button", { type: "button", id, onclick: action, ...extra }, label);
}

// Replace a table body's rows, or say it is empty; marks when it was loaded (tests wait on it).
// Focus stays on the control it was on (a redrawn row gets its button back by id).
function fill(body, rows, columns, emptyText) {
  const focused = body.contains(document.activeElement) ? document.activeElement.id : null;
  body.replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: String(columns), class: "empty" }, emptyText))]));
  if (focused && $(focused)) $(focused).focus();
  body.dataset.loaded = String(Date.now());
}

function pct(ratio) {
  return ratio === null || ratio === undefined ? "–" : `${(ratio * 100).toFixed(1)} %`;
}

function duration(ms) {
  if (ms === null || ms === undefined) return "?";
  const s = Math.floor(ms / 1000);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  return (h ? `${h}:${String(m).padStart(2, "0")}` : `${m}`) + `:${String(sec).padStart(2, "0")}`;
}

function every(ms, fn) {
  state.timers.push(setInterval(() => { if (!document.hidden) fn(); }, ms));
}

// --- overview --------------------------------------------------------------------------------------

async function loadToday() {
  const [usage, perf] = await Promise.all([api("GET", "/api/admin/stats/usage?days=1"),
                                           api("GET", "/api/admin/stats/performance?hours=24")]);
  if (usage.ok) {
    $("today-requests").textContent = String(usage.data.requests);
    $("today-errors").textContent = String(usage.data.errors);
    $("today-limited").textContent = String(usage.data.rate_limited);
  }
  if (perf.ok) $("today-hit-ratio").textContent = pct(perf.data.cache.hit_ratio);
  $("today-requests").dataset.loaded = String(Date.now());
}

async function loadActivity() {
  const result = await api("GET", "/api/admin/activity");
  if (!result.ok) { say("page-message", errorText(result), true); return; }
  const rows = result.data.plays.map((play) => {
    const progress = play.duration_ms ? Math.min(100, Math.round(100 * (play.position_ms || 0) / play.duration_ms)) : null;
    return el("tr", { id: `play-${play.play_id}` },
      el("td", { class: "play-user" }, play.username),
      el("td", { class: "play-title" }, play.title),
      el("td", {}, badge(play.state, play.state === "playing" ? "ok" : "warn")),
      el("td", { class: "play-progress" },
        progress === null ? "?" : el("progress", { max: "100", value: String(progress),
                                                   "aria-label": `${progress} percent` }),
        ` ${duration(play.position_ms)} / ${duration(play.duration_ms)}`),
      el("td", { class: "play-delivery" }, play.delivery || "unknown"),
      el("td", { class: "play-client" }, play.client || ""));
  });
  fill($("activity-table"), rows, 6, "Nothing is playing.");
  // Announced only when the count changes (not the table every 3 s).
  const summary = `${rows.length} playing now.`;
  if ($("activity-summary").textContent !== summary) $("activity-summary").textContent = summary;
}

function healthRow(id, what, ok, detail, neutral = false) {
  return el("tr", { id: `health-${id}` },
    el("th", { scope: "row" }, what),
    el("td", { class: "health-status" }, neutral ? badge("info", "info") : badge(ok ? "ok" : "failing", ok ? "ok" : "bad")),
    el("td", {}, detail || ""));
}

async function loadHealth() {
  const [health, setup, services] = await Promise.all([api("GET", "/health"), api("GET", "/api/setup"),
                                                       api("GET", "/api/admin/services")]);
  const rows = [];
  if (health.data) {
    const db = health.data.db;
    rows.push(healthRow("database", "Database (SQLite)", db.ok,
      db.ok ? `schema ${db.schema_version}, ${db.latency_ms} ms` : db.error));
  }
  if (setup.ok) {
    for (const [name, check] of Object.entries(setup.data.plex || {})) {
      const detail = check.ok ? `${check.url}${check.version ? `, Plex ${check.version}` : ""}`
                              : `${check.url}: ${check.detail || check.error}`;
      rows.push(healthRow(`plex-${name}`, `Plex server (${name})`, check.ok, detail));
    }
    rows.push(healthRow("tmdb", "TMDB", setup.data.tmdb.ok, setup.data.tmdb.detail));
    rows.push(healthRow("trakt", "Trakt", setup.data.trakt.ok, setup.data.trakt.detail));
    rows.push(healthRow("ca", "Proxy CA certificate", setup.data.ca.ready,
      setup.data.ca.ready ? `SHA-256 ${setup.data.ca.sha256}` : "not created yet: start the proxy once"));
    for (const player of setup.data.player_urls || []) {
      rows.push(healthRow(`player-url-${player.upstream}`, `Player's Plex URL (${player.upstream})`, true, player.url, true));
    }
    $("health-problem").hidden = !setup.data.rules_problem;
    $("health-problem").textContent = setup.data.rules_problem || "";
  }
  if (services.ok) {
    for (const [i, service] of services.data.services.entries()) {
      rows.push(healthRow(`service-${i}`, service.name[0].toUpperCase() + service.name.slice(1), service.ok,
        service.ok ? `${service.address} accepts connections (${service.latency_ms} ms)`
                   : `${service.address}: ${service.error}`));
    }
  }
  fill($("health-table"), rows, 3, "No checks answered.");
}

async function showOverview() {
  await Promise.all([loadToday(), loadActivity(), loadHealth()]);
  every(3000, loadActivity);
  every(30000, () => { loadToday(); loadHealth(); });
}

// --- users -----------------------------------------------------------------------------------------

async function loadUsers() {
  const result = await api("GET", "/api/admin/users");
  if (!result.ok) { say("users-message", errorText(result), true); return; }
  const rows = result.data.users.map((user) => {
    const self = state.me && user.id === state.me.id;
    return el("tr", { id: `user-${user.id}` },
      el("th", { scope: "row", class: "user-name" }, user.username),
      el("td", {}, user.is_admin ? badge("admin", "info") : "user"),
      el("td", {}, el("span", { class: `user-status badge ${user.disabled ? "bad" : "ok"}` },
                      user.disabled ? "disabled" : "active")),
      el("td", { class: "num" }, String(user.active_sessions)),
      el("td", {}, when(user.last_seen_at)),
      el("td", {},
        button(`toggle-${user.id}`, user.disabled ? "Enable" : "Disable",
               () => userAction(user, "POST", `/api/admin/users/${user.id}/${user.disabled ? "enable" : "disable"}`),
               { class: user.disabled ? "" : "danger", disabled: self,
                 "aria-label": `${user.disabled ? "Enable" : "Disable"} ${user.username}` }),
        button(`admin-${user.id}`, user.is_admin ? "Remove admin" : "Make admin",
               () => userAction(user, "PUT", `/api/admin/users/${user.id}/admin`, { admin: !user.is_admin }),
               { disabled: self, "aria-label": `${user.is_admin ? "Remove admin from" : "Make admin"} ${user.username}` }),
        button(`sessions-${user.id}`, "Sessions", () => loadSessions(user, true),
               { "aria-label": `Sessions of ${user.username}`, "aria-controls": "sessions-panel" }),
        button(`revoke-${user.id}`, "Sign out everywhere", () => userAction(user, "POST", `/api/admin/users/${user.id}/revoke`),
               { "aria-label": `Sign ${user.username} out everywhere` })));
  });
  fill($("users-table"), rows, 6, "Nobody has signed in yet.");
}

async function userAction(user, method, path, body) {
  const result = await api(method, path, body);
  say("users-message", result.ok
    ? `${result.data.user.username}: done (${result.data.sessions_revoked} session(s) and `
      + `${result.data.surrogates_revoked} player token(s) revoked).`
    : errorText(result), !result.ok);
  await loadUsers();
  if (!$("sessions-panel").hidden && state.sessionsOf === user.id) await loadSessions(user, false);
}

async function loadSessions(user, focus) {
  state.sessionsOf = user.id;
  const result = await api("GET", `/api/admin/users/${user.id}/sessions`);
  $("sessions-panel").hidden = false;
  $("sessions-title").textContent = `Sessions and devices of ${user.username}`;
  if (!result.ok) { say("sessions-message", errorText(result), true); return; }
  $("sessions-summary").textContent = `${result.data.sessions.filter((s) => s.active).length} live session(s) `
    + `in browsers; ${result.data.surrogates} live player token(s).`;
  const rows = result.data.sessions.map((s) => el("tr", { id: `session-${s.id}` },
    el("td", {}, s.user_agent || "unknown"),
    el("td", {}, s.ip || ""),
    el("td", {}, when(s.created_at)),
    el("td", {}, when(s.last_seen_at)),
    el("td", {}, s.active ? badge("active", "ok") : badge(s.revoked_at ? "revoked" : "expired", "warn")),
    el("td", {}, s.active ? button(`revoke-session-${s.id}`, "Revoke", async () => {
      const r = await api("DELETE", `/api/admin/sessions/${s.id}`);
      say("sessions-message", r.ok ? "Session revoked." : errorText(r), !r.ok);
      await loadSessions(user, false);
      await loadUsers();
    }, { "aria-label": `Revoke session ${s.id}` }) : "")));
  fill($("sessions-table"), rows, 6, "No sessions.");
  if (focus) $("sessions-title").focus();
}

const REFUSAL_REASONS = {
  not_shared: "not shared: the Plex server is not shared with the account",
  not_allowed: "not allowed: not in PROJECTIONIST_ALLOWED_USERS",
  disabled: "disabled: an admin disabled the user",
};

async function loadRefusals() {
  const result = await api("GET", "/api/admin/sign-in-refusals?hours=168");
  if (!result.ok) return;
  const rows = result.data.reasons.map((r) => el("tr", { id: `refusal-${r.reason}` },
    el("th", { scope: "row" }, REFUSAL_REASONS[r.reason] || r.reason),
    el("td", { class: "num" }, String(r.refusals)),
    el("td", {}, r.last_hour)));
  fill($("refusals-table"), rows, 3, "No sign-in was refused.");
}

async function showUsers() {
  await Promise.all([loadUsers(), loadRefusals()]);
}

// --- cache -----------------------------------------------------------------------------------------

function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

async function loadCache() {
  const result = await api("GET", `/api/cache/stats?hours=${encodeURIComponent($("cache-hours").value)}`);
  if (!result.ok) { say("cache-message", errorText(result), true); return; }
  $("cache-buckets").textContent = result.data.buckets.map((b) =>
    `${b.bucket}: ${b.hits} hits, ${b.misses} misses, ${b.keys} keys, ${bytes(b.bytes)}`).join(" · ");
  const rows = result.data.routes.map((r) => el("tr", { id: `cache-${r.bucket}-${r.route}` },
    el("th", { scope: "row" }, r.route),
    el("td", {}, r.bucket),
    el("td", { class: "num" }, String(r.hits)),
    el("td", { class: "num" }, String(r.misses)),
    el("td", { class: "num" }, String(r.stale)),
    el("td", { class: "num" }, pct(r.hit_ratio)),
    el("td", { class: "num" }, String(r.keys)),
    el("td", { class: "num" }, bytes(r.bytes)),
    el("td", { class: "num" }, bytes(r.bytes_saved)),
    el("td", { class: "num" }, String(r.evictions)),
    el("td", {}, button(`flush-route-${r.route}`, "Flush route", () => flush("route", r.route),
                        { "aria-label": `Flush every entry of route ${r.route}` }))));
  fill($("cache-table"), rows, 11, "Nothing cached or served from the cache in this window.");
}

async function flush(target, value) {
  const result = await api("POST", "/api/cache/flush", { target, value });
  say("cache-message", result.ok ? `Flush #${result.data.id} of ${target === "url" ? "the URL" : `${target} ${value}`} queued: `
    + "the proxy applies it within a second." : errorText(result), !result.ok);
  if (result.ok && target === "url") $("flush-url").value = "";
  $("cache-message").dataset.flushId = result.ok ? String(result.data.id) : "";
  setTimeout(loadCache, 1500);
}

async function showCache() {
  $("flush-url-button").addEventListener("click", () => {
    const url = $("flush-url").value.trim();
    if (!url) { say("cache-message", "Type the URL first.", true); $("flush-url").focus(); return; }
    flush("url", url);
  });
  $("cache-refresh").addEventListener("click", loadCache);
  $("cache-hours").addEventListener("change", loadCache);
  await loadCache();
}

// --- limits ----------------------------------------------------------------------------------------

function rate(perSecond) {
  if (perSecond >= 1) return `${Number(perSecond.toFixed(2))}/s`;
  if (perSecond * 60 >= 1) return `${Number((perSecond * 60).toFixed(2))}/min`;
  return `${Number((perSecond * 3600).toFixed(2))}/h`;
}

async function loadLimits() {
  const result = await api("GET", `/api/admin/limits?hours=${encodeURIComponent($("limits-hours").value)}`);
  if (!result.ok) { say("page-message", errorText(result), true); return; }
  $("limits-problem").hidden = !result.data.rules_problem;
  $("limits-problem").textContent = result.data.rules_problem ? `rules.yaml was not applied:\n${result.data.rules_problem}` : "";
  const rows = result.data.limits.map((l) => {
    const perMinute = l.rate_per_second * 60;
    const busy = l.forwarded_last_minute >= perMinute;
    return el("tr", { id: `limit-${l.name}` },
      el("th", { scope: "row" }, l.name),
      el("td", {}, rate(l.rate_per_second)),
      el("td", { class: "num" }, String(l.burst)),
      el("td", {}, l.per + (l.when_credential !== "any" ? ` (${l.when_credential} key)` : "")),
      el("td", { class: "num" }, `${l.max_wait_seconds} s`),
      el("td", {}, [...l.upstreams, ...l.routes].join(", ")),
      el("td", { class: "num", title: `at most ${Math.round(perMinute)} a minute sustained per ${l.per}` },
         String(l.forwarded_last_minute), busy ? " " : null, busy ? badge("at rate", "warn") : null),
      el("td", { class: "num" }, String(l.forwarded)),
      el("td", { class: "num limit-queued" }, String(l.queued)),
      el("td", { class: "num limit-refused" }, l.refused ? badge(String(l.refused), "bad") : "0"),
      el("td", { class: "num" }, String(l.stale)),
      el("td", { class: "num" }, l.waited_ms_max === null ? "" : `${Math.round(l.waited_ms_max)} ms`));
  });
  fill($("limits-table"), rows, 12, "rules.yaml declares no limits.");
  const other = result.data.other.map((o) => el("tr", {},
    el("th", { scope: "row" }, o.rule), el("td", {}, o.outcome), el("td", { class: "num" }, String(o.events))));
  fill($("throttles-table"), other, 3, "None in this window.");
}

async function showLimits() {
  $("limits-refresh").addEventListener("click", loadLimits);
  $("limits-hours").addEventListener("change", loadLimits);
  await loadLimits();
  every(10000, loadLimits);
}

// --- jobs ------------------------------------------------------------------------------------------

function runText(run) {
  return `${run.status} ${when(run.ended_at || run.started_at)}`;
}

async function loadJobs() {
  const result = await api("GET", "/api/jobs");
  if (!result.ok) { say("jobs-message", errorText(result), true); return; }
  const problem = result.data.rules_problem;
  const warnings = result.data.rules_warnings || [];
  $("jobs-problem").hidden = !problem && !warnings.length;
  $("jobs-problem").textContent = [problem ? `rules.yaml was not applied:\n${problem}` : "", ...warnings]
    .filter(Boolean).join("\n");
  const rows = result.data.jobs.map((job) => {
    const last = job.last_run;
    const status = job.running ? "running" : last ? runText(last) : "never";
    const kind = job.running ? "info" : !last ? "warn" : last.status === "ok" ? "ok" : "bad";
    const recent = el("details", { class: "runs" }, el("summary", {}, `${job.recent_runs.length} run(s)`),
      el("ul", { id: `runs-${job.name}` }, ...job.recent_runs.map((run) => el("li", { dataset: { runId: String(run.id) } },
        `#${run.id} ${run.trigger}: ${runText(run)}${run.items !== null ? `, ${run.items} item(s)` : ""}`
        + (run.error ? ` (${run.error})` : "")))));
    return el("tr", { id: `job-${job.name}` },
      el("th", { scope: "row", title: job.summary }, job.name),
      el("td", {}, job.enabled ? job.schedule : "disabled"),
      el("td", {}, when(job.next_run_at)),
      el("td", {}, el("span", { class: `job-status badge ${kind}`, title: last && last.error ? last.error : null }, status)),
      el("td", { class: "num" }, last && last.items !== null ? String(last.items) : ""),
      el("td", {}, recent),
      el("td", {}, button(`run-${job.name}`, "Run now", () => runJob(job.name),
                          { disabled: job.running, "aria-label": `Run ${job.name} now` })));
  });
  fill($("jobs-table"), rows, 7, "No jobs.");
}

async function runJob(name) {
  const result = await api("POST", `/api/jobs/${encodeURIComponent(name)}/run`);
  say("jobs-message", result.ok ? `Started ${name} (run #${result.data.id}).` : errorText(result), !result.ok);
  for (let i = 0; i < 60; i++) {  // follow the run until it ends (two minutes at most)
    await loadJobs();
    const status = document.querySelector(`#job-${CSS.escape(name)} .job-status`);
    if (status && status.textContent !== "running") break;
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

async function showJobs() {
  $("jobs-refresh").addEventListener("click", loadJobs);
  await loadJobs();
}

// --- the shell -------------------------------------------------------------------------------------

const TABS = { overview: showOverview, users: showUsers, cache: showCache, limits: showLimits, jobs: showJobs };

function currentTab() {
  const name = window.location.pathname.replace(/\/+$/, "").split("/")[2] || "overview";
  return name in TABS ? name : "overview";
}

async function start() {
  const session = await api("GET", "/api/auth/session");
  if (!session.ok) { window.location.assign("/admin"); return; }  // signed out meanwhile: the gate explains
  state.csrf = session.data.csrf_token;
  state.me = session.data.user;
  $("admin-name").textContent = session.data.user.username;
  const tab = currentTab();
  for (const link of document.querySelectorAll("nav.tabs a")) {
    if (link.dataset.tab === tab) link.setAttribute("aria-current", "page");
  }
  document.title = `${tab[0].toUpperCase()}${tab.slice(1)} - Projectionist admin`;
  $(`tab-${tab}`).hidden = false;
  await TABS[tab]();
  document.body.dataset.ready = "true";
}

start();
