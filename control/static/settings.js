// The settings page: everything through the JSON API; state-changing calls carry the CSRF token.
"use strict";

const state = { csrf: null, admin: false };
const $ = (id) => document.getElementById(id);

function say(text) {
  const box = $("message");
  box.textContent = text;
  box.hidden = !text;
}

function errorText(result) {
  return (result.data && result.data.message) || `request failed (${result.status})`;
}

async function loadSession() {
  const result = await api("GET", "/api/auth/session");
  if (!result.ok) {
    state.csrf = null;
    $("signed-in").hidden = true;
    $("signed-out").hidden = false;
    return false;
  }
  state.csrf = result.data.csrf_token;
  $("username").textContent = result.data.user.username;
  state.admin = result.data.user.is_admin;
  $("admin-badge").hidden = !state.admin;
  $("admin-link").hidden = !state.admin;
  $("session-expires").textContent = new Date(result.data.session.expires_at).toLocaleString();
  $("signed-out").hidden = true;
  $("signed-in").hidden = false;
  return true;
}

async function loadSettings() {
  const result = await api("GET", "/api/settings");
  if (!result.ok) return;
  const tmdb = result.data.tmdb;
  $("tmdb-status").textContent = tmdb.custom_key ? "your own key" : "the server's key";
  $("tmdb-bearer").textContent = tmdb.bearer;
  $("trakt-status").textContent = result.data.trakt_connected ? "connected" : "not connected";
  // Buttons match the state: nothing to remove or disconnect until there is something.
  $("tmdb-remove").disabled = !tmdb.custom_key;
  $("trakt-disconnect").disabled = !result.data.trakt_connected;
  $("watchlist-sync").value = result.data.watchlist_sync || "off";
  const again = result.data.sign_in_again || [];  // stored tokens the token-health job found revoked
  $("sign-in-again").hidden = again.length === 0;
  $("sign-in-again").textContent = again.length ? `Sign in again to ${again.join(" and ")} in your player: ` +
    "the stored token was revoked." : "";
}

async function loadUsage() {
  const result = await api("GET", "/api/usage?days=30");
  if (!result.ok) return;
  $("usage-total").textContent = String(result.data.requests);
  $("usage-default").textContent = String(result.data.tmdb.default);
  $("usage-custom").textContent = String(result.data.tmdb.custom);
  const body = $("usage-table");
  body.replaceChildren();
  for (const route of result.data.routes) {
    const row = document.createElement("tr");
    for (const value of [route.upstream, route.route, route.requests, route.errors, route.avg_latency_ms ?? ""]) {
      const cell = document.createElement("td");
      cell.textContent = String(value);
      row.appendChild(cell);
    }
    body.appendChild(row);
  }
  body.dataset.loaded = String(Date.now());
}

function when(value) {
  return value ? new Date(value).toLocaleString() : "";
}

async function loadJobs() {
  const section = $("jobs");
  if (!state.admin) { section.hidden = true; return; }
  const result = await api("GET", "/api/jobs");
  if (!result.ok) { $("jobs-message").textContent = errorText(result); return; }
  section.hidden = false;
  const problem = result.data.rules_problem;  // a bad rules.yaml edit: the schedules shown still run
  const warnings = result.data.rules_warnings || [];
  $("jobs-problem").hidden = !problem && !warnings.length;
  $("jobs-problem").textContent = [problem ? `rules.yaml was not applied:\n${problem}` : "", ...warnings]
    .filter(Boolean).join("\n");
  const body = $("jobs-table");
  body.replaceChildren();
  for (const job of result.data.jobs) {
    const row = document.createElement("tr");
    row.id = `job-${job.name}`;
    const last = job.last_run;
    const status = job.running ? "running" : last ? `${last.status} ${when(last.ended_at || last.started_at)}` : "never";
    const cells = [job.name, job.enabled ? job.schedule : "disabled", when(job.next_run_at), status,
                   last && last.items !== null ? String(last.items) : ""];
    for (const value of cells) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.appendChild(cell);
    }
    row.cells[3].className = "job-status";
    if (last && last.error) row.cells[3].title = last.error;
    const action = document.createElement("td");
    const button = document.createElement("button");
    button.type = "button";
    button.id = `run-${job.name}`;
    button.textContent = "Run now";
    button.disabled = job.running;
    button.addEventListener("click", () => runJob(job.name));
    action.appendChild(button);
    row.appendChild(action);
    body.appendChild(row);
  }
  body.dataset.loaded = String(Date.now());
}

