// The explorer page: asks the server (pipeline/explorer/server.py) and draws its answers; no maths here.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { catalogue: null, selection: {}, view: null, sequence: 0, busy: false, searchVariant: null };

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

function setStatus(text, kind) { const s = $("status"); s.textContent = text; s.dataset.state = kind; }

function option(select, value, text) {
  const o = document.createElement("option"); o.value = value; o.textContent = text ?? value; select.appendChild(o); return o;
}

function el(tag, className, parent) {
  const e = document.createElement(tag); if (className) e.className = className; if (parent) parent.appendChild(e); return e;
}

// ---- maps to draw: per store, chosen layers x timesteps x transforms --------------------------------------
function buildVariantChooser() {
  const box = $("variants");
  for (const store of state.catalogue.stores) {
    const chosen = store.default;
    const sel = state.selection[store.name] = { on: true, layers: new Set([chosen.layer]),
      timesteps: new Set([chosen.timestep]), transforms: new Set([chosen.transform]) };
    const row = el("div", "store", box);
    const label = el("label", "", row);
    const check = el("input", "", label); check.type = "checkbox"; check.checked = true; check.dataset.store = store.name;
    label.append(" " + store.name);
    if (store.stale) { const mark = el("span", "stale", label); mark.textContent = " stale"; mark.title = store.stale; }
    check.onchange = () => { sel.on = check.checked; variantsChanged(); };
    const choices = el("div", "choices", row);
    for (const [key, values] of [["layers", store.layers], ["timesteps", store.timesteps], ["transforms", store.transforms]]) {
      const line = el("div", "", choices);
      for (const value of values) {
        const chip = el("span", "chip" + (sel[key].has(value) ? " on" : ""), line);
        chip.textContent = key === "timesteps" ? `t=${value}` : value;
        chip.dataset.store = store.name; chip.dataset.kind = key; chip.dataset.value = value;
        chip.onclick = () => {
          if (sel[key].has(value)) { if (sel[key].size > 1) sel[key].delete(value); } else sel[key].add(value);
          chip.classList.toggle("on", sel[key].has(value));
          variantsChanged();
        };
      }
    }
  }
  countVariants();
}

function variants() {
  const out = [];
  for (const store of state.catalogue.stores) {
    const sel = state.selection[store.name];
    if (!sel.on) continue;
    for (const layer of store.layers) if (sel.layers.has(layer))
      for (const timestep of store.timesteps) if (sel.timesteps.has(timestep))
        for (const transform of store.transforms) if (sel.transforms.has(transform))
          out.push({ store: store.name, layer, timestep, transform });
  }
  return out;
}

function countVariants() { $("variant-count").textContent = `(${variants().length})`; }

function variantsChanged() {
  countVariants();
  if (state.view && state.view.lastQuery) query(state.view.lastQuery);
}

// ---- pairs ---------------------------------------------------------------------------------------------------
async function loadPairs() {
  const params = new URLSearchParams({ category: $("category").value, flag: $("flag").value,
    value: $("flag-value").value, right: $("right").value, wrong: $("wrong").value });
  const select = $("pair");
  select.innerHTML = "";
  try {
    const { total, pairs } = await api(`/api/pairs?${params}`);
    for (const p of pairs) {
      const extra = p.disagreements !== undefined ? ` — ${p.disagreements} kp` : "";
      option(select, p.pair, `${p.pair} (${p.keypoints} kp)${extra}`);
    }
    setStatus(pairs.length < total ? `the first ${pairs.length} of ${total} pairs` : `${total} pairs`, "idle");
  } catch (error) { setStatus(error.message, "error"); }
}

async function showPair(name) {
  const pair = await api(`/api/pair?name=${encodeURIComponent(name)}`);
  showImages(pair.src, pair.trg, pair);
}

