// The jobs page: polls the API about once a second while the tab is visible and renders the jobs.
// Plain DOM, no framework and no build step; every value from the API goes in as text, never as HTML.

const POLL_MS = 1000;
const PAGE_SIZE = 50;
const RATE_WINDOW_MS = 15000; // ETA from the bytes written over the last 15 s of the current phase
const TOKEN_KEY = "adapter-merge.token";
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);

const $ = (id) => document.getElementById(id);
const state = { jobs: [], total: 0, selected: null, lone: null, timer: null, busy: false, again: false, sticky: false };
const rates = new Map(); // running job id -> {phase, samples: [[ms, bytes_done]], eta: seconds | null}

class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

// ---- API -------------------------------------------------------------------------------------------------

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function request(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...options.headers, ...authHeaders() } });
  if (!response.ok) {
    const problem = await response.json().catch(() => ({}));
    throw new ApiError(response.status, problem);
  }
  return response.status === 204 ? null : response.json();
}

// ---- formatting ------------------------------------------------------------------------------------------

function bytes(n) {
  if (n == null) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i === 0 || n >= 100 ? 0 : 1)} ${units[i]}`;
}

function seconds(s) {
  if (s == null) return "—";
  if (s < 10) return `${s.toFixed(2)} s`;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${String(Math.floor(s % 60)).padStart(2, "0")} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
}

const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
const day = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric" });

function when(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  const today = date.toDateString() === new Date().toDateString();
  return today ? clock.format(date) : `${day.format(date)} ${clock.format(date)}`;
}

function etaText(s) {
  return s < 1 ? "< 1 s" : s < 60 ? `${Math.ceil(s)} s` : seconds(s);
}

const since = (iso) => Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
const shortId = (id) => id.slice(0, 8);

// ---- DOM helpers -----------------------------------------------------------------------------------------

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value == null || value === false) continue;
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key in node) node[key] = value;
    else node.setAttribute(key, value);
  }
  node.append(...children.flat().filter((child) => child != null && child !== false));
  return node;
}

const badge = (text, kind) => el("span", { class: `badge ${kind}` }, text);

function definitions(pairs) {
  const shown = pairs.filter(([, value]) => value != null && value !== "" && value !== "—");
  return el("dl", {}, shown.flatMap(([term, value]) => [el("dt", {}, term), el("dd", {}, value)]));
}

function section(title, ...content) {
  return el("section", { class: "detail-section" }, el("h3", {}, title), ...content);
}

function wideSection(title, ...content) {
  const node = section(title, ...content);
  node.classList.add("wide");
  return node;
}

// ---- progress and ETA ------------------------------------------------------------------------------------

function fraction(job) {
  if (job.status === "succeeded") return 1;
  const { bytes_done: done, bytes_total: total } = job.progress;
  return total > 0 ? Math.min(1, done / total) : 0;
}

function track(jobs) {
  // Called once per poll: the ETA is the bytes left over the rate seen since the phase began (last 15 s).
  const now = performance.now();
  const running = new Set();
  for (const { id, status, progress: { phase, bytes_done: done, bytes_total: total } } of jobs) {
    if (status !== "running") continue;
    running.add(id);
    let rate = rates.get(id);
    if (!rate || rate.phase !== phase) rates.set(id, (rate = { phase, samples: [], eta: null }));
    if (rate.samples.at(-1)?.[1] !== done) rate.samples.push([now, done]);
    while (rate.samples.length > 2 && now - rate.samples[0][0] > RATE_WINDOW_MS) rate.samples.shift();
    const [t0, b0] = rate.samples[0];
    const perMs = (done - b0) / (now - t0);
    rate.eta = perMs > 0 && total > done ? (total - done) / perMs / 1000 : null;
  }
  for (const id of rates.keys()) if (!running.has(id)) rates.delete(id);
}

const PHASES = { downloading: "Downloading", merging: "Merging", publishing: "Publishing" };

function progressView(job) {
  const f = fraction(job);
  const { progress } = job;
  const bar = el("progress", { max: 100, class: `bar ${job.status}`, "aria-label": "progress" }); // no value: indeterminate
  if (job.status !== "running" || progress.bytes_total > 0) bar.value = Math.round(f * 1000) / 10;
  const remaining = rates.get(job.id)?.eta;
  let label = job.status === "running" ? PHASES[progress.phase] ?? progress.phase : "";
  let detail;
  if (job.status === "queued") detail = "waiting for a worker";
  else if (job.status === "running" && progress.phase === "queued") { label = "Starting"; detail = "loading the engine, planning"; }
  else if (job.status === "succeeded") { label = "Done"; detail = bytes(job.metrics.bytes_written ?? progress.bytes_total); }
  else if (job.status === "failed") { label = "Failed"; detail = job.error?.title ?? ""; }
  else if (job.status === "cancelled") { label = "Cancelled"; detail = progress.bytes_done ? `at ${bytes(progress.bytes_done)}` : ""; }
  else {
    detail = `${bytes(progress.bytes_done)} / ${bytes(progress.bytes_total)}`;
    if (progress.phase === "merging" && progress.tensors_total) {
      detail += ` · ${progress.tensors_done}/${progress.tensors_total} tensors`;
    }
  }
  return el("div", { class: "progress" },
    el("div", { class: "progress-head" },
      el("span", { class: "phase" }, label),
      el("span", { class: "percent" }, job.status === "queued" ? "" : `${Math.floor(f * 100)}%`)),
    bar,
    el("div", { class: "progress-foot muted" },
      el("span", {}, detail),
      remaining != null ? el("span", { class: "eta" }, `ETA ${etaText(remaining)}`) : null));
}

// ---- the list --------------------------------------------------------------------------------------------

const rows = new Map(); // job id -> {row, cells, detailRow, actionsKey, signature}

function statusView(job) {
  if (job.status === "running" && job.cancel_requested) return badge("cancelling", "cancelled");
  return badge(job.status, job.status);
}

function requestView(job) {
  const { base_model: base, adapters, output_dtype: dtype } = job.request;
  const names = adapters.map((a) => (a.weight === 1 ? a.ref : `${a.ref} ×${a.weight}`));
  return el("div", { class: "request" },
    el("div", { class: "base", title: base }, base),
    el("div", { class: "adapters muted", title: names.join("\n") },
      `+ ${names.slice(0, 2).join(", ")}${names.length > 2 ? ` and ${names.length - 2} more` : ""}`,
      dtype !== "auto" ? el("span", { class: "chip" }, dtype) : null));
}

function timeView(job) {
  if (FINISHED.has(job.status)) {
    const total = job.timings.total ?? (job.finished_at ? (Date.parse(job.finished_at) - Date.parse(job.created_at)) / 1000 : null);
    return el("div", {}, seconds(total), el("div", { class: "muted small" }, `ended ${when(job.finished_at)}`));
  }
  if (job.status === "running" && job.started_at) {
    return el("div", {}, seconds(since(job.started_at)), el("div", { class: "muted small" }, "running"));
  }
  return el("div", {}, seconds(since(job.created_at)), el("div", { class: "muted small" }, "in queue"));
}

function actionsView(job) {
  const buttons = [];
  if (!FINISHED.has(job.status)) {
    buttons.push(el("button", { type: "button", class: "danger", disabled: job.cancel_requested,
      title: "Cancel this job", onclick: () => act(job, "cancel") }, job.cancel_requested ? "Cancelling…" : "Cancel"));
  } else {
    if (job.archive_url) buttons.push(downloadLink(job.archive_url, `${job.id}.tar`, "Download", "button", "The merged model as one tar"));
    buttons.push(el("button", { type: "button", class: "quiet", title: "Delete the job and its files",
      onclick: () => act(job, "delete") }, "Delete"));
  }
  return el("div", { class: "actions" }, buttons);
}

function newRow(job) {
  const cells = [null, "id", null, null, "time", "actions-col"].map((name) => el("td", { class: name }));
  cells[1].append(el("span", { class: "chevron", "aria-hidden": "true" }), el("code", { title: job.id }, shortId(job.id)),
    el("div", { class: "muted small" }, when(job.created_at)));
  cells[2].append(requestView(job));
  const row = el("tr", { class: "job", tabindex: 0, "data-job": job.id }, cells);
  row.addEventListener("click", (event) => { if (!event.target.closest("a, button")) select(job.id); });
  row.addEventListener("keydown", (event) => { if (event.key === "Enter") select(job.id); });
  return { row, cells, detailRow: el("tr", { class: "detail-row" }), actionsKey: "", signature: "" };
}

function renderRow(job) {
  const entry = rows.get(job.id) ?? rows.set(job.id, newRow(job)).get(job.id);
  const [status, , , progress, time, actions] = entry.cells;
  status.replaceChildren(statusView(job));
  progress.replaceChildren(progressView(job));
  time.replaceChildren(timeView(job));
  const actionsKey = `${job.status}|${job.cancel_requested}|${job.archive_url}`;
  if (entry.actionsKey !== actionsKey) { // buttons are only replaced when they change, so no click is lost
    entry.actionsKey = actionsKey;
    actions.replaceChildren(actionsView(job));
  }
  const selected = state.selected === job.id;
  entry.row.classList.toggle("selected", selected);
  entry.row.setAttribute("aria-expanded", String(selected));
  if (!selected) {
    entry.signature = "";
    return [entry.row];
  }
  const signature = JSON.stringify(job);
  if (signature !== entry.signature) { // unchanged details stay as they are (a text selection survives)
    entry.signature = signature;
    entry.detailRow.replaceChildren(el("td", { colSpan: 6 }, detailView(job)));
  }
  return [entry.row, entry.detailRow];
}

function renderList() {
  const body = $("rows");
  const wanted = state.jobs.flatMap(renderRow);
  wanted.forEach((node, i) => { if (body.children[i] !== node) body.insertBefore(node, body.children[i] ?? null); });
  while (body.children.length > wanted.length) body.lastElementChild.remove();
  for (const id of rows.keys()) if (!state.jobs.some((job) => job.id === id)) rows.delete(id);
  $("empty").hidden = state.jobs.length > 0;
  $("count").textContent = state.total > state.jobs.length ? `${state.jobs.length} of ${state.total}` : `${state.total}`;
  const lone = $("detail");
  lone.hidden = !state.lone;
  if (state.lone) lone.replaceChildren(detailView(state.lone));
}

// ---- one job's details -----------------------------------------------------------------------------------

function timingsView(timings) {
  const phases = ["queued", "download", "resolve", "merge", "write", "publish"].filter((p) => timings[p] != null);
  const sum = phases.reduce((acc, p) => acc + timings[p], 0);
  const strip = el("div", { class: "timeline", role: "img", "aria-label": "time per phase" }, phases.map((p) => {
    const part = el("span", { class: `t-${p}`, title: `${p}: ${seconds(timings[p])}` });
    part.style.flexGrow = String(sum > 0 ? timings[p] / sum : 0);
    return part;
  }));
  return [sum > 0 ? strip : null, el("dl", { class: "legend" }, phases.flatMap((p) => [
    el("dt", {}, el("i", { class: `swatch t-${p}` }), p), el("dd", {}, seconds(timings[p]))]),
    timings.total != null ? [el("dt", { class: "total" }, "total"), el("dd", { class: "total" }, seconds(timings.total))] : [])];
}

function metricsView(m) {
  return definitions([
    ["peak memory", m.peak_rss_bytes != null ? bytes(m.peak_rss_bytes) : null],
    ["written", m.bytes_written != null ? bytes(m.bytes_written) : null],
    ["throughput", m.bytes_per_second != null ? `${bytes(m.bytes_per_second)}/s` : null],
    ["tensors merged", m.tensors_merged], ["tensors copied", m.tensors_copied],
    ["downloaded", m.bytes_downloaded != null ? bytes(m.bytes_downloaded) : null],
    ["cache hits", m.cache_hits], ["shared result", m.cache_hit == null ? null : m.cache_hit ? "yes" : "no"],
    ["worker host", m.worker_host],
  ]);
}

function inputsView(job) {
  const weights = [null, ...job.request.adapters.map((a) => a.weight)];
  const remote = job.inputs.some((input) => input.files.length);
  return el("table", { class: "mini" },
    el("thead", {}, el("tr", {}, el("th", {}, ""), el("th", {}, "reference"), el("th", {}, "pinned"),
      remote ? el("th", { class: "num" }, "files") : null)),
    el("tbody", {}, job.inputs.map((input, i) => el("tr", {},
      el("td", { class: "muted" }, i === 0 ? "base" : `adapter ${i}${weights[i] !== 1 ? ` ×${weights[i]}` : ""}`),
      el("td", { class: "wrap" }, el("code", {}, input.ref)),
      el("td", { class: "wrap" }, input.scheme === "file" ? el("span", { class: "muted" }, "local folder")
        : Object.entries(input.version).map(([k, v]) => el("div", {}, el("span", { class: "muted" }, `${k} `), el("code", {}, v)))),
      remote ? el("td", { class: "num" }, input.files.length ? `${input.files.length} · ${bytes(input.files.reduce((s, f) => s + f.size, 0))}` : "—") : null))));
}

function artifactsView(job) {
  return [
    el("table", { class: "mini" },
      el("thead", {}, el("tr", {}, el("th", {}, "file"), el("th", { class: "num" }, "size"), el("th", {}, "sha256"))),
      el("tbody", {}, job.artifacts.map((a) => el("tr", {},
        el("td", { class: "file" }, downloadLink(a.url, a.path.split("/").at(-1), a.path)),
        el("td", { class: "num" }, bytes(a.size)),
        el("td", {}, el("code", { class: "digest" }, a.sha256)))))),
    job.archive_url ? el("p", {}, downloadLink(job.archive_url, `${job.id}.tar`, "Download everything as one tar", "button")) : null,
  ];
}

function safeUrl(url) {
  try { return ["http:", "https:"].includes(new URL(url).protocol) ? url : null; } catch { return null; }
}

function detailView(job) {
  const r = job.request;
  const error = job.error;
  const webhook = job.webhook;
  const published = job.published;
  return el("div", { class: "detail" },
    el("div", { class: "detail-head" }, "Job ", el("code", {}, job.id)),
    section("Job", definitions([
      ["tenant", job.tenant], ["status", statusView(job)],
      ["created", when(job.created_at)], ["started", when(job.started_at)], ["finished", when(job.finished_at)],
      ["attempts", job.attempts], ["worker", job.worker],
      ["request digest", job.request_digest ? el("code", { title: job.request_digest }, `${job.request_digest.slice(0, 16)}…`) : null],
      ["result of", job.reused_from ? el("a", { href: `#job=${job.reused_from}` }, shortId(job.reused_from)) : null],
    ])),
    section("Progress", progressView(job), definitions([
      ["phase", job.progress.phase], ["tensors", `${job.progress.tensors_done} / ${job.progress.tensors_total}`],
      ["bytes", `${bytes(job.progress.bytes_done)} / ${bytes(job.progress.bytes_total)}`],
    ])),
    Object.values(job.timings).some((v) => v != null) ? section("Timings", timingsView(job.timings)) : null,
    Object.values(job.metrics).some((v) => v != null) ? section("Metrics", metricsView(job.metrics)) : null,
    error ? wideSection("Error", el("div", { class: "problem" },
      el("strong", {}, `${error.status ?? ""} ${error.title ?? ""}`), el("p", {}, error.detail ?? ""),
      el("code", { class: "muted" }, error.type ?? ""))) : null,
    wideSection("Request", definitions([
      ["output dtype", r.output_dtype], ["max shard size", r.max_shard_size != null ? bytes(r.max_shard_size) : null],
      ["publish to", r.publish ? `${r.publish.to}${r.publish.alias ? ` (alias ${r.publish.alias})` : ""}` : null],
      ["callback", r.callback_url], ["reuse", r.reuse === false ? "no (forced fresh merge)" : null],
    ]), inputsView(job)),
    job.artifacts.length ? wideSection("Artifacts", artifactsView(job)) : null,
    published ? wideSection("Published", definitions([
      ["target", el("code", {}, published.uri)], ["version", published.version],
      ["link", safeUrl(published.url) ? el("a", { href: published.url, target: "_blank", rel: "noopener" }, published.url) : published.url],
    ])) : null,
    webhook ? wideSection("Webhook", definitions([
      ["state", badge(webhook.state, { pending: "queued", delivered: "succeeded", failed: "failed" }[webhook.state])],
      ["attempts", webhook.attempts], ["last status", webhook.last_status], ["last error", webhook.last_error],
      ["next attempt", webhook.next_attempt_at ? when(webhook.next_attempt_at) : null],
      ["delivered", webhook.delivered_at ? when(webhook.delivered_at) : null], ["webhook id", el("code", {}, webhook.id)],
    ])) : null,
    job.notes.length ? section("Notes", el("ul", {}, job.notes.map((note) => el("li", {}, note)))) : null);
}

