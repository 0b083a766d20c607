"""darkroom studio's HTTP API, every feature, against a real server with the tiny model.

The server is uvicorn on 127.0.0.1 (tests/studio_fixtures.py); requests go over HTTP with
httpx.  What the pictures show is checked on decoded PNGs.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from daemon.studio.engine import Engine, StudioConfig
from tests.studio_fixtures import CHECKPOINT_STEP, STEPS, Studio, serve
from tests.tiny_models import DIT_LAYERS

PROMPT = "a golden sunset over the harbour"
OTHER = "a blue night in a snowy forest"
RUN_TIMEOUT_S = 180
POLL_S = 0.1
PROB_TOLERANCE = 5e-3  # float16 maps of probabilities
PIXEL_TOLERANCE = 1
CHANGED = 4  # 8-bit levels somewhere in the image: more than rounding
TOKEN = "a-long-enough-studio-token"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def client(studio_server: Studio) -> httpx.Client:
    """An HTTP client for the module's studio."""
    with httpx.Client(base_url=studio_server.url, timeout=60) as http:
        yield http


def finished(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """POST a run and poll it until it is done; its final status."""
    response = client.post("/api/runs", json=body)
    assert response.status_code == 202, response.text
    run_id = response.json()["id"]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        status = client.get(f"/api/runs/{run_id}").json()
        if status["state"] in ("done", "failed"):
            return status
        assert time.monotonic() < deadline, f"run {run_id} still {status['state']}"
        time.sleep(POLL_S)


def picture(client: httpx.Client, path: str) -> Image.Image:
    """A PNG the studio serves, decoded."""
    response = client.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(response.content))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def changed(a: Image.Image, b: Image.Image) -> int:
    """The largest 8-bit difference between two pictures."""
    return int(np.abs(pixels(a) - pixels(b)).max())


@pytest.fixture(scope="module")
def plain(client: httpx.Client) -> dict[str, Any]:
    """The prompt rendered with the defaults and the base model."""
    status = finished(client, {"prompt": PROMPT})
    assert status["state"] == "done", status["error"]
    return status


# --- options and tokens ----------------------------------------------------------------------


def test_options_offer_the_buckets_and_every_checkpoint(client: httpx.Client) -> None:
    options = client.get("/api/options").json()
    assert [c["spec"] for c in options["checkpoints"]] == ["base", str(CHECKPOINT_STEP)]
    assert options["checkpoints"][1]["label"] == f"step {CHECKPOINT_STEP}"
    assert len(options["sizes"]) == 9
    assert options["blocks"] == DIT_LAYERS
    assert options["defaults"]["steps"] == STEPS


def test_tokens_are_the_prompt_as_the_model_reads_it(
    client: httpx.Client, studio_server: Studio
) -> None:
    tokens = client.get("/api/tokens", params={"prompt": PROMPT}).json()["tokens"]
    ids = studio_server.engine.sampler.token_ids(PROMPT)
    assert [t["token_id"] for t in tokens] == ids
    assert tokens[-1]["special"] and not any(t["special"] for t in tokens[:-1])
    words = "".join(t["piece"] for t in tokens[:-1]).replace("▁", " ").strip()
    assert words == PROMPT


def test_nearest_tokens_come_with_the_substituted_prompt(client: httpx.Client) -> None:
    found = client.get("/api/tokens/nearest", params={"prompt": PROMPT, "index": 1, "k": 5})
    assert found.status_code == 200, found.text
    suggestions = found.json()["suggestions"]
    assert len(suggestions) == 5
    similarities = [s["similarity"] for s in suggestions]
    assert similarities == sorted(similarities, reverse=True)
    tokens = client.get("/api/tokens", params={"prompt": suggestions[0]["prompt"]}).json()["tokens"]
    assert tokens[1]["piece"] == suggestions[0]["piece"]
    eos = len(client.get("/api/tokens", params={"prompt": PROMPT}).json()["tokens"]) - 1
    refused = client.get("/api/tokens/nearest", params={"prompt": PROMPT, "index": eos})
    assert refused.status_code == 422