function showImages(src, trg, pair) {
  state.view = { pair: pair ? pair.pair : null, src, trg, lastQuery: null };
  $("source-title").textContent = `source: ${src.image}` + (pair ? ` — pair ${pair.pair}` : "");
  const frame = $("source-frame");
  frame.querySelectorAll(".keypoint, .marker").forEach((e) => e.remove());
  $("source").src = `/image?key=${encodeURIComponent(src.image)}`;
  (src.kps || []).forEach(([x, y], index) => {
    const dot = el("button", "keypoint", frame);
    place(dot, x, y, src);
    dot.dataset.keypoint = index;
    dot.title = `keypoint ${pair.keypoints[index]}`;
    dot.onclick = (event) => { event.stopPropagation(); query({ keypoint: index }); };
  });
  $("maps").innerHTML = ""; $("search-results").innerHTML = ""; $("query").textContent = "click a point or a keypoint";
  api("/api/warm", { variants: variants(), pair: state.view.pair, trg: trg.image }).catch(() => {});
}

function place(element, x, y, image) {
  element.style.left = `${(100 * (x + 0.5)) / image.width}%`;
  element.style.top = `${(100 * (y + 0.5)) / image.height}%`;
}

function pointFromEvent(event) {
  const img = $("source"), rect = img.getBoundingClientRect(), src = state.view.src;
  return { x: Math.floor(((event.clientX - rect.left) / rect.width) * src.width),
           y: Math.floor(((event.clientY - rect.top) / rect.height) * src.height) };
}

// ---- a query: every selected map for one source point ------------------------------------------------------
async function query(what) {
  if (!state.view) return;
  const view = state.view, sequence = ++state.sequence, started = performance.now();
  view.lastQuery = what;
  state.busy = true;
  setStatus("…", "busy");
  const body = { variants: variants(), ...what };
  if (view.pair) body.pair = view.pair; else { body.src = view.src.image; body.trg = view.trg.image; }
  try {
    const answer = await api("/api/click", body);
    if (sequence !== state.sequence) return;  // a newer query is on its way
    drawQuery(answer, view);
    setStatus(`${answer.maps.length} maps in ${Math.round(performance.now() - started)} ms`, "ready");
    $("status").dataset.query = JSON.stringify(what);
    search(answer);
  } catch (error) { setStatus(error.message, "error"); }
  finally { state.busy = false; }
}

function drawQuery(answer, view) {
  const frame = $("source-frame");
  frame.querySelectorAll(".marker").forEach((e) => e.remove());
  frame.querySelectorAll(".keypoint").forEach((e) => e.classList.toggle("on", Number(e.dataset.keypoint) === answer.keypoint));
  const [qx, qy] = answer.point;
  place(el("div", "marker query", frame), qx, qy, view.src);
  $("query").textContent = `query (${qx}, ${qy})` + (answer.keypoint !== null ? `, keypoint ${answer.keypoint}` : "");
  const maps = $("maps");
  maps.innerHTML = "";
  for (const m of answer.maps) maps.appendChild(card(m, view.trg));
}

function card(m, trg) {
  const c = el("div", "card");
  Object.assign(c.dataset, { store: m.variant.store, layer: m.variant.layer, timestep: m.variant.timestep,
                             transform: m.variant.transform });
  const label = el("div", "label", c); label.textContent = m.label; label.title = "search this layer across the dataset";
  label.style.cursor = "pointer";
  label.onclick = () => { state.searchVariant = m.variant; if (state.lastAnswer) search(state.lastAnswer); };
  const frame = el("div", "frame", c);
  const image = el("img", "", frame); image.src = `/image?key=${encodeURIComponent(trg.image)}`;
  const overlay = el("img", "overlay", frame); overlay.src = m.map;
  const [px, py] = m.predicted;
  const pred = el("div", "marker pred", frame); place(pred, px, py, trg);
  pred.dataset.x = px; pred.dataset.y = py;
  if (m.true) { const t = el("div", "marker true", frame); place(t, m.true[0], m.true[1], trg); t.dataset.x = m.true[0]; t.dataset.y = m.true[1]; }
  const numbers = el("div", "numbers", c);
  const s = m.sharpness;
  const pck = m.pck ? ` · pair PCK@0.1 bbox ${fmt(m.pck.bbox)}, img ${fmt(m.pck.img)}` : "";
  numbers.innerHTML = `predicted <b class="predicted">(${px}, ${py})</b>` + (m.true ? `, true (${m.true[0]}, ${m.true[1]})` : "") +
    `${pck}<br>max ${fmt(s.sim_max)} · mean ${fmt(s.sim_mean)} · std ${fmt(s.sim_std)} · entropy ${fmt(s.sim_entropy)} · 2nd-peak ${fmt(s.sim_peak_ratio)}`;
  c.appendChild(histogram(m.histogram));
  return c;
}

