// The left column: filling it from /api/options and reading it back as a POST /api/runs body.

const $ = (id) => document.getElementById(id);

function option(value, text) {
  const el = document.createElement("option");
  el.value = value;
  el.textContent = text;
  return el;
}

const sizeValue = (w, h) => `${w}x${h}`;

/** Fill the selects, the layer toggles and the defaults from /api/options. */
export function fillForm(options) {
  const d = options.defaults;
  $("prompt").value = d.prompt || "";
  $("negative").value = d.negative || "";
  $("seed").value = d.seed;
  $("steps").value = d.steps;
  $("steps").max = options.limits.max_steps;
  $("guidance").value = d.guidance;
  $("size").replaceChildren(...options.sizes.map((s) => option(sizeValue(s.width, s.height), s.name)));
  $("size").value = sizeValue(d.width, d.height);
  $("checkpoint").replaceChildren(...options.checkpoints.map((c) => option(c.spec, c.label)));
  $("checkpoint").value = d.checkpoint;
  $("strength-scale").max = options.limits.max_strength;
  fillBlocks(options.blocks);
}

function fillBlocks(count) {
  const boxes = [];
  for (let b = 0; b < count; b++) {
    const wrap = document.createElement("label");
    wrap.className = "block";
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = true;
    box.value = b;
    box.dataset.testid = "block-toggle";
    box.dataset.block = b;
    box.setAttribute("aria-label", `block ${b}`);
    wrap.append(box, document.createTextNode(String(b)));
    boxes.push(wrap);
  }
  $("blocks").replaceChildren(...boxes);
}

const blockBoxes = () => [...$("blocks").querySelectorAll("input[type=checkbox]")];

/** Presets "0-2", "0-7", "all": tick exactly those blocks. */
export function applyPreset(preset) {
  const last = preset === "all" ? Infinity : Number(preset.split("-")[1]);
  for (const box of blockBoxes()) box.checked = Number(box.value) <= last;
}

/** The ticked blocks, or null when all are ticked (the API's "every block"). */
function chosenBlocks() {
  const boxes = blockBoxes();
  const on = boxes.filter((b) => b.checked).map((b) => Number(b.value));
  return on.length === boxes.length ? null : on;
}

/** The strength select lists the tokens of the prompt as typed (refreshed as it changes). */
export function fillStrengthTokens(tokens) {
  const select = $("strength-token");
  const keep = select.value;
  select.replaceChildren(option("", "none"),
    ...tokens.map((t) => option(t.index, `${t.index}: ${t.special ? t.piece : t.text}`)));
  // Keep the choice when that index still exists in the new prompt.
  select.value = tokens.some((t) => String(t.index) === keep) ? keep : "";
}

export function pickStrengthToken(index) {
  const select = $("strength-token");
  if ([...select.options].some((o) => o.value === String(index))) select.value = String(index);
}

export function clearStrength() {
  $("strength-token").value = "";
  $("strength-scale").value = 1;
  showStrength();
}

export function showStrength() {
  $("strength-value").textContent = Number($("strength-scale").value).toFixed(1);
}

/** The POST /api/runs body, or throws an Error with a message for people. */
export function readForm() {
  const prompt = $("prompt").value.trim();
  if (!prompt) throw new Error("Write a prompt first.");
  const [width, height] = $("size").value.split("x").map(Number);
  const blocks = chosenBlocks();
  if (blocks && blocks.length === 0) throw new Error("Tick at least one layer.");
  const token = $("strength-token").value;
  const blendPrompt = $("blend-prompt").value.trim();
  return {
    prompt,
    negative: $("negative").value,
    seed: Number($("seed").value),
    steps: Number($("steps").value),
    guidance: Number($("guidance").value),
    width,
    height,
    checkpoint: $("checkpoint").value,
    blocks,
    strength: token === "" ? null : { index: Number(token), scale: Number($("strength-scale").value) },
    blend: blendPrompt ? { prompt: blendPrompt, switch_step: Number($("blend-step").value) } : null,
  };
}