// ---- downloads -------------------------------------------------------------------------------------------

function downloadLink(url, filename, text, kind = "", title = null) {
  return el("a", { href: url, download: filename, class: kind, title, onclick: (event) => authedDownload(event, url, filename) }, text);
}

async function authedDownload(event, url, filename) {
  // Without a token the browser streams the file itself; with one, a plain link cannot send the header, so
  // the file comes through fetch (in memory: for multi-GB models use curl, see the README).
  if (!sessionStorage.getItem(TOKEN_KEY)) return;
  event.preventDefault();
  try {
    const response = await fetch(url, { headers: authHeaders() });
    if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => ({})));
    const href = URL.createObjectURL(await response.blob());
    el("a", { href, download: filename }).click();
    setTimeout(() => URL.revokeObjectURL(href), 60000);
  } catch (error) {
    report(error);
  }
}

// ---- actions ---------------------------------------------------------------------------------------------

async function act(job, action) {
  if (action === "delete" && !confirm(`Delete job ${shortId(job.id)} and its files?`)) return;
  try {
    if (action === "cancel") await request(`jobs/${job.id}/cancel`, { method: "POST" });
    else await request(`jobs/${job.id}`, { method: "DELETE" });
    poll();
  } catch (error) {
    report(error);
  }
}

