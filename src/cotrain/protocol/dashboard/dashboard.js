// cotrain's dashboard: plain JavaScript over the coordinator's public /v1 API, no build step.
// Pages (hash routes): #/ tasks, #/task/ID, #/node/KEY, #/ledger, #/entry/N. Each page is
// re-read every 2 s while it is shown. Everything shown comes from strangers (names, reasons):
// it is only ever set as text, never parsed as HTML.
"use strict";

const POLL_MS = 2000;
const main = () => document.getElementById("main");

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

async function get(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) {
    let why = r.statusText;
    try { why = (await r.json()).error || why; } catch (_) { /* not JSON */ }
    throw new Error(`${path}: ${r.status} ${why}`);
  }
  return r.json();
}

const short = (key) => (key ? `${key.slice(0, 10)}…` : "");
const fmt = (n) => (typeof n === "number" ? n.toLocaleString("en-US") : String(n ?? ""));
const names = new Map(); // node key -> its registered name (asked once)
async function nameOf(key) {
  if (!names.has(key)) {
    names.set(key, get(`/v1/identities/${key}`).then((i) => i.name || "").catch(() => ""));
  }
  return names.get(key);
}
const nodeLink = (key, name) => el("a", { href: `#/node/${key}`, title: key },
  name ? `${name} ` : "", el("span", { class: "mono" }, short(key)));
const entryLink = (seq, text) => el("a", { href: `#/entry/${seq}`, title: `ledger entry ${seq}` }, text ?? `#${seq}`);
const state = (s) => el("span", { class: `state ${s}` }, s);
const card = (k, v, title) => el("div", { class: "card", title }, el("div", { class: "k" }, k), el("div", { class: "v" }, v));

function bar(fraction, title) {
  const fill = el("i");
  fill.style.width = `${Math.min(100, 100 * fraction).toFixed(1)}%`; // CSSOM: allowed by the CSP
  return el("div", { class: "bar", title }, fill);
}

