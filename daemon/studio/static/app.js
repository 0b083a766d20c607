// darkroom studio: wiring. Generating (POST + polling), the checkpoint switcher and the
// session's history strip live here; the form and the viewer are their own modules.

import { getOptions, getRun, getTokens, postRun, previewUrl } from "./api.js";
import {
  applyPreset, clearStrength, fillForm, fillStrengthTokens, pickStrengthToken, readForm,
  showStrength,
} from "./form.js";
import { initViewer, showRun } from "./viewer.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 300;
// The fields of a POST body; a run's resolved `request` is cut down to these before it is
// sent again, so extra resolved fields never trip the server's validation.
const BODY_FIELDS = ["prompt", "negative", "seed", "steps", "guidance", "width", "height",
  "checkpoint", "blocks", "strength", "blend"];

const session = { history: [], shown: null, busy: false };

function report(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function showProgress(run) {
  const bar = $("progress");
  bar.hidden = false;
  bar.max = Math.max(1, run.total || 1);
  bar.value = run.done || 0;
  const label = {
    queued: () => (run.position ? `queued · ${run.position} ahead` : "queued · next"),
    running: () => `step ${run.done} / ${run.total}`,
    done: () => (run.result && run.result.seconds != null
      ? `done in ${run.result.seconds.toFixed(1)} s` : "done"),
    failed: () => "failed",
  }[run.state];
  $("progress-label").textContent = label ? label() : run.state;
}

function setBusy(busy) {
  session.busy = busy;
  $("generate").disabled = busy;
  $("generate").textContent = busy ? "Developing…" : "Generate";
}

/** Poll a run until it is done or failed, showing its progress on the way. */
async function follow(run) {
  for (;;) {
    showProgress(run);
    if (run.state === "done" || run.state === "failed") return run;
    await sleep(POLL_MS);
    run = await getRun(run.id);
  }
}

async function generate(body) {
  report("");
  setBusy(true);
  try {
    const run = await follow(await postRun(body));
    if (run.state === "failed") {
      report(run.error || "The run failed.");
    } else {
      remember(run);
      show(run);
    }
  } catch (err) {
    report(err.message);
  } finally {
    setBusy(false);
  }
}

function onSubmit(event) {
  event.preventDefault();
  if (session.busy) return;
  try {
    generate(readForm());
  } catch (err) {
    report(err.message);
  }
}

const bodyOf = (request) => Object.fromEntries(BODY_FIELDS.map((k) => [k, request[k] ?? null]));
const sameBody = (a, b) => JSON.stringify(bodyOf(a)) === JSON.stringify(bodyOf(b));

/**
 * The checkpoint switcher: the shown run again (same prompt, seed and settings) with the
 * newly picked checkpoint. A snapshot this session already made is flipped to, not re-made.
 */
function onCheckpointChange() {
  if (!session.shown || session.busy) return;
  const body = { ...bodyOf(session.shown.request), checkpoint: $("checkpoint").value };
  const twin = session.history.find((run) => sameBody(run.request, body));
  if (twin) show(twin);
  else generate(body);
}

function remember(run) {
  session.history.push(run);
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.dataset.testid = "history-item";
  button.dataset.run = run.id;
  const thumb = new Image();
  thumb.alt = "";
  thumb.src = previewUrl(run.id, run.result.steps - 1); // ≤256 px: light for a strip
  const caption = document.createElement("span");
  caption.textContent = `${run.result.checkpoint} · ${run.request.seed}`;
  button.title = `${run.id}: ${run.request.prompt}`;
  button.append(thumb, caption);
  button.addEventListener("click", () => show(run));
  item.append(button);
  $("history").append(item);
}

function show(run) {
  session.shown = run;
  // Keep the switcher in step with the snapshot on screen (setting .value fires no change).
  if ([...$("checkpoint").options].some((o) => o.value === run.request.checkpoint)) {
    $("checkpoint").value = run.request.checkpoint;
  }
  for (const b of $("history").querySelectorAll("button")) {
    b.setAttribute("aria-current", String(b.dataset.run === run.id));
  }
  showRun(run);
}

// The strength select follows the prompt as typed; asking on every key would flood the
// tokenizer, so wait for a pause in typing.
let tokenTimer = 0;
function refreshTokens() {
  clearTimeout(tokenTimer);
  tokenTimer = setTimeout(async () => {
    const prompt = $("prompt").value.trim();
    try {
      fillStrengthTokens(prompt ? (await getTokens(prompt)).tokens : []);
    } catch (err) {
      report(err.message);
    }
  }, 250);
}

function useSuggestion(prompt) {
  $("prompt").value = prompt;
  $("prompt").focus();
  refreshTokens();
}

// "Set its strength…" under the chips: that token becomes the strength token. Only an
// explicit click does this (looking at heatmaps must not change the next run), and only
// when the typed prompt is the run's prompt, or the token indices would not match.
function strengthFor(index, run) {
  if ($("prompt").value.trim() !== run.request.prompt.trim()) {
    report("The prompt was edited since this run; pick the token in Token strength instead.");
    return;
  }
  pickStrengthToken(index);
  $("strength-scale").focus();
}

function wire() {
  $("run-form").addEventListener("submit", onSubmit);
  $("checkpoint").addEventListener("change", onCheckpointChange);
  $("prompt").addEventListener("input", refreshTokens);
  // Ctrl/⌘+Enter in any text field develops, as in most prompt tools.
  $("run-form").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("run-form").requestSubmit();
  });
  $("seed-random").addEventListener("click", () => {
    $("seed").value = Math.floor(Math.random() * 2 ** 31);
  });
  for (const button of document.querySelectorAll("[data-preset]")) {
    button.addEventListener("click", () => applyPreset(button.dataset.preset));
  }
  $("strength-scale").addEventListener("input", showStrength);
  $("strength-clear").addEventListener("click", clearStrength);
  initViewer({ report, suggestion: useSuggestion, strengthFor });
}

async function start() {
  wire();
  try {
    const options = await getOptions();
    fillForm(options);
    $("model-name").textContent = options.model;
    $("generate").disabled = false;
    document.body.dataset.ready = "true"; // lets tests (and people) know the form is filled
    refreshTokens();
  } catch (err) {
    report(err.message);
  }
}

start();
