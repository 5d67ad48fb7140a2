// The vmgrid dashboard. The token lives in sessionStorage and travels only in the Authorization
// header of fetch() calls to this pool's API; it is never put in a URL. Everything shown comes
// from the API under the token's own role checks. Text from the pool is set with textContent
// only (never as HTML).

import { loadOverview, loadJob, openJobWith } from "./app-pages.js";

const KEY = "vmgrid-token";
const $ = (id) => document.getElementById(id);

const SVG = "http://www.w3.org/2000/svg";
const view = {
  tab: "overview",
  job: null, // the id on the job page
  stream: null, // the AbortController of the event stream
  busy: false, // a refresh is running
  again: false, // a change came in while it ran
  cursors: [0], // `after` of each page seen; the last is the current page's
  next: null,
  jobs: [],
  newest: false, // the pool's order of the list, across pages: by id, newest first or oldest first
  sort: null, // { key, dir }: a column that sorts the page shown; null: the pool's order
};

async function api(path, init = {}) {
  const token = sessionStorage.getItem(KEY);
  const headers = Object.assign({}, init.headers || {}, { Authorization: `Bearer ${token}` });
  if (init.body) headers["Content-Type"] = "application/json";
  const resp = await fetch(path, Object.assign({}, init, { headers, cache: "no-store" }));
  let body = null;
  try { body = await resp.json(); } catch (_) { body = null; }
  if (!resp.ok) {
    const why = body && body.error ? body.error : `${resp.status} ${resp.statusText}`;
    const e = new Error(why);
    e.status = resp.status;
    throw e;
  }
  return body;
}

function size(bytes) {
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) {
    bytes /= 1024;
    i++;
  }
  return `${i === 0 ? bytes : bytes.toFixed(1)} ${units[i]}`;
}

function cell(tr, text) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  tr.appendChild(td);
  return td;
}

function showError(e) {
  $("error").textContent = e ? String(e.message || e) : "";
  if (e && e.status === 401) signOut();
}

async function signIn(token) {
  sessionStorage.setItem(KEY, token);
  try {
    await api("/v1/jobs?limit=1");
  } catch (e) {
    sessionStorage.removeItem(KEY);
    $("signin-error").textContent = e.message;
    return;
  }
  $("signin-error").textContent = "";
  $("signin").hidden = true;
  $("app").hidden = false;
  $("signout").hidden = false;
  follow();
  showTab(view.tab);
}

function signOut() {
  sessionStorage.removeItem(KEY);
  if (view.stream) view.stream.abort();
  view.stream = null;
  $("app").hidden = true;
  $("signout").hidden = true;
  $("signin").hidden = false;
}

// The pool filters by state, owner and name and orders by id (across every page, not only the one
// shown); another column sorts the page shown.
function sortedJobs() {
  if (view.sort === null) return view.jobs;
  const { key, dir } = view.sort;
  return view.jobs
    .slice()
    .sort((a, b) => {
      const x = a[key] ?? "", y = b[key] ?? "";
      return (x < y ? -1 : x > y ? 1 : 0) * dir;
    });
}

function actionButton(td, job, action) {
  const b = document.createElement("button");
  b.textContent = action;
  b.className = `act-${action}`;
  b.addEventListener("click", async () => {
    if (!window.confirm(`${action} job ${job.id} (${job.name})?`)) return;
    try {
      const r = await api("/v1/jobs/actions", { method: "POST", body: JSON.stringify({ action, ids: [job.id] }) });
      if (r.refused.length) showError(new Error(r.refused.map(([id, why]) => `job ${id}: ${why}`).join("; ")));
      else showError(null);
    } catch (e) {
      showError(e);
    }
    await refresh();
  });
  td.appendChild(b);
}