# --- one run, all it shows -------------------------------------------------------------------


def test_a_run_reports_its_progress_and_result(plain: dict[str, Any]) -> None:
    assert plain["done"] == plain["total"] == STEPS
    result = plain["result"]
    assert (result["width"], result["height"], result["steps"]) == (1024, 1024, STEPS)
    assert result["blocks"] == list(range(DIT_LAYERS))
    assert result["captured_steps"] == list(range(STEPS))
    assert len(result["block_change"]) == STEPS
    assert all(len(row) == DIT_LAYERS and all(v > 0 for v in row) for row in result["block_change"])
    assert result["checkpoint"] == "base"
    assert plain["request"]["seed"] == 42 and plain["request"]["checkpoint"] == "base"


def test_image_previews_and_overlays_are_served(
    client: httpx.Client, plain: dict[str, Any]
) -> None:
    run = f"/api/runs/{plain['id']}"
    assert picture(client, f"{run}/image.png").size == (1024, 1024)
    previews = [picture(client, f"{run}/preview/{step}.png") for step in range(STEPS)]
    assert all(p.size == (256, 256) for p in previews)
    assert changed(previews[0], previews[-1]) > CHANGED
    overlay = picture(client, f"{run}/heatmap.png?token=1")
    assert overlay.mode == "RGBA" and overlay.size == (512, 512)  # the browser stretches it
    alpha = np.asarray(overlay)[..., 3]
    assert alpha.max() > alpha.min()  # it shows where, not a uniform veil
    assert client.get(f"{run}/preview/{STEPS}.png").status_code == 422


def test_heatmaps_one_per_token_sum_to_one(client: httpx.Client, plain: dict[str, Any]) -> None:
    """Each cell's attention over all the prompt's tokens adds up to 1, for the mean and for
    one step and block alike."""
    run = f"/api/runs/{plain['id']}"
    count = len(plain["result"]["tokens"])
    for choice in ({}, {"step": 1, "block": 0}):
        maps = [
            np.array(client.get(f"{run}/heatmap", params={"token": t, **choice}).json()["values"])
            for t in range(count)
        ]
        assert all(m.shape == (32, 32) for m in maps)
        np.testing.assert_allclose(sum(maps), 1.0, atol=PROB_TOLERANCE)
    one_step = client.get(f"{run}/heatmap", params={"token": 1, "step": 0}).json()["values"]
    every_step = client.get(f"{run}/heatmap", params={"token": 1}).json()["values"]
    assert not np.allclose(one_step, every_step)
    for bad in ({"token": count}, {"token": 0, "step": STEPS}, {"token": 0, "block": DIT_LAYERS}):
        assert client.get(f"{run}/heatmap", params=bad).status_code == 422


def test_unknown_runs_are_404(client: httpx.Client) -> None:
    for path in ("/api/runs/r999", "/api/runs/r999/image.png", "/api/runs/r999/heatmap?token=0"):
        assert client.get(path).status_code == 404


# --- the features that change the render ------------------------------------------------------


def test_the_checkpoint_switcher_flips_between_snapshots(
    client: httpx.Client, plain: dict[str, Any]
) -> None:
    """The same prompt and seed with the checkpoint looks different; back on base it is the
    first image again."""
    base = picture(client, f"/api/runs/{plain['id']}/image.png")
    trained = finished(client, {"prompt": PROMPT, "checkpoint": str(CHECKPOINT_STEP)})
    assert trained["result"]["checkpoint"] == f"step {CHECKPOINT_STEP}"
    assert changed(picture(client, f"/api/runs/{trained['id']}/image.png"), base) > CHANGED
    again = finished(client, {"prompt": PROMPT, "checkpoint": "base"})
    assert changed(picture(client, f"/api/runs/{again['id']}/image.png"), base) <= PIXEL_TOLERANCE


