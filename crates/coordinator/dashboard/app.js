// The vmgrid dashboard. The token lives in sessionStorage and travels only in the Authorization
// header of fetch() calls to this pool's API; it is never put in a URL. Everything shown comes
// from the API under the token's own role checks. Text from the pool is set with textContent
// only (never as HTML).

const KEY = "vmgrid-token";
const $ = (id) => document.getElementById(id);

const view = {
  tab: "jobs",
  cursors: [0], // `after` of each page seen; the last is the current page's
  next: null,
  jobs: [],
  sort: { key: "id", dir: 1 },
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
  await refresh();
}

function signOut() {
  sessionStorage.removeItem(KEY);
  $("app").hidden = true;
  $("signout").hidden = true;
  $("signin").hidden = false;
  $("who").textContent = "";
}

function sortedJobs() {
  const owner = $("f-owner").value.trim().toLowerCase();
  const name = $("f-name").value.trim().toLowerCase();
  const { key, dir } = view.sort;
  return view.jobs
    .filter((j) => (!owner || j.owner.toLowerCase().includes(owner)) && (!name || j.name.toLowerCase().includes(name)))
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
    await loadJobs();
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
    for (const k of ["id", "name", "owner", "state", "node", "exit_code", "attempts", "reason"]) cell(tr, j[k]);
    const td = cell(tr, "");
    if (j.state === "idle" || j.state === "running") actionButton(td, j, "hold");
    if (j.state === "held") actionButton(td, j, "release");
    if (!["completed", "removed"].includes(j.state)) actionButton(td, j, "rm");
    body.appendChild(tr);
  }
  const page = view.cursors.length;
  $("page-info").textContent = `page ${page}, ${view.jobs.length} jobs${view.next === null ? " (last page)" : ""}`;
  $("next").disabled = view.next === null;
}

async function loadJobs() {
  const after = view.cursors[view.cursors.length - 1];
  const q = new URLSearchParams({ after: String(after), limit: $("f-limit").value });
  if ($("f-state").value) q.set("state", $("f-state").value);
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
  if (view.tab === "jobs") await loadJobs();
  if (view.tab === "nodes") await loadNodes();
  if (view.tab === "users") await loadUsers();
}

function showTab(tab) {
  view.tab = tab;
  for (const p of document.querySelectorAll(".pane")) p.hidden = p.id !== `tab-${tab}`;
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
$("f-owner").addEventListener("input", renderJobs);
$("f-name").addEventListener("input", renderJobs);
$("first").addEventListener("click", restart);
$("next").addEventListener("click", () => {
  if (view.next === null) return;
  view.cursors.push(view.next);
  loadJobs();
});
for (const th of document.querySelectorAll("#jobs th[data-key]")) {
  th.addEventListener("click", () => {
    const key = th.dataset.key;
    view.sort = { key, dir: view.sort.key === key ? -view.sort.dir : 1 };
    renderJobs();
  });
}

if (sessionStorage.getItem(KEY)) signIn(sessionStorage.getItem(KEY));
