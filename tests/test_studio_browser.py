"""darkroom studio end to end: Debian's chromium drives the real UI against a real server.

The server is the studio app under uvicorn with the tiny PixArt-Sigma (``studio_server``);
the browser is /usr/bin/chromium through Playwright (no browser download). Without
chromium the test is skipped, except under CI, where a missing browser is a failure.
``UPDATE_SCREENSHOTS=1`` also saves docs/studio-generate.png and docs/studio-heatmap.png.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

from daemon.studio.engine import Engine
from tests.studio_fixtures import Studio, serve

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS = Path(__file__).resolve().parent.parent / "docs"
PROMPT = "a golden sunset over the harbour"
STEPS = 4
RUN_TIMEOUT_MS = 180_000  # a CPU render of the tiny model, queued behind nothing
LOAD_TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Headless Debian chromium; skipped without it, unless CI is set (then a failure)."""
    if not CHROMIUM.exists():
        reason = f"{CHROMIUM} is missing (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI needs the browser test to run")
        pytest.skip(reason)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, studio_server: Studio) -> Iterator[Page]:
    """The module's studio (conftest's ``studio_server``: tiny model, no token), opened."""
    with open_studio(browser, f"{studio_server.url}/") as page:
        yield page


@contextmanager
def open_studio(browser: Browser, address: str) -> Iterator[Page]:
    """A fresh browser context on ``address``, once the form is filled from /api/options;
    fails the test on any uncaught script error in the page."""
    context = browser.new_context(viewport={"width": 1500, "height": 950})
    script_errors: list[str] = []
    try:
        page = context.new_page()
        page.on("pageerror", lambda error: script_errors.append(str(error)))
        page.goto(address)
        page.wait_for_selector("body[data-ready=true]", timeout=LOAD_TIMEOUT_MS)
        yield page
    finally:
        context.close()
    assert not script_errors, f"script errors in the page: {script_errors}"


def tid(name: str, **data: object) -> str:
    """The CSS selector of an element by data-testid (and data-* attributes)."""
    extra = "".join(f'[data-{key}="{value}"]' for key, value in data.items())
    return f'[data-testid="{name}"]{extra}'


def wait_loaded(page: Page, name: str, src_part: str) -> str:
    """Wait until the <img> of that test id shows a URL containing src_part, fully decoded."""
    page.wait_for_function(
        """([selector, part]) => {
            const img = document.querySelector(selector);
            return img && !img.hidden && img.src.includes(part)
                && img.complete && img.naturalWidth > 0;
        }""",
        arg=[tid(name), src_part],
        timeout=RUN_TIMEOUT_MS,
    )
    return page.get_attribute(tid(name), "src") or ""


def smallest_size(page: Page) -> str:
    """The value of the size option with the fewest pixels ("WxH")."""
    values = page.eval_on_selector_all(f"{tid('size')} option", "opts => opts.map(o => o.value)")

    def pixels(value: str) -> int:
        width, height = value.split("x")
        return int(width) * int(height)

    return min(values, key=pixels)


def generate(page: Page) -> dict[str, object]:
    """Press Generate; wait for that run's final image; return the POST body the page sent."""
    with page.expect_response(
        lambda r: r.url.endswith("/api/runs") and r.request.method == "POST"
    ) as answer:
        page.click(tid("generate"))
    response = answer.value
    assert response.status == 202, response.text()
    run_id = response.json()["id"]
    wait_loaded(page, "image", f"/api/runs/{run_id}/image.png")
    assert "done" in (page.text_content(tid("progress-label")) or "")
    return json.loads(response.request.post_data or "{}")


def screenshot(page: Page, name: str) -> None:
    """Save docs/<name> for the README when UPDATE_SCREENSHOTS=1."""
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        page.screenshot(path=str(DOCS / name))


def box(page: Page, name: str) -> dict[str, float]:
    """An element's box on the page, rounded to the pixel."""
    found = page.locator(tid(name)).bounding_box()
    assert found is not None, f"{name} is not laid out"
    return {key: round(value) for key, value in found.items()}


def test_generate_inspect_and_regenerate(page: Page) -> None:
    """Generate, read a token's heatmap, scrub the steps, pick a grid cell, fewer layers."""
    page.fill(tid("prompt"), PROMPT)
    page.fill(tid("steps"), str(STEPS))
    page.select_option(tid("size"), smallest_size(page))
    first = generate(page)
    assert first["prompt"] == PROMPT and first["steps"] == STEPS and first["blocks"] is None
    assert first["strength"] is None and first["blend"] is None
    chips = page.locator(tid("token-chip"))
    assert chips.count() >= len(PROMPT.split())  # every word's tokens, and EOS
    screenshot(page, "studio-generate.png")

    # A chip: its heatmap over the image, exactly on top of it; clicked again, gone.
    page.click(tid("token-chip", index=1))
    wait_loaded(page, "overlay", "heatmap.png?token=1")
    assert box(page, "overlay") == box(page, "image")
    screenshot(page, "studio-heatmap.png")
    page.click(tid("token-chip", index=1))
    assert page.locator(tid("overlay")).is_hidden()

    # The scrubber: a step's predicted clean image instead of the final one, then back.
    page.locator(tid("step-slider")).fill("1")
    wait_loaded(page, "image", "/preview/1.png")
    assert "step 1" in (page.text_content(tid("preview-label")) or "")
    slider = box(page, "step-slider")  # dragged with the mouse, from the right end to the left
    middle = slider["y"] + slider["height"] / 2
    page.mouse.move(slider["x"] + slider["width"] - 2, middle)
    page.mouse.down()
    page.mouse.move(slider["x"] + 2, middle, steps=8)
    page.mouse.up()
    wait_loaded(page, "image", "/preview/0.png")
    page.click(tid("final"))
    wait_loaded(page, "image", "/image.png")

    # A grid cell: block 1 at step 2 for the first token (none is selected).
    page.click(tid("grid-cell", block=1, step=2))
    wait_loaded(page, "overlay", "heatmap.png?token=0&step=2&block=1")
    assert page.locator(tid("heat-step")).input_value() == "2"
    assert page.locator(tid("heat-block")).input_value() == "1"

    # Layers: block 0 only, developed again; the grid greys out the skipped block.
    page.click(tid("block-preset") + ":has-text('all')")
    page.uncheck(tid("block-toggle", block=1))
    second = generate(page)
    assert second["blocks"] == [0]
    assert page.locator(tid("history-item")).count() == 2
    assert "skipped" in (page.get_attribute(tid("grid-cell", block=1, step=0), "class") or "")
    assert page.locator(tid("grid-cell", block=1, step=0)).is_disabled()


