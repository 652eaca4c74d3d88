// medsig web page: upload a photo, show label scores, the summary and similar cases.
// Plain DOM + fetch; every server value goes through textContent (never innerHTML).
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { health: null, thumbs: [] };

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function authHeaders() {
  const key = $("#api-key").value.trim();
  return key ? { "X-API-Key": key } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...authHeaders() } });
  let body = null;
  try { body = await response.json(); } catch (_) { body = null; }
  if (!response.ok) {
    const message = body && body.error ? body.error.message : `HTTP ${response.status}`;
    throw new Error(message);
  }
  return body;
}

function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
}

function status(text) { $("#status").textContent = text; }

async function loadHealth() {
  try {
    const response = await fetch("/health");
    state.health = await response.json();
    const h = state.health;
    $("#model").textContent = `${h.model.name} ${h.model.version}` +
      (h.search ? " · search on" : "") + (h.auth_required ? " · API key required" : "");
    status("Pick or drop a photo.");
  } catch (err) {
    showError("The server is not reachable.");
  }
}

function pct(p) { return `${Math.max(0, Math.min(100, p * 100)).toFixed(1)}%`; }

// One sentence that names the state each shown probability is for.
function explain(lab) {
  if (lab.kind === "binary") {
    const side = lab.present.length ? "at or above" : "below";
    return `P(${lab.probability_of}) = ${lab.probability.toFixed(2)}, ${side} the threshold ` +
      `${lab.threshold.toFixed(2)}`;
  }
  if (lab.kind === "multiclass") return `most probable class (of ${lab.classes.length})`;
  return lab.present.length ? "classes at or above their thresholds"
    : "no class reaches its threshold";
}

function renderLabels(labels) {
  const root = $("#labels");
  root.replaceChildren();
  for (const lab of labels) {
    const card = el("div", "label");
    card.dataset.label = lab.name;
    const head = el("div", "label-head");
    head.append(el("span", "name", lab.name));
    const positive = lab.kind !== "multiclass" && lab.present.length > 0;
    if (lab.state === "uncertain") {
      head.append(el("span", "decision uncertain", "uncertain — needs review"));
    } else {
      head.append(el("span", "decision" + (positive ? " positive" : ""), lab.decision));
    }
    card.append(head);
    card.append(el("div", "explain muted", explain(lab)));
    if (lab.conformal_set !== null && lab.conformal_set !== undefined) {
      const what = lab.kind === "multilabel" ? "present for sure" : "plausible";
      const set = lab.conformal_set.length ? lab.conformal_set.join(", ") : "none";
      card.append(el("div", "conformal muted",
        `${what} (conformal, α = ${lab.alpha}): ${set}` +
        (lab.uncertain_classes && lab.uncertain_classes.length
          ? ` · unsure: ${lab.uncertain_classes.join(", ")}` : "")));
    }
    if (lab.saliency_png) {
      const img = el("img", "saliency");
      img.alt = `where the model looked for ${lab.name}`;
      img.src = `data:image/png;base64,${lab.saliency_png}`;
      card.append(img);
    }
    for (const s of lab.scores) {
      const row = el("div", "row");
      row.append(el("span", "cls", `P(${s.name})`));
      const bar = el("div", "bar");
      const fill = el("div", "fill" + (s.positive && lab.kind !== "multiclass" ? " positive" : ""));
      fill.style.width = pct(s.probability);
      bar.append(fill);
      if (s.threshold !== null) {
        const mark = el("div", "threshold");
        mark.style.left = pct(s.threshold);
        mark.title = `threshold ${s.threshold.toFixed(2)}`;
        bar.append(mark);
      }
      row.append(bar, el("span", "value", s.probability.toFixed(2)));
      card.append(row);
    }
    root.append(card);
  }
}

function clearThumbs() {
  for (const url of state.thumbs) URL.revokeObjectURL(url);
  state.thumbs = [];
}

async function loadThumb(img, path) {
  try {
    const response = await fetch(path, { headers: authHeaders() });
    if (!response.ok) return;
    const url = URL.createObjectURL(await response.blob());
    state.thumbs.push(url);
    img.src = url;
  } catch (_) { /* a missing thumbnail leaves the grey box */ }
}

function renderSimilar(hits) {
  const root = $("#similar");
  root.replaceChildren();
  clearThumbs();
  for (const hit of hits) {
    const card = el("div", "case");
    card.dataset.id = hit.id;
    const img = el("img");
    img.alt = `case ${hit.id}`;
    card.append(img);
    if (hit.thumbnail) loadThumb(img, hit.thumbnail);
    card.append(el("div", "case-title", `${hit.id} · ${hit.score.toFixed(3)}`));
    if (hit.same_image) {
      card.classList.add("same");
      card.append(el("div", "flag", "same image as the query"));
    }
    card.append(el("div", "muted split", `split: ${hit.split || "none"}`));
    const list = el("ul");
    for (const [name, value] of Object.entries(hit.labels)) {
      const shown = value === null ? "not recorded" : (Array.isArray(value) ? value.join(", ") : value);
      list.append(el("li", "", `${name}: ${shown}`));
    }
    card.append(list);
    root.append(card);
  }
  $("#similar-section").hidden = hits.length === 0;
}

async function analyse(file) {
  showError("");
  if (state.health && state.health.auth_required && !$("#api-key").value.trim()) {
    showError("This server needs an API key: enter it above.");
    return;
  }
  const preview = $("#preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.hidden = !file.type.startsWith("image/");
  if (!preview.hidden) preview.src = URL.createObjectURL(file);
  status(`Analysing ${file.name}…`);
  const form = new FormData();
  form.append("file", file);
  try {
    const query = $("#explain").checked ? "?explain=true" : "";
    const result = await api(`/v1/predict${query}`, { method: "POST", body: form });
    const verdict = $("#verdict");
    verdict.hidden = result.status === "assessed";
    verdict.className = `verdict ${result.status}`;
    verdict.textContent = result.status === "not_assessed"
      ? "Unlike the images this model was trained on: not assessed."
      : "Uncertain — needs review: at least one label has more than one plausible answer.";
    renderLabels(result.labels);
    $("#summary").textContent = result.summary;
    $("#results").hidden = false;
    status(`${result.model.name} ${result.model.version}: ${result.timing.total_ms.toFixed(0)} ms`);
    if (state.health && state.health.search) {
      const query = new FormData();
      query.append("file", file);
      query.append("k", "8");
      const found = await api("/v1/search", { method: "POST", body: query });
      renderSimilar(found.hits);
    }
  } catch (err) {
    showError(err.message);
    status("");
  }
}

function setup() {
  $("#key-form").addEventListener("submit", (event) => event.preventDefault());
  const key = $("#api-key");
  key.value = sessionStorage.getItem("medsig-api-key") || "";
  key.addEventListener("change", () => sessionStorage.setItem("medsig-api-key", key.value.trim()));
  $("#file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    event.target.value = "";  // picking the same file again analyses it again
    if (file) analyse(file);
  });
  const drop = $("#drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const file = event.dataTransfer.files[0];
    if (file) analyse(file);
  });
  $("#copy").addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText($("#summary").textContent);
      status("Summary copied.");
    } catch (_) {
      status("Copy is not allowed here: select the text instead.");
    }
  });
  loadHealth();
}

document.addEventListener("DOMContentLoaded", setup);
