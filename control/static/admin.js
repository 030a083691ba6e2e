// The admin pages: one shell, the tab from the URL, everything through the JSON API; every write
// carries the session's CSRF token (X-CSRF-Token). The server sends this page to admins only.
"use strict";

const state = { csrf: null, me: null, timers: [] };
const $ = (id) => document.getElementById(id);

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.csrf) headers["X-CSRF-Token"] = state.csrf;
  const response = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  return { status: response.status, ok: response.ok, data };
}

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
function fill(body, rows, columns, emptyText) {
  body.replaceChildren(...(rows.length ? rows
    : [el("tr", {}, el("td", { colspan: String(columns), class: "empty" }, emptyText))]));
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
}

function healthRow(id, what, ok, detail, neutral = false) {
  return el("tr", { id: `health-${id}` },
    el("th", { scope: "row" }, what),
    el("td", { class: "health-status" }, neutral ? badge("info", "info") : badge(ok ? "ok" : "failing", ok ? "ok" : "bad")),
    el("td", {}, detail || ""));
}

async function loadHealth() {
  const [health, setup] = await Promise.all([api("GET", "/health"), api("GET", "/api/setup")]);
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
    rows.push(healthRow("proxy", "Explicit proxy", true, `${setup.data.proxy} (PAC: ${setup.data.pac_url})`, true));
    for (const player of setup.data.player_urls || []) {
      rows.push(healthRow(`listener-${player.upstream}`, `Player URL (${player.upstream})`, true, player.url, true));
    }
    $("health-problem").hidden = !setup.data.rules_problem;
    $("health-problem").textContent = setup.data.rules_problem || "";
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

async function showUsers() {
  await loadUsers();
}

// --- the shell -------------------------------------------------------------------------------------

const TABS = { overview: showOverview, users: showUsers };

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