def test_suggestion_strength_blend_and_errors(page: Page) -> None:
    """Nearest-token suggestions edit the prompt; strength and blend reach the POST body."""
    page.fill(tid("prompt"), PROMPT)
    page.fill(tid("steps"), str(STEPS))
    page.select_option(tid("size"), smallest_size(page))
    generate(page)

    page.click(tid("token-chip", index=1))
    page.click(tid("suggest"))
    suggestion = page.locator(tid("suggestion")).first
    suggestion.wait_for(timeout=LOAD_TIMEOUT_MS)
    suggestion.click()
    changed = page.locator(tid("prompt")).input_value()
    assert changed != PROMPT and changed.strip()

    # Strength for chip 1, from the chip; the slider's value goes into the body.
    page.fill(tid("prompt"), PROMPT)
    page.wait_for_function(
        "document.querySelectorAll('[data-testid=strength-token] option').length > 2"
    )
    page.click(tid("use-strength"))
    page.locator(tid("strength-scale")).fill("0.5")
    page.fill(tid("blend-prompt"), "a blue night in a snowy forest")
    page.fill(tid("blend-step"), "2")
    body = generate(page)
    assert body["strength"] == {"index": 1, "scale": 0.5}
    assert body["blend"] == {"prompt": "a blue night in a snowy forest", "switch_step": 2}

    # Cleared strength and an empty second prompt send nulls.
    page.click(tid("strength-clear"))
    page.fill(tid("blend-prompt"), "")
    body = generate(page)
    assert body["strength"] is None and body["blend"] is None

    # A refused run: the server's detail is shown to the user.
    page.fill(tid("steps"), "100000")
    page.click(tid("generate"))
    error = page.locator(tid("error"))
    error.wait_for(state="visible", timeout=LOAD_TIMEOUT_MS)
    assert (error.text_content() or "").strip()


def shown_run(page: Page) -> str:
    """The id of the run whose picture is on screen."""
    src = page.get_attribute(tid("image"), "src") or ""
    return src.split("/api/runs/")[1].split("/")[0]


def test_checkpoint_switcher_and_history(page: Page) -> None:
    """Another checkpoint re-develops the same prompt and seed; the strip flips back."""
    checkpoints = page.eval_on_selector_all(
        f"{tid('checkpoint')} option", "opts => opts.map(o => o.value)"
    )
    assert checkpoints[0] == "base" and len(checkpoints) >= 2  # the fixture trains one
    page.fill(tid("prompt"), PROMPT)
    page.fill(tid("steps"), str(STEPS))
    page.fill(tid("seed"), "7")
    page.select_option(tid("size"), smallest_size(page))
    generate(page)
    base_run = shown_run(page)

    # Changing the picker is the whole gesture: no Generate press.
    with page.expect_response(lambda r: r.url.endswith("/api/runs")) as answer:
        page.select_option(tid("checkpoint"), checkpoints[1])
    body = json.loads(answer.value.request.post_data or "{}")
    assert body["checkpoint"] == checkpoints[1]
    assert body["prompt"] == PROMPT and body["seed"] == 7 and body["steps"] == STEPS
    other_run = answer.value.json()["id"]
    wait_loaded(page, "image", f"/api/runs/{other_run}/image.png")
    assert page.locator(tid("history-item")).count() == 2

    # Back to base: that snapshot exists, so it is shown again rather than re-made.
    posts: list[str] = []
    page.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    page.select_option(tid("checkpoint"), "base")
    wait_loaded(page, "image", f"/api/runs/{base_run}/image.png")
    assert posts == []
    assert page.locator(tid("history-item")).count() == 2
    page.click(tid("history-item", run=other_run))
    wait_loaded(page, "image", f"/api/runs/{other_run}/image.png")
    assert page.locator(tid("checkpoint")).input_value() == checkpoints[1]


def test_the_token_cookie_is_all_the_page_needs(browser: Browser, studio_engine: Engine) -> None:
    """With a token, opening /?token=… once signs the page in; its fetches carry the cookie."""
    token = "a-long-enough-studio-token"
    with (
        serve(studio_engine, token=token) as studio,
        open_studio(browser, f"{studio.url}/?token={token}") as page,
    ):
        assert page.url == f"{studio.url}/"  # redirected: the token left the address bar
        page.fill(tid("prompt"), PROMPT)
        page.fill(tid("steps"), "2")
        page.select_option(tid("size"), smallest_size(page))
        generate(page)
        page.click(tid("token-chip", index=0))
        wait_loaded(page, "overlay", "heatmap.png?token=0")
