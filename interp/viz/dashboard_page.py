"""The dashboard page: HTML, CSS and JavaScript, with ``__TITLE__`` and ``__DATA__`` filled in by
``interp.viz.dashboard.write_page``. Plain DOM code, no libraries, no network."""

PAGE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
body { font-family: system-ui, sans-serif; margin: 0; color: #222; background: #fafafa; }
header { padding: 0.8em 1.2em; background: #fff; border-bottom: 1px solid #ddd; display: flex; gap: 2em; align-items: center; }
header h1 { font-size: 1.2em; margin: 0; }
header .meta { color: #555; font-size: 0.85em; line-height: 1.5; }
main { display: flex; align-items: flex-start; }
aside { width: 330px; flex: none; padding: 0.8em; border-right: 1px solid #ddd; background: #fff; min-height: 90vh; }
aside input, aside select { width: 100%; box-sizing: border-box; padding: 0.4em; margin-bottom: 0.4em; font-size: 0.95em; }
#count { color: #555; font-size: 0.85em; margin: 0.3em 0; }
#list { list-style: none; padding: 0; margin: 0; }
#list li { padding: 0.3em 0.4em; border-bottom: 1px solid #eee; cursor: pointer; font-size: 0.85em; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
#list li:hover { background: #f0f4ff; }
#list li.selected { background: #dde6ff; }
#list .id { font-weight: 600; display: inline-block; min-width: 4.5em; }
#list .dens { color: #777; display: inline-block; min-width: 5em; }
.pager { display: flex; justify-content: space-between; align-items: center; margin-top: 0.5em; font-size: 0.85em; }
.pager button { padding: 0.2em 0.8em; }
section#detail { flex: 1; padding: 1em 1.5em; min-width: 0; }
.stats { color: #444; font-size: 0.9em; margin-bottom: 0.6em; }
.row { display: flex; gap: 2em; flex-wrap: wrap; align-items: flex-start; }
.chips span { display: inline-block; font-family: ui-monospace, monospace; font-size: 0.85em; padding: 0.1em 0.35em; margin: 0.1em; border-radius: 3px; white-space: pre; }
.chips .pos { background: #d8f0d8; } .chips .neg { background: #f6d6d6; }
h3 { font-size: 0.95em; margin: 0.8em 0 0.3em; }
.ctx { font-family: ui-monospace, monospace; font-size: 0.85em; white-space: pre-wrap; line-height: 1.7; padding: 0.15em 0; border-bottom: 1px solid #f0f0f0; }
.ctx .val { display: inline-block; width: 5.5em; color: #888; }
.tok { border-radius: 2px; }
.tok.peak { outline: 2px solid #c00; }
svg text { font-size: 10px; fill: #555; }
.empty { color: #888; font-style: italic; }
</style></head>
<body>
<header><h1 id="title"></h1><div class="meta" id="meta"></div><div id="overview"></div></header>
<main>
<aside>
  <input id="search" type="search" placeholder="search: latent id or token text" autocomplete="off">
  <select id="sort">
    <option value="id">sort by latent id</option>
    <option value="density">sort by firing density</option>
    <option value="max">sort by max activation</option>
  </select>
  <div id="count"></div>
  <ul id="list"></ul>
  <div class="pager"><button id="prev">&larr;</button><span id="page"></span><button id="next">&rarr;</button></div>
</aside>
<section id="detail"><p class="empty">Select a latent.</p></section>
</main>
<script type="application/json" id="interp-data">__DATA__</script>
<script>
"use strict";
const PER_PAGE = 50;
const raw = JSON.parse(document.getElementById("interp-data").textContent);
function decode(text, Type) {
  const bin = atob(text), bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Type(bytes.buffer);
}
const D = {
  meta: raw.meta, vocab: raw.vocab, bins: raw.bins,
  ids: decode(raw.latent_ids, Int32Array), density: decode(raw.density, Float32Array), max: decode(raw.max, Float32Array),
  hist: decode(raw.hist, Int32Array),
  tokens: decode(raw.tokens, raw.token_type === "u16" ? Uint16Array : Uint32Array),
  starts: decode(raw.context_starts, Int32Array),
  exOff: decode(raw.ex_offsets, Int32Array), exRows: decode(raw.ex_rows, Int32Array), exVals: decode(raw.ex_values, Float32Array),
  winOff: decode(raw.win_offsets, Int32Array), winRows: decode(raw.win_rows, Int32Array), winVals: decode(raw.win_values, Float32Array),
};
if (raw.decoded) {
  D.dec = { k: raw.decoded.k, pro: decode(raw.decoded.promoted, Int32Array), proV: decode(raw.decoded.promoted_logits, Float32Array),
            sup: decode(raw.decoded.suppressed, Int32Array), supV: decode(raw.decoded.suppressed_logits, Float32Array) };
}
const N = D.ids.length;
const state = { order: [], page: 0, selected: -1 };
let searchText = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v; else if (k === "style") node.style.cssText = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}
function shown(token) { return token.replace(/\n/g, "\u21b5").replace(/\t/g, "\u2192"); }
function pct(x) { return x >= 0.01 ? (100 * x).toFixed(2) + "%" : x > 0 ? (100 * x).toPrecision(2) + "%" : "0%"; }
function contextOf(row) {  // [start, stop) of the context holding a local row
  let lo = 0, hi = D.starts.length - 1;
  while (lo < hi) { const mid = (lo + hi + 1) >> 1; if (D.starts[mid] <= row) lo = mid; else hi = mid - 1; }
  return [D.starts[lo], lo + 1 < D.starts.length ? D.starts[lo + 1] : D.tokens.length];
}
function peakTokens(i) {
  const out = [];
  for (let e = D.exOff[i]; e < D.exOff[i + 1]; e++) out.push(D.vocab[D.tokens[D.exRows[e]]]);
  return out;
}
function buildSearchText() {  // per latent: its top tokens and promoted tokens, lower case
  searchText = new Array(N);
  for (let i = 0; i < N; i++) {
    const words = peakTokens(i);
    if (D.dec) for (let j = 0; j < D.dec.k; j++) words.push(D.vocab[D.dec.pro[i * D.dec.k + j]]);
    searchText[i] = words.join("\u0001").toLowerCase();
  }
}
function filterAndSort() {
  const query = document.getElementById("search").value.trim().toLowerCase();
  let order = [];
  if (!query) { for (let i = 0; i < N; i++) order.push(i); }
  else {
    if (searchText === null) buildSearchText();
    const number = /^\d+$/.test(query) ? Number(query) : -1;
    for (let i = 0; i < N; i++) if (D.ids[i] === number || searchText[i].includes(query)) order.push(i);
  }
  const key = document.getElementById("sort").value;
  if (key === "density") order.sort((a, b) => D.density[b] - D.density[a]);
  else if (key === "max") order.sort((a, b) => D.max[b] - D.max[a]);
  state.order = order;
  state.page = 0;
  renderList();
}
function renderList() {
  const list = document.getElementById("list");
  list.replaceChildren();
  const pages = Math.max(1, Math.ceil(state.order.length / PER_PAGE));
  state.page = Math.min(state.page, pages - 1);
  for (const i of state.order.slice(state.page * PER_PAGE, (state.page + 1) * PER_PAGE)) {
    const preview = peakTokens(i).slice(0, 5).map(shown).join(" \u00b7 ");
    const item = el("li", { "data-latent": String(D.ids[i]), class: i === state.selected ? "selected" : "" },
      el("span", { class: "id" }, "#" + D.ids[i]), el("span", { class: "dens" }, pct(D.density[i])), preview);
    item.addEventListener("click", () => select(i));
    list.append(item);
  }
  document.getElementById("count").textContent = state.order.length + " of " + N + " latents";
  document.getElementById("page").textContent = "page " + (state.page + 1) + " / " + pages;
}
function histogramSvg(values, width, height, label) {
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", height + 28);
  const top = Math.max(1, ...values), barW = width / values.length;
  values.forEach((v, b) => {
    const h = (v / top) * height, rect = document.createElementNS(svgNS, "rect");
    rect.setAttribute("x", (b * barW + 0.5).toFixed(1)); rect.setAttribute("y", (height - h).toFixed(1));
    rect.setAttribute("width", Math.max(barW - 1, 1).toFixed(1)); rect.setAttribute("height", h.toFixed(1));
    rect.setAttribute("fill", "#f28e2b");
    const tip = document.createElementNS(svgNS, "title"); tip.textContent = String(v); rect.append(tip);
    svg.append(rect);
  });
  label.forEach(([x, text, anchor]) => {
    const t = document.createElementNS(svgNS, "text");
    t.setAttribute("x", x); t.setAttribute("y", height + 14); t.setAttribute("text-anchor", anchor); t.textContent = text;
    svg.append(t);
  });
  return svg;
}
function chips(ids, vals, cls) {
  const box = el("div", { class: "chips" });
  for (let j = 0; j < ids.length; j++) box.append(el("span", { class: cls, title: vals[j].toFixed(3) }, shown(D.vocab[ids[j]])));
  return box;
}
function contextLine(i, e, peak) {
  const row = D.exRows[e], [start, stop] = contextOf(row);
  const lo = Math.max(start, row - D.meta.left), hi = Math.min(stop, row + D.meta.right + 1);
  const acts = new Map();
  for (let w = D.winOff[i]; w < D.winOff[i + 1]; w++) if (D.winRows[w] >= lo && D.winRows[w] < hi) acts.set(D.winRows[w], D.winVals[w]);
  const line = el("div", { class: "ctx" }, el("span", { class: "val" }, D.exVals[e].toFixed(3)));
  for (let r = lo; r < hi; r++) {
    const a = acts.get(r) || 0, alpha = peak > 0 ? Math.min(1, a / peak) : 0;
    const span = el("span", { class: "tok" + (a > 0 ? " act" : "") + (r === row ? " peak" : ""),
                              title: a.toFixed(3), style: a > 0 ? "background: rgba(242, 142, 43, " + alpha.toFixed(2) + ")" : "" },
                    shown(D.vocab[D.tokens[r]]));
    line.append(span);
  }
  return line;
}
function select(i) {
  state.selected = i;
  history.replaceState(null, "", "#latent=" + D.ids[i]);
  for (const item of document.querySelectorAll("#list li")) item.classList.toggle("selected", item.dataset.latent === String(D.ids[i]));
  const detail = document.getElementById("detail");
  const count = D.exOff[i + 1] - D.exOff[i];
  const hist = Array.from(D.hist.subarray(i * D.bins, (i + 1) * D.bins));
  const fired = hist.reduce((a, b) => a + b, 0);
  detail.replaceChildren(
    el("h2", {}, "Latent " + D.ids[i]),
    el("div", { class: "stats" }, "fires on " + pct(D.density[i]) + " of " + D.meta.rows.toLocaleString() + " tokens (" +
       fired.toLocaleString() + ")  \u00b7  max activation " + D.max[i].toFixed(3)));
  const row = el("div", { class: "row" });
  const left = el("div", {}, el("h3", {}, "activation histogram (non-zero activations)"),
    histogramSvg(hist, 360, 90, [[0, "0", "start"], [360, D.max[i].toFixed(2), "end"]]));
  row.append(left);
  if (D.dec) {
    const k = D.dec.k, s = i * k;
    row.append(el("div", {}, el("h3", {}, "promotes (output direction through the unembedding)"),
      chips(D.dec.pro.subarray(s, s + k), D.dec.proV.subarray(s, s + k), "pos"),
      el("h3", {}, "suppresses"), chips(D.dec.sup.subarray(s, s + k), D.dec.supV.subarray(s, s + k), "neg")));
  }
  detail.append(row, el("h3", {}, "top-activating contexts (" + count + ")"));
  const box = el("div", { id: "contexts" });
  if (!count) box.append(el("p", { class: "empty" }, "This latent did not fire on the tokens read."));
  for (let e = D.exOff[i]; e < D.exOff[i + 1]; e++) box.append(contextLine(i, e, D.max[i]));
  detail.append(box);
}
function overview() {  // firing densities of all latents, log10 bins
  const bins = new Array(14).fill(0);
  let dead = 0;
  for (let i = 0; i < N; i++) {
    if (D.density[i] <= 0) { dead++; continue; }
    bins[Math.min(13, Math.max(0, Math.floor((Math.log10(D.density[i]) + 7) * 2)))]++;
  }
  const box = el("div", { class: "meta" }, "firing density of the latents (log scale, 1e-7 to 1); " + dead + " never fired");
  box.append(histogramSvg(bins, 280, 40, [[0, "1e-7", "start"], [140, "1e-3.5", "middle"], [280, "1", "end"]]));
  return box;
}
function init() {
  const m = D.meta;
  document.getElementById("title").textContent = m.name + " (" + m.kind + ")";
  document.getElementById("meta").append(
    el("div", {}, m.shown_latents + " of " + m.n_latents + " latents \u00b7 site " + m.site + " \u00b7 model " + m.model),
    el("div", {}, m.rows.toLocaleString() + " tokens of " + m.corpus + " (store rows " + m.first_row.toLocaleString() + "+) \u00b7 " +
       m.dead + " latents never fired \u00b7 built " + m.created));
  document.getElementById("overview").append(overview());
  document.getElementById("search").addEventListener("input", filterAndSort);
  document.getElementById("sort").addEventListener("change", filterAndSort);
  document.getElementById("prev").addEventListener("click", () => { state.page = Math.max(0, state.page - 1); renderList(); });
  document.getElementById("next").addEventListener("click", () => { state.page += 1; renderList(); });
  filterAndSort();
  const wanted = /latent=(\d+)/.exec(location.hash);
  const first = wanted ? Array.from(D.ids).indexOf(Number(wanted[1])) : -1;
  if (first >= 0) select(first); else if (state.order.length) select(state.order[0]);
}
init();
</script>
</body></html>
"""
