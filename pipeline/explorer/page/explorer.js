// The explorer page: asks the server (pipeline/explorer/server.py) and draws its answers; no maths here.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const DEBOUNCE_MS = 250;  // chip and store changes: three quick clicks make one query
const SEARCH_TOP = 20;
const state = {
  catalogue: null, order: [], selection: {}, view: null,
  sequence: 0,        // the latest query; an answer for an older one is dropped
  searchSequence: 0,  // the latest dataset-wide search; likewise
  pairsSequence: 0,   // the latest list of pairs; likewise
  busy: false, timer: null, searchVariant: null, lastAnswer: null,
};

// The server's cookie authorises the page; where the browser withholds it (the page in a notebook's IFrame),
// the token of the page's URL goes with every request.
const TOKEN = new URLSearchParams(location.search).get("token");

async function api(path, body) {
  const headers = TOKEN ? { Authorization: `token ${TOKEN}` } : {};
  const response = await fetch(path, body === undefined ? { headers } : {
    method: "POST", headers: { ...headers, "Content-Type": "application/json" }, body: JSON.stringify(body) });
  let data = null;
  try { data = await response.json(); } catch (_) { /* not JSON: say the status instead */ }
  if (!response.ok || data === null) {
    const message = (data && data.error) || `${path.split("?")[0]}: ${response.status} ${response.statusText}`;
    throw new Error(String(message).split("\n")[0]);
  }
  return data;
}

function setStatus(text, kind) { const s = $("status"); s.textContent = text; s.dataset.state = kind; }

function option(select, value, text) {
  const o = document.createElement("option"); o.value = value; o.textContent = text ?? value; select.appendChild(o); return o;
}

function el(tag, className, parent) {
  const e = document.createElement(tag); if (className) e.className = className; if (parent) parent.appendChild(e); return e;
}

function svg(tag, attributes, parent) {
  const e = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes || {})) e.setAttribute(key, value);
  if (parent) parent.appendChild(e);
  return e;
}

function fmt(v) { return v === undefined || v === null ? "-" : Number(v).toFixed(3); }

function imageUrl(key) {
  return `/image?key=${encodeURIComponent(key)}` + (TOKEN ? `&token=${encodeURIComponent(TOKEN)}` : "");
}

const limit = () => state.catalogue.limits.maps;

