// weakloc serve: the page. Plain JavaScript, no build step, no other origin (works offline).
// Names (files, classes) reach the document only as text (textContent, setAttribute), never as markup.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const PALETTE = ["#ff3b30", "#34c759", "#0a84ff", "#ffd60a", "#bf5af2", "#ff9f0a", "#64d2ff", "#ff375f"];
  const SVG = "http://www.w3.org/2000/svg";
  const state = { model: null, current: null, results: [], jobs: new Map(), round: null, thresholdTimer: null, thresholdSeq: 0 };

  function el(tag, attrs = {}, text = null) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== null) e.textContent = text;
    return e;
  }
  function svgEl(tag, attrs = {}, text = null) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
    if (text !== null) e.textContent = text;
    return e;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function showError(message) { $("error").textContent = message || ""; $("error").hidden = !message; }
  function colour(categoryId) { return PALETTE[(Math.max(1, categoryId) - 1) % PALETTE.length]; }

  async function api(url, options) {
    const response = await fetch(url, options);
    let body = null;
    try { body = await response.json(); } catch (e) { body = null; }
    if (!response.ok) throw new Error((body && body.detail) || `${response.status} ${response.statusText}`);
    return body;
  }

  // --- the model ------------------------------------------------------------------------------
  async function init() {
    const m = await api("/api/model");
    state.model = m;
    $("model-line").textContent = `${m.backbone} · ${m.classes.length} classes (${m.task}${m.counting ? ", counting" : ""}) · ${m.device}`;
    const method = $("method");
    for (const entry of m.methods) {
      const option = el("option", { value: entry.name }, `${entry.name} (cost: ${entry.cost})`);
      option.title = entry.problem || entry.summary;
      if (!entry.usable) option.disabled = true;
      method.appendChild(option);
    }
    method.value = m.method;
    const target = $("target");
    target.appendChild(el("option", { value: "" }, `default (${m.target})`));
    for (const t of ["predicted", "all"]) target.appendChild(el("option", { value: t }, t));
    m.classes.forEach((name, k) => target.appendChild(el("option", { value: String(k) }, name)));
    const slider = $("threshold");
    slider.value = String(m.threshold.default);
    $("threshold-value").textContent = Number(slider.value).toFixed(2);
    $("threshold-hint").textContent = m.threshold.calibrated !== null
      ? `calibrated: ${m.threshold.calibrated.toFixed(2)}` : "no calibrated threshold: 0.30 by default";
    if (m.counting) {
      $("threshold-box").hidden = true;
      method.disabled = true;
      target.disabled = true;
      $("method-cost").textContent = "a counting model: counts and numbered instances from its density head";
    } else {
      describeMethod();
    }
    if (m.images) loadFolder();
  }

  function describeMethod() {
    const entry = state.model.methods.find((e) => e.name === $("method").value);
    const hint = $("method-cost");
    clear(hint);
    if (!entry) return;
    const measured = entry.seconds_per_image != null ? ` · about ${entry.seconds_per_image.toFixed(2)} s per image here` : "";
    hint.appendChild(el("span", { class: `cost-${entry.cost}` }, `cost ${entry.cost}: ${entry.cost_detail}${measured}`));
    hint.appendChild(el("br"));
    hint.appendChild(document.createTextNode(entry.summary));
  }

  async function loadFolder() {
    const box = $("browse");
    box.hidden = false;
    const data = await api("/api/images");
    const list = $("browse-list");
    const render = () => {
      clear(list);
      const q = $("browse-filter").value.toLowerCase();
      for (const name of data.images.filter((n) => n.toLowerCase().includes(q)).slice(0, 500)) {
        const button = el("button", { type: "button", title: name }, name);
        button.addEventListener("click", () => run([{ kind: "path", path: name, name }]));
        const item = el("li");
        item.appendChild(button);
        list.appendChild(item);
      }
    };
    $("browse-filter").addEventListener("input", render);
    render();
  }

  // --- jobs: upload, queue, progress, cancel --------------------------------------------------
  function formFor(source) {
    const form = new FormData();
    if (source.kind === "file") form.append("files", source.file, source.file.name);
    else form.append("path", source.path);
    if (!state.model.counting) {
      form.append("method", $("method").value);
      if ($("target").value) form.append("target", $("target").value);
      form.append("threshold", $("threshold").value);
    }
    form.append("maps", "array");
    form.append("masks", "map");
    return form;
  }

  function run(sources) {
    if (!sources.length) return;
    showError("");
    cancelAll(false);
    state.round = { total: sources.length, finished: 0, started: performance.now() };
    $("progress-box").hidden = false;
    sources.forEach((source) => startJob(source));
    updateProgress();
  }

  function startJob(source) {
    const local = { source, id: null, xhr: null, timer: null, status: "uploading", uploaded: 0, done: 0 };
    const key = Symbol("job");
    state.jobs.set(key, local);
    const xhr = new XMLHttpRequest();
    local.xhr = xhr;
    xhr.open("POST", "/api/jobs");
    xhr.responseType = "json";
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) { local.uploaded = e.loaded / e.total; updateProgress(); } };
    xhr.onload = () => {
      local.xhr = null;
      const body = xhr.response || {};
      if (xhr.status === 202) {
        local.id = body.job;
        local.status = body.status;
        poll(key);
      } else if (xhr.status === 503) {
        const wait = Number(xhr.getResponseHeader("Retry-After") || "1");
        local.status = `busy: retrying in ${wait} s`;
        local.timer = setTimeout(() => { state.jobs.delete(key); startJob(source); }, wait * 1000);
        updateProgress();
      } else {
        finishJob(key, `${source.name}: ${body.detail || xhr.status}`);
      }
    };
    xhr.onerror = () => finishJob(key, `${source.name}: the server could not be reached`);
    xhr.send(formFor(source));
  }

  async function poll(key) {
    const local = state.jobs.get(key);
    if (!local) return;
    let body;
    try {
      body = await api(`/api/jobs/${encodeURIComponent(local.id)}`);
    } catch (e) {
      finishJob(key, e.message);
      return;
    }
    if (!state.jobs.has(key)) return;
    local.status = body.status;
    local.position = body.position;
    local.done = body.total ? body.done / body.total : 0;
    if (body.status === "done") {
      finishJob(key, null);
      addResult(body.result, local.source);
    } else if (body.status === "failed") {
      finishJob(key, body.error || "failed");
    } else if (body.status === "cancelled") {
      finishJob(key, null);
    } else {
      updateProgress();
      local.timer = setTimeout(() => poll(key), 200);
    }
  }

  function finishJob(key, error) {
    const local = state.jobs.get(key);
    if (!local) return;
    clearTimeout(local.timer);
    state.jobs.delete(key);
    if (state.round) state.round.finished += 1;
    if (error) showError(error);
    updateProgress();
  }

  function cancelAll(say = true) {
    for (const [key, local] of state.jobs) {
      clearTimeout(local.timer);
      if (local.xhr) local.xhr.abort();
      if (local.id) fetch(`/api/jobs/${encodeURIComponent(local.id)}`, { method: "DELETE" }).catch(() => {});
      state.jobs.delete(key);
    }
    if (say && state.round) {
      $("status").textContent = "cancelled";
      state.round = null;
      $("progress-box").hidden = false;
      $("cancel").disabled = true;
    }
  }

  function updateProgress() {
    const round = state.round;
    if (!round) return;
    const active = [...state.jobs.values()];
    const partial = active.reduce((s, j) => s + (j.status === "uploading" ? 0.1 * j.uploaded : 0.1 + 0.9 * j.done), 0);
    $("progress").value = (round.finished + partial) / round.total;
    $("cancel").disabled = active.length === 0;
    const seconds = ((performance.now() - round.started) / 1000).toFixed(1);
    if (!active.length) {
      $("status").textContent = `${round.finished} of ${round.total} image(s) done in ${seconds} s`;
      return;
    }
    const first = active[0];
    const method = state.model.counting ? "the counting head" : $("method").value;
    const entry = state.model.methods.find((e) => e.name === method);
    const cost = entry ? ` (cost ${entry.cost})` : "";
    let what = first.status;
    if (first.status === "queued") what = `queued, ${first.position || 0} image(s) ahead`;
    else if (first.status === "running") what = `computing with ${method}${cost}`;
    else if (first.status === "uploading") what = "uploading";
    $("status").textContent = `${round.finished} of ${round.total} done · ${what} · ${seconds} s`;
  }

  // --- results --------------------------------------------------------------------------------
  function addResult(doc, source) {
    const image = doc.images[0];
    const entry = { id: image.result, doc, maps: image.maps || [], source, mapIndex: 0, thumb: null };
    state.results.push(entry);
    const thumb = el("button", { type: "button", title: image.file_name });
    thumb.appendChild(el("img", { src: `/api/results/${encodeURIComponent(entry.id)}/image.png`, alt: image.file_name }));
    thumb.addEventListener("click", () => show(entry));
    entry.thumb = thumb;
    $("history").appendChild(thumb);
    show(entry);
  }

  function show(entry) {
    state.current = entry;
    const image = entry.doc.images[0];
    const stage = $("stage");
    stage.dataset.state = "loading";
    $("empty").hidden = true;
    $("result").hidden = false;
    $("result-name").textContent = image.file_name;
    for (const r of state.results) r.thumb.classList.toggle("current", r === entry);
    const picture = $("picture");
    const url = `/api/results/${encodeURIComponent(entry.id)}/image.png`;
    if (picture.getAttribute("src") === url && picture.complete) {
      drawAll();
      stage.dataset.state = "ready";
    } else {
      picture.onload = () => { drawAll(); stage.dataset.state = "ready"; };
      picture.src = url;
    }
    stage.dataset.result = entry.id;
    stage.dataset.method = image.method;
    if (!state.model.counting && image.threshold !== undefined && typeof image.threshold === "number") {
      $("threshold").value = String(image.threshold);
      $("threshold-value").textContent = image.threshold.toFixed(2);
    }
  }

  function drawAll() {
    drawTabs();
    drawHeat();
    drawMasks();
    drawBoxes();
    drawClasses();
    drawLinks();
  }

  function drawTabs() {
    const tabs = $("map-tabs");
    clear(tabs);
    const entry = state.current;
    entry.maps.forEach((m, k) => {
      const label = m.score !== undefined ? `${m.label} ${m.score.toFixed(2)}` : m.label;
      const tab = el("button", { type: "button", role: "tab", "aria-selected": String(k === entry.mapIndex) }, label);
      tab.addEventListener("click", () => { entry.mapIndex = k; drawTabs(); drawHeat(); drawLinks(); });
      tabs.appendChild(tab);
    });
  }

  function decodeBase64(text) {
    const raw = atob(text);
    const out = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
    return out;
  }

  function drawHeat() {
    const canvas = $("heat");
    const m = state.current.maps[state.current.mapIndex];
    if (!m) { canvas.width = 1; canvas.height = 1; return; }
    const [h, w] = m.shape;
    const values = decodeBase64(m.data);
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d");
    const pixels = ctx.createImageData(w, h);
    const lut = state.model.colormap;
    for (let i = 0; i < values.length; i++) {
      const c = lut[values[i]];
      pixels.data[4 * i] = c[0]; pixels.data[4 * i + 1] = c[1]; pixels.data[4 * i + 2] = c[2]; pixels.data[4 * i + 3] = 255;
    }
    ctx.putImageData(pixels, 0, 0);
    canvas.style.opacity = $("opacity").value;
  }

  function drawMasks() {
    const canvas = $("mask");
    const rles = state.current.doc.images[0].masks_rle || {};
    const names = Object.keys(rles);
    canvas.hidden = !$("show-masks").checked;
    if (!names.length) { canvas.width = 1; canvas.height = 1; canvas.getContext("2d").clearRect(0, 0, 1, 1); return; }
    const [h, w] = rles[names[0]].size;
    canvas.width = w;
    canvas.height = h;
    const ctx = canvas.getContext("2d");
    const pixels = ctx.createImageData(w, h);
    for (const name of names) {
      const k = state.model.classes.indexOf(name);
      const hex = colour(k + 1);
      const rgb = [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
      let pos = 0, on = false;
      for (const run of rles[name].counts) {  // COCO RLE: column-major runs, starting with zeros
        if (on) {
          for (let p = pos; p < pos + run; p++) {
            const idx = 4 * ((p % h) * w + Math.floor(p / h));
            pixels.data[idx] = rgb[0]; pixels.data[idx + 1] = rgb[1]; pixels.data[idx + 2] = rgb[2]; pixels.data[idx + 3] = 120;
          }
        }
        pos += run;
        on = !on;
      }
    }
    ctx.putImageData(pixels, 0, 0);
  }

  function drawBoxes() {
    const layer = $("boxes");
    clear(layer);
    const image = state.current.doc.images[0];
    const boxes = state.current.doc.annotations;
    layer.setAttribute("viewBox", `0 0 ${image.width} ${image.height}`);
    layer.style.display = $("show-boxes").checked ? "" : "none";
    // captions about 13 screen pixels high, whatever the image's size (the SVG is in image pixels)
    const shown = $("stage").clientWidth || image.width;
    const font = Math.max(1, 13 * image.width / shown);
    for (const a of boxes) {
      const [x, y, w, h] = a.bbox;
      const rect = svgEl("rect", { class: "box", x, y, width: w, height: h, stroke: colour(a.category_id),
        "vector-effect": "non-scaling-stroke", "data-bbox": a.bbox.join(","), "data-label": a.label });
      layer.appendChild(rect);
      const caption = a.instance !== undefined ? `${a.label} ${a.instance}` : `${a.label} ${a.score.toFixed(2)}`;
      layer.appendChild(svgEl("text", { x: x + font / 6, y: Math.max(font, y - font / 6), "font-size": font, "stroke-width": font / 5 }, caption));
      if (a.point) layer.appendChild(svgEl("circle", { cx: a.point[0], cy: a.point[1], r: font / 4, class: "point" }));
    }
    const summary = $("summary");
    if (image.counts) {
      summary.textContent = Object.entries(image.counts).map(([c, n]) => `${c}: ${n}`).join(" · ") + ` (${boxes.length} numbered instances)`;
    } else {
      const t = typeof image.threshold === "number" ? image.threshold.toFixed(2) : String(image.threshold);
      summary.textContent = `predicted ${image.predicted} · ${boxes.length} box(es) at threshold ${t} · method ${image.method}`;
    }
    $("stage").dataset.boxes = String(boxes.length);
  }

  function drawClasses() {
    const body = $("classes").tBodies[0];
    clear(body);
    const image = state.current.doc.images[0];
    const order = image.probabilities.map((p, k) => [p, k]).sort((a, b) => b[0] - a[0]);
    for (const [p, k] of order) {
      const row = el("tr");
      row.appendChild(el("td", {}, state.model.classes[k]));
      const bar = el("td");
      bar.appendChild(el("meter", { min: "0", max: "1", value: String(p) }));
      row.appendChild(bar);
      const counts = image.counts ? ` · count ${image.counts[state.model.classes[k]]}` : "";
      row.appendChild(el("td", {}, `${p.toFixed(4)}${counts}`));
      body.appendChild(row);
    }
  }

  function drawLinks() {
    const entry = state.current;
    const id = encodeURIComponent(entry.id);
    const t = state.model.counting ? "" : `threshold=${encodeURIComponent($("threshold").value)}&`;
    $("dl-json").href = `/api/results/${id}/coco.json?${t}`;
    $("dl-png").href = `/api/results/${id}/overlay.png?${t}map=${entry.mapIndex}&opacity=${$("opacity").value}`;
  }

  // A new threshold: boxes and masks from the kept maps on the server (no model pass).
  async function rethreshold() {
    const entry = state.current;
    if (!entry || state.model.counting) return;
    const seq = ++state.thresholdSeq;
    const value = $("threshold").value;
    $("stage").dataset.state = "updating";
    try {
      const doc = await api(`/api/results/${encodeURIComponent(entry.id)}?threshold=${encodeURIComponent(value)}&masks=map`);
      if (seq !== state.thresholdSeq || entry !== state.current) return;
      entry.doc = doc;
      drawMasks();
      drawBoxes();
      drawLinks();
      $("stage").dataset.threshold = value;
      $("stage").dataset.state = "ready";
    } catch (e) {
      showError(e.message);
    }
  }

  function rerun() {
    const entry = state.current;
    if (entry) run([entry.source]);
  }

  // --- controls -------------------------------------------------------------------------------
  function wire() {
    const input = $("file-input");
    input.addEventListener("change", () => {
      run([...input.files].map((file) => ({ kind: "file", file, name: file.name })));
      input.value = "";
    });
    const drop = $("drop");
    for (const target of [drop, document.body]) {
      target.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
      target.addEventListener("dragleave", () => drop.classList.remove("over"));
      target.addEventListener("drop", (e) => {
        e.preventDefault();
        drop.classList.remove("over");
        const files = [...(e.dataTransfer ? e.dataTransfer.files : [])];
        run(files.map((file) => ({ kind: "file", file, name: file.name })));
      });
    }
    $("threshold").addEventListener("input", () => {
      $("threshold-value").textContent = Number($("threshold").value).toFixed(2);
      clearTimeout(state.thresholdTimer);
      state.thresholdTimer = setTimeout(rethreshold, 60);
    });
    $("opacity").addEventListener("input", () => {
      $("opacity-value").textContent = Number($("opacity").value).toFixed(2);
      $("heat").style.opacity = $("opacity").value;
      if (state.current) drawLinks();
    });
    $("show-masks").addEventListener("change", () => { $("mask").hidden = !$("show-masks").checked; });
    $("show-boxes").addEventListener("change", () => { $("boxes").style.display = $("show-boxes").checked ? "" : "none"; });
    $("method").addEventListener("change", () => { describeMethod(); rerun(); });
    $("target").addEventListener("change", rerun);
    $("cancel").addEventListener("click", () => cancelAll(true));
  }

  document.addEventListener("DOMContentLoaded", () => {
    wire();
    init().catch((e) => showError(`the model could not be loaded: ${e.message}`));
  });
})();