function renderJobs() {
  const body = $("jobs").querySelector("tbody");
  body.replaceChildren();
  for (const j of sortedJobs()) {
    const tr = document.createElement("tr");
    tr.dataset.id = j.id;
    tr.dataset.state = j.state;
    const link = document.createElement("button");
    link.textContent = j.id;
    link.className = "job-link";
    link.addEventListener("click", () => openJob(j.id));
    cell(tr, "").appendChild(link);
    for (const k of ["name", "owner", "state", "node", "exit_code", "attempts", "reason"]) cell(tr, j[k]);
    const td = cell(tr, "");
    if (j.state === "idle" || j.state === "running") actionButton(td, j, "hold");
    if (j.state === "held") actionButton(td, j, "release");
    if (!["completed", "removed"].includes(j.state)) actionButton(td, j, "rm");
    body.appendChild(tr);
  }
  const page = view.cursors.length;
  $("page-info").textContent = `page ${page}, ${view.jobs.length} jobs${view.next === null ? " (last page)" : ""}`;
  $("next").disabled = view.next === null;
  $("prev").disabled = view.cursors.length === 1;
  for (const th of document.querySelectorAll("#jobs th[data-key]")) {
    const key = th.dataset.key;
    if (view.sort === null) th.dataset.sorted = key === "id" ? (view.newest ? "down" : "up") : "";
    else th.dataset.sorted = key === view.sort.key ? (view.sort.dir > 0 ? "up" : "down") : "";
  }
}

async function loadJobs() {
  const after = view.cursors[view.cursors.length - 1];
  const q = new URLSearchParams({ after: String(after), limit: $("f-limit").value });
  if (view.newest) q.set("order", "newest");
  if ($("f-state").value) q.set("state", $("f-state").value);
  if ($("f-owner").value.trim()) q.set("owner", $("f-owner").value.trim());
  if ($("f-name").value.trim()) q.set("name", $("f-name").value.trim());
  try {
    const page = await api(`/v1/jobs?${q}`);
    view.jobs = page.jobs;
    view.next = page.next_after ?? null;
    showError(null);
  } catch (e) {
    showError(e);
  }
  renderJobs();
}

async function loadNodes() {
  const body = $("nodes").querySelector("tbody");
  try {
    const nodes = await api("/v1/nodes");
    body.replaceChildren();
    for (const n of nodes) {
      const tr = document.createElement("tr");
      tr.dataset.state = n.state;
      cell(tr, n.name);
      cell(tr, n.state);
      cell(tr, `${n.free_cpus} / ${n.cpus}`);
      cell(tr, `${n.free_memory_mb} / ${n.memory_mb}`);
      cell(tr, n.vm_types.join(", "));
      cell(tr, Object.entries(n.labels || {}).map(([k, v]) => `${k}=${v}`).join(", "));
      cell(tr, n.running_jobs);
      cell(tr, `${n.reputation.toFixed(2)} (${n.agreements} of ${n.agreements + n.disagreements})`);
      const c = n.cache;
      cell(tr, c ? `${c.blobs} blob${c.blobs === 1 ? "" : "s"}, ${size(c.bytes)} of ${size(c.max_bytes)}` : "");
      body.appendChild(tr);
    }
    showError(null);
  } catch (e) {
    showError(e);
  }
}

async function loadUsers() {
  const body = $("users").querySelector("tbody");
  try {
    const users = await api("/v1/users");
    body.replaceChildren();
    for (const u of users) {
      const tr = document.createElement("tr");
      cell(tr, u.user);
      cell(tr, u.running_jobs);
      cell(tr, u.idle_jobs);
      cell(tr, u.running_cpus);
      cell(tr, u.usage_cpu_s.toFixed(1));
      cell(tr, u.recent_cpus.toFixed(2));
      cell(tr, u.factor);
      cell(tr, u.max_cpus ?? "none");
      cell(tr, u.priority.toFixed(2));
      body.appendChild(tr);
    }
    showError(null);
  } catch (e) {
    showError(e);
  }
}

async function refresh() {
  // One refresh at a time; changes that come in meanwhile cause one more.
  if (view.busy) { view.again = true; return; }
  view.busy = true;
  try {
    do {
      view.again = false;
      if (view.tab === "overview") await loadOverview();
      if (view.tab === "jobs") await loadJobs();
      if (view.tab === "nodes") await loadNodes();
      if (view.tab === "users") await loadUsers();
      if (view.tab === "job") await loadJob();
    } while (view.again);
  } finally {
    view.busy = false;
  }
}

