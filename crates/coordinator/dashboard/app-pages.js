// The dashboard's overview (with its chart, drawn as inline SVG) and job page. Text from the
// pool is set with textContent only; files are fetched with the Bearer header and handed to the
// browser as blob: URLs (the token is never in a URL).
import { api, showError, actionButton, view, $, SVG } from "./app.js";

function dl(parent, pairs) {
  parent.replaceChildren();
  for (const [k, v] of pairs) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = v === null || v === undefined ? "" : String(v);
    dd.dataset.key = k;
    parent.append(dt, dd);
  }
}

export async function loadOverview() {
  try {
    const o = await api("/v1/overview");
    dl($("ov-nodes"), Object.entries(o.nodes));
    dl($("ov-cpus"), [["used", o.cpus_used], ["total", o.cpus_total]]);
    dl($("ov-jobs"), Object.entries(o.jobs));
    chart($("ov-chart"), o.history);
    showError(null);
  } catch (e) {
    showError(e);
  }
}

function el(name, attrs, text) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = text;
  return e;
}

// Throughput (bars: results accepted per minute) and queue length (line: idle jobs) over the
// last hour, one sample a minute, the current minute last.
function chart(svg, samples) {
  const W = 720, H = 220, L = 40, R = 40, T = 20, B = 30;
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.replaceChildren();
  const end = samples.length ? samples[samples.length - 1].minute_ms : 0;
  const x = (m) => L + ((W - L - R) * (59 - (end - m) / 60000)) / 60;
  const bw = (W - L - R) / 60 - 1;
  const maxDone = Math.max(1, ...samples.map((s) => s.completed));
  const maxQ = Math.max(1, ...samples.map((s) => s.queued));
  const y = (v, max) => H - B - ((H - T - B) * v) / max;
  svg.append(el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }));
  for (const s of samples) {
    svg.append(el("rect", { x: x(s.minute_ms), y: y(s.completed, maxDone), width: bw, height: H - B - y(s.completed, maxDone), class: "done" }));
  }
  const pts = samples.map((s) => `${x(s.minute_ms) + bw / 2},${y(s.queued, maxQ)}`).join(" ");
  if (samples.length) svg.append(el("polyline", { points: pts, class: "queue" }));
  svg.append(el("text", { x: 4, y: T, class: "label done-label" }, `${maxDone}/min`));
  svg.append(el("text", { x: W - R + 4, y: T, class: "label queue-label" }, `${maxQ} idle`));
  svg.append(el("text", { x: L, y: H - 8, class: "label" }, "60 min ago"));
  svg.append(el("text", { x: W - R - 30, y: H - 8, class: "label" }, "now"));
  const last = samples[samples.length - 1] || { completed: 0, queued: 0 };
  $("ov-legend").textContent = `bars: jobs finished per minute (this minute: ${last.completed}); line: idle jobs (now: ${last.queued})`;
}

export function openJobWith(v, id, showTab) {
  v.job = id;
  showTab("job");
}

function fmtTime(ms) {
  return ms ? new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC") : "";
}

// A blob, or with `range` (a Range header's value) the part of it asked for (none: 416).
async function blob(hash, range) {
  const headers = { Authorization: `Bearer ${sessionStorage.getItem("vmgrid-token")}` };
  if (range) headers.Range = range;
  const resp = await fetch(`/v1/blobs/${hash}`, { headers, cache: "no-store" });
  if (range && resp.status === 416) return new Blob([]);
  if (!resp.ok) throw new Error(`blob ${hash}: ${resp.status}`);
  return resp.blob();
}

// Text from the end of a longer text: a cut may fall inside a character, so the bytes that
// continue one (0b10xxxxxx) at the start are dropped before decoding.
async function tailText(part) {
  const bytes = new Uint8Array(await part.arrayBuffer());
  let from = 0;
  while (from < 3 && from < bytes.length && (bytes[from] & 0xc0) === 0x80) from++;
  return new TextDecoder().decode(bytes.subarray(from));
}

const TAIL = 8192;
// Blobs never change: the tails read, by hash (a few), so an update of the page reads none again.
const tails = new Map();

async function tail(pre, file, dropped) {
  if (!file) { pre.textContent = "(none)"; return; }
  // Short output comes inline with the job; of longer output, only the last 8 KiB are read.
  let text = file.inline;
  if (text == null) {
    if (!tails.has(file.blob)) {
      const part = await tailText(await blob(file.blob, `bytes=-${TAIL}`));
      if (tails.size >= 8) tails.delete(tails.keys().next().value);
      tails.set(file.blob, part);
    }
    text = tails.get(file.blob);
  }
  const cut = file.size > TAIL || text.length > TAIL;
  pre.textContent = (dropped || cut ? "…\n" : "") + (text.length > TAIL ? text.slice(-TAIL) : text);
  pre.scrollTop = pre.scrollHeight; // the end of the output in view

}

