// The dashboard end to end, in headless Chromium (Debian's package) driven by playwright-core.
// Run by crates/vmgrid/tests/all/dashboard.rs, which starts the pool and answers this script's
// requests on stdout ("start-node", "kill-node") by doing them and writing "done" on stdin.
// Environment: VMGRID_URL, ALICE, BOB (user tokens), ADMIN, SHOTS (the directory for screenshots).
import { chromium } from "playwright-core";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

const { VMGRID_URL: url, ALICE: alice, BOB: bob, ADMIN: admin, SHOTS: shots } = process.env;
const lines = createInterface({ input: process.stdin })[Symbol.asyncIterator]();

async function ask(what) {
  console.log(what);
  const { value } = await lines.next();
  if (value !== "done") throw new Error(`the test did not do ${what}: ${value}`);
}

function check(cond, what) {
  if (!cond) throw new Error(`failed: ${what}`);
  console.error(`ok: ${what}`);
}

// Waits until `cond` holds without touching the page: the page must update itself, from the
// pool's event stream (there is no polling loop, and this does not click Refresh).
async function until(page, what, cond, ms = 60000) {
  const end = Date.now() + ms;
  for (;;) {
    if (await cond()) return check(true, what);
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}; the jobs: ${JSON.stringify(await states(page))}`);
    await page.waitForTimeout(200);
  }
}

// Waits until `fn` holds in the page (page.waitForFunction evaluates a string: the CSP forbids it).
async function holds(page, fn, arg, ms = 30000) {
  const end = Date.now() + ms;
  while (!(await page.evaluate(fn, arg))) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${fn}`);
    await page.waitForTimeout(100);
  }
}

async function tab(page, name) {
  await page.click(`button[data-tab="${name}"]`);
  await page.waitForSelector(`#tab-${name}:not([hidden])`);
}

const states = (page) => page.$$eval("#jobs tbody tr", (rows) => rows.map((r) => [Number(r.dataset.id), r.dataset.state]));

async function signIn(page, token) {
  await page.goto(url);
  await page.fill("#token", token);
  await page.click("#signin-form button");
  await page.waitForSelector("#app:not([hidden])");
  await page.waitForSelector("#ov-jobs dd"); // the overview opens first
  await tab(page, "jobs");
  await holds(page, () => document.querySelectorAll("#jobs tbody tr").length > 0);
}

