// The setup page: each step's live check. Steps 1 and 2 are fetches this browser makes to the
// reserved setup host, which only the proxy answers; the rest comes from /api/setup.
"use strict";

const PROBE_TIMEOUT_MS = 6000;
// Over https (PROJECTIONIST_CONTROL_URL behind a TLS front) the plain-http probe is mixed content,
// which the browser blocks: only the https probe can answer there.
const SECURE_PAGE = location.protocol === "https:";

function step(id, state, text) {
  const section = document.getElementById(`step-${id}`);
  section.dataset.state = state;
  const label = {ok: "Done: ", fail: "To do: ", pending: ""}[state];
  document.getElementById(`step-${id}-result`).textContent = label + text;
}

async function probe(url) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), PROBE_TIMEOUT_MS);
  try {
    const response = await fetch(url, {cache: "no-store", signal: controller.signal});
    return response.ok ? await response.json() : null;
  } catch (error) {
    return null;  // not through the proxy, or (HTTPS) the certificate is not trusted
  } finally {
    clearTimeout(timer);
  }
}

function checkProxy(status, answer, secureAnswer) {
  if (answer && answer.proxy === "projectionist") {
    step("proxy", "ok", `this browser reaches ${status.probe.http} through the proxy.`);
    return true;
  }
  if (secureAnswer && secureAnswer.proxy === "projectionist") {  // only the proxy answers it, over https too
    step("proxy", "ok", `this browser reaches ${status.probe.https} through the proxy.`);
    return true;
  }
  if (SECURE_PAGE) {
    step("proxy", "fail", `this page is served over https, where the browser may not fetch the plain-http probe, ` +
         `and ${status.probe.https} did not answer. Open http://${new URL(status.probe.http).host}/ in this ` +
         `browser: if it says "This browser uses the Projectionist proxy", this step is done and step 2 is not. ` +
         `If it does not load, set the PAC URL below as the browser's automatic proxy configuration, then reload ` +
         `this page.`);
    return false;
  }
  step("proxy", "fail", `this browser does not go through the proxy (${status.probe.http} did not answer). ` +
       `Set the PAC URL below as its automatic proxy configuration, then reload this page.`);
  return false;
}

function checkCa(status, viaProxy, answer) {
  if (answer && answer.proxy === "projectionist") {
    if (status.ca.sha256 && answer.ca_sha256 !== status.ca.sha256) {
      step("ca", "fail", "the proxy that answered is not this server's (another CA): check the proxy address.");
      return false;
    }
    step("ca", "ok", "this browser trusts the proxy's certificate.");
    return true;
  }
  if (!viaProxy) {
    step("ca", "fail", "finish step 1 first: this check goes through the proxy.");
  } else if (!status.ca.ready) {
    step("ca", "fail", "the proxy has not created its certificate yet; start it and reload this page.");
  } else {
    step("ca", "fail", `this browser does not trust the proxy's certificate (${status.probe.https} failed). ` +
         "Download projectionist-ca.pem below and trust it as described for your system and browser, " +
         "then restart the browser and reload this page.");
    document.getElementById("ca-instructions").open = true;
  }
  return false;
}

function checkPlex(status) {
  const checks = Object.entries(status.plex);
  if (status.rules_problem && checks.length === 0) {
    step("plex", "fail", `the rules file cannot be used: ${status.rules_problem}`);
    return false;
  }
  if (checks.length === 0) {
    step("plex", "fail", "rules.yaml declares no Plex server: add upstreams.plex with a base_url.");
    return false;
  }
  const failing = checks.filter(([, check]) => !check.ok);
  if (failing.length === 0) {
    step("plex", "ok", checks.map(([name, c]) =>
      `${name}: ${c.url} answers, Plex Media Server ${c.version} (machine ${c.machine_identifier}).`).join(" "));
    return true;
  }
  step("plex", "fail", failing.map(([name, c]) => `${name}: ${c.detail}`).join(" "));
  return false;
}

function checkPlayer(status) {
  const player = status.player_urls[0];
  if (!player) {
    step("player", "fail", "rules.yaml declares no reverse listener: give upstreams.plex a listen port.");
    return false;
  }
  document.getElementById("player-url").value = player.url;
  step("player", "ok", `type ${player.url} as the Plex URL in the player's settings.`);
  return true;
}

function checkKeys(status) {
  if (status.tmdb_bearer) document.getElementById("tmdb-bearer").textContent = status.tmdb_bearer;
  const again = status.sign_in_again || [];  // signed in, and a stored token was found revoked
  document.getElementById("sign-in-again").hidden = again.length === 0;
  document.getElementById("sign-in-again").textContent = again.length ?
    `Sign in again to ${again.join(" and ")} in your player: your stored token was revoked.` : "";
  document.getElementById("tmdb-detail").textContent = status.tmdb.detail;
  document.getElementById("trakt-detail").textContent = status.trakt.detail;
  const problems = [status.tmdb, status.trakt].filter(c => !c.ok).map(c => c.detail);
  if (problems.length === 0) {
    step("keys", "ok", "TMDB accepts the server's key and Trakt's app credentials are set.");
    return true;
  }
  step("keys", "fail", problems.join(" "));
  return false;
}

async function checkAll() {
  document.getElementById("summary").textContent = "Checking…";
  for (const id of ["proxy", "ca", "plex", "player", "keys"]) step(id, "pending", "Checking…");
  let status;
  try {
    const response = await fetch("/api/setup", {cache: "no-store"});
    status = await response.json();
  } catch (error) {
    document.getElementById("summary").textContent = "The control plane did not answer; reload the page.";
    return;
  }
  for (const input of [document.getElementById("pac-url")]) input.value = status.pac_url;
  for (const span of document.querySelectorAll(".pac-url-text")) span.textContent = status.pac_url;
  document.getElementById("proxy-address").textContent = status.proxy;
  document.getElementById("ca-fingerprint").textContent = status.ca.sha256 || "(not created yet)";
  for (const [kind, url] of Object.entries(status.ca.downloads)) {
    const link = document.getElementById(`download-${kind}`);
    if (link) link.href = url;
  }
  const [plain, secure] = await Promise.all([SECURE_PAGE ? null : probe(status.probe.http),
                                             probe(status.probe.https)]);
  const results = [checkProxy(status, plain, secure)];
  results.push(checkCa(status, results[0], secure), checkPlex(status), checkPlayer(status), checkKeys(status));
  const done = results.filter(Boolean).length;
  document.getElementById("summary").textContent = done === results.length
    ? "All five steps are done: open the player."
    : `${done} of ${results.length} steps done; the red ones say what to do.`;
  document.body.dataset.checked = "true";
}

async function copy(button) {
  const input = document.getElementById(button.dataset.copy);
  input.select();
  try {
    await navigator.clipboard.writeText(input.value);
  } catch (error) {
    document.execCommand("copy");  // plain-HTTP origins have no clipboard API
  }
  button.textContent = "Copied";
  setTimeout(() => { button.textContent = "Copy"; }, 2000);
}

document.addEventListener("DOMContentLoaded", () => {
  for (const button of document.querySelectorAll("button.copy")) button.addEventListener("click", () => copy(button));
  document.getElementById("recheck").addEventListener("click", () => {
    document.body.dataset.checked = "";
    checkAll();
  });
  checkAll();
});
