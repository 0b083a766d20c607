// The middle column: the picture, the heatmap over it, the token chips and the step scrubber.
// It shows one finished run at a time; app.js decides which.

import { getNearest, heatmapUrl, imageFailure, imageUrl, previewUrl } from "./api.js";
import { markCell, renderGrid } from "./grid.js";

const $ = (id) => document.getElementById(id);

// What is on screen: the run, the token whose heatmap is drawn (null: none), the heatmap's
// step/block (null: averaged over all) and the scrubbed step (null: the final image).
const view = { run: null, token: null, step: null, block: null, scrub: null };
// Preloaded preview images per run id: holding the decoded Image objects keeps them in the
// browser's memory cache, so scrubbing swaps instantly instead of waiting on the network.
const previews = new Map();
let hooks = { report: () => {}, suggestion: () => {}, strengthFor: () => {} };

export function initViewer(callbacks) {
  hooks = { ...hooks, ...callbacks };
  $("step-slider").addEventListener("input", (e) => scrubTo(Number(e.target.value)));
  $("final").addEventListener("click", () => scrubTo(view.run ? view.run.result.steps : 0));
  $("heat-step").addEventListener("change", (e) => setHeat(e.target.value, view.block));
  $("heat-block").addEventListener("change", (e) => setHeat(view.step, e.target.value));
  $("suggest").addEventListener("click", suggest);
  $("use-strength").addEventListener("click", () => hooks.strengthFor(view.token, view.run));
  // Say why a picture is missing instead of leaving a broken-image icon.
  for (const id of ["image", "overlay"]) {
    $(id).addEventListener("error", async (e) => {
      if (!e.target.getAttribute("src")) return;
      if (id === "overlay") e.target.hidden = true;
      hooks.report(await imageFailure(e.target.src));
    });
  }
}

const asIndex = (v) => (v === "" || v == null ? null : Number(v));

function options(select, allText, values, label) {
  const opts = [new Option(allText, "")];
  for (const v of values) opts.push(new Option(label(v), v));
  select.replaceChildren(...opts);
}

/** Show a finished run: picture, chips, scrubber, grid; the heatmap starts hidden. */
export function showRun(run) {
  const r = run.result;
  Object.assign(view, { run, token: null, step: null, block: null, scrub: null });
  const frame = $("frame");
  frame.style.setProperty("--ar", `${r.width} / ${r.height}`);
  frame.style.setProperty("--ratio", r.width / r.height);
  $("empty").hidden = true;
  preload(run);
  const slider = $("step-slider");
  slider.max = r.steps; // the last position is the final image
  slider.value = r.steps;
  slider.disabled = false;
  options($("heat-step"), "all steps", r.captured_steps, (s) => `step ${s}`);
  options($("heat-block"), "all blocks", r.blocks, (b) => `block ${b}`);
  renderChips(r.tokens);
  renderGrid($("grid"), r, selectCell, (text) => { $("grid-hover").textContent = text; });
  $("grid-measure").textContent = r.block_change_measure || "";
  $("run-meta").textContent = describe(run);
  clearSuggestions();
  drawImage();
  drawOverlay();
}

function describe(run) {
  const q = run.request;
  const r = run.result;
  const blocks = r.blocks.length === r.block_count ? "all blocks" : `blocks ${r.blocks.join(", ")}`;
  const extras = [q.strength && `token ${q.strength.index} ×${q.strength.scale}`,
    q.blend && `→ “${q.blend.prompt}” at step ${q.blend.switch_step}`].filter(Boolean);
  return [run.id, r.checkpoint, `seed ${q.seed}`, `${r.width}×${r.height}`, `${r.steps} steps`,
    `cfg ${q.guidance}`, blocks, ...extras, r.seconds == null ? "" : `${r.seconds.toFixed(1)} s`]
    .filter(Boolean).join(" · ");
}

function preload(run) {
  if (previews.has(run.id)) return;
  const images = [];
  for (let s = 0; s < run.result.steps; s++) {
    const img = new Image();
    img.src = previewUrl(run.id, s);
    images.push(img);
  }
  previews.set(run.id, images);
}