async function runJob(name) {
  const result = await api("POST", `/api/jobs/${encodeURIComponent(name)}/run`);
  $("jobs-message").textContent = result.ok ? `Started ${name}.` : errorText(result);
  for (let i = 0; i < 30; i++) {  // follow the run until it ends (a minute at most)
    await loadJobs();
    const row = $(`job-${name}`);
    if (row && !row.cells[3].textContent.startsWith("running")) break;
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
}

async function loadUsers() {
  const section = $("users");
  if (!state.admin) { section.hidden = true; return; }
  const result = await api("GET", "/api/admin/users");
  if (!result.ok) { $("users-message").textContent = errorText(result); return; }
  section.hidden = false;
  const body = $("users-table");
  body.replaceChildren();
  for (const user of result.data.users) {
    const row = document.createElement("tr");
    row.id = `user-${user.id}`;
    const cells = [user.username, user.is_admin ? "admin" : "user", user.disabled ? "disabled" : "active",
                   String(user.active_sessions)];
    for (const value of cells) {
      const cell = document.createElement("td");
      cell.textContent = value;
      row.appendChild(cell);
    }
    row.cells[2].className = "user-status";
    const actions = document.createElement("td");
    const buttons = [
      [`toggle-${user.id}`, user.disabled ? "Enable" : "Disable",
       () => userAction("POST", `/api/admin/users/${user.id}/${user.disabled ? "enable" : "disable"}`)],
      [`admin-${user.id}`, user.is_admin ? "Remove admin" : "Make admin",
       () => userAction("PUT", `/api/admin/users/${user.id}/admin`, { admin: !user.is_admin })],
      [`revoke-${user.id}`, "Sign out everywhere", () => userAction("POST", `/api/admin/users/${user.id}/revoke`)],
    ];
    for (const [id, label, action] of buttons) {
      const button = document.createElement("button");
      button.type = "button";
      button.id = id;
      button.textContent = label;
      button.addEventListener("click", action);
      actions.appendChild(button);
    }
    row.appendChild(actions);
    body.appendChild(row);
  }
  body.dataset.loaded = String(Date.now());
}

async function userAction(method, path, body) {
  const result = await api(method, path, body);
  $("users-message").textContent = result.ok
    ? `${result.data.user.username}: done (${result.data.sessions_revoked} session(s) and `
      + `${result.data.surrogates_revoked} player token(s) revoked).`
    : errorText(result);
  await loadUsers();
}

async function loadRecommendations() {
  const result = await api("GET", "/api/recommendations");
  if (!result.ok) return;
  const list = $("recommendations-list");
  list.replaceChildren();
  for (const item of result.data.items) {
    const entry = document.createElement("li");
    entry.textContent = `${item.title}${item.year ? ` (${item.year})` : ""}, because of ${item.because.join(", ")}`;
    list.appendChild(entry);
  }
  if (!result.data.items.length) {
    const entry = document.createElement("li");
    entry.textContent = "Nothing yet: watch something or add to your watchlist first.";
    list.appendChild(entry);
  }
  list.dataset.loaded = String(Date.now());
}

async function refreshAll() {
  if (await loadSession()) {
    await Promise.all([loadSettings(), loadUsage(), loadJobs(), loadUsers(), loadRecommendations()]);
  }
}

async function login() {
  const result = await api("POST", "/api/auth/plex");
  if (!result.ok) { say(errorText(result)); return; }
  window.location.assign(result.data.auth_url);
}

async function pollLogin(pin) {
  for (let i = 0; i < 60; i++) {
    const result = await api("GET", `/api/auth/plex/${encodeURIComponent(pin)}`);
    if (result.ok && result.data.status === "complete") { say(""); await refreshAll(); return; }
    if (!result.ok) { say(errorText(result)); return; }
    await new Promise((resolve) => setTimeout(resolve, 2000));
  }
  say("Plex did not confirm the sign-in; try again.");
}

async function logout(everywhere) {
  const result = await api("POST", everywhere ? "/api/auth/logout-everywhere" : "/api/auth/logout");
  say(result.ok ? "Signed out." : errorText(result));
  await refreshAll();
}

async function saveTmdbKey() {
  const key = $("tmdb-key-input").value.trim();
  $("tmdb-message").textContent = "Checking the key with TMDB…";
  const result = await api("PUT", "/api/settings/tmdb-key", { key });
  $("tmdb-message").textContent = result.ok ? "Saved: your TMDB calls now use your key." : errorText(result);
  if (result.ok) $("tmdb-key-input").value = "";
  await loadSettings();
}

async function removeTmdbKey() {
  const result = await api("DELETE", "/api/settings/tmdb-key");
  $("tmdb-message").textContent = result.ok ? "Removed: the server's key is used again." : errorText(result);
  await loadSettings();
}

async function importSettings() {
  let parsed;
  try { parsed = JSON.parse($("import-input").value); } catch (e) {
    $("import-message").textContent = "That is not JSON.";
    return;
  }
  const result = await api("POST", "/api/import/local-storage", parsed);
  $("import-message").textContent = result.ok ? "Imported. Copy this back into the player:" : errorText(result);
  $("import-output").value = result.ok ? JSON.stringify(result.data) : "";
  if (result.ok) { $("import-input").value = ""; await loadSettings(); }
}

async function saveWatchlistSync() {
  const mode = $("watchlist-sync").value;
  const result = await api("PUT", "/api/settings", { watchlist_sync: mode });
  $("watchlist-message").textContent = !result.ok ? errorText(result)
    : mode === "off" ? "Saved: your watchlists are left alone."
    : `Saved: ${mode === "on" ? "synced" : "compared (nothing changed)"} by the watchlist-sync job`
      + (result.data.trakt_connected ? "." : " once Trakt is connected.");
  await loadSettings();
}

async function connectTrakt() {
  const start = await api("POST", "/api/trakt/device");
  if (!start.ok) { $("trakt-code").textContent = errorText(start); return; }
  $("trakt-code").textContent = `Go to ${start.data.verification_url} and enter ${start.data.user_code}`;
  const deadline = Date.now() + start.data.expires_in * 1000;
  while (Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, start.data.interval * 1000));
    const poll = await api("POST", "/api/trakt/device/poll");
    if (!poll.ok) { $("trakt-code").textContent = errorText(poll); return; }
    if (poll.data.status === "connected") { $("trakt-code").textContent = "Connected."; break; }
    if (poll.data.status === "denied" || poll.data.status === "expired") {
      $("trakt-code").textContent = `Not connected (${poll.data.status}).`;
      break;
    }
  }
  await loadSettings();
}

