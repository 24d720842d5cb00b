"""One self-contained HTML page of a model's attention over a text (`leapllm attention --html`).

The page shows, for each kind of attention the model has (a decoder's or encoder's "self"; an
encoder-decoder's "encoder", "decoder" and "cross"), a layer x head grid of heatmaps, a mean over
each layer's heads, and for the head clicked on, a large heatmap and a token-to-token view: point
at a query token and the key tokens are shaded by the weight it gives them.

The probabilities travel as one byte each, round(255 * sqrt(p)): the square root keeps the small
weights (most of a row, next to an attention sink's) distinguishable, and the page squares them
back for the numbers it shows (to within about 0.008 at p = 1, finer below). The page needs
nothing from the network; tokens are put in with textContent, never as markup.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from leapllm.model.attention import AttentionMaps


def encode_probabilities(layers: Sequence[torch.Tensor]) -> str:
    """Per layer (heads, queries, keys) probabilities -> base64 of round(255 * sqrt(p)), layer by layer."""
    parts = [torch.round(layer.float().clamp(0, 1).sqrt() * 255).to(torch.uint8).contiguous().numpy().tobytes()
             for layer in layers]
    return base64.b64encode(b"".join(parts)).decode("ascii")


def page_data(maps: Sequence[AttentionMaps], title: str, subtitle: str) -> dict:
    kinds = []
    for m in maps:
        for layer in m.layers:
            if layer.shape[1:] != (len(m.query_tokens), len(m.key_tokens)):
                raise ValueError(f"{m.kind}: a layer of shape {tuple(layer.shape)} does not fit "
                                 f"{len(m.query_tokens)} queries x {len(m.key_tokens)} keys")
        kinds.append({"kind": m.kind, "query_tokens": list(m.query_tokens), "key_tokens": list(m.key_tokens),
                      "heads": [int(layer.shape[0]) for layer in m.layers], "data": encode_probabilities(m.layers)})
    return {"title": title, "subtitle": subtitle, "kinds": kinds}


def render_attention_page(maps: Sequence[AttentionMaps], title: str, subtitle: str = "") -> str:
    data = json.dumps(page_data(maps, title, subtitle), ensure_ascii=True)
    # JSON inside <script> ends at the first "</": "<" is written as its escape, which JSON reads back.
    data = data.replace("<", "\\u003c")
    return (PAGE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data))


def write_attention_page(maps: Sequence[AttentionMaps], path: str | Path, title: str, subtitle: str = "") -> Path:
    path = Path(path)
    path.write_text(render_attention_page(maps, title, subtitle), encoding="utf-8")
    return path


PAGE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  :root { --ink: #1d2330; --muted: #5d6677; --line: #d9dde5; --accent: #c2410c; }
  body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink); margin: 0;
         background: #f7f8fa; }
  header { padding: 14px 22px; background: #fff; border-bottom: 1px solid var(--line); }
  h1 { font-size: 18px; margin: 0 0 2px; }
  .sub { color: var(--muted); }
  main { display: grid; grid-template-columns: max-content minmax(0, 1fr); gap: 22px; padding: 16px 22px;
         align-items: start; }
  #detail { position: sticky; top: 12px; }
  section { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; }
  .kinds button { font: inherit; margin-right: 6px; padding: 3px 10px; border: 1px solid var(--line);
                  background: #fff; border-radius: 14px; cursor: pointer; }
  .kinds button.on { background: var(--ink); color: #fff; border-color: var(--ink); }
  #grid { border-collapse: collapse; margin-top: 10px; }
  #grid th { font-weight: 500; color: var(--muted); font-size: 11px; padding: 1px 3px; }
  #grid td { padding: 1px; }
  #grid canvas { display: block; image-rendering: pixelated; border: 2px solid transparent; cursor: pointer; }
  #grid canvas.sel { border-color: var(--accent); }
  #grid-box { max-height: 78vh; overflow: auto; }
  #detail h2 { font-size: 15px; margin: 0 0 8px; }
  #big { image-rendering: pixelated; border: 1px solid var(--line); cursor: crosshair; }
  #tip { min-height: 1.5em; color: var(--muted); font-variant-numeric: tabular-nums; }
  .tokens { max-width: 600px; line-height: 1.9; margin-top: 8px; }
  .tokens span { padding: 1px 1px; border-radius: 3px; white-space: pre-wrap; }
  .tokens.queries span { cursor: pointer; }
  .tokens span.q { outline: 2px solid var(--accent); }
  .label { font-size: 12px; color: var(--muted); margin-top: 10px; max-width: 560px; }
  #top { margin: 6px 0 0; padding-left: 18px; font-variant-numeric: tabular-nums; }
  .legend { display: flex; align-items: center; gap: 6px; font-size: 12px; color: var(--muted); margin-top: 8px; }
  .legend canvas { border: 1px solid var(--line); }
</style>
</head>
<body>
<header><h1 id="title"></h1><div class="sub" id="subtitle"></div></header>
<main>
  <section>
    <div class="kinds" id="kinds"></div>
    <div class="label">Rows are layers, columns heads; the last column is the mean of the layer's heads.
      Each square is a queries &times; keys map (a query's row sums to 1). Click one to look closer.</div>
    <div id="grid-box"><table id="grid"></table></div>
    <div class="legend">0 <canvas id="legend" width="160" height="10"></canvas> 1 (shade &prop; &radic;p)</div>
  </section>
  <section id="detail">
    <h2 id="detail-title"></h2>
    <canvas id="big"></canvas>
    <div id="tip">Point at the map: query &rarr; key and its weight.</div>
    <div class="label" id="keys-label">Keys, shaded by the weight the chosen query gives them:</div>
    <div class="tokens" id="keys"></div>
    <div class="label" id="queries-label">Queries (point at one to choose it):</div>
    <div class="tokens queries" id="queries"></div>
    <div class="label">The chosen query's largest weights:</div>
    <ol id="top"></ol>
  </section>
</main>
<script type="application/json" id="attention-data">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("attention-data").textContent);
const kinds = DATA.kinds.map(k => {
  const bytes = Uint8Array.from(atob(k.data), c => c.charCodeAt(0));
  const q = k.query_tokens.length, n = k.key_tokens.length, offsets = [];
  let at = 0;
  for (const h of k.heads) { offsets.push(at); at += h * q * n; }
  return Object.assign(k, {bytes, q, n, offsets, same: k.query_tokens.join("\u0000") === k.key_tokens.join("\u0000")});
});
let kind = kinds[0], layer = 0, head = 0, query = kind ? kind.q - 1 : 0;

// A head's map as shades 0..255 (round(255 sqrt p)); head === -1: the layer's mean over heads.
function shades(k, l, h) {
  const size = k.q * k.n;
  if (h >= 0) return k.bytes.subarray(k.offsets[l] + h * size, k.offsets[l] + (h + 1) * size);
  const out = new Uint8Array(size), heads = k.heads[l];
  for (let i = 0; i < size; i++) {
    let p = 0;
    for (let j = 0; j < heads; j++) { const s = k.bytes[k.offsets[l] + j * size + i] / 255; p += s * s; }
    out[i] = Math.round(Math.sqrt(p / heads) * 255);
  }
  return out;
}
const prob = s => (s / 255) * (s / 255);
// White to deep blue, by shade.
function color(s) {
  const t = s / 255;
  return [Math.round(255 - t * 247), Math.round(255 - t * 207), Math.round(255 - t * 148)];
}
function paint(canvas, values, rows, cols) {
  canvas.width = cols; canvas.height = rows;
  const ctx = canvas.getContext("2d"), img = ctx.createImageData(cols, rows);
  for (let i = 0; i < rows * cols; i++) {
    const [r, g, b] = color(values[i]);
    img.data.set([r, g, b, 255], i * 4);
  }
  ctx.putImageData(img, 0, 0);
}
const shown = t => t.replace(/\n/g, "\u21b5\n");
const quoted = t => JSON.stringify(t);

function drawKinds() {
  const box = document.getElementById("kinds");
  box.replaceChildren();
  if (kinds.length < 2) return;
  for (const k of kinds) {
    const b = document.createElement("button");
    b.textContent = k.kind;
    b.className = k === kind ? "on" : "";
    b.onclick = () => { kind = k; layer = 0; head = 0; query = k.q - 1; drawAll(); };
    box.appendChild(b);
  }
}
function drawGrid() {
  const grid = document.getElementById("grid");
  grid.replaceChildren();
  const most = Math.max(...kind.heads), side = Math.max(24, Math.min(64, Math.round(480 / (most + 1))));
  const head_row = grid.insertRow();
  head_row.appendChild(document.createElement("th"));
  for (let h = 0; h < most; h++) { const th = document.createElement("th"); th.textContent = "H" + h; head_row.appendChild(th); }
  const mean = document.createElement("th"); mean.textContent = "mean"; head_row.appendChild(mean);
  kind.heads.forEach((heads, l) => {
    const row = grid.insertRow(), th = document.createElement("th");
    th.textContent = "L" + l; row.appendChild(th);
    for (let h = 0; h < heads; h++) addCell(row.insertCell(), l, h, side);
    if (heads < most) row.insertCell().colSpan = most - heads;  // a pruned layer keeps fewer heads
    addCell(row.insertCell(), l, -1, side);
  });
}
function addCell(td, l, h, side) {
  const c = document.createElement("canvas");
  paint(c, shades(kind, l, h), kind.q, kind.n);
  c.style.width = side + "px"; c.style.height = Math.round(side * kind.q / kind.n) + "px";
  c.title = "layer " + l + (h < 0 ? ", mean of heads" : ", head " + h);
  c.dataset.layer = l; c.dataset.head = h;
  if (l === layer && h === head) c.className = "sel";
  c.onclick = () => { layer = l; head = h; drawGrid(); drawDetail(); };
  td.appendChild(c);
}
function drawDetail() {
  const values = shades(kind, layer, head);
  document.getElementById("detail-title").textContent =
    kind.kind + " attention, layer " + layer + (head < 0 ? ", mean of the heads" : ", head " + head);
  const big = document.getElementById("big"), cell = Math.max(2, Math.floor(480 / Math.max(kind.q, kind.n)));
  paint(big, values, kind.q, kind.n);
  big.style.width = kind.n * cell + "px"; big.style.height = kind.q * cell + "px";
  big.onmousemove = e => {
    const r = big.getBoundingClientRect();
    const i = Math.min(kind.q - 1, Math.floor((e.clientY - r.top) / r.height * kind.q));
    const j = Math.min(kind.n - 1, Math.floor((e.clientX - r.left) / r.width * kind.n));
    document.getElementById("tip").textContent = quoted(kind.query_tokens[i]) + " \u2192 " +
      quoted(kind.key_tokens[j]) + ": " + prob(values[i * kind.n + j]).toFixed(3);
  };
  big.onclick = e => {
    const r = big.getBoundingClientRect();
    query = Math.min(kind.q - 1, Math.floor((e.clientY - r.top) / r.height * kind.q));
    drawTokens(values);
  };
  drawTokens(values);
}
function drawTokens(values) {
  const row = values.subarray(query * kind.n, (query + 1) * kind.n);
  const keys = document.getElementById("keys");
  keys.replaceChildren();
  kind.key_tokens.forEach((t, j) => {
    const s = document.createElement("span");
    s.textContent = shown(t);
    const [r, g, b] = color(row[j]);
    s.style.background = "rgb(" + r + "," + g + "," + b + ")";
    if (row[j] > 170) s.style.color = "#fff";
    s.title = prob(row[j]).toFixed(3);
    if (kind.same && j === query) s.className = "q";
    if (kind.same) s.onmouseenter = () => { if (j !== query) { query = j; drawTokens(values); } };
    keys.appendChild(s);
  });
  const queries = document.getElementById("queries");
  queries.replaceChildren();
  document.getElementById("queries-label").style.display = kind.same ? "none" : "";
  document.getElementById("keys-label").textContent = kind.same
    ? "Point at a token to see where it looks (shade = its weight on each token):"
    : "Keys, shaded by the weight the chosen query gives them:";
  if (!kind.same) {
    kind.query_tokens.forEach((t, i) => {
      const s = document.createElement("span");
      s.textContent = shown(t);
      if (i === query) s.className = "q";
      s.onmouseenter = () => { if (i !== query) { query = i; drawTokens(values); } };
      queries.appendChild(s);
    });
  }
  const top = document.getElementById("top");
  top.replaceChildren();
  Array.from(row.keys()).sort((a, b) => row[b] - row[a]).slice(0, 5).forEach(j => {
    const li = document.createElement("li");
    li.textContent = quoted(kind.query_tokens[query]) + " \u2192 " + quoted(kind.key_tokens[j]) +
      " (" + j + "): " + prob(row[j]).toFixed(3);
    top.appendChild(li);
  });
}
function drawAll() { drawKinds(); drawGrid(); drawDetail(); }

document.getElementById("title").textContent = DATA.title;
document.getElementById("subtitle").textContent = DATA.subtitle;
const legend = document.getElementById("legend").getContext("2d");
for (let x = 0; x < 160; x++) { const [r, g, b] = color(x * 255 / 159); legend.fillStyle = "rgb(" + r + "," + g + "," + b + ")"; legend.fillRect(x, 0, 1, 10); }
if (kind) drawAll();
</script>
</body>
</html>
"""