// ---- stores and maps to compare: per store, chosen layers x timesteps x transforms ---------------------------
function buildVariantChooser() {
  const box = $("variants"), c = state.catalogue;
  const compare = c.compare || c.stores.slice(0, 2).map((s) => s.name);
  // The chooser lists the compared stores first (in `compare`'s order); rows are drawn in this order.
  state.order = [...compare.map((name) => c.stores.find((s) => s.name === name)).filter(Boolean),
                 ...c.stores.filter((s) => !compare.includes(s.name))];
  for (const store of state.order) {
    const chosen = store.default;
    const sel = state.selection[store.name] = { on: compare.includes(store.name), layers: new Set([chosen.layer]),
      timesteps: new Set([chosen.timestep]), transforms: new Set([chosen.transform]) };
    const row = el("div", "store" + (sel.on ? "" : " off"), box);
    row.dataset.store = store.name;
    const label = el("label", "", row);
    const check = el("input", "", label); check.type = "checkbox"; check.checked = sel.on; check.dataset.store = store.name;
    label.append(" " + store.name);
    if (store.stale) { const mark = el("span", "stale", label); mark.textContent = " stale"; mark.title = store.stale; }
    const turn = (on) => { sel.on = on; check.checked = on; row.classList.toggle("off", !on); };
    check.onchange = () => { turn(check.checked); variantsChanged(); };
    const choices = el("div", "choices", row);
    for (const [key, values] of [["layers", store.layers], ["timesteps", store.timesteps], ["transforms", store.transforms]]) {
      const line = el("div", "", choices);
      for (const value of values) {
        const chip = el("span", "chip" + (sel[key].has(value) ? " on" : ""), line);
        chip.textContent = key === "timesteps" ? `t=${value}` : value;
        chip.title = `${store.name}: ${chip.textContent}`;
        chip.dataset.store = store.name; chip.dataset.kind = key; chip.dataset.value = value;
        chip.onclick = () => {
          if (!sel.on) { turn(true); sel[key].add(value); }  // a chip of an unticked store adds the store
          else if (sel[key].has(value)) { if (sel[key].size > 1) sel[key].delete(value); } else sel[key].add(value);
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
  for (const store of state.order) {
    const sel = state.selection[store.name];
    if (!sel.on) continue;
    for (const layer of store.layers) if (sel.layers.has(layer))
      for (const timestep of store.timesteps) if (sel.timesteps.has(timestep))
        for (const transform of store.transforms) if (sel.transforms.has(transform))
          out.push({ store: store.name, layer, timestep, transform });
  }
  return out;
}

function countVariants() {
  const n = variants().length, count = $("variant-count");
  count.textContent = n > limit() ? `(${n} maps: at most ${limit()})` : `(${n} map${n === 1 ? "" : "s"})`;
  count.classList.toggle("over", n > limit());
}

// Chip and store changes wait a moment, so a few quick clicks make one query.
function variantsChanged() {
  countVariants();
  clearTimeout(state.timer);
  state.timer = setTimeout(() => {
    state.timer = null;
    if (!state.view) return;
    if (state.view.lastQuery) query(state.view.lastQuery);
    else warm();
  }, DEBOUNCE_MS);
}

function warm() {
  const chosen = variants();
  if (!state.view || !chosen.length || chosen.length > limit()) return;
  api("/api/warm", { variants: chosen, pair: state.view.pair, trg: state.view.trg.image }).catch(() => {});
}

// ---- pairs ---------------------------------------------------------------------------------------------------
async function loadPairs() {
  const params = new URLSearchParams();
  for (const id of ["category", "flag"]) if ($(id).value) params.set(id, $(id).value);
  if ($("flag").value && $("flag-value").value !== "") params.set("value", $("flag-value").value);
  // `right` and `wrong` filter together or not at all.
  const right = $("right").value, wrong = $("wrong").value, hint = $("right-wrong-hint");
  hint.textContent = right && !wrong ? "choose wrong too" : wrong && !right ? "choose right too"
    : right && right === wrong ? "choose two different stores" : "";
  if (right && wrong) { params.set("right", right); params.set("wrong", wrong); }
  const select = $("pair"), shown = select.value, sequence = ++state.pairsSequence;
  select.dataset.state = "loading";
  try {
    const { total, pairs } = await api(`/api/pairs?${params}`);
    if (sequence !== state.pairsSequence) return;  // a newer filter is on its way
    select.innerHTML = "";
    for (const p of pairs) {
      if (p.disagreements === undefined) option(select, p.pair, `${p.pair} (${p.keypoints} kp)`).title = p.pair;
      else {  // the count first: the list is sorted by it
        const o = option(select, p.pair, `[${p.disagreements} of ${p.keypoints} kp] ${p.pair}`);
        o.title = `${p.pair}: ${p.disagreements} of its ${p.keypoints} keypoints right by ${right}, wrong by ${wrong}`;
        o.dataset.disagreements = p.disagreements;
      }
    }
    if (shown && pairs.some((p) => p.pair === shown)) select.value = shown;
    setStatus(pairs.length < total ? `the first ${pairs.length} of ${total} pairs` : `${total} pairs`, "idle");
  } catch (error) {
    if (sequence === state.pairsSequence) setStatus(error.message, "error");
  } finally {
    if (sequence === state.pairsSequence) select.dataset.state = "ready";
  }
}

async function showPair(name) {
  try {
    const pair = await api(`/api/pair?name=${encodeURIComponent(name)}`);
    showImages(pair.src, pair.trg, pair);
  } catch (error) { setStatus(error.message, "error"); }
}

function showTwoImages() {
  const sizes = state.catalogue.sizes;
  const keys = [$("src-image").value.trim(), $("trg-image").value.trim()];
  const unknown = keys.find((key) => !Object.hasOwn(sizes, key));
  if (unknown !== undefined) {
    setStatus(unknown ? `image: no image ${JSON.stringify(unknown)} in the split` : "image: choose a source and a target", "error");
    return;
  }
  const side = (key) => ({ image: key, width: sizes[key][0], height: sizes[key][1], kps: [] });
  showImages(side(keys[0]), side(keys[1]), null);
  setStatus("click a point of the source", "idle");
}

// Fit an image box (aspect ratio of `image`) into `maxWidth` x `maxHeight`: markers are placed in % of it.
function fit(frame, image, maxHeight) {
  frame.style.aspectRatio = `${image.width} / ${image.height}`;
  frame.style.width = `min(100%, ${(maxHeight * image.width) / image.height}px)`;
}

function showImages(src, trg, pair) {
  state.sequence++;  // answers for the previous images are dropped
  clearSearch();
  state.view = { pair: pair ? pair.pair : null, src, trg, lastQuery: null };
  const name = (side, image) => `${side}: ${image.image}`;
  $("source-title").textContent = name("source", src);
  $("source-title").title = name("source", src) + (pair ? ` (pair ${pair.pair})` : "");
  $("target-title").textContent = name("target", trg);
  $("target-title").title = name("target", trg) + (pair ? ` (pair ${pair.pair})` : "");
  const frame = $("source-frame");
  frame.querySelectorAll(".keypoint, .marker").forEach((e) => e.remove());
  fit(frame, src, 440);
  $("source").src = imageUrl(src.image);
  (src.kps || []).forEach(([x, y], index) => {
    const dot = el("button", "keypoint", frame);
    place(dot, x, y, src);
    dot.dataset.keypoint = index;
    dot.title = `keypoint ${pair.keypoints[index]}`;
    dot.onclick = (event) => { event.stopPropagation(); query({ keypoint: index }); };
  });
  $("maps").innerHTML = "";
  $("query").textContent = pair ? "click a keypoint or any point" : "click any point";
  warm();
}

function place(element, x, y, image) {
  element.style.left = `${(100 * (x + 0.5)) / image.width}%`;
  element.style.top = `${(100 * (y + 0.5)) / image.height}%`;
}

// A pixel of the source under the mouse, inside the image (the server wants 0..w-1, 0..h-1).
function pointFromEvent(event) {
  const rect = $("source").getBoundingClientRect(), src = state.view.src;
  const clamp = (v, n) => Math.min(Math.max(v, 0), n - 1);
  return { x: clamp(Math.floor(((event.clientX - rect.left) / rect.width) * src.width), src.width),
           y: clamp(Math.floor(((event.clientY - rect.top) / rect.height) * src.height), src.height) };
}

// ---- a query: every chosen map for one source point ------------------------------------------------------------
async function query(what) {
  if (!state.view) return;
  clearTimeout(state.timer); state.timer = null;
  const view = state.view, sequence = ++state.sequence, started = performance.now(), chosen = variants();
  view.lastQuery = what;
  clearSearch();
  if (!chosen.length) { setStatus("no maps chosen: tick a store", "error"); return; }
  if (chosen.length > limit()) { setStatus(`${chosen.length} maps: at most ${limit()}, untick some`, "error"); return; }
  state.busy = true;
  setStatus("…", "busy");
  const body = { variants: chosen, ...what };
  if (view.pair) body.pair = view.pair; else { body.src = view.src.image; body.trg = view.trg.image; }
  try {
    const answer = await api("/api/click", body);
    if (sequence !== state.sequence) return;  // a newer query is on its way
    drawQuery(answer, view);
    setStatus(`${answer.maps.length} maps in ${Math.round(performance.now() - started)} ms`, "ready");
    $("status").dataset.query = JSON.stringify(what);
    $("status").dataset.drawn = String(sequence);
    search(answer, sequence);
  } catch (error) {
    if (sequence === state.sequence) setStatus(error.message, "error");
  } finally {
    if (sequence === state.sequence) state.busy = false;
  }
}

function drawQuery(answer, view) {
  const frame = $("source-frame");
  frame.querySelectorAll(".marker").forEach((e) => e.remove());
  frame.querySelectorAll(".keypoint").forEach((e) => e.classList.toggle("on", Number(e.dataset.keypoint) === answer.keypoint));
  const [qx, qy] = answer.point;
  place(el("div", "marker query", frame), qx, qy, view.src);
  $("query").textContent = `query (${qx}, ${qy})` + (answer.keypoint !== null && answer.keypoint !== undefined
    ? `, keypoint ${answer.keypoint}` : "");
  // One row per store (in the order asked), one column per variant of that store.
  const rows = [];
  for (const m of answer.maps) {
    let row = rows.find((r) => r.store === m.variant.store);
    if (!row) rows.push(row = { store: m.variant.store, maps: [] });
    row.maps.push(m);
  }
  const grid = $("maps");
  grid.innerHTML = "";
  grid.style.setProperty("--columns", Math.max(1, ...rows.map((r) => r.maps.length)));
  rows.forEach((row, r) => {
    const head = el("div", "row-head", grid);
    Object.assign(head.dataset, { row: r, store: row.store });
    head.style.gridRow = r + 1;
    const name = el("div", "store-name", head); name.textContent = row.store; name.title = row.store;
    el("div", "count", head).textContent = `${row.maps.length} map${row.maps.length === 1 ? "" : "s"}`;
    const store = state.catalogue.stores.find((s) => s.name === row.store);
    if (store && store.stale) { const mark = el("div", "stale", head); mark.textContent = "stale"; mark.title = store.stale; }
    row.maps.forEach((m, c) => {
      const item = card(m, view.trg);
      Object.assign(item.dataset, { row: r, column: c });
      item.style.gridRow = r + 1; item.style.gridColumn = c + 2;
      grid.appendChild(item);
    });
  });
}

function card(m, trg) {
  const v = m.variant, c = el("div", "card");
  Object.assign(c.dataset, { store: v.store, layer: v.layer, timestep: v.timestep, transform: v.transform });
  const label = el("div", "label", c);
  label.textContent = `${v.layer} t=${v.timestep}` + (v.transform === "raw" ? "" : ` ${v.transform}`);
  label.title = `${m.label}\nclick: search this layer across the dataset`;
  label.onclick = () => { state.searchVariant = v; if (state.lastAnswer) search(state.lastAnswer, state.sequence); };
  const frame = el("div", "frame", c);
  fit(frame, trg, 230);
  const image = el("img", "", frame); image.src = imageUrl(trg.image); image.alt = trg.image;
  const overlay = el("img", "overlay", frame); overlay.src = m.map; overlay.alt = "";
  const [px, py] = m.predicted;
  const pred = el("div", "marker pred", frame); place(pred, px, py, trg);
  pred.dataset.x = px; pred.dataset.y = py; pred.title = `predicted (${px}, ${py})`;
  if (m.true) {
    const t = el("div", "marker true", frame); place(t, m.true[0], m.true[1], trg);
    t.dataset.x = m.true[0]; t.dataset.y = m.true[1];
  }
  const numbers = el("div", "numbers", c), s = m.sharpness;
  const line = (html, title) => { const d = el("div", "", numbers); d.innerHTML = html; d.title = title || d.textContent; };
  line(`predicted <b class="predicted">(${px}, ${py})</b>` + (m.true ? ` · true (${m.true[0]}, ${m.true[1]})` : ""));
  if (m.pck) line(`pair PCK@0.1 bbox ${fmt(m.pck.bbox)} · img ${fmt(m.pck.img)}`);
  line(`max ${fmt(s.sim_max)} · mean ${fmt(s.sim_mean)} · std ${fmt(s.sim_std)}`);
  line(`entropy ${fmt(s.sim_entropy)} · 2nd-peak ${fmt(s.sim_peak_ratio)}`,
       "normalised entropy of the softmaxed map; second-peak ratio");
  c.appendChild(histogram(m));
  return c;
}

function count(n) { return n >= 10000 ? `${(n / 1000).toFixed(n >= 100000 ? 0 : 1)}k` : String(n); }

// The histogram of the map's cosine values: bars over the server's bin edges, a count axis, and marks at the
// maximum, at the predicted point and (for a keypoint) at the true point.
function histogram(m) {
  const { counts, edges } = m.histogram, n = counts.length;
  const width = 250, height = 120, left = 34, right = 8, top = 6, bottom = 42;
  const plotWidth = width - left - right, plotHeight = height - top - bottom, base = top + plotHeight;
  const lo = edges[0], hi = edges[n], most = Math.max(...counts, 1);
  const x = (v) => left + ((v - lo) / (hi - lo)) * plotWidth, y = (c) => base - (plotHeight * c) / most;
  const box = svg("svg", { class: "histogram", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `histogram of the ${counts.reduce((a, b) => a + b, 0)} cosine values of the map` });
  counts.forEach((c, i) => {
    if (!c) return;
    svg("rect", { class: "bar", x: x(edges[i]), width: Math.max(x(edges[i + 1]) - x(edges[i]) - 0.5, 0.5),
                  y: y(c), height: base - y(c) }, box);
  });
  // axes
  svg("line", { class: "axis", x1: left, x2: left, y1: top, y2: base }, box);
  svg("line", { class: "axis", x1: left, x2: left + plotWidth, y1: base, y2: base }, box);
  for (const [c, anchor] of [[0, "end"], [most, "end"]]) {
    svg("line", { class: "axis", x1: left - 3, x2: left, y1: y(c), y2: y(c) }, box);
    const t = svg("text", { class: "tick y-tick", x: left - 5, y: y(c) + 3, "text-anchor": anchor }, box);
    t.textContent = count(c);
    if (c === most) svg("title", {}, t).textContent = `${most} pixels in the fullest bin`;
  }
  const label = svg("text", { class: "axis-label y-label", "text-anchor": "middle",
                              transform: `translate(9 ${top + plotHeight / 2}) rotate(-90)` }, box);
  label.textContent = "pixels";
  svg("title", {}, label).textContent = "target pixels per bin";
  for (const v of [lo, (lo + hi) / 2, hi]) {
    svg("line", { class: "axis", x1: x(v), x2: x(v), y1: base, y2: base + 3 }, box);
    svg("text", { class: "tick x-tick", x: x(v), y: base + 12, "text-anchor": "middle" }, box).textContent = String(+v.toFixed(2));
  }
  svg("text", { class: "axis-label x-label", x: left + plotWidth / 2, y: base + 23, "text-anchor": "middle" }, box)
    .textContent = "cosine similarity";
  // marks at the maximum, the predicted point and the true point; a key under the axis names them with their values
  const marks = [["max", "max", m.sharpness && m.sharpness.sim_max, "maximum cosine of the map"],
                 ["pred", "pred", m.at_predicted, "cosine at the predicted point"],
                 ["true", "true", m.at_true, "cosine at the true keypoint"]];
  let keyAt = left;
  for (const [kind, text, value, title] of marks) {
    if (value === null || value === undefined) continue;
    const at = x(value), g = svg("g", { class: `mark ${kind}`, "data-value": value }, box);
    svg("title", {}, g).textContent = `${title}: ${fmt(value)}`;
    svg("line", { x1: at, x2: at, y1: top, y2: base }, g);
    svg("line", { x1: keyAt, x2: keyAt, y1: height - 10, y2: height - 1 }, g);
    svg("text", { x: keyAt + 4, y: height - 2 }, g).textContent = `${text} ${fmt(value)}`;
    keyAt += 70;
  }
  return box;
}

// ---- dataset-wide search for the clicked point: tied to the query that asked it ---------------------------------------
function clearSearch() {
  state.searchSequence++;
  state.lastAnswer = null;
  $("search-results").innerHTML = "";
  $("search-variant").textContent = "";
  document.querySelectorAll(".card.searched").forEach((c) => c.classList.remove("searched"));
}

async function search(answer, sequence) {
  if (sequence !== state.sequence) return;
  const mine = ++state.searchSequence, current = () => mine === state.searchSequence && sequence === state.sequence;
  state.lastAnswer = answer;
  const same = (a, b) => a.store === b.store && a.layer === b.layer && a.timestep === b.timestep && a.transform === b.transform;
  const variant = state.searchVariant && answer.maps.some((m) => same(m.variant, state.searchVariant))
    ? state.searchVariant : answer.maps[0] && answer.maps[0].variant;
  if (!variant) return;
  document.querySelectorAll(".card").forEach((c) => c.classList.toggle("searched",
    same({ store: c.dataset.store, layer: c.dataset.layer, timestep: Number(c.dataset.timestep),
           transform: c.dataset.transform }, variant)));
  $("search-variant").textContent = `${variant.store} ${variant.layer} t=${variant.timestep}`
    + (variant.transform === "raw" ? "" : ` ${variant.transform}`);
  const box = $("search-results");
  box.innerHTML = "";
  el("span", "hint", box).textContent = "searching…";
  try {
    const top = Math.min(SEARCH_TOP, state.catalogue.limits.top);
    const hits = await api("/api/search", { variant, image: answer.src, x: answer.point[0], y: answer.point[1], top });
    if (!current()) return;  // a newer query or search: its panel is not this one
    box.innerHTML = "";
    for (const hit of hits) {
      const cell = el("div", "hit", box);
      cell.title = `${hit.image} (${hit.x}, ${hit.y}): cosine ${hit.similarity.toFixed(4)}`;
      Object.assign(cell.dataset, { image: hit.image, x: hit.x, y: hit.y });
      const frame = el("div", "frame", el("div", "hit-box", cell));
      const size = state.catalogue.sizes[hit.image];
      const img = el("img", "", frame); img.src = imageUrl(hit.image); img.loading = "lazy"; img.alt = hit.image;
      if (size) {
        const image = { width: size[0], height: size[1] };
        fit(frame, image, 64);
        place(el("div", "marker query", frame), hit.x - 0.5, hit.y - 0.5, image);
      }
      el("div", "hit-name", cell).textContent = hit.image;
      el("div", "", cell).textContent = hit.similarity.toFixed(3);
    }
  } catch (error) { if (current()) box.textContent = error.message; }
}

// ---- start ----------------------------------------------------------------------------------------------------------
async function start() {
  state.catalogue = await api("/api/catalogue");
  const c = state.catalogue;
  c.limits = { maps: 32, top: 100, ...(c.limits || {}) };
  for (const category of c.categories) option($("category"), category);
  for (const flag of Object.keys(c.flags)) option($("flag"), flag);
  for (const store of c.stores.filter((s) => s.predictions)) { option($("right"), store.name); option($("wrong"), store.name); }
  for (const key of c.images) option($("image-keys"), key);
  $("flag").onchange = () => {
    $("flag-value").innerHTML = "";
    for (const v of c.flags[$("flag").value] || []) option($("flag-value"), v);
    loadPairs();
  };
  for (const id of ["category", "flag-value", "right", "wrong"]) $(id).onchange = loadPairs;
  $("pair").onchange = () => { if ($("pair").value) showPair($("pair").value); };
  $("use-images").onclick = showTwoImages;
  $("source-frame").onclick = (event) => { if (state.view) query(pointFromEvent(event)); };
  $("source-frame").onmousemove = (event) => {
    if ($("hover").checked && state.view && !state.busy) query(pointFromEvent(event));
  };
  buildVariantChooser();
  await loadPairs();
  const stale = c.stores.filter((s) => s.stale).map((s) => s.name);
  setStatus(`${c.pairs} pairs, ${c.stores.length} stores` + (stale.length ? ` (stale: ${stale.join(", ")})` : ""), "idle");
}

start().catch((error) => setStatus(error.message, "error"));
