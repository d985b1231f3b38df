// The operator dashboard: a small single-page client of the runtime's REST API, served
// by bloom-api at /ui. Pages are hash routes; every value from the API is inserted as
// text (never as HTML). The API key, when the runtime has one, is asked for once and
// kept in this tab's sessionStorage.

const KEY = "bloom.apiKey";
// Live pages make at most 5 calls per poll: 60 a minute, within the API's default
// rate limit of 100 per client and minute.
const POLL_MS = 5000;
const main = document.getElementById("main");
const live = document.getElementById("live");
let timer = null;
let route = 0; // bumps on each navigation: a stale page's late answer is dropped

// ---- DOM ---------------------------------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function iso(ms) {
  return ms === null || ms === undefined ? "" : new Date(ms).toISOString().replace(".000Z", "Z");
}

function usd(x) {
  return x === null || x === undefined ? "" : "$" + Number(x).toFixed(4).replace(/0+$/, "").replace(/\.$/, "");
}

function status(s) {
  return h("span", { class: `status ${s}` }, s);
}

function table(columns, rows, empty = "Nothing here.") {
  if (!rows.length) return h("p", { class: "muted" }, empty);
  return h("table", {},
    h("thead", {}, h("tr", {}, columns.map(([title, , num]) => h("th", { scope: "col", class: num ? "num" : null }, title)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, columns.map(([, cell, num]) => h("td", { class: num ? "num" : null }, cell(r)))))));
}

function render(...nodes) {
  main.replaceChildren(...nodes.flat().filter((n) => n !== null && n !== undefined && n !== false));
}

// ---- API ---------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  const key = sessionStorage.getItem(KEY);
  if (key) headers["X-Runtime-Api-Key"] = key;
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { ...options, headers, body: options.body === undefined ? undefined : JSON.stringify(options.body) });
  if (res.status === 401) {
    await signIn(key ? "That key was refused." : "");
    return api(path, options);
  }
  const text = await res.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch { body = text; }
  if (!res.ok) throw new ApiError(res.status, (body && body.error) || `HTTP ${res.status}`);
  return { body, next: res.headers.get("X-Next-Cursor") };
}

let pendingSignIn = null;
function signIn(message) {
  if (pendingSignIn) return pendingSignIn;
  const dialog = document.getElementById("login");
  const form = document.getElementById("login-form");
  document.getElementById("login-error").textContent = message;
  pendingSignIn = new Promise((resolve) => {
    form.onsubmit = (e) => {
      e.preventDefault();
      sessionStorage.setItem(KEY, document.getElementById("login-key").value);
      dialog.close();
      pendingSignIn = null;
      resolve();
    };
  });
  if (!dialog.open) dialog.showModal();
  document.getElementById("login-key").focus();
  return pendingSignIn;
}

// ---- pages -------------------------------------------------------------------------

const samples = []; // (time, queued, running) samples of this tab, for the sparkline

function spark(samples, pick, label) {
  const w = 360, hgt = 60;
  const values = samples.map(pick);
  const max = Math.max(1, ...values);
  const points = values.map((v, i) => `${(i / Math.max(1, values.length - 1)) * w},${hgt - (v / max) * (hgt - 4) - 2}`).join(" ");
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", w);
  svg.setAttribute("height", hgt);
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `${label}: now ${values.at(-1) ?? 0}, at most ${max}`);
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points);
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#0b5cad");
  line.setAttribute("stroke-width", "2");
  svg.append(line);
  if (values.length === 1) {
    const dot = document.createElementNS("http://www.w3.org/2000/svg", "circle");
    dot.setAttribute("cx", w - 4);
    dot.setAttribute("cy", hgt - (values[0] / max) * (hgt - 4) - 2);
    dot.setAttribute("r", 3);
    dot.setAttribute("fill", "#0b5cad");
    svg.append(dot);
  }
  return h("figure", {}, svg, h("figcaption", { class: "muted" }, `${label} (this tab, every ${POLL_MS / 1000} s)`));
}

