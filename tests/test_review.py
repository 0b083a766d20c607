"""``darkroom review`` and ``darkroom recurate``, run as a person would, on the stand-ins."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from daemon import curate, writeback
from tests.curation_harness import process, settings_env
from tests.immich_library import make_jpeg
from tests.immich_server import ImmichServer
from tests.ollama_server import OllamaServer
from tests.test_cli import darkroom
from tests.vlm_critic import Critic


def cli(tmp_path: Path, immich: ImmichServer, ollama: OllamaServer, *args: str) -> Any:
    env = settings_env(tmp_path, immich, ollama)
    env.pop("DARKROOM_PATHS__STATE_DIR")  # darkroom() sets the same one
    result = darkroom(tmp_path, *args, **env)
    assert immich.api_key not in result.stdout + result.stderr
    return result


def test_review_apply_undo_dismiss(
    tmp_path: Path, immich: ImmichServer, ollama: OllamaServer, critic: Critic, make_ctx: Any
) -> None:
    critic.confused.update({"rocket", "coffee"})
    rocket = immich.add_asset(make_jpeg("rocket", rotate=90))
    coffee = immich.add_asset(make_jpeg("coffee"))
    ctx = make_ctx()
    process(ctx)
    listed = cli(tmp_path, immich, ollama, "review")
    assert listed.returncode == 0
    assert "2 photo(s) to review" in listed.stdout and rocket in listed.stdout
    assert "0°→0, 90°→90, 180°→180, 270°→270" in listed.stdout

    refused = cli(tmp_path, immich, ollama, "review", "apply", rocket)
    assert refused.returncode == 1 and "choose an angle" in refused.stderr
    applied = cli(tmp_path, immich, ollama, "review", "apply", rocket, "--angle", "270")
    assert applied.returncode == 0, applied.stderr
    assert [e["parameters"] for e in immich.asset(rocket).edits] == [{"angle": 270}]
    undone = cli(tmp_path, immich, ollama, "review", "undo", rocket)
    assert undone.returncode == 0, undone.stderr
    assert immich.asset(rocket).edits == ()
    dismissed = cli(tmp_path, immich, ollama, "review", "dismiss", coffee)
    assert dismissed.returncode == 0
    assert "nothing to review" in cli(tmp_path, immich, ollama, "review").stdout
    again = cli(tmp_path, immich, ollama, "review", "dismiss", coffee)
    assert again.returncode == 1 and "no open rotation review" in again.stderr

    # A later re-curation must not overrule the person's decisions.
    critic.confused.clear()
    result = cli(tmp_path, immich, ollama, "recurate", "--since-version", "99")
    assert result.returncode == 0 and "2 photo(s) queued" in result.stdout
    process(ctx)
    assert immich.asset(rocket).edits == ()
    assert ctx.store.open_reviews() == 0


def test_undo_of_an_automatic_rotation_keeps_other_edits(
    tmp_path: Path, immich: ImmichServer, ollama: OllamaServer, make_ctx: Any
) -> None:
    asset_id = immich.add_asset(make_jpeg("chelsea", rotate=180))
    ctx = make_ctx()
    process(ctx)
    assert [e["parameters"] for e in immich.asset(asset_id).edits] == [{"angle": 180}]
    # The owner crops afterwards in Immich, keeping darkroom's rotation.
    crop = {"action": "crop", "parameters": {"x": 0, "y": 0, "width": 50, "height": 50}}
    immich.human_update(asset_id, edits=[dict(immich.asset(asset_id).edits[0]), crop])
    result = cli(tmp_path, immich, ollama, "review", "undo", asset_id)
    assert result.returncode == 0, result.stderr
    assert immich.asset(asset_id).edits == (crop,)


def test_recurate_quarantined_and_status_accounts_for_them(
    tmp_path: Path, immich: ImmichServer, ollama: OllamaServer, critic: Critic, make_ctx: Any
) -> None:
    asset_id = immich.add_asset(make_jpeg("astronaut"))
    critic.scores["astronaut"] = {"focus": "sharp"}  # never valid
    ctx = make_ctx()
    process(ctx)
    status = cli(tmp_path, immich, ollama, "status").stdout
    assert "curate: 1 quarantined" in status
    assert "curate quarantined: score: no valid answer in 3 attempts" in status
    critic.scores.clear()
    result = cli(tmp_path, immich, ollama, "recurate", "--quarantined")
    assert "1 photo(s) queued" in result.stdout
    process(ctx)
    assert ctx.store.stage_of(asset_id, curate.STAGE)[0] == "done"
    assert ctx.store.stage_of(asset_id, writeback.STAGE)[0] == "done"
    assert immich.asset(asset_id).rating == 4