function renderChips(tokens) {
  const chips = tokens.map((t) => {
    const chip = document.createElement("button");
    chip.type = "button";
    chip.className = t.special ? "chip special" : "chip";
    chip.textContent = t.text; // the server's text keeps "</s>" and a lone "▁" visible
    chip.title = `token ${t.index}: ${t.piece} (id ${t.token_id})`;
    chip.dataset.testid = "token-chip";
    chip.dataset.index = t.index;
    chip.setAttribute("aria-pressed", "false");
    chip.addEventListener("click", () => selectToken(t.index));
    return chip;
  });
  $("chips").replaceChildren(...chips);
}

/** Click a chip: show its heatmap; click the shown one again: hide it. */
function selectToken(index) {
  view.token = view.token === index ? null : index;
  clearSuggestions();
  drawOverlay();
}

/** A grid cell: that block and step, for the chosen token (or the first one). */
function selectCell(block, step) {
  if (view.token == null) view.token = 0;
  setHeat(step, block);
}

function setHeat(step, block) {
  view.step = asIndex(step);
  view.block = asIndex(block);
  // Picking a step or block alone should show something, so fall back to the first token.
  if (view.token == null && (view.step != null || view.block != null)) view.token = 0;
  drawOverlay();
}

function drawOverlay() {
  const overlay = $("overlay");
  $("heat-step").value = view.step ?? "";
  $("heat-block").value = view.block ?? "";
  for (const chip of $("chips").children) {
    chip.setAttribute("aria-pressed", String(Number(chip.dataset.index) === view.token));
  }
  markCell($("grid"), view.token == null ? null : view.block, view.step);
  // EOS has no neighbours worth suggesting (the API refuses special tokens).
  const token = view.run && view.token != null ? view.run.result.tokens[view.token] : null;
  $("suggest").hidden = !token || token.special;
  $("use-strength").hidden = view.token == null;
  if (!view.run || view.token == null) {
    overlay.hidden = true;
    overlay.removeAttribute("src");
    return;
  }
  overlay.src = heatmapUrl(view.run.id, view.token, view.step, view.block);
  overlay.hidden = false;
}

/** The scrubber: a step shows that step's predicted clean image; the last position is final. */
function scrubTo(step) {
  if (!view.run) return;
  view.scrub = step >= view.run.result.steps ? null : step;
  $("step-slider").value = view.scrub ?? view.run.result.steps;
  drawImage();
}

function drawImage() {
  const image = $("image");
  const { run, scrub } = view;
  image.hidden = false;
  if (scrub == null) {
    image.src = imageUrl(run.id);
    $("preview-label").textContent = "final";
  } else {
    image.src = previews.get(run.id)[scrub].src;
    // 0-based like the API, the heatmap's step select and the grid's columns.
    $("preview-label").textContent = `step ${scrub} of 0–${run.result.steps - 1}`;
  }
  image.classList.toggle("preview", scrub != null);
}

async function suggest() {
  const { run, token } = view;
  if (!run || token == null) return;
  const list = $("suggestions");
  list.replaceChildren(Object.assign(document.createElement("li"), { textContent: "…" }));
  try {
    const answer = await getNearest(run.request.prompt, token);
    list.replaceChildren(...answer.suggestions.map(suggestionItem));
    if (!answer.suggestions.length) list.textContent = "no suggestions";
  } catch (err) {
    clearSuggestions();
    hooks.report(err.message);
  }
}

function suggestionItem(s) {
  const li = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.dataset.testid = "suggestion";
  button.textContent = s.text || s.piece;
  button.title = `use: ${s.prompt}`;
  const sim = document.createElement("span");
  sim.className = "similarity";
  sim.textContent = s.similarity.toFixed(2);
  button.append(sim);
  button.addEventListener("click", () => hooks.suggestion(s.prompt));
  li.append(button);
  return li;
}

function clearSuggestions() {
  $("suggestions").replaceChildren();
}