def test_a_layer_subset_changes_the_image(client: httpx.Client, plain: dict[str, Any]) -> None:
    subset = finished(client, {"prompt": PROMPT, "blocks": [0]})
    assert subset["result"]["blocks"] == [0]
    assert all(row[1] is None for row in subset["result"]["block_change"])
    before = picture(client, f"/api/runs/{plain['id']}/image.png")
    assert changed(picture(client, f"/api/runs/{subset['id']}/image.png"), before) > CHANGED


def test_strength_zero_takes_the_token_out(client: httpx.Client, plain: dict[str, Any]) -> None:
    """At 0× the token draws no attention and the image moves; at 3× it draws more."""
    zero = finished(client, {"prompt": PROMPT, "strength": {"index": 1, "scale": 0}})
    three = finished(client, {"prompt": PROMPT, "strength": {"index": 1, "scale": 3}})

    def share(status: dict[str, Any]) -> float:
        values = client.get(f"/api/runs/{status['id']}/heatmap", params={"token": 1}).json()
        return float(np.mean(values["values"]))

    assert share(zero) < 1e-3 < share(plain) < share(three)
    before = picture(client, f"/api/runs/{plain['id']}/image.png")
    assert changed(picture(client, f"/api/runs/{zero['id']}/image.png"), before) > CHANGED


def test_blending_at_step_zero_is_the_second_prompt(
    client: httpx.Client, plain: dict[str, Any]
) -> None:
    second = finished(client, {"prompt": OTHER})
    at_zero = finished(client, {"prompt": PROMPT, "blend": {"prompt": OTHER, "switch_step": 0}})
    at_end = finished(client, {"prompt": PROMPT, "blend": {"prompt": OTHER, "switch_step": STEPS}})

    def image(status: dict[str, Any]) -> Image.Image:
        return picture(client, f"/api/runs/{status['id']}/image.png")

    assert changed(image(at_zero), image(second)) <= PIXEL_TOLERANCE
    assert changed(image(at_end), image(plain)) <= PIXEL_TOLERANCE
    assert at_zero["result"]["captured_steps"] == []


# --- refusals, access, limits ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"prompt": PROMPT, "width": 1000}, "nine buckets"),
        ({"prompt": PROMPT, "checkpoint": "7"}, "available: base, latest, 100"),
        ({"prompt": PROMPT, "checkpoint": "../../etc"}, "no checkpoint"),
        ({"prompt": PROMPT, "blocks": [0, 5]}, "blocks must be in"),
        ({"prompt": PROMPT, "strength": {"index": 99, "scale": 1}}, "strength token"),
        ({"prompt": PROMPT, "blend": {"prompt": OTHER, "switch_step": 99}}, "switch step"),
        ({"prompt": PROMPT, "steps": 0}, "greater than or equal"),
        ({"prompt": PROMPT, "strength": {"index": 1, "scale": 4}}, "less than or equal"),
        ({"prompt": PROMPT, "path": "/etc/passwd"}, "Extra inputs"),
        ({"prompt": ""}, "at least 1 character"),
    ],
)
def test_bad_requests_say_what_is_wrong(
    client: httpx.Client, body: dict[str, Any], message: str
) -> None:
    response = client.post("/api/runs", json=body)
    assert response.status_code == 422
    assert message in response.text


