// freshrec status page: polls GET /status every 2 s, keeps the online HR@10 it sees to draw a
// small SVG chart, and asks GET /recommend for a user. No libraries, nothing fetched elsewhere.
"use strict";

const POLL_MS = 2000;
const KEEP_POINTS = 300; // 10 minutes of the chart at one point per poll
const hrPoints = []; // [unix seconds, HR@10]

const $ = (id) => document.getElementById(id);
const dash = "\u2013";

function num(v, digits) {
  return v === null || v === undefined || Number.isNaN(v) ? dash : Number(v).toFixed(digits);
}

function seconds(v) {
  if (v === null || v === undefined) return dash;
  if (v < 60) return `${v.toFixed(v < 10 ? 2 : 1)} s`;
  if (v < 3600) return `${(v / 60).toFixed(1)} min`;
  return `${(v / 3600).toFixed(1)} h`;
}

function setText(id, text) {
  $(id).textContent = text;
}

function render(s) {
  const t = s.trainer || {};
  setText("version", s.version > 0 ? `v${s.version}` : "none yet");
  $("version").dataset.version = String(s.version);
  setText("age", seconds(s.age_seconds));
  setText("fresh-p50", seconds(s.freshness_seconds.p50));
  setText("fresh-p99", seconds(s.freshness_seconds.p99));
  setText("fresh-count", String(s.freshness_seconds.count));
  setText("events-per-s", num(t.events_per_s, 0));
  setText("events-version", t.events === undefined || t.events === null ? dash : String(t.events));
  setText("online-hr", num(t["online_hr@10"], 3));
  setText("online-ndcg", num(t["online_ndcg@10"], 3));
  setText("holdout-hr", num(t["holdout_hr@10"], 3));
  setText("swaps", String(s.swaps));
  setText("swap-failures", String(s.swap_failures));
  setText("dlq", t.dlq === undefined || t.dlq === null ? dash : String(t.dlq));
  setText("catalog", String(s.catalog_items));
  setText("redis", s.redis_ok ? "ok" : "unreachable");
  const hr = t["online_hr@10"];
  if (typeof hr === "number") {
    hrPoints.push([s.now, hr]);
    if (hrPoints.length > KEEP_POINTS) hrPoints.shift();
  }
  drawChart();
}

function svg(tag, attrs, text) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

function drawChart() {
  const chart = $("hr-chart");
  const W = Math.max(200, Math.round(chart.clientWidth || 600)), H = 160;
  const left = 34, right = 6, top = 8, bottom = 18;
  chart.setAttribute("viewBox", `0 0 ${W} ${H}`); // 1:1 with pixels: text is not stretched
  chart.replaceChildren();
  const maxHr = Math.max(0.1, ...hrPoints.map((p) => p[1]));
  const yMax = Math.min(1, Math.ceil(maxHr * 10) / 10);
  const y = (v) => top + (H - top - bottom) * (1 - v / yMax);
  for (const v of [0, yMax / 2, yMax]) {
    chart.append(svg("line", { class: "axis", x1: left, x2: W - right, y1: y(v), y2: y(v) }));
    chart.append(svg("text", { x: 2, y: y(v) + 4 }, v.toFixed(2)));
  }
  if (hrPoints.length === 0) {
    chart.append(svg("text", { x: left + 8, y: H / 2 }, "waiting for the trainer's first version\u2026"));
    return;
  }
  const t0 = hrPoints[0][0], t1 = hrPoints[hrPoints.length - 1][0];
  const span = Math.max(t1 - t0, 1);
  const x = (t) => left + (W - left - right) * ((t - t0) / span);
  const pts = hrPoints.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`);
  if (pts.length === 1) pts.push(`${W - right},${y(hrPoints[0][1]).toFixed(1)}`);
  chart.append(svg("polyline", { class: "line", points: pts.join(" ") }));
  chart.append(svg("text", { x: left, y: H - 4 }, `${Math.round(span)} s`));
  chart.append(svg("text", { x: W - right - 30, y: H - 4 }, "now"));
  chart.dataset.points = String(hrPoints.length);
}

async function poll() {
  try {
    const resp = await fetch("/status", { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    render(await resp.json());
    $("conn").className = "conn ok";
    $("conn").textContent = `live \u00b7 updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    $("conn").className = "conn bad";
    $("conn").textContent = `disconnected (${err.message})`;
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

async function ask(event) {
  event.preventDefault();
  const user = $("user-id").value.trim();
  const k = $("k").value || "10";
  const list = $("recs");
  const meta = $("rec-meta");
  list.replaceChildren();
  if (!user) return;
  meta.className = "sub";
  meta.textContent = "asking\u2026";
  try {
    const q = new URLSearchParams({ user_id: user, k });
    const resp = await fetch(`/recommend?${q}`);
    const body = await resp.json();
    if (!resp.ok) throw new Error(typeof body.detail === "string" ? body.detail : `HTTP ${resp.status}`);
    meta.textContent = `user ${body.user_id}: ${body.items.length} items from ` +
      `${body.source === "model" ? `model v${body.model_version}` : "popularity (no model yet)"}` +
      `, ${body.history_used} history items used${body.stale_features ? " (stale history: Redis down)" : ""}`;
    for (const item of body.items) {
      const li = document.createElement("li");
      const text = document.createElement("span");
      text.className = "rec-text";
      text.textContent = item.text ?? "(no text)";
      const id = document.createElement("span");
      id.className = "item-id";
      id.textContent = ` [${item.item_id}]`;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = item.score.toFixed(3);
      li.append(text, id, score);
      list.append(li);
    }
  } catch (err) {
    meta.className = "sub error";
    meta.textContent = `failed: ${err.message}`;
  }
}

$("ask-form").addEventListener("submit", ask);
drawChart();
poll();