// Live updates: the pool's event stream (`GET /v1/events`, text/event-stream), read with fetch()
// so the token travels in the Authorization header, never in a URL (EventSource cannot send
// it). Each `changed` event is a tick: the page reloads what it shows. No polling loop.
async function follow() {
  if (view.stream) view.stream.abort();
  const ctl = new AbortController();
  view.stream = ctl;
  let wait = 1000;
  while (view.stream === ctl) {
    let why = "";
    try {
      const resp = await fetch("/v1/events", {
        headers: { Authorization: `Bearer ${sessionStorage.getItem(KEY)}`, Accept: "text/event-stream" },
        cache: "no-store",
        signal: ctl.signal,
      });
      if (resp.status === 401) return signOut();
      if (!resp.ok) {
        // Refused (too many streams open, the pool unavailable): say why, then try again.
        why = await resp.json().then((b) => b.error, () => `HTTP ${resp.status}`);
        throw new Error(why);
      }
      wait = 1000;
      $("live").textContent = "live";
      await readEvents(resp.body, (type) => { if (type === "changed") refresh(); });
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    $("live").textContent = why ? `not live: ${why}; retrying` : "reconnecting";
    await new Promise((r) => setTimeout(r, wait)); // a reconnect with backoff, not a poll
    wait = Math.min(wait * 2, 30000);
  }
}

// Parses a text/event-stream body: events are separated by a blank line; `event:` names one.
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += value.replace(/\r\n?/g, "\n");
    let at;
    while ((at = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, at);
      buf = buf.slice(at + 2);
      let type = "message";
      for (const line of block.split("\n")) if (line.startsWith("event:")) type = line.slice(6).trim();
      if (block.split("\n").some((l) => l && !l.startsWith(":"))) onEvent(type);
    }
  }
}

function showTab(tab) {
  view.tab = tab;
  for (const p of document.querySelectorAll(".pane")) p.hidden = p.id !== `tab-${tab}`;
  if (tab !== "job") view.job = null;
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.tab === tab);
  refresh();
}

function restart() {
  view.cursors = [0];
  loadJobs();
}

$("signin-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const t = $("token").value.trim();
  $("token").value = "";
  if (t) signIn(t);
});
$("signout").addEventListener("click", signOut);
$("refresh").addEventListener("click", refresh);
for (const b of document.querySelectorAll(".tab")) b.addEventListener("click", () => showTab(b.dataset.tab));
$("f-state").addEventListener("change", restart);
$("f-limit").addEventListener("change", restart);
// Typing in a filter asks the pool once the typing pauses.
let typing = null;
const filterTyped = () => {
  clearTimeout(typing);
  typing = setTimeout(restart, 250);
};
$("f-owner").addEventListener("input", filterTyped);
$("f-name").addEventListener("input", filterTyped);
$("first").addEventListener("click", restart);
$("next").addEventListener("click", () => {
  if (view.next === null) return;
  view.cursors.push(view.next);
  loadJobs();
});
$("prev").addEventListener("click", () => {
  if (view.cursors.length === 1) return;
  view.cursors.pop();
  loadJobs();
});
for (const th of document.querySelectorAll("#jobs th[data-key]")) {
  th.addEventListener("click", () => {
    const key = th.dataset.key;
    if (key === "id" && view.sort === null) {
      // The id order is the pool's, across pages: reversing it starts again at the first page.
      view.newest = !view.newest;
      restart();
    } else if (key === "id") {
      // Back to the pool's order on the page shown.
      view.sort = null;
      renderJobs();
    } else {
      view.sort = { key, dir: view.sort && view.sort.key === key ? -view.sort.dir : 1 };
      renderJobs();
    }
  });
}

function openJob(id) { openJobWith(view, id, showTab); }
export { api, showError, actionButton, view, $, SVG };

if (sessionStorage.getItem(KEY)) signIn(sessionStorage.getItem(KEY));