def test_only_the_ui_files_are_served(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert client.get("/static/app.js").status_code == 200
    for sneaky in ("/static/../engine.py", "/static/%2e%2e/engine.py", "/static/..%2fapp.py"):
        assert client.get(sneaky).status_code == 404


def test_a_loopback_studio_refuses_other_host_names(studio_server: Studio) -> None:
    """A web page elsewhere cannot reach it through a DNS name pointing at 127.0.0.1."""
    response = httpx.get(f"{studio_server.url}/api/options", headers={"Host": "evil.example"})
    assert response.status_code == 400


def test_with_a_token_every_request_needs_it(studio_engine: Engine) -> None:
    with serve(studio_engine, token=TOKEN, host="0.0.0.0") as studio:
        options = f"{studio.url}/api/options"
        assert httpx.get(options).status_code == 401
        assert httpx.get(options, headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.get(f"{studio.url}/").status_code == 401
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert httpx.get(options, headers=bearer).status_code == 200
        with httpx.Client(base_url=studio.url, follow_redirects=True) as browser:
            opened = browser.get("/", params={"token": TOKEN})
            assert opened.status_code == 200 and opened.url.path == "/"
            assert browser.get("/api/options").status_code == 200  # the cookie carries it
        assert TOKEN not in httpx.get(options).text


def test_an_exposed_studio_without_a_token_does_not_start(studio_engine: Engine) -> None:
    config = studio_engine.config
    for host in ("0.0.0.0", "192.168.1.5", "photos.lan"):
        with pytest.raises(ValueError, match=r"set studio\.token"):
            StudioConfig(config.pipeline, config.checkpoint_dir, host=host).check()
    with pytest.raises(ValueError, match="at least 16"):
        StudioConfig(config.pipeline, config.checkpoint_dir, token="short").check()
    StudioConfig(config.pipeline, config.checkpoint_dir, host="::1").check()


def test_the_command_refuses_an_exposed_studio_before_loading(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DARKROOM_PATHS__STATE_DIR": str(tmp_path),
        "DARKROOM_CACHE__MODEL": str(tmp_path / "no-model-here"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "studio", "--host", "0.0.0.0"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "set studio.token" in done.stderr


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_command_serves_and_never_logs_the_token(tiny_pixart: Path, tmp_path: Path) -> None:
    """``darkroom studio`` as a user starts it: it loads the model, answers with the token,
    signs a browser in through ``/?token=``, stops on SIGTERM, and its output never holds
    the token (no access log: the sign-in URL carries it)."""
    port = free_port()
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "DARKROOM_PATHS__STATE_DIR": str(tmp_path),
        "DARKROOM_CACHE__MODEL": str(tiny_pixart),
        "DARKROOM_SAMPLES__DEVICE": "cpu",
        "DARKROOM_SAMPLES__PRECISION": "fp32",
        "DARKROOM_STUDIO__TOKEN": TOKEN,
        "DARKROOM_STUDIO__PORT": str(port),
    }
    studio = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli", "studio"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while True:
            assert studio.poll() is None, "the studio exited"
            assert time.monotonic() < deadline, "the studio did not start"
            try:
                options = httpx.get(
                    f"{url}/api/options", headers={"Authorization": f"Bearer {TOKEN}"}
                )
                break
            except httpx.TransportError:
                time.sleep(POLL_S * 5)
        assert options.status_code == 200 and options.json()["defaults"]["steps"] == 30
        assert httpx.get(f"{url}/api/options").status_code == 401
        signed_in = httpx.get(f"{url}/", params={"token": TOKEN}, follow_redirects=True)
        assert signed_in.status_code == 200 and "<html" in signed_in.text.lower()
    finally:
        studio.send_signal(signal.SIGTERM)
        output, _ = studio.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the signal (systemd counts it clean).
    assert studio.returncode in (0, -signal.SIGTERM), output
    assert "Application shutdown complete" in output
    assert f"darkroom studio on http://127.0.0.1:{port}/" in output
    assert TOKEN not in output


def test_a_full_queue_refuses_more_runs(studio_engine: Engine) -> None:
    """With room for one waiting run, a burst gets 503 for the rest; all accepted finish."""
    with serve(studio_engine, max_waiting=1) as studio, httpx.Client(base_url=studio.url) as http:
        answers = [http.post("/api/runs", json={"prompt": PROMPT}) for _ in range(4)]
        assert answers[0].status_code == 202
        refused = [a for a in answers if a.status_code == 503]
        assert refused and "already waiting" in refused[0].json()["detail"]
        runs = http.get("/api/runs").json()["runs"]
        for run in runs:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while http.get(f"/api/runs/{run['id']}").json()["state"] not in ("done", "failed"):
                assert time.monotonic() < deadline
                time.sleep(POLL_S)