// The pool's own CA signs its certificate; this loopback test does not install it in Chromium.
const profile = mkdtempSync(join(tmpdir(), "vmgrid-chromium-"));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
  ignoreHTTPSErrors: true,
  viewport: { width: 1280, height: 720 },
});
try {
  const page = await context.newPage();
  const errors = [];
  page.on("console", (m) => { if (m.type() === "error") errors.push(m.text()); });
  // Every action asks for confirmation; the test answers yes unless it sets `confirming` to false.
  let confirming = true;
  const dialogs = [];
  page.on("dialog", (d) => { dialogs.push(d.message()); return confirming ? d.accept() : d.dismiss(); });
  const urls = [];
  page.on("request", (r) => urls.push(r.url()));
  const since = (n, part) => urls.slice(n).filter((u) => new URL(u).pathname.startsWith(part)).length;

  // A wrong token is refused with the API's reason, and nothing is kept.
  await page.goto(url);
  await page.fill("#token", "not-a-token");
  await page.click("#signin-form button");
  await holds(page, () => document.getElementById("signin-error").textContent.length > 0);
  check((await page.textContent("#signin-error")).includes("not valid"), "a wrong token is refused");
  check(await page.evaluate(() => sessionStorage.length === 0), "a refused token is not kept");
  errors.length = 0; // the browser logs the refused call itself; from here on, none is expected

  // Alice sees her sweep and her spare job (idle: no node yet), not Bob's job.
  await signIn(page, alice);
  let seen = await states(page);
  check(seen.length === 4 && seen.every(([, s]) => s === "idle"), `alice sees her 4 idle jobs: ${JSON.stringify(seen)}`);
  const owners = await page.$$eval("#jobs tbody tr td:nth-child(3)", (tds) => tds.map((t) => t.textContent));
  check(owners.every((o) => o === "alice"), "alice sees no other user's job");

  // She removes the spare one: a dismissed confirmation sends nothing, a confirmed one removes it.
  const spare = Math.max(...seen.map(([id]) => id));
  confirming = false;
  const asked = urls.length;
  await page.click(`#jobs tr[data-id="${spare}"] .act-rm`);
  await page.evaluate(() => true); // runs once the page's script goes on after the dialog
  check(dialogs.at(-1) === `rm job ${spare} (spare)?`, `rm asks first: ${JSON.stringify(dialogs.at(-1))}`);
  check(since(asked, "/v1/jobs/actions") === 0, "a dismissed rm sends nothing");
  check((await states(page)).some(([id, s]) => id === spare && s === "idle"), "a dismissed rm leaves the job idle");
  confirming = true;
  await page.click(`#jobs tr[data-id="${spare}"] .act-rm`);
  await page.waitForSelector(`#jobs tr[data-id="${spare}"][data-state="removed"]`);
  check(true, `job ${spare} removed, once confirmed`);
  const sweep = async () => (await states(page)).filter(([id]) => id !== spare);
  seen = await sweep();

  // Hold one (confirmed), then release it.
  const first = seen[0][0];
  await page.click(`#jobs tr[data-id="${first}"] .act-hold`);
  await page.waitForSelector(`#jobs tr[data-id="${first}"][data-state="held"]`);
  check(true, `job ${first} held`);
  await page.click(`#jobs tr[data-id="${first}"] .act-release`);
  await page.waitForSelector(`#jobs tr[data-id="${first}"][data-state="idle"]`);
  check(true, `job ${first} released`);

  // A node joins: the sweep moves from idle to completed on the page by itself: no reload, no
  // click, one event stream and no polling.
  await page.evaluate(() => { window.stillHere = true; });
  const before = urls.length;
  await ask("start-node");
  await until(page, "a job shows running, live", async () => (await sweep()).some(([, s]) => s === "running"));
  await until(page, "the sweep completed, live", async () => (await sweep()).every(([, s]) => s === "completed"));
  check(await page.evaluate(() => window.stillHere === true), "the page was not reloaded");
  check(since(before, "/v1/events") === 0, "the page kept its one event stream (no new one)");
  const reloads = since(before, "/v1/jobs");
  check(reloads >= 1, `the page reloaded the jobs on events (${reloads} times)`);
  // Once the pool's last changes have settled (on a loaded machine they may take a while), a
  // 3-second window with no request at all: a polling page would ask in every one.
  let quiet = urls.length;
  for (let tries = 0; tries < 5; tries++) {
    quiet = urls.length;
    await page.waitForTimeout(3000);
    if (urls.length === quiet) break;
  }
  check(urls.length === quiet, `no request while the pool is quiet (no polling): ${urls.slice(quiet).join(", ")}`);
  await page.screenshot({ path: join(shots, "dashboard-jobs.png"), fullPage: true });

  // A job's page: its fields, stdout and stderr tails, and an output to download.
  await page.click(`#jobs tr[data-id="${first}"] .job-link`);
  await holds(page, () => document.getElementById("job-stdout").textContent.includes("hello from the sweep"));
  const shown = await page.textContent("#job-stdout");
  check(shown.startsWith("…") && shown.length <= 8194, `the job page shows the job's stdout, its last 8 KiB of 1 MiB (${shown.length} characters)`);
  check((await page.textContent("#job-stderr")).includes("a warning"), "the job page shows its stderr");
  check((await page.textContent('#job-spec dd[data-key="state"]')) === "completed", "the job page shows its state");
  const image = await page.textContent('#job-file dd[data-key="image"]');
  check(/\.wasm \(\d+ bytes\)$/.test(image), `the job page shows the job file: image ${JSON.stringify(image)}`);
  const tries = await page.$$eval("#job-attempts tbody tr", (trs) => trs.map((tr) => [...tr.cells].map((c) => c.textContent)));
  check(tries.length === 1 && tries[0][0] === "1" && tries[0][1].length > 0 && tries[0][4] === "exited with 0",
    `the job page lists its one attempt with its node and outcome: ${JSON.stringify(tries)}`);
  const [download] = await Promise.all([page.waitForEvent("download"), page.click("#job-outputs .download")]);
  const got = readFileSync(await download.path(), "utf8");
  check(got === "forty-two", `the output downloads through a blob: URL (${JSON.stringify(got)})`);
  check(download.url().startsWith("blob:"), "the download URL is a blob: URL, without the token");
  await page.screenshot({ path: join(shots, "dashboard-job.png"), fullPage: true });

  // The overview: nodes, cpus, jobs by state, and the last hour's chart.
  await tab(page, "overview");
  await holds(page, () => Number(document.querySelector('#ov-jobs dd[data-key="completed"]')?.textContent) >= 3);
  check((await page.textContent('#ov-nodes dd[data-key="ready"]')) === "1", "the overview counts one ready node");
  check((await page.textContent('#ov-cpus dd[data-key="total"]')) === "2", "the overview counts the node's 2 cpus");
  check((await page.$$("#ov-chart rect")).length >= 1 && (await page.$("#ov-chart polyline")) !== null, "the chart is drawn");
  await page.screenshot({ path: join(shots, "dashboard-overview.png"), fullPage: true });
  await tab(page, "jobs");

  // Sorting and filters: the pool orders by id and filters across every page.
  const ordered = urls.length;
  await page.click('#jobs th[data-key="id"]');
  await until(page, "a click on id lists newest first", async () => {
    const s = await states(page);
    return s.length > 1 && s[0][0] > s[s.length - 1][0];
  });
  check(urls.slice(ordered).some((u) => u.includes("order=newest")), "the newest-first order is asked of the pool");
  // Pages of two (an option the test adds to the select): next, then previous.
  await page.evaluate(() => {
    const o = document.createElement("option");
    o.textContent = "2";
    document.getElementById("f-limit").appendChild(o);
  });
  await page.selectOption("#f-limit", "2");
  await until(page, "a page of two jobs", async () => (await states(page)).length === 2);
  const page1 = (await states(page)).map(([id]) => id);
  await page.click("#next");
  await until(page, "the next page goes on below the first", async () => {
    const s = await states(page);
    return s.length >= 1 && s.every(([id]) => id < Math.min(...page1));
  });
  await page.click('#jobs th[data-key="state"]');
  check((await page.textContent("#page-info")).startsWith("page 2"), "a click on another column sorts the page shown, on that page");
  await page.click("#prev");
  await until(page, "the previous page is the first again",
    async () => JSON.stringify((await states(page)).map(([id]) => id).sort()) === JSON.stringify(page1.slice().sort()));
  await page.selectOption("#f-limit", "50");
  await page.selectOption("#f-state", "removed");
  await until(page, "the state filter shows only the removed job",
    async () => JSON.stringify(await states(page)) === JSON.stringify([[spare, "removed"]]));
  await page.selectOption("#f-state", "completed");
  await until(page, "the state filter shows only the completed sweep",
    async () => (await states(page)).length === 3 && (await states(page)).every(([, s]) => s === "completed"));
  await page.selectOption("#f-state", "");
  await page.fill("#f-name", "no-such-name");
  await until(page, "the name filter, applied by the pool, hides what does not match", async () => (await states(page)).length === 0);
  await page.fill("#f-name", "");
  await until(page, "without the filter the jobs are back", async () => (await states(page)).length > 0);

  // The token was never in a URL, and the session keeps it across a reload.
  check(urls.every((u) => !u.includes(alice)), "the token is in no URL the page asked for");
  await page.reload();
  await page.waitForSelector("#app:not([hidden])");
  check(true, "a reload stays signed in (sessionStorage)");
  await page.click("#signout");
  check(await page.evaluate(() => sessionStorage.length === 0), "signing out forgets the token");

  // Bob sees only his own job; the admin sees everyone's and the nodes.
  await signIn(page, bob);
  seen = await states(page);
  check(seen.length === 1, `bob sees only his job: ${JSON.stringify(seen)}`);
  check(errors.length === 0, `no console errors while alice used the page (a CSP violation is one): ${errors.join("; ")}`);
  const status = await page.evaluate(async (id) => (await fetch(`/v1/jobs/${id}`, {
    headers: { Authorization: `Bearer ${sessionStorage.getItem("vmgrid-token")}` },
  })).status, first);
  check(status === 404, `bob cannot read alice's job ${first}; to him it does not exist (${status})`);
  errors.length = 0; // the browser logs that refused call itself
  await page.click("#signout");
  await signIn(page, admin);
  check((await states(page)).length === 5, "the admin sees every job");
  await tab(page, "users");
  await holds(page, () => document.querySelectorAll("#users tbody tr").length >= 2);
  const usage = await page.$$eval("#users tbody tr", (trs) => trs.map((tr) => [...tr.cells].map((c) => c.textContent)));
  const row = (u) => usage.find((r) => r[0] === u);
  check(row("alice") && row("bob") && Number(row("alice")[4]) > 0 && Number(row("bob")[4]) > 0,
    `the users tab shows each user's usage (cpu·s): ${JSON.stringify(usage)}`);
  await page.click('button[data-tab="nodes"]');
  await page.waitForSelector('#nodes tbody tr[data-state="ready"]');
  const cache = await page.textContent('#nodes tbody tr[data-state="ready"] td:last-child');
  check(/^[1-9]\d* blobs?, [\d.]+ (bytes|KiB|MiB) of 4.0 GiB$/.test(cache), `the node's cache, as its heartbeat says: ${JSON.stringify(cache)}`);
  await ask("kill-node");
  await until(page, "the killed node shows as lost", async () => (await page.$('#nodes tbody tr[data-state="lost"]')) !== null);
  await page.screenshot({ path: join(shots, "dashboard-nodes.png"), fullPage: true });
  check(errors.length === 0, `no console errors (a CSP violation is one): ${errors.join("; ")}`);
  console.log("passed");
} finally {
  await context.close();
  rmSync(profile, { recursive: true, force: true });
}
process.exit(0); // stdin (the test's answers) stays open
