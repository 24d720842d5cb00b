// The live dashboard: the server's samples (GET /metrics.json, once a second) as uPlot charts, the
// model's facts, and the reports of --reports DIR.
"use strict";

(() => {
  const { api, errorText, el, renderMarkdown } = LeapLLM;
  const $ = (id) => document.getElementById(id);
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea"];
  const charts = {};
  let reportsLoaded = false;

  // chart id -> its series: [label, function of a sample]
  const SERIES = {
    "chart-tokens": [["prompt tok/s", (s) => s.prompt_tokens_per_s], ["generated tok/s", (s) => s.generated_tokens_per_s]],
    "chart-requests": [["running", (s) => s.running], ["waiting", (s) => s.waiting]],
    "chart-kv": [["used", (s) => s.kv_blocks_used], ["total", (s) => s.kv_blocks_total],
                 ["windowed layers' pool, used", (s) => s.kv_window_blocks_used]],
    "chart-rates": [["prefix hit rate", (s) => s.prefix_hit_rate], ["speculative acceptance", (s) => s.spec_acceptance]],
    "chart-ttft": [["p50", (s) => ms(s.ttft_p50)], ["p90", (s) => ms(s.ttft_p90)]],
    "chart-tpot": [["p50", (s) => ms(s.tpot_p50)], ["p90", (s) => ms(s.tpot_p90)]],
  };

  function ms(seconds) {
    return seconds === null || seconds === undefined ? null : seconds * 1000;
  }

  function chartData(id, samples) {
    return [samples.map((s) => s.t), ...SERIES[id].map(([, get]) => samples.map((s) => get(s) ?? null))];
  }

  function draw(samples) {
    for (const id of Object.keys(SERIES)) {
      const data = chartData(id, samples);
      const box = $(id);
      if (!charts[id]) {
        const series = [{}, ...SERIES[id].map(([label], i) => ({ label, stroke: COLORS[i], width: 2, points: { show: false } }))];
        charts[id] = new uPlot({ width: Math.max(box.clientWidth, 280), height: 180, series, legend: { live: false } },
                               data, box);
      } else {
        charts[id].setData(data);
      }
      // What the chart shows, for a reader that cannot see the canvas (the browser tests): how many
      // samples, and the largest value of its first series.
      box.dataset.points = String(samples.length);
      box.dataset.peak = String(Math.max(0, ...data[1].filter((v) => v !== null)));
    }
  }

  function tile(label, value) {
    const node = el("div", "tile");
    node.append(el("div", "value", value), el("div", "label", label));
    return node;
  }

  function fmt(value, digits = 1) {
    return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
  }

  function drawTiles(data) {
    const s = data.stats;
    const last = data.samples[data.samples.length - 1] || {};
    const lat = data.latency;
    $("tiles").replaceChildren(
      tile("generated tok/s", fmt(last.generated_tokens_per_s)),
      tile("prompt tok/s", fmt(last.prompt_tokens_per_s)),
      tile("running / waiting", `${s.num_running} / ${s.num_waiting}`),
      tile("KV blocks used", `${s.kv_blocks_used} / ${s.kv_blocks_total}`),
      ...(s.kv_window_blocks_total ? [tile("windowed layers' KV blocks", `${s.kv_window_blocks_used} / ${s.kv_window_blocks_total}`)] : []),
      tile("prefix-cache hits", s.prefix_cache_query_tokens ? `${fmt(100 * s.prefix_cache_hit_tokens / s.prefix_cache_query_tokens)}%` : "–"),
      tile("TTFT p50 / p90 ms", `${fmt(ms(lat.ttft.p50), 0)} / ${fmt(ms(lat.ttft.p90), 0)}`),
      tile("TPOT p50 ms", fmt(ms(lat.tpot.p50))),
      tile("speculative acceptance", s.spec_decode_draft_tokens ? `${fmt(100 * s.spec_decode_accepted_tokens / s.spec_decode_draft_tokens)}%` : "–"),
    );
  }

  function factText(value, key = "") {
    if (value === null || value === undefined) return "–";
    if (typeof value === "number" && /bytes/.test(key)) return `${(value / 2 ** 20).toFixed(1)} MiB`;
    if (Array.isArray(value)) return value.map((v) => factText(v)).join(", ");
    if (typeof value !== "object") return String(value);
    const entries = Object.entries(value);
    if (!entries.length) return "–";
    return entries.map(([k, v]) => typeof v === "object" && !Array.isArray(v)
      ? `${k} (${Object.entries(v).map(([k2, v2]) => `${k2} ${factText(v2, k2)}`).join(", ")})`
      : `${k}: ${factText(v, key)}`).join("; ");
  }

  function drawFacts(model) {
    const rows = Object.entries(model).map(([key, value]) => {
      const row = el("tr");
      row.append(el("th", "", key.replaceAll("_", " ")), el("td", "", factText(value, key)));
      return row;
    });
    $("model-facts").replaceChildren(...rows);
  }

  // -- reports -----------------------------------------------------------------------------------
  async function showReport(name) {
    const view = $("report-view");
    view.replaceChildren(el("p", "muted", `Loading ${name}…`));
    const response = await api(`/reports/${encodeURIComponent(name)}`);
    if (!response.ok) {
      view.replaceChildren(el("p", "error", await errorText(response)));
      return;
    }
    const text = await response.text();
    view.replaceChildren(el("h3", "", name));
    if (name.endsWith(".md")) {
      view.appendChild(el("div", "markdown")).append(renderMarkdown(text));
    } else if (name.endsWith(".json")) {
      let pretty = text;
      try { pretty = JSON.stringify(JSON.parse(text), null, 2); } catch (_) { /* shown as it is */ }
      view.append(el("pre", "", pretty));
    } else {  // a profile report's HTML: in a frame that may run no script at all
      const frame = el("iframe", "report-frame");
      frame.setAttribute("sandbox", "");
      frame.srcdoc = text;
      view.append(frame);
    }
  }

  async function loadReports() {
    const response = await api("/reports");
    if (!response.ok) {
      $("report-list").replaceChildren(el("li", "error", await errorText(response)));
      return;
    }
    const { reports } = await response.json();
    const items = reports.map((r) => {
      const li = el("li");
      const button = el("button", "link", r.name);
      button.type = "button";
      button.addEventListener("click", () => showReport(r.name));
      li.append(button, el("span", "muted", ` ${(r.bytes / 1024).toFixed(1)} KiB`));
      return li;
    });
    $("report-list").replaceChildren(...(items.length ? items : [el("li", "muted", "The folder has no reports.")]));
  }

  // -- polling -----------------------------------------------------------------------------------
  async function poll() {
    try {
      const response = await api("/metrics.json");
      if (!response.ok) throw new Error(await errorText(response));
      const data = await response.json();
      $("model-name").textContent = data.model_name;
      $("status").textContent = `${data.samples.length} samples, one a second; updated ${new Date(data.now * 1000).toLocaleTimeString()}`;
      drawTiles(data);
      if (data.samples.length) draw(data.samples);
      if (!$("model-facts").childElementCount) drawFacts(data.model);
      if (data.reports && !reportsLoaded) {
        reportsLoaded = true;
        $("reports-section").hidden = false;
        loadReports();
      }
    } catch (e) {
      $("status").textContent = `No data: ${e.message}`;
    }
    setTimeout(poll, 1000);
  }

  LeapLLM.wireKeyButton();
  poll();
})();
