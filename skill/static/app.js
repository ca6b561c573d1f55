// Status page: renders /ui/status.json and sends the "try" box to POST /parse. Text goes in with
// textContent only, never as HTML, because recent decisions show what users said.
"use strict";

const $ = (sel) => document.querySelector(sel);
const OUTCOMES = ["accept", "abstain", "reject"];

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function fmt(value, digits) {
  if (value === null || value === undefined || Number.isNaN(value)) return "n/a";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(digits === undefined ? 3 : digits);
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

function pct(value) {
  return value === null || value === undefined ? "n/a" : (100 * value).toFixed(1) + "%";
}

function fillRows(tbody, rows) {
  tbody.replaceChildren(...rows.map((cells) => {
    const tr = el("tr");
    for (const cell of cells) tr.append(cell instanceof Node ? cell : el("td", cell));
    return tr;
  }));
}

function kvRows(tbody, pairs) {
  fillRows(tbody, pairs.map(([k, v]) => [el("th", k), el("td", fmt(v))]));
}

function renderModel(health) {
  const pairs = [
    ["status", health.status],
    ["model_id", health.model_id || "(none: regex and rules only)"],
    ["service version", health.version],
    ["thresholds", health.thresholds],
    ["catalog", health.catalog],
    ["examples / negatives", `${health.examples_total} / ${health.negatives_total}`],
    ["index backend", health.index_backend],
    ["last reload", health.last_reload],
    ["last refusal", health.last_refusal],
    ["load error", health.load_error],
    ["uptime (s)", health.uptime_s],
  ];
  for (const [k, v] of Object.entries(health.model || {})) pairs.push(["model." + k, v]);
  for (const [k, v] of Object.entries(health.stages || {})) pairs.push(["stage " + k, (v.ready ? "ready" : "off") + (v.detail ? " — " + v.detail : "")]);
  kvRows($("#model-table"), pairs);
  const badge = $("#status-badge");
  badge.textContent = health.status + (health.model_id ? " · " + health.model_id : "");
  badge.className = "badge " + health.status;
}

function renderCounts(m, audit) {
  const pairs = [["requests", m.requests]];
  for (const o of OUTCOMES) pairs.push([o, `${m.by_outcome[o] || 0} (${pct(m.requests ? (m.by_outcome[o] || 0) / m.requests : null)})`]);
  pairs.push(["fallback ratio (not accepted)", pct(m.fallback_ratio)]);
  const canon = m.canonicalization || {};
  pairs.push(["canonicalization", ["hit", "miss", "ambiguity", "unresolved"].map((k) => `${k} ${canon[k] || 0}`).join(" · ")]);
  const nonzero = (obj) => Object.entries(obj).filter(([, n]) => n).map(([k, n]) => `${k} ${n}`).join(" · ") || "none";
  pairs.push(["reloads (trigger/result)", nonzero(m.reloads.reloads)]);
  pairs.push(["refusals (trigger)", nonzero(m.reloads.refusals)]);
  pairs.push(["audit log", audit.enabled ? `${audit.path} (text: ${audit.privacy}; written ${audit.written}, dropped ${audit.dropped}, failed ${audit.failed})` : "off"]);
  const intents = Object.entries(m.by_intent).slice(0, 10)
    .map(([name, c]) => `${name}: ${OUTCOMES.map((o) => c[o] || 0).join("/")}`);
  pairs.push(["top intents (accept/abstain/reject)", intents.join("\n") || "none yet"]);
  kvRows($("#counts-table"), pairs);
  fillRows($("#latency-table tbody"), Object.entries(m.latency_ms).map(([part, l]) =>
    [part, fmt(l.count), fmt(l.mean, 2), fmt(l.p50, 2), fmt(l.p95, 2)]));
}

function renderConfidence(bins) {
  const chart = $("#confidence-chart");
  const max = Math.max(1, ...bins.map((b) => OUTCOMES.reduce((s, o) => s + b[o], 0)));
  const nodes = [];
  for (const b of bins) {
    const total = OUTCOMES.reduce((s, o) => s + b[o], 0);
    const bar = el("div", null, "bar");
    bar.title = OUTCOMES.map((o) => `${o} ${b[o]}`).join(", ");
    for (const o of OUTCOMES) {
      const part = el("span", null, o);
      part.style.width = (100 * b[o] / max) + "%";
      bar.append(part);
    }
    nodes.push(el("span", `${b.lo.toFixed(2)}–${b.hi.toFixed(2)}`, "muted"), bar, el("span", total));
  }
  chart.replaceChildren(...nodes);
}

function renderRecent(records) {
  fillRows($("#recent-table tbody"), records.map((r) => [
    r.ts.slice(11, 23),
    r.text !== undefined ? r.text : (r.text_sha256 ? "#" + r.text_sha256 : "(not stored)"),
    r.intent || "—",
    fmt(r.confidence),
    el("td", r.decision, r.decision),
    r.via,
    fmt(r.total_ms, 2),
    r.canonical.result,
  ]));
}

async function refresh() {
  try {
    const resp = await fetch("/ui/status.json", { cache: "no-store" });
    const data = await resp.json();
    renderModel(data.health);
    renderCounts(data.metrics, data.audit);
    renderConfidence(data.metrics.confidence);
    renderRecent(data.recent);
    $("#updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (err) {
    $("#status-badge").textContent = "unreachable";
    $("#status-badge").className = "badge down";
  }
}

function showResult(body) {
  $("#try-intent").textContent = body.top_intent || "(abstain)";
  $("#try-confidence").textContent = fmt(body.confidence, 4);
  $("#try-decision").textContent = body.decision;
  $("#try-decision").className = body.decision;
  $("#try-via").textContent = body.via;
  $("#try-reason").textContent = body.reason || "—";
  $("#try-locale-used").textContent = body.locale;
  fillRows($("#try-stages tbody"), body.stages.map((s) =>
    [s.stage, el("td", s.outcome, s.outcome), fmt(s.ms, 3), s.intent || "—", fmt(s.confidence, 4), s.reason || "—"]));
  $("#try-alternatives").textContent = JSON.stringify({ alternatives: body.alternatives, slots: body.slots }, null, 2);
  $("#try-evidence").textContent = JSON.stringify(body.evidence, null, 2);
  $("#try-result").hidden = false;
  $("#try-result").dataset.requestId = body.request_id || "";
}

async function tryText(text, locale) {
  const payload = { text: text, request_id: "ui-" + Math.random().toString(16).slice(2, 14) };
  if (locale) payload.locale = locale;
  $("#try-error").hidden = true;
  try {
    const resp = await fetch("/parse", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(payload),
    });
    const body = await resp.json();
    if (!body.ok) throw new Error(`${body.error}: ${body.message}`);
    showResult(body);
  } catch (err) {
    $("#try-result").hidden = true;
    $("#try-error").textContent = String(err.message || err);
    $("#try-error").hidden = false;
  }
  refresh();
}

$("#try-form").addEventListener("submit", (event) => {
  event.preventDefault();
  tryText($("#try-text").value, $("#try-locale").value);
});

// "/ui?text=...&locale=en" fills the box and submits it: a link (or a --dump-dom run) shows a decision.
const params = new URLSearchParams(window.location.search);
if (params.get("text")) {
  $("#try-text").value = params.get("text");
  $("#try-locale").value = params.get("locale") || "";
  tryText(params.get("text"), params.get("locale") || "");
} else {
  refresh();
}
setInterval(refresh, 5000);