function download(li, f) {
  const b = document.createElement("button");
  b.textContent = `${f.path} (${f.size} bytes)`;
  b.className = "download";
  b.addEventListener("click", async () => {
    try {
      const url = URL.createObjectURL(await blob(f.blob));
      const a = document.createElement("a");
      a.href = url;
      a.download = f.path.split("/").pop();
      a.click();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (e) {
      showError(e);
    }
  });
  li.appendChild(b);
}

// The job as submitted: what its job file said, its files by path and size.
function jobFile(s) {
  if (!s) {
    dl($("job-file"), [["spec", "could not be read back"]]);
    return;
  }
  const file = (f) => (f ? `${f.path} (${f.size} bytes)` : null);
  const list = (xs) => (xs && xs.length ? xs.join(" ") : null);
  const pairs = [["image", file(s.image)], ["args", list(s.args)],
    ["env", list(Object.entries(s.env || {}).map(([k, v]) => `${k}=${v}`))],
    ["kernel", file(s.kernel)], ["initrd", file(s.initrd)], ["append", s.append], ["network", s.network],
    ["cpus", s.cpus], ["memory", `${s.memory_mb} MiB`], ["disk", `${s.disk_mb} MiB`], ["time limit", `${s.timeout_s} s`],
    ["inputs", list((s.inputs || []).map(file))], ["outputs", list(s.outputs)], ["requirements", s.requirements],
    ["rank", s.rank], ["retries", s.max_retries], ["priority", s.priority]];
  dl($("job-file"), pairs.filter(([, v]) => v !== null && v !== undefined && v !== ""));
}

// Each attempt of the job: where it ran and how it ended (the pool keeps the latest ones).
function attempts(history) {
  const body = $("job-attempts").tBodies[0];
  body.replaceChildren();
  for (const a of history) {
    const tr = body.insertRow();
    const from = a.resumed_from == null ? "" : `resumed from checkpoint ${a.resumed_from}; `;
    for (const v of [a.attempt, a.node, fmtTime(a.started_ms), a.ended_ms == null ? "" : fmtTime(a.ended_ms), from + a.outcome]) {
      tr.insertCell().textContent = v == null ? "" : String(v);
    }
    tr.dataset.outcome = a.outcome;
  }
  if (!history.length) body.insertRow().insertCell().textContent = "not run yet";
}

export async function loadJob() {
  if (view.job === null) return;
  try {
    const r = await api(`/v1/jobs/${view.job}`);
    const j = r.job;
    $("job-title").textContent = `Job ${j.id}: ${j.name}`;
    $("job-title").dataset.state = j.state;
    dl($("job-spec"), [["owner", j.owner], ["state", j.state], ["vm type", j.vm_type], ["index", j.index],
      ["node", j.node], ["attempts", j.attempts], ["reason", j.reason], ["exit code", j.exit_code],
      ["submitted", fmtTime(j.submitted_ms)], ["started", fmtTime(j.started_ms)], ["finished", fmtTime(j.finished_ms)],
      ["checkpoint", r.checkpoint ? `${r.checkpoint.seq} (after ${r.checkpoint.guest_s.toFixed(1)} s of the guest's run)` : null]]);
    attempts(r.history || []);
    jobFile(r.spec);
    const acts = $("job-actions");
    acts.replaceChildren();
    if (j.state === "idle" || j.state === "running") actionButton(acts, j, "hold");
    if (j.state === "running" && r.spec && r.spec.checkpoint_s != null) actionButton(acts, j, "vacate");
    if (j.state === "held") actionButton(acts, j, "release");
    if (!["completed", "removed"].includes(j.state)) actionButton(acts, j, "rm");
    await tail($("job-stdout"), r.stdout, r.stdout_dropped);
    await tail($("job-stderr"), r.stderr, r.stderr_dropped);
    const outs = $("job-outputs");
    outs.replaceChildren();
    for (const f of r.outputs) {
      const li = document.createElement("li");
      download(li, f);
      outs.appendChild(li);
    }
    if (!r.outputs.length) {
      const li = document.createElement("li");
      li.textContent = "none";
      outs.appendChild(li);
    }
    showError(null);
  } catch (e) {
    showError(e);
  }
}