// A line chart of the last minutes: `series` is [label, pick, colour] per line.
function chart(title, minutes, series, unit) {
  const w = 560, hgt = 150, left = 48, bottom = 20;
  const values = series.flatMap(([, pick]) => minutes.map(pick).filter((v) => v !== null && v !== undefined));
  const max = Math.max(1, ...values);
  const x = (i) => left + (i / Math.max(1, minutes.length - 1)) * (w - left - 6);
  const y = (v) => hgt - bottom - (v / max) * (hgt - bottom - 8);
  const ns = "http://www.w3.org/2000/svg";
  const el = (tag, attrs, text) => {
    const e = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const svg = el("svg", { class: "chart", width: w, height: hgt, role: "img",
    "aria-label": `${title} (${unit}): ${series.map(([l, pick]) => {
      const vs = minutes.map(pick).filter((v) => v !== null && v !== undefined);
      return `${l} peak ${Math.round(Math.max(0, ...vs))}, latest ${Math.round(vs.at(-1) ?? 0)}`;
    }).join("; ")}` });
  svg.append(el("line", { x1: left, y1: y(0), x2: w, y2: y(0), stroke: "#d0d7de" }));
  svg.append(el("text", { x: left - 4, y: y(max) + 4, "text-anchor": "end", "font-size": 11 }, Math.round(max)));
  svg.append(el("text", { x: left - 4, y: y(0) + 4, "text-anchor": "end", "font-size": 11 }, "0"));
  svg.append(el("text", { x: left, y: hgt - 4, "font-size": 11 }, `${minutes.length} min ago`));
  svg.append(el("text", { x: w - 4, y: hgt - 4, "text-anchor": "end", "font-size": 11 }, "now"));
  for (const [, pick, colour] of series) {
    const pts = minutes.map((m, i) => [i, pick(m)]).filter(([, v]) => v !== null && v !== undefined);
    svg.append(el("polyline", { points: pts.map(([i, v]) => `${x(i)},${y(v)}`).join(" "), fill: "none", stroke: colour, "stroke-width": 2 }));
    // Minutes with something to show are marked, so a single one is seen too.
    for (const [i, v] of pts) if (v > 0) svg.append(el("circle", { cx: x(i), cy: y(v), r: 2.5, fill: colour }));
  }
  const legend = h("div", { class: "legend" }, series.map(([l, , colour]) => h("span", {}, h("i", { class: "swatch", "data-colour": colour }), l)));
  for (const sw of legend.querySelectorAll(".swatch")) sw.style.background = sw.dataset.colour;
  return h("figure", { class: "panel" }, h("figcaption", {}, `${title} (${unit})`), svg, legend);
}

// What this API process reaches, and the membridge agent sync the reconcilers run.
function connections(health) {
  const mb = health.membridge || {};
  const sync = mb.sync || {};
  const state = (ok) => h("span", { class: `status ${ok ? "completed" : "failed"}` }, ok ? "connected" : "disconnected");
  return h("dl", { class: "kv", id: "connections" }, [
    ["Postgres", state(health.database?.connected)],
    ["NATS", state(health.nats?.connected)],
    // The health's `membridge` object keeps the original's camelCase keys.
    ["Membridge", mb.status === "unknown" ? "not called yet" : h("span", {}, state(mb.connected), " ", mb.lastError || "")],
    ["Agent sync (reconcilers)", sync.lastRun
      ? `${sync.ok ? `${sync.agents} agents` : `failing: ${sync.error || "unknown error"}`}, last run ${iso(sync.lastRun)}`
      : "not run yet"],
  ].flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

const COUNT_LIMIT = 10000;

async function overview(r) {
  const [{ body: stats }, { body: holds }, { body: limits }, { body: budgets }, { body: activity }, { body: health }] = await Promise.all([
    api(`/api/runtime/stats?count_limit=${COUNT_LIMIT}`), api("/api/runtime/holds"), api("/api/runtime/concurrency-limits"), api("/api/runtime/budgets"),
    api("/api/runtime/activity?minutes=60"), api("/api/runtime/health"),
  ]);
  if (r !== route) return;
  const by = stats.tasks.by_status || {};
  samples.push({ t: Date.now(), queued: by.queued || 0, running: (by.running || 0) + (by.leased || 0) });
  if (samples.length > 600) samples.shift();
  const card = (n, l) => h("div", { class: "card" }, h("div", { class: "n" }, n), h("div", { class: "l" }, l));
  // Counts stop at COUNT_LIMIT (a poll's cost stays bounded): that many reads "at least".
  const atLeast = (n) => (n >= COUNT_LIMIT ? `${n.toLocaleString("en")}+` : n);
  const capped = Object.values(by).some((n) => n >= COUNT_LIMIT);
  render(
    h("h1", {}, "Overview"),
    h("h2", {}, "Tasks"),
    h("div", { class: "cards", id: "task-cards" },
      card(capped ? `${stats.tasks.total.toLocaleString("en")}+` : stats.tasks.total, "total"),
      ["queued", "leased", "running", "completed", "failed", "dead", "cancelled"].map((s) =>
        h("a", { href: `#/tasks?status=${s}`, class: "card-link" }, card(atLeast(by[s] || 0), s)))),
    h("h2", {}, "Fleet"),
    h("div", { class: "cards" },
      card(stats.workers.online, "workers online"), card(stats.workers.total, "workers"),
      card(stats.leases.active, "active leases"), card(holds.length, "rate-limit holds"),
      card(limits.length, "concurrency limits"), card(budgets.length, "budgets")),
    h("h2", {}, "Connections"),
    connections(health),
    h("h2", {}, "Last hour"),
    h("div", { class: "cards", id: "charts" },
      chart("Runs per minute", activity.minutes, [["completed", (m) => m.completed, "#1a7f37"], ["failed", (m) => m.failed, "#cf222e"]], "runs"),
      chart("Dispatch latency", activity.minutes, [["p50", (m) => m.dispatch_p50_ms, "#0b5cad"], ["p99", (m) => m.dispatch_p99_ms, "#9a6700"]], "ms"),
      chart("End-to-end latency", activity.minutes, [["p50", (m) => m.e2e_p50_ms, "#0b5cad"], ["p99", (m) => m.e2e_p99_ms, "#9a6700"]], "ms")),
    h("h2", {}, "Queue"),
    h("div", { class: "cards" }, spark(samples, (s) => s.queued, "Queued tasks"), spark(samples, (s) => s.running, "Leased or running")),
  );
}

const STATUSES = ["", "queued", "leased", "running", "completed", "failed", "dead", "cancelled"];

async function tasks(r, params) {
  const q = new URLSearchParams();
  for (const k of ["status", "agent_slug", "context_id", "priority", "prompt_prefix", "cursor"]) if (params.get(k)) q.set(k, params.get(k));
  // The time range: `from` and `to` as UTC date-times (the inputs' values).
  const utc = (v) => (v ? Date.parse(`${v}Z`) : NaN);
  const range = {};
  if (!Number.isNaN(utc(params.get("from")))) range.created_from = utc(params.get("from"));
  if (!Number.isNaN(utc(params.get("to")))) range.created_to = utc(params.get("to"));
  for (const [k, v] of Object.entries(range)) q.set(k, v);
  q.set("limit", "50");
  const { body: rows, next } = await api(`/api/runtime/llm-tasks?${q}`);
  if (r !== route) return;
  const field = (name, label, input) => h("label", { for: `f-${name}` }, label, input);
  // `data-query`: the filter this page was drawn for (a form being replaced is told
  // from its successor by it).
  const form = h("form", { class: "filters", role: "search", "data-query": params.toString(), onsubmit: (e) => {
    e.preventDefault();
    const f = new URLSearchParams();
    for (const el of e.target.elements) if (el.name && el.value) f.set(el.name, el.value);
    location.hash = `#/tasks?${f}`;
  } },
    field("status", "Status", h("select", { id: "f-status", name: "status" },
      STATUSES.map((s) => h("option", { value: s, selected: s === (params.get("status") || "") }, s || "any")))),
    field("agent_slug", "Agent", h("input", { id: "f-agent_slug", name: "agent_slug", value: params.get("agent_slug") || "" })),
    field("context_id", "Context", h("input", { id: "f-context_id", name: "context_id", value: params.get("context_id") || "" })),
    field("prompt_prefix", "Prompt starts with", h("input", { id: "f-prompt_prefix", name: "prompt_prefix", value: params.get("prompt_prefix") || "" })),
    field("priority", "Priority", h("select", { id: "f-priority", name: "priority" },
      ["", "2", "1", "0", "-1", "-2"].map((p) => h("option", { value: p, selected: p === (params.get("priority") || "") }, p || "any")))),
    field("from", "Created from (UTC)", h("input", { id: "f-from", name: "from", type: "datetime-local", value: params.get("from") || "" })),
    field("to", "Created before (UTC)", h("input", { id: "f-to", name: "to", type: "datetime-local", value: params.get("to") || "" })),
    h("button", { type: "submit" }, "Filter"));
  const bulk = h("div", { id: "bulk" });
  const selection = {};
  for (const k of ["agent_slug", "context_id", "prompt_prefix"]) if (params.get(k)) selection[k] = params.get(k);
  if (["queued", "leased", "running"].includes(params.get("status"))) selection.status = [params.get("status")];
  if (params.get("priority")) selection.priority = Number(params.get("priority"));
  Object.assign(selection, range);
  const cancelMatching = async () => {
    const { body: dry } = await api("/api/runtime/llm-tasks/cancel", { method: "POST", body: { ...selection, dry_run: true } });
    // The average cost of a run over the last hour, else the last day (fewer rows to
    // add up than a day's on a busy installation).
    const average = async (hours) => {
      const { body: usage } = await api(`/api/runtime/usage?group_by=agent_slug&limit=1000&from=${Date.now() - hours * 3600000}`);
      const costs = selection.agent_slug ? usage.groups.filter((g) => g.key === selection.agent_slug) : [usage.total];
      return costs.length && costs[0].runs ? costs[0].total_cost_usd / costs[0].runs : null;
    };
    let span = "hour";
    let perRun = await average(1);
    if (perRun === null) [span, perRun] = ["day", (await average(24)) ?? 0];
    const text = `Cancel ${dry.matched} queued, leased or running tasks matching this filter? At ${usd(perRun)} per run `
      + `(the last ${span}'s average) they would cost about ${usd(perRun * dry.matched)}.`;
    bulk.replaceChildren(confirmPanel(text, `Cancel ${dry.matched}`, async () => {
      const { body: done } = await api("/api/runtime/llm-tasks/cancel", { method: "POST", body: selection });
      setTimeout(() => r === route && show(), 800);
      return `Cancelled ${done.cancelled.length} tasks.`;
    }));
  };
  const more = new URLSearchParams(params);
  if (next) more.set("cursor", next);
  render(
    h("h1", {}, "Tasks"),
    form,
    selection.agent_slug || selection.context_id || selection.prompt_prefix
      ? h("div", { class: "actions" }, h("button", { type: "button", class: "danger", id: "cancel-matching", onclick: cancelMatching }, "Cancel matching…"))
      : null,
    bulk,
    table([
      ["Task", (t) => h("a", { href: `#/tasks/${encodeURIComponent(t.id)}` }, t.id)],
      ["Status", (t) => status(t.status)],
      ["Agent", (t) => t.agent_slug],
      ["Context", (t) => t.context_id],
      ["Priority", (t) => t.priority ?? 0, true],
      ["Attempts", (t) => `${t.attempts}/${t.max_attempts}`, true],
      ["Created", (t) => iso(t.created_at)],
      ["Waiting because", (t) => t.wait_reason || t.last_error || ""],
    ], rows, next ? "No match among the tasks read for this page; older tasks follow on the next page." : "No task matches."),
    h("div", { class: "pager" },
      params.get("cursor") ? h("a", { href: "#/tasks" }, "First page") : null,
      next ? h("a", { href: `#/tasks?${more}`, id: "next-page" }, "Next page") : h("span", { class: "muted" }, "Last page")));
}

async function task(r, id) {
  const enc = encodeURIComponent(id);
  const [{ body: t }, { body: results }, { body: artifacts }, { body: history }] = await Promise.all([
    api(`/api/runtime/llm-tasks/${enc}`), api(`/api/runtime/llm-tasks/${enc}/results`), api(`/api/runtime/artifacts?task_id=${enc}`),
    api(`/api/runtime/llm-tasks/${enc}/history`),
  ]);
  if (r !== route) return;
  const costed = results.filter((x) => x.metrics.total_cost_usd !== undefined);
  const cost = costed.length ? costed.reduce((sum, x) => sum + x.metrics.total_cost_usd, 0) : null;
  const tokens = results.reduce((sum, x) => sum + (x.metrics.tokens_used || 0), 0);
  const message = h("p", { id: "action-result", role: "status" });
  const act = (label, path, danger) => h("button", { type: "button", class: danger ? "danger" : null, onclick: async (e) => {
    e.target.disabled = true;
    try {
      const { body } = await api(`/api/runtime/llm-tasks/${enc}/${path}`, { method: "POST", body: {} });
      message.textContent = `${label}: the task is now ${body.status}.`;
      setTimeout(() => r === route && show(), 600);
    } catch (err) {
      message.textContent = `${label} refused: ${err.message}`;
      message.className = "error";
      e.target.disabled = false;
    }
  } }, label);
  const live_ = ["queued", "leased", "running"].includes(t.status);
  render(
    h("p", {}, h("a", { href: "#/tasks" }, "← Tasks")),
    h("h1", {}, "Task ", h("code", {}, t.id), " ", status(t.status)),
    h("div", { class: "actions" },
      live_ ? act("Cancel", "cancel", true) : null,
      ["failed", "dead", "cancelled"].includes(t.status) ? act("Requeue", "requeue") : null),
    message,
    h("dl", { class: "kv" }, [
      ["Agent", t.agent_slug], ["Context", t.context_id], ["Priority", t.priority ?? 0],
      ["Attempts", `${t.attempts} of ${t.max_attempts}`], ["Created", iso(t.created_at)], ["Updated", iso(t.updated_at)],
      ["Not before", iso(t.not_before)], ["Waiting because", t.wait_reason || ""], ["Last error", t.last_error || ""],
      ["Worker", t.worker_id || ""], ["Lease", t.lease_id || ""], ["Concurrency key", t.concurrency_key || ""],
      ["Cost", usd(cost)], ["Tokens", tokens || ""],
    ].flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    h("h2", {}, "Prompt"), h("pre", { id: "prompt" }, t.prompt),
    h("h2", {}, "Policy"), h("pre", {}, JSON.stringify(t.policy, null, 2)),
    h("h2", {}, `Results (${results.length})`),
    table([
      ["Completed", (x) => iso(x.completed_at)],
      ["Status", (x) => status(x.status === "success" ? "completed" : "failed")],
      ["Class", (x) => x.error_kind || ""],
      ["Cost", (x) => usd(x.metrics.total_cost_usd), true],
      ["Tokens", (x) => x.metrics.tokens_used ?? "", true],
      ["Duration", (x) => `${x.metrics.duration_ms} ms`, true],
      ["Worker", (x) => x.worker_id],
      ["Output or error", (x) => h("pre", {}, x.error_message || x.output || "")],
    ], results, "No result yet."),
    h("h2", {}, `Artifacts (${artifacts.length})`),
    table([
      ["Artifact", (a) => h("code", {}, a.id)],
      ["Type", (a) => a.type],
      ["Created", (a) => iso(a.created_at)],
      ["Content", (a) => h("button", { type: "button", onclick: () => download(a.id) }, "Download")],
    ], artifacts, "No artifact."),
    h("h2", {}, `Leases (${history.leases.length})`),
    table([
      ["Lease", (l) => h("code", {}, l.id)],
      ["Worker", (l) => l.worker_id],
      ["Started", (l) => iso(l.started_at)],
      ["Last heartbeat", (l) => iso(l.last_heartbeat)],
      ["Expires", (l) => iso(l.expires_at)],
      ["Status", (l) => l.status],
    ], history.leases, "Never leased."),
    h("h2", {}, "Audit trail"),
    table([
      ["Time", (a) => iso(a.timestamp)],
      ["Action", (a) => a.action],
      ["Actor", (a) => a.actor],
      ["Detail", (a) => a.detail],
    ], history.audit, "No entry."),
  );
}

async function download(id) {
  const key = sessionStorage.getItem(KEY);
  const res = await fetch(`/api/runtime/artifacts/${encodeURIComponent(id)}/content`, { headers: key ? { "X-Runtime-Api-Key": key } : {} });
  if (!res.ok) return alert(`Download failed: HTTP ${res.status}`);
  const url = URL.createObjectURL(await res.blob());
  h("a", { href: url, download: `${id}.txt` }).click();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// A bulk action: a dry run first, then the count and the money involved shown for
// confirmation, then the action itself.
function confirmPanel(text, label, run, keep = "Keep them") {
  const panel = h("div", { class: "confirm", role: "alertdialog", "aria-label": label });
  const result = h("p", { role: "status", id: "bulk-result" });
  const yes = h("button", { type: "button", class: "danger", id: "bulk-confirm", onclick: async () => {
    yes.disabled = true;
    try {
      result.textContent = await run();
    } catch (err) {
      result.textContent = `Refused: ${err.message}`;
      result.className = "error";
    }
  } }, label);
  const no = h("button", { type: "button", onclick: () => panel.remove() }, keep);
  panel.append(h("p", { id: "bulk-summary" }, text), h("div", { class: "actions" }, yes, no), result);
  return panel;
}

async function failures(r, params) {
  const hours = Number(params.get("hours") || 24);
  const to = Date.now();
  const { body } = await api(`/api/runtime/failures?from=${to - hours * 3600000}&to=${to}`);
  if (r !== route) return;
  const slot = h("div", { id: "bulk" });
  const requeue = (g) => async () => {
    const { body: dry } = await api("/api/runtime/llm-tasks/requeue", { method: "POST", body: { ids: g.task_ids, dry_run: true } });
    const perRun = g.runs ? g.cost_usd / g.runs : 0;
    const text = `Requeue ${dry.matched} ${g.agent_slug} tasks that failed with ${g.error_kind}? Their ${g.runs} runs cost `
      + `${usd(g.cost_usd)}; running each once more costs about ${usd(perRun * dry.matched)} (${usd(perRun)} per run).`;
    slot.replaceChildren(confirmPanel(text, `Requeue ${dry.matched}`, async () => {
      const { body: done } = await api("/api/runtime/llm-tasks/requeue", { method: "POST", body: { ids: g.task_ids } });
      setTimeout(() => r === route && show(), 800);
      return `Requeued ${done.requeued.length} tasks.`;
    }));
  };
  render(
    h("h1", {}, "Failures"),
    h("p", {}, "Failed and dead tasks of the last ",
      h("select", { id: "f-hours", "aria-label": "Range", onchange: (e) => { location.hash = `#/failures?hours=${e.target.value}`; } },
        [1, 24, 168].map((n) => h("option", { value: n, selected: n === hours }, n === 1 ? "hour" : n === 24 ? "day" : "week"))),
      ", grouped by agent, error class and message."),
    slot,
    table([
      ["Agent", (g) => g.agent_slug],
      ["Class", (g) => g.error_kind],
      ["Reason", (g) => g.reason],
      ["Tasks", (g) => g.tasks, true],
      ["Runs", (g) => g.runs, true],
      ["Cost", (g) => usd(g.cost_usd), true],
      ["Latest", (g) => h("a", { href: `#/tasks/${encodeURIComponent(g.task_ids[0])}` }, iso(g.latest_created_at))],
      ["", (g) => h("button", { type: "button", onclick: requeue(g) }, "Requeue…")],
    ], body.groups, "No failure in this range."),
  );
}

async function workers(r) {
  const [{ body: ws }, { body: limits }, { body: budgets }, { body: holds }] = await Promise.all([
    api("/api/runtime/workers?limit=200"), api("/api/runtime/concurrency-limits"), api("/api/runtime/budgets"), api("/api/runtime/holds"),
  ]);
  if (r !== route) return;
  render(
    h("h1", {}, "Workers"),
    table([
      ["Worker", (w) => h("a", { href: `#/workers/${encodeURIComponent(w.id)}` }, w.id)],
      ["Status", (w) => (w.draining_since ? `${w.status}, draining` : w.status)],
      ["Kind", (w) => (w.transport === "http" ? "HTTP agent" : "NATS worker")],
      ["Busy", (w) => `${w.active_leases ?? 0}/${w.capabilities?.max_concurrency ?? 1}`, true],
      ["Version", (w) => w.agent_version || ""],
      ["Last heartbeat", (w) => iso(w.last_heartbeat)],
    ], ws, "No worker registered."),
    h("h2", {}, "Concurrency limits"),
    table([
      ["Scope", (l) => l.scope], ["Key", (l) => l.key], ["Max running", (l) => l.max_running, true],
      ["Running", (l) => l.running, true], ["Waiting", (l) => l.waiting, true],
    ], limits, "No concurrency limit."),
    h("h2", {}, "Budgets"),
    table([
      ["Scope", (b) => b.scope], ["Key", (b) => b.key], ["Rule", (b) => b.rule], ["Max", (b) => b.max, true],
      ["Used", (b) => b.used ?? `${b.keys} keys`, true], ["Remaining", (b) => b.remaining ?? "", true],
      ["Waiting", (b) => b.waiting, true], ["Resets", (b) => iso(b.resets_at)],
    ], budgets, "No budget."),
    h("h2", {}, "Held by a provider rate limit"),
    table([["Scope", (x) => x.scope], ["Key", (x) => x.key], ["Until", (x) => iso(x.until)], ["Reason", (x) => x.reason]],
      holds, "Nothing is held."),
  );
}

// A worker's page: its record and active leases, drain and resume; for an HTTP
// (membridge) agent, a health check and a restart. A NATS worker is restarted by its
// deployment.
let workerNote = null; // the last health check's outcome: { id, text, ok }

async function worker(r, id) {
  const enc = encodeURIComponent(id);
  const { body: w } = await api(`/api/runtime/workers/${enc}`);
  if (r !== route) return;
  const note = h("p", { role: "status", id: "worker-result" });
  const report = (text, ok) => {
    note.textContent = text;
    note.className = ok ? "" : "error";
  };
  if (workerNote?.id === id) report(workerNote.text, workerNote.ok);
  const health = h("button", { type: "button", id: "agent-health", onclick: async () => {
    health.disabled = true;
    try {
      const { body } = await api(`/api/runtime/workers/${enc}/agent-health`);
      // Shown again over the record the check updated (version, status, heartbeat).
      workerNote = { id, ok: body.reachable,
        text: body.reachable ? `Reachable: agent version ${body.version ?? "unknown"}.` : `Unreachable: ${body.error}` };
      if (r === route) await show();
      return;
    } catch (err) {
      report(`Health check refused: ${err.message}`, false);
    }
    health.disabled = false;
  } }, "Check health");
  const restart = h("button", { type: "button", class: "danger", id: "agent-restart", onclick: () => {
    note.replaceWith(confirmPanel(`Restart the agent of ${w.id}? Its runs in progress are cut off and retried.`, "Restart", async () => {
      await api(`/api/runtime/workers/${enc}/agent-restart`, { method: "POST", body: {} });
      return "The agent was asked to restart.";
    }, "Keep it running"));
  } }, "Restart agent…");
  const drain = h("button", { type: "button", id: "worker-drain", onclick: () => {
    const text = `Drain ${w.id}? It takes no new task and finishes the ${w.active_leases ?? 0} it runs; it stays registered until resumed.`;
    note.replaceWith(confirmPanel(text, "Drain", async () => {
      await api(`/api/runtime/workers/${enc}/drain`, { method: "POST", body: {} });
      setTimeout(() => r === route && show(), 600);
      return "Draining: no new task goes to this worker.";
    }, "Keep it taking tasks"));
  } }, "Drain…");
  const resume = h("button", { type: "button", id: "worker-resume", onclick: async () => {
    resume.disabled = true;
    try {
      await api(`/api/runtime/workers/${enc}/resume`, { method: "POST", body: {} });
      if (r === route) await show();
    } catch (err) {
      report(`Resume refused: ${err.message}`, false);
      resume.disabled = false;
    }
  } }, "Resume");
  const http = w.transport === "http";
  render(
    h("p", {}, h("a", { href: "#/workers" }, "← Workers")),
    h("h1", {}, "Worker ", h("code", {}, w.id), " ", status(w.status)),
    w.draining_since ? h("p", { id: "draining" }, `Draining since ${iso(w.draining_since)}: no new task; ${w.active_leases ?? 0} still running.`) : null,
    h("div", { class: "actions" }, w.draining_since ? resume : drain, http ? health : null, http ? restart : null),
    http ? null : h("p", { class: "muted" }, "A NATS worker: restarted by its deployment; on SIGTERM it takes no new task and finishes its runs."),
    note,
    h("dl", { class: "kv" }, [
      ["Kind", http ? "HTTP agent" : "NATS worker"], ["URL", w.url || ""], ["Node", w.node_id || ""],
      ["Busy", `${w.active_leases ?? 0} of ${w.capabilities?.max_concurrency ?? 1}`],
      ["Labels", (w.capabilities?.labels || []).join(", ")], ["Version", w.agent_version || ""], ["OS", w.os_info || ""],
      ["Installed", w.install_method || ""], ["Registered", iso(w.registered_at)], ["Last heartbeat", iso(w.last_heartbeat)],
    ].flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    h("h2", {}, `Active leases (${w.leases.length})`),
    table([
      ["Task", (l) => h("a", { href: `#/tasks/${encodeURIComponent(l.task_id)}` }, l.task_id)],
      ["Lease", (l) => h("code", {}, l.id)],
      ["Started", (l) => iso(l.started_at)],
      ["Expires", (l) => iso(l.expires_at)],
    ], w.leases, "No active lease."),
  );
}

const AUDIT_FILTERS = [["action", "Action"], ["entity_type", "Entity type"], ["entity_id", "Entity id"], ["actor", "Actor"]];
const AUDIT_ACTIONS = ["task_created", "task_leased", "task_completed", "task_requeued", "task_cancelled", "task_dead",
  "task_retry_scheduled", "task_due", "task_redispatched", "lease_expired", "result_late", "task_dispatched",
  "dispatch_failed", "worker_registered", "worker_updated", "worker_removed", "worker_offline", "worker_draining",
  "worker_resumed", "agent_restarted",
  "agent_updated", "config_updated"];

async function audit(r, params) {
  const q = new URLSearchParams();
  for (const [k] of [...AUDIT_FILTERS, ["cursor"]]) if (params.get(k)) q.set(k, params.get(k));
  q.set("limit", "100");
  const { body: rows, next } = await api(`/api/runtime/audit?${q}`);
  if (r !== route) return;
  const entity = (a) => (a.entity_type === "llm_task" ? h("a", { href: `#/tasks/${encodeURIComponent(a.entity_id)}` }, a.entity_id) : a.entity_id);
  const more = new URLSearchParams(params);
  if (next) more.set("cursor", next);
  const entries = h("div", { id: "audit-entries" },
    table([
      ["Time", (a) => iso(a.timestamp)],
      ["Action", (a) => h("a", { href: `#/audit?action=${encodeURIComponent(a.action)}` }, a.action)],
      ["Type", (a) => a.entity_type],
      ["Entity", entity],
      ["Actor", (a) => a.actor],
      ["Detail", (a) => a.detail],
    ], rows, "No entry matches."),
    h("div", { class: "pager" },
      params.get("cursor") ? h("a", { href: `#/audit?${new URLSearchParams([...params].filter(([k]) => k !== "cursor"))}` }, "Newest") : null,
      next ? h("a", { href: `#/audit?${more}`, id: "next-page" }, rows.length < 100 ? "Search older entries" : "Older")
        : h("span", { class: "muted" }, "Oldest entry")));
  // A poll of the live tail replaces the entries only: the filter form keeps its input.
  const shown = document.getElementById("audit-entries");
  if (shown && shown.dataset.query === String(q)) {
    entries.dataset.query = String(q);
    shown.replaceWith(entries);
    return;
  }
  entries.dataset.query = String(q);
  const field = (name, label, input) => h("label", { for: `a-${name}` }, label, input);
  const form = h("form", { class: "filters", role: "search", onsubmit: (e) => {
    e.preventDefault();
    const f = new URLSearchParams();
    for (const el of e.target.elements) if (el.name && el.value.trim()) f.set(el.name, el.value.trim());
    location.hash = `#/audit?${f}`;
  } },
    AUDIT_FILTERS.map(([name, label]) => field(name, label,
      h("input", { id: `a-${name}`, name, value: params.get(name) || "", list: name === "action" ? "audit-actions" : null }))),
    h("datalist", { id: "audit-actions" }, AUDIT_ACTIONS.map((a) => h("option", { value: a }))),
    h("button", { type: "submit" }, "Filter"));
  render(
    h("h1", {}, "Audit"),
    form,
    h("p", { class: "muted" }, params.get("cursor") ? "Older entries; not updated live." : "Newest first, updated live."),
    entries,
  );
}

// ---- routing -----------------------------------------------------------------------

function parse() {
  const [path, query] = (location.hash.slice(1) || "/").split("?");
  return { path, params: new URLSearchParams(query || "") };
}

async function show() {
  const { path, params } = parse();
  const r = route;
  const page = path.slice(1).split("/")[0] || "overview";
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.nav === page) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  try {
    if (path === "/" || path === "") await overview(r);
    else if (path === "/tasks") await tasks(r, params);
    else if (path.startsWith("/tasks/")) await task(r, decodeURIComponent(path.slice(7)));
    else if (path === "/failures") await failures(r, params);
    else if (path === "/workers") await workers(r);
    else if (path.startsWith("/workers/")) await worker(r, decodeURIComponent(path.slice(9)));
    else if (path === "/audit") await audit(r, params);
    else render(h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/" }, "Overview")));
    if (r === route) live.textContent = `Updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    if (r === route) render(h("h1", {}, "Error"), h("p", { class: "error", role: "alert" }, err.message));
  }
}

function navigate(event) {
  route += 1;
  clearInterval(timer);
  const { path } = parse();
  // Moving to another page puts the keyboard focus on its content (not on first load).
  show().then(() => event && main.focus({ preventScroll: true }));
  // Live pages poll; a task page and filtered lists refresh after an action instead.
  // A hidden tab does not poll.
  if (path === "/" || path === "" || path === "/workers" || (path === "/audit" && !parse().params.get("cursor"))) {
    timer = setInterval(() => document.hidden || show(), POLL_MS);
  }
}

window.addEventListener("hashchange", navigate);
navigate();
