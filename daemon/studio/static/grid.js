// The layer × step grid: how much each transformer block changed its input at each step.
// A CSS grid of buttons rather than a canvas, so every cell is focusable, has a tooltip
// and can be clicked by a test (data-block, data-step).

// A few stops of the "inferno" colour map: dark for little change, bright for a lot,
// and readable on a dark background without implying a good/bad red–green reading.
const STOPS = [
  [0.0, [0, 0, 4]], [0.25, [87, 16, 110]], [0.5, [188, 55, 84]],
  [0.75, [249, 142, 9]], [1.0, [252, 255, 164]],
];

function colour(t) {
  const x = Math.min(1, Math.max(0, t));
  for (let i = 1; i < STOPS.length; i++) {
    const [t1, c1] = STOPS[i];
    const [t0, c0] = STOPS[i - 1];
    if (x <= t1) {
      const f = (x - t0) / (t1 - t0);
      return `rgb(${c0.map((c, k) => Math.round(c + f * (c1[k] - c))).join(",")})`;
    }
  }
  return "rgb(252,255,164)";
}

function maxValue(rows) {
  let max = 0;
  for (const row of rows) for (const v of row) if (v != null && v > max) max = v;
  return max || 1;
}

function cell(block, step, value, max, pickable) {
  const el = document.createElement("button");
  el.type = "button";
  el.className = "cell";
  el.dataset.testid = "grid-cell";
  el.dataset.block = block;
  el.dataset.step = step;
  if (value == null) {
    el.classList.add("skipped");
    el.title = `block ${block}, step ${step}: skipped`;
  } else {
    el.style.background = colour(value / max);
    el.title = `block ${block}, step ${step}: ${value.toFixed(3)}`;
  }
  // Only cells whose attention was recorded can show a heatmap.
  el.disabled = value == null || !pickable;
  return el;
}

function label(text, cls) {
  const el = document.createElement("span");
  el.className = cls;
  el.textContent = text;
  return el;
}

/**
 * Draw result.block_change (steps × blocks) as rows = blocks, columns = steps.
 * onPick(block, step) runs when a cell is clicked; onHover(text) when one is pointed at.
 */
export function renderGrid(container, result, onPick, onHover = () => {}) {
  const changes = result.block_change || [];
  const steps = changes.length;
  const captured = new Set(result.captured_steps || []);
  const max = maxValue(changes);
  container.replaceChildren();
  container.style.setProperty("--steps", steps);
  container.style.setProperty("--rows", result.block_count);
  container.append(label("", "corner"));
  // Labelling every one of many steps would crowd; then every fifth is enough to count.
  const every = steps <= 12 ? 1 : 5;
  for (let s = 0; s < steps; s++) {
    container.append(label(s % every === 0 ? String(s) : "", "col-label"));
  }
  for (let b = 0; b < result.block_count; b++) {
    container.append(label(String(b), "row-label"));
    for (let s = 0; s < steps; s++) {
      container.append(cell(b, s, changes[s][b], max, captured.has(s)));
    }
  }
  container.onclick = (event) => {
    const target = event.target.closest(".cell");
    if (target && !target.disabled) onPick(Number(target.dataset.block), Number(target.dataset.step));
  };
  container.onmouseover = (event) => {
    const target = event.target.closest(".cell");
    if (target) onHover(target.title);
  };
}

/** Outline the cell of the heatmap being shown (or none). */
export function markCell(container, block, step) {
  for (const el of container.querySelectorAll(".cell.selected")) el.classList.remove("selected");
  if (block == null || step == null) return;
  const el = container.querySelector(`.cell[data-block="${block}"][data-step="${step}"]`);
  if (el) el.classList.add("selected");
}