function fmt(v) { return v === undefined || v === null ? "-" : Number(v).toFixed(3); }

function histogram(h) {
  const width = 250, height = 50, n = h.counts.length, top = Math.max(...h.counts, 1);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", height + 12);
  h.counts.forEach((count, i) => {
    const bar = document.createElementNS(svg.namespaceURI, "rect");
    const barHeight = (height * count) / top;
    bar.setAttribute("x", (i * width) / n); bar.setAttribute("width", width / n - 0.5);
    bar.setAttribute("y", height - barHeight); bar.setAttribute("height", barHeight); bar.setAttribute("fill", "#3b528b");
    svg.appendChild(bar);
  });
  for (const [x, text] of [[0, "-1"], [width / 2 - 3, "0"], [width - 8, "1"]]) {
    const t = document.createElementNS(svg.namespaceURI, "text");
    t.setAttribute("x", x); t.setAttribute("y", height + 10); t.setAttribute("font-size", "9"); t.textContent = text;
    svg.appendChild(t);
  }
  return svg;
}

// ---- dataset-wide search for the clicked point ------------------------------------------------------------------
async function search(answer) {
  state.lastAnswer = answer;
  const variant = state.searchVariant && answer.maps.some((m) => JSON.stringify(m.variant) === JSON.stringify(state.searchVariant))
    ? state.searchVariant : answer.maps[0] && answer.maps[0].variant;
  if (!variant) return;
  $("search-variant").textContent = `${variant.store} ${variant.layer} t=${variant.timestep}`;
  const box = $("search-results");
  try {
    const hits = await api("/api/search", { variant, image: answer.src, x: answer.point[0], y: answer.point[1], top: 20 });
    box.innerHTML = "";
    for (const hit of hits) {
      const cell = el("div", "hit", box);
      const frame = el("div", "frame", cell);
      const img = el("img", "", frame); img.src = `/image?key=${encodeURIComponent(hit.image)}`; img.loading = "lazy";
      const size = state.catalogue.sizes[hit.image];
      const dot = el("div", "marker query", frame); place(dot, hit.x - 0.5, hit.y - 0.5, { width: size[0], height: size[1] });
      el("div", "", cell).textContent = `${hit.image} ${hit.similarity.toFixed(3)}`;
    }
  } catch (error) { box.textContent = error.message; }
}

// ---- start ----------------------------------------------------------------------------------------------------------
async function start() {
  state.catalogue = await api("/api/catalogue");
  const c = state.catalogue;
  for (const category of c.categories) option($("category"), category);
  for (const flag of Object.keys(c.flags)) option($("flag"), flag);
  for (const store of c.stores.filter((s) => s.compare)) { option($("right"), store.name); option($("wrong"), store.name); }
  for (const key of c.images) option($("image-keys"), key);
  $("flag").onchange = () => {
    $("flag-value").innerHTML = "";
    for (const v of c.flags[$("flag").value] || []) option($("flag-value"), v);
    loadPairs();
  };
  for (const id of ["category", "flag-value", "right", "wrong"]) $(id).onchange = loadPairs;
  $("pair").onchange = () => showPair($("pair").value);
  $("use-images").onclick = () => {
    const size = (key) => ({ image: key, width: c.sizes[key][0], height: c.sizes[key][1], kps: [] });
    showImages(size($("src-image").value), size($("trg-image").value), null);
  };
  $("source-frame").onclick = (event) => query(pointFromEvent(event));
  $("source-frame").onmousemove = (event) => { if ($("hover").checked && !state.busy) query(pointFromEvent(event)); };
  buildVariantChooser();
  await loadPairs();
  const stale = c.stores.filter((s) => s.stale).map((s) => s.name);
  setStatus(`${c.pairs} pairs, ${c.stores.length} stores` + (stale.length ? ` (stale: ${stale.join(", ")})` : ""), "idle");
}

start().catch((error) => setStatus(error.message, "error"));