function table(heads, rows) {
  const head = el("tr", {}, heads.map((h) => el("th", { class: h.endsWith("#") ? "num" : "" }, h.replace(/#$/, ""))));
  const body = rows.map((cells) => el("tr", {}, cells.map((c, i) =>
    el("td", { class: heads[i].endsWith("#") ? "num" : "" }, c))));
  return el("div", { class: "scroll" }, el("table", {}, el("thead", {}, head), el("tbody", {}, body)));
}

// ---- charts -------------------------------------------------------------------------------

function chart(points, label) {
  const W = 600, H = 220, P = 34;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "chart");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  const add = (tag, attrs, text) => {
    const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    svg.append(e);
    return e;
  };
  add("line", { x1: P, y1: H - P, x2: W - 8, y2: H - P, class: "axis" });
  add("line", { x1: P, y1: 8, x2: P, y2: H - P, class: "axis" });
  add("text", { x: P + 4, y: 18 }, label);
  if (points.length === 0) {
    add("text", { x: W / 2 - 40, y: H / 2 }, "no data yet");
    return svg;
  }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1);
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (y1 - y0 < 1e-9) { y0 -= 1; y1 += 1; }
  const sx = (x) => P + ((x - x0) / (x1 - x0)) * (W - P - 12);
  const sy = (y) => H - P - ((y - y0) / (y1 - y0)) * (H - P - 16);
  add("polyline", { points: points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ") });
  add("text", { x: 2, y: sy(y1) + 4 }, y1.toPrecision(4));
  add("text", { x: 2, y: sy(y0) }, y0.toPrecision(4));
  add("text", { x: P, y: H - P + 14 }, `step ${x0}`);
  add("text", { x: W - 70, y: H - P + 14 }, `step ${x1}`);
  svg.dataset.points = String(points.length);
  return svg;
}

// A validator's verdict reason carries the validation loss before and after the work:
// "validation loss 5.1234 -> 5.0987". The consensus loss at an outer step is the "before".
function lossCurve(work) {
  const byStep = new Map();
  for (const w of work) {
    const m = /validation loss ([0-9.]+) -> ([0-9.]+)/.exec(w.reason || "");
    if (m && !byStep.has(w.step)) byStep.set(w.step, parseFloat(m[1]));
  }
  return [...byStep.entries()].sort((a, b) => a[0] - b[0]);
}

// A node's throughput and traffic, as it reports them with its work (the median of its last
// ten records): DiLoCo nodes give tokens/s and the MB they sent per synchronisation, RL
// workers the tokens/s at which they generated.
function nodeRates(work) {
  const by = new Map();
  for (const w of work) (by.get(w.node) || by.set(w.node, []).get(w.node)).push(w);
  const median = (xs) => xs.sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  const out = new Map();
  for (const [node, ws] of by) {
    const last = ws.slice(-10);
    const tps = last.map((w) => w.meta && w.meta.tokens_per_s).filter((x) => typeof x === "number");
    const mb = last.map((w) => w.meta && w.meta.sent_mb).filter((x) => typeof x === "number");
    if (tps.length) {
      out.set(node, `${fmt(Math.round(median(tps)))} tok/s` + (mb.length ? `, ${median(mb).toFixed(2)} MB/sync` : ""));
    }
  }
  return out;
}

function unitsCurve(work) {
  const byStep = new Map();
  for (const w of work) if (w.state === "accepted") byStep.set(w.step, (byStep.get(w.step) || 0) + w.units);
  let total = 0;
  return [...byStep.entries()].sort((a, b) => a[0] - b[0]).map(([s, u]) => [s, (total += u)]);
}

// ---- pages --------------------------------------------------------------------------------

async function pageTasks() {
  const { tasks } = await get("/v1/tasks");
  const rows = tasks.map((t) => [
    el("a", { href: `#/task/${t.id}` }, t.id), t.name, t.kind, state(t.state),
    fmt(t.budget), fmt(t.credited),
    bar(t.credited / Math.max(1, t.budget), `${t.credited} of ${t.budget} credited`),
    fmt(t.accepted_units), fmt(t.submitted_units),
  ]);
  return [el("h1", {}, `Tasks (${tasks.length})`),
    table(["task", "name", "kind", "state", "budget#", "credited#", "spent", "accepted units#", "submitted units#"], rows)];
}

// A task's progress reports (task.report entries, signed by its trainer or validators):
// one curve per metric, each point a ledger entry.
function reportCurve(reports, name) {
  return reports.filter((r) => typeof r.metrics[name] === "number").map((r) => [r.step, r.metrics[name]]);
}

function reportsPart(reports) {
  if (!reports.length) return [];
  const last = reports[reports.length - 1];
  const reward = reportCurve(reports, "mean_reward"), acc = reportCurve(reports, "heldout_accuracy");
  const rows = reports.slice(-12).reverse().map((r) => [
    entryLink(r.seq), fmt(r.step),
    Object.entries(r.metrics).map(([k, v]) => `${k} ${Number.isInteger(v) ? v : v.toFixed(3)}`).join(", "),
    r.note, nodeLink(r.author),
  ]);
  return [
    el("div", { class: "cards" },
      card("policy version", last.metrics.version !== undefined ? `v${last.metrics.version}` : "-", last.note),
      card("trainer step", fmt(last.step)),
      card("held-out accuracy", acc.length ? acc[acc.length - 1][1].toFixed(2) : "-",
        "greedy accuracy on held-out tasks, as the trainer reports it")),
    el("div", { class: "charts" },
      chart(reward, "mean reward of the step's accepted rollouts"),
      chart(acc, "held-out accuracy (greedy)")),
    el("h3", {}, "Progress reports (signed ledger entries)"),
    table(["entry", "step#", "figures", "note", "by"], rows),
  ];
}

async function pageTask(id) {
  const [t, work, shares, rep] = await Promise.all([
    get(`/v1/tasks/${encodeURIComponent(id)}`),
    get(`/v1/tasks/${encodeURIComponent(id)}/work?limit=1000`),
    get(`/v1/tasks/${encodeURIComponent(id)}/shares`),
    get(`/v1/tasks/${encodeURIComponent(id)}/reports`),
  ]);
  const reports = rep.reports;
  const rows = work.work;
  const total = shares.total || 0;
  const named = await Promise.all(t.members.map((m) => nameOf(m.node)));
  const rate = nodeRates(rows);
  const members = t.members.map((m, i) => [
    nodeLink(m.node, named[i]), state(m.status), rate.get(m.node) || "",
    fmt(m.submitted_units), fmt(m.accepted_units),
    fmt(m.rejected_units), fmt(m.earned), fmt(m.locked),
    total ? `${((100 * (shares.weights[m.node] || 0)) / total).toFixed(1)}%` : "",
    entryLink(m.since_seq, `#${m.since_seq}`),
  ]);
  const loss = lossCurve(rows);
  const recent = rows.slice(-25).reverse().map((w) => [
    entryLink(w.seq), nodeLink(w.node), fmt(w.step), fmt(w.units), state(w.state),
    w.last_seq > w.seq ? entryLink(w.last_seq) : "", w.reason || "",
  ]);
  return [
    el("h1", {}, `${t.id}: ${t.name}`),
    el("div", { class: "cards" },
      card("state", state(t.state)), card("kind", t.kind), card("budget", fmt(t.budget)),
      card("credited", fmt(t.credited)), card("left", fmt(t.left)), card("fees", fmt(t.fees)),
      card("accepted units", fmt(t.accepted_units), "sum of accepted work units"),
      card("nodes", fmt(t.members.length)), card("quorum", `${t.quorum} of ${t.validators.length}`)),
    el("h2", {}, "Progress"),
    ...reportsPart(reports),
    el("div", { class: "charts" },
      ...(loss.length ? [chart(loss, "consensus validation loss (from the validators' verdicts)")] : []),
      chart(unitsCurve(rows), "accepted units, cumulative")),
    el("h2", {}, "Nodes"),
    el("p", { class: "formula" },
      "earned = accepted units x rate per unit, minus slashes; share = a node's weight / all weights; " +
      "'joined' links to the ledger entry of its admission."),
    table(["node", "status", "throughput", "submitted#", "accepted#", "rejected#", "earned#", "locked#", "share#", "joined"], members),
    el("h2", {}, "Recent work and verdicts"),
    table(["entry", "node", "step#", "units#", "state", "verdict", "reason"], recent),
  ];
}

async function pageNode(key) {
  const [ident, acct, { tasks }] = await Promise.all([
    get(`/v1/identities/${key}`).catch(() => ({ key, name: "(not registered)", roles: [] })),
    get(`/v1/accounts/${key}`),
    get("/v1/tasks"),
  ]);
  const out = [
    el("h1", {}, `${ident.name || "node"} `, el("span", { class: "mono" }, key)),
    el("div", { class: "cards" },
      card("roles", (ident.roles || []).join(", ")),
      card("claimable", fmt(acct.claimable), "earned and matured, not claimed yet"),
      card("locked", fmt(acct.locked), "earned, still in its lock period"),
      card("claimed", fmt(acct.claimed))),
  ];
  for (const t of tasks) {
    const w = await get(`/v1/tasks/${t.id}/work?node=${key}&limit=1000`);
    if (!w.work.length) continue;
    const acc = w.work.filter((u) => u.state === "accepted");
    const credit = acc.reduce((s, u) => s + (u.credit || 0), 0);
    const sh = await get(`/v1/tasks/${t.id}/shares`);
    const weight = (sh.weights || {})[key] || 0;
    out.push(el("h2", {}, `${t.id}: ${t.name}`),
      el("div", { class: "cards" },
        card("share", sh.total ? `${((100 * weight) / sh.total).toFixed(1)}%` : "-",
          "this node's weight / all weights" + (sh.frozen ? " (frozen at finalize)" : "")),
        card("weight", `${fmt(weight)} of ${fmt(sh.total || 0)}`, "accepted units x the task's weight per kind"),
        card("accepted records", fmt(acc.length))),
      el("p", { class: "formula" },
        `rewards: ${fmt(credit)} = ${acc.length} accepted record(s) x units x ${t.rate_per_unit} per unit; ` +
        "each reward links to the submission and the verdict entries that produce it."),
      table(["submission", "step#", "units#", "state", "reward#", "verdict", "reason"],
        w.work.slice(-50).reverse().map((u) => [
          entryLink(u.seq), fmt(u.step), fmt(u.units), state(u.state),
          el("span", { class: "reward" }, fmt(u.credit)),
          u.last_seq > u.seq ? entryLink(u.last_seq) : "", u.reason || "",
        ])));
  }
  return out;
}

// ---- the ledger, and the inclusion check in this browser -----------------------------------

const hex = (buf) => [...new Uint8Array(buf)].map((b) => b.toString(16).padStart(2, "0")).join("");
const unhex = (s) => new Uint8Array(s.match(/../g).map((h) => parseInt(h, 16)));
async function sha256(...parts) {
  const n = parts.reduce((s, p) => s + p.length, 0);
  const buf = new Uint8Array(n);
  let o = 0;
  for (const p of parts) { buf.set(p, o); o += p.length; }
  return new Uint8Array(await crypto.subtle.digest("SHA-256", buf));
}

// RFC 9162 section 2.1.3.2: does `proof` lead from the leaf to `root` in a tree of `size`?
async function verifyInclusion(entryBytes, index, size, proof, root) {
  if (index >= size) return false;
  let fn = index, sn = size - 1;
  let r = await sha256(new Uint8Array([0]), entryBytes);
  for (const p of proof) {
    if (sn === 0) return false;
    if (fn % 2 === 1 || fn === sn) {
      r = await sha256(new Uint8Array([1]), p, r);
      if (fn % 2 === 0) while (fn % 2 === 0 && fn !== 0) { fn = Math.floor(fn / 2); sn = Math.floor(sn / 2); }
    } else {
      r = await sha256(new Uint8Array([1]), r, p);
    }
    fn = Math.floor(fn / 2); sn = Math.floor(sn / 2);
  }
  return sn === 0 && hex(r) === hex(root);
}

async function checkpoint() {
  const r = await fetch("/v1/log/checkpoint", { cache: "no-store" });
  if (!r.ok) throw new Error("no checkpoint yet");
  const text = await r.text();
  const lines = text.split("\n");
  const root = Uint8Array.from(atob(lines[2]), (c) => c.charCodeAt(0));
  return { text, origin: lines[0], size: parseInt(lines[1], 10), root };
}

async function entryText(n) {
  const r = await fetch(`/v1/log/entries?start=${n}&end=${n + 1}`, { cache: "no-store" });
  const t = await r.text();
  return t.endsWith("\n") ? t.slice(0, -1) : t;
}

async function pageLedger() {
  const [status, cp] = await Promise.all([get("/v1/status"), checkpoint().catch(() => null)]);
  const start = Math.max(0, status.size - 40);
  const r = await fetch(`/v1/log/entries?start=${start}&end=${status.size}`, { cache: "no-store" });
  const lines = (await r.text()).split("\n").filter((x) => x);
  const rows = lines.map((line, i) => {
    let e = {};
    try { e = JSON.parse(line); } catch (_) { /* shown raw */ }
    const req = e.req || {};
    const when = e.ts ? new Date(e.ts).toLocaleTimeString() : "";
    return [entryLink(start + i), e.kind || line.slice(0, 60), `${req.method || ""} ${req.path || ""}`,
      req.key ? nodeLink(req.key) : "", when];
  }).reverse();
  return [
    el("h1", {}, "Ledger"),
    el("div", { class: "cards" }, card("entries", fmt(status.size)), card("origin", status.origin),
      card("checkpoint", cp ? fmt(cp.size) : "none yet", "the newest signed checkpoint covers this many entries")),
    el("h2", {}, "Newest checkpoint (signed note, with witness co-signatures)"),
    el("pre", { class: "mono scroll", id: "checkpoint" }, cp ? cp.text : "none yet"),
    el("h2", {}, "Newest entries"),
    table(["entry", "kind", "request", "signed by", "time"], rows),
  ];
}

async function pageEntry(n) {
  const cp = await checkpoint().catch(() => null);
  const text = await entryText(n);
  const area = el("textarea", { id: "entry-text", spellcheck: "false" });
  area.value = text;
  const result = el("span", { id: "inclusion" }, "");
  const check = async () => {
    result.className = "";
    result.textContent = "checking…";
    if (!cp || n >= cp.size) {
      result.className = "bad";
      result.textContent = `entry ${n} is not covered by a checkpoint yet`;
      return;
    }
    const p = await get(`/v1/log/proof/inclusion?index=${n}&size=${cp.size}`);
    const ok = await verifyInclusion(new TextEncoder().encode(area.value), n, cp.size, p.proof.map(unhex), cp.root);
    result.className = ok ? "ok" : "bad";
    result.textContent = ok
      ? `included: this entry hashes, with ${p.proof.length} proof hashes, to the root of checkpoint ${cp.size}`
      : `NOT included: these bytes do not hash to the root of checkpoint ${cp.size}`;
  };
  setTimeout(check, 0);
  return [
    el("h1", {}, `Ledger entry ${n}`),
    area,
    el("p", {}, el("button", { onclick: check, id: "check" }, "check inclusion"), " ", result),
    el("p", { class: "formula" },
      "The check runs here, in this browser: SHA-256 of 0x00 || entry, then the RFC 9162 proof, " +
      "compared with the root hash of the coordinator's newest signed checkpoint. Edit the text " +
      "and check again: one changed byte fails."),
  ];
}

// ---- the market ----------------------------------------------------------------------------

const usd = (x) => (typeof x === "number" ? `$${x < 1 && x > 0 ? x.toFixed(4) : x.toFixed(2)}` : "");
const ago = (s) => (s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`);

// What cotrain measured on a launched machine (SSH hosts: GFLOP/s, link Mbit/s, round trips).
const measured = (m) => Object.entries(m || {}).filter(([, v]) => typeof v === "number")
  .map(([k, v]) => `${k} ${Number.isInteger(v) ? v : v.toFixed(1)}`).join(", ");

async function pageMarket() {
  let m;
  try {
    m = await get("/v1/market");
  } catch (err) {
    return [el("h1", {}, "Market"), el("p", {}, String(err.message))];
  }
  const out = [el("h1", {}, "Market")];
  out.push(el("h2", {}, `Launched nodes (${m.launches.reduce((n, l) => n + l.nodes.length, 0)})`),
    el("p", { class: "formula" },
      "cost = $/h x hours from launch to end (or now); each node links to its key's page once it has joined."));
  for (const l of m.launches) {
    out.push(el("h3", {}, el("a", { href: `#/task/${l.task}` }, l.task),
      ` · spent ${usd(l.spent_usd)}` + (l.budget_usd ? ` of ${usd(l.budget_usd)}` : "") +
      ` · ${usd(l.rate_usd_per_hour)}/h running` + (l.stopped ? ` · stopped: ${l.stopped}` : "")));
    out.push(table(["node", "provider", "offer", "state", "$/h#", "hours#", "cost#", "measured", "joined as"],
      l.nodes.map((n) => [n.name, n.provider, n.offer_id, state(n.state), usd(n.usd_per_hour),
        n.hours.toFixed(3), usd(n.spent_usd), measured(n.measured),
        n.node_key ? nodeLink(n.node_key) : n.detail || ""])));
  }
  out.push(el("h2", {}, `Offers (${m.offers.length}, cheapest first)`),
    table(["provider", "gpu", "n#", "$/h#", "$/GPU-h#", "vCPUs#", "RAM GB#", "where", "tier", "age"],
      m.offers.slice(0, 100).map((o) => [o.provider, o.gpu, fmt(o.gpu_count), usd(o.usd_per_hour),
        usd(o.usd_per_gpu_hour), fmt(o.vcpus), fmt(o.ram_gb), o.region || "", o.tier || "", ago(o.age_s)])));
  return out;
}

// ---- router and live updates ---------------------------------------------------------------

const routes = [
  [/^#?\/?$/, pageTasks],
  [/^#\/task\/([^/]+)$/, pageTask],
  [/^#\/node\/([0-9a-f]{64})$/, pageNode],
  [/^#\/ledger$/, pageLedger],
  [/^#\/market$/, pageMarket],
  [/^#\/entry\/(\d+)$/, (n) => pageEntry(parseInt(n, 10))],
];
let timer = null, rendering = false, queued = null, shown = null;

// One render at a time; a render asked for meanwhile runs when the current one ends (a page
// change is never lost behind a slow refresh of the page before it).
async function render(again) {
  if (rendering) {
    queued = queued === false || !again ? false : true;
    return;
  }
  rendering = true;
  const hash = location.hash || "#/";
  try {
    const [re, page] = routes.find(([re]) => re.test(hash)) || [null, null];
    if (!page) { main().replaceChildren(el("p", {}, `no page ${hash}`)); shown = hash; return; }
    if (again && shown === hash && hash.startsWith("#/entry/")) return; // keep what the user typed
    const content = await page(...re.exec(hash).slice(1));
    if ((location.hash || "#/") !== hash) return; // the user moved on
    main().replaceChildren(...content);
    shown = hash;
    document.getElementById("live").textContent = `live · ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    document.getElementById("live").textContent = `offline: ${err.message}`;
  } finally {
    rendering = false;
    if (queued !== null) {
      const again2 = queued;
      queued = null;
      render(again2);
    }
  }
}

window.addEventListener("hashchange", () => render(false));
window.addEventListener("DOMContentLoaded", () => {
  render(false);
  timer = setInterval(() => render(true), POLL_MS);
});