function select(id) {
  state.selected = id === state.selected ? null : id;
  history.replaceState(null, "", state.selected ? `#job=${state.selected}` : location.pathname + location.search);
  poll();
}

function parseAdapters(text) {
  return text.split("\n").map((line) => line.trim()).filter(Boolean).map((line) => {
    const match = line.match(/^(.*\S)\s+(-?\d*\.?\d+(?:e-?\d+)?)$/i);
    return match ? { ref: match[1], weight: Number(match[2]) } : line;
  });
}

async function submitMerge(event) {
  event.preventDefault();
  const form = event.target;
  const status = $("submit-status");
  const body = {
    base_model: form.base_model.value.trim(),
    adapters: parseAdapters(form.adapters.value),
    output_dtype: form.output_dtype.value,
  };
  status.textContent = "checking the inputs…";
  status.className = "form-status";
  try {
    const job = await request("merge", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    status.replaceChildren("queued as ", el("a", { href: `#job=${job.id}` }, shortId(job.id)));
    poll();
  } catch (error) {
    status.textContent = error instanceof ApiError ? `${error.problem.title ?? "Error"} (${error.status}): ${error.message}` : String(error);
    status.className = "form-status error";
    if (error instanceof ApiError && error.status === 401) report(error);
  }
}

// ---- polling, auth and errors ----------------------------------------------------------------------------

function setLive(text, kind) {
  const live = $("live");
  live.textContent = text;
  live.className = `live ${kind}`;
}

const LOGIN_HINT = $("login-reason").textContent; // what the key is for and where it is kept

function showLogin(error) {
  $("login").hidden = false;
  $("login-reason").textContent = sessionStorage.getItem(TOKEN_KEY)
    ? `The key was refused (401): ${error.message}. Paste another one.`
    : LOGIN_HINT;
  $("token").focus();
  setLive("sign-in needed", "off");
}

function report(error) {
  // A refused action (403, 409, ...) stays until closed; "cannot reach the server" clears itself once it can.
  if (error instanceof ApiError && error.status === 401) { showLogin(error); return; }
  const reachable = error instanceof ApiError;
  state.sticky = reachable;
  const what = !reachable ? "The server cannot be reached."
    : error.status === 403 ? "Not allowed (403):" : `${error.problem.title ?? "Error"} (${error.status}):`;
  $("banner").replaceChildren(el("strong", {}, what), ` ${reachable ? error.message : "Retrying…"}`,
    el("button", { type: "button", class: "close", title: "Dismiss", onclick: () => { $("banner").hidden = true; } }, "×"));
  $("banner").hidden = false;
  if (!reachable) setLive("offline", "off");
}

function statusQuery() {
  const wanted = $("filter").value;
  return wanted ? wanted.split(",").map((s) => `&status=${s}`).join("") : "";
}

async function poll() {
  clearTimeout(state.timer);
  if (state.busy) { state.again = true; return; }
  state.busy = true;
  let signedOut = false;
  try {
    const page = await request(`jobs?limit=${PAGE_SIZE}${statusQuery()}`);
    const listed = page.items.some((job) => job.id === state.selected);
    state.lone = state.selected && !listed ? await request(`jobs/${state.selected}`) : null;
    Object.assign(state, { jobs: page.items, total: page.total });
    track([...state.jobs, ...(state.lone ? [state.lone] : [])]);
    $("login").hidden = true;
    $("forget").hidden = !sessionStorage.getItem(TOKEN_KEY);
    if (!state.sticky) $("banner").hidden = true;
    renderList();
    setLive(`live · updated ${clock.format(new Date())}`, "on");
  } catch (error) {
    signedOut = error instanceof ApiError && error.status === 401;
    if (error instanceof ApiError && error.status === 404) select(null); // the job in the address is gone
    else report(error);
  } finally {
    state.busy = false;
    if (state.again) { state.again = false; poll(); }
    else if (!document.hidden && !signedOut) state.timer = setTimeout(poll, POLL_MS);
  }
}

function selectFromHash() {
  const match = location.hash.match(/^#job=([\w-]+)$/);
  state.selected = match ? match[1] : null;
}

function start() {
  selectFromHash();
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    poll();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    state.jobs = [];
    renderList();
    poll();
  });
  $("submit-form").addEventListener("submit", submitMerge);
  $("filter").addEventListener("change", poll);
  window.addEventListener("hashchange", () => { selectFromHash(); poll(); });
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      clearTimeout(state.timer);
      setLive("paused while the tab is hidden", "paused");
    } else {
      poll();
    }
  });
  poll();
}

start();