async function disconnectTrakt() {
  const result = await api("DELETE", "/api/trakt");
  $("trakt-code").textContent = result.ok ? "Disconnected." : errorText(result);
  await loadSettings();
}

async function start() {
  $("login-button").addEventListener("click", login);
  $("logout-button").addEventListener("click", () => logout(false));
  $("logout-everywhere-button").addEventListener("click", () => logout(true));
  $("tmdb-save").addEventListener("click", saveTmdbKey);
  $("tmdb-remove").addEventListener("click", removeTmdbKey);
  $("usage-refresh").addEventListener("click", loadUsage);
  $("import-button").addEventListener("click", importSettings);
  $("trakt-connect").addEventListener("click", connectTrakt);
  $("trakt-disconnect").addEventListener("click", disconnectTrakt);
  $("jobs-refresh").addEventListener("click", loadJobs);
  $("watchlist-sync").addEventListener("change", saveWatchlistSync);

  const params = new URLSearchParams(window.location.search);
  const outcome = params.get("login");
  const pin = params.get("pin");
  if (outcome) window.history.replaceState(null, "", "/");
  if (outcome === "failed") say("The sign-in could not be completed in this browser; try again.");
  if (outcome === "expired") say("The Plex sign-in expired; try again.");
  await refreshAll();
  if (outcome === "pending" && pin) await pollLogin(pin);
  document.body.dataset.ready = "true";
}

start();
