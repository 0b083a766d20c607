"""Curation end to end on the stand-ins: real JPEGs in Immich, a looking critic in Ollama."""

from __future__ import annotations

import io
import uuid
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from daemon import curate, writeback
from daemon.discover import discover
from daemon.pipeline import FatalError, ServiceDownError, drain, open_context
from daemon.prompts import PROMPT_VERSION
from daemon.settings import load_settings
from daemon.vision import VisionModelMissingError
from tests.curation_harness import CRITIC_STARS, process, settings_env
from tests.immich_library import make_jpeg
from tests.immich_server import ImmichServer
from tests.ollama_server import Answer, AnswerQueue, Fault, OllamaServer
from tests.vlm_critic import DEFAULT_SCORES, DESCRIPTIONS, Critic


def test_library_ends_curated_in_immich(
    immich: ImmichServer, ollama: OllamaServer, make_ctx: Any
) -> None:
    upright = immich.add_asset(make_jpeg("astronaut"))
    sideways = immich.add_asset(make_jpeg("chelsea", rotate=90))  # needs 270° clockwise
    upside_down = immich.add_asset(make_jpeg("rocket", rotate=180))
    partner = immich.add_user("Partner")
    theirs = immich.add_asset(make_jpeg("coffee"), owner_id=partner)
    video = immich.add_asset(b"not really a video", type="VIDEO")
    ctx = make_ctx()
    process(ctx)

    for asset_id, name in ((upright, "astronaut"), (sideways, "chelsea"), (upside_down, "rocket")):
        state = immich.asset(asset_id)
        expected = DESCRIPTIONS[name][0].upper() + DESCRIPTIONS[name][1:]
        assert state.description == expected  # "This image shows" removed
        assert state.rating == CRITIC_STARS
        assert "darkroom/score/7" in state.tags
        meta = state.metadata["darkroom"]
        assert meta["provenance"]["model"] == "qwen2.5vl:7b"
        assert len(meta["provenance"]["digest"]) == 64
        assert meta["provenance"]["prompt_version"] == PROMPT_VERSION
        assert meta["scores"] == DEFAULT_SCORES and meta["stars"] == CRITIC_STARS
    assert immich.asset(upright).edits == ()
    assert [e["parameters"] for e in immich.asset(sideways).edits] == [{"angle": 270}]
    assert [e["parameters"] for e in immich.asset(upside_down).edits] == [{"angle": 180}]
    untouched = immich.asset(theirs)
    assert (untouched.description, untouched.rating, untouched.tags) == ("", None, ())
    assert ctx.store.stage_of(video, curate.STAGE)[0] == "skipped"
    assert ctx.store.stage_counts()[writeback.STAGE] == {"done": 3}
    assert ctx.store.open_reviews() == 0
    # Constant options: Ollama never had to reload the model between calls.
    assert ollama.stats.reloads == 0
    assert ollama.stats.option_values("num_ctx") == [8192]
    assert all(chat.think is False for chat in ollama.chats)


def test_disagreeing_votes_go_to_review_and_nothing_rotates(
    immich: ImmichServer, critic: Critic, make_ctx: Any
) -> None:
    critic.confused.add("rocket")
    asset_id = immich.add_asset(make_jpeg("rocket", rotate=90))
    ctx = make_ctx()
    process(ctx)
    assert immich.asset(asset_id).edits == ()
    assert ctx.store.open_reviews() == 1
    albums = immich.albums()
    assert albums["darkroom · check rotation"] == [asset_id]
    assert immich.asset(asset_id).rating == CRITIC_STARS  # the rest was still written


def test_human_rotation_means_review_not_edit(immich: ImmichServer, make_ctx: Any) -> None:
    asset_id = immich.add_asset(make_jpeg("chelsea", rotate=180))
    crop = {"action": "crop", "parameters": {"x": 0, "y": 0, "width": 100, "height": 100}}
    immich.human_update(asset_id, edits=[crop])
    ctx = make_ctx()
    process(ctx)
    assert immich.asset(asset_id).edits == (crop,)
    proposal = ctx.store.reviews()[0][2]
    assert proposal["correction"] == 180 and "already edited" in proposal["reason"]


@pytest.mark.parametrize(
    "bad",
    [
        '{"focus": 7}',  # partial
        '{"focus": 11, "exposure": 7, "composition": 7, "lighting": 7, "colors": 7, '
        '"creativity": 7, "depth": 7, "emotion": 7, "subject": 7}',  # out of range
        'Sure! {"focus": 7}',  # text around JSON
        '{"focus": "8/10", "exposure": 7, "composition": 7, "lighting": 7, "colors": 7, '
        '"creativity": 7, "depth": 7, "emotion": 7, "subject": 7}',  # a string score
    ],
)
def test_bad_scores_retried_then_quarantined(
    immich: ImmichServer, ollama: OllamaServer, make_ctx: Any, bad: str
) -> None:
    asset_id = immich.add_asset(make_jpeg("coffee"))
    ollama.responder = AnswerQueue(
        "A cup of coffee on a red table, seen from above.", bad, bad, bad
    )
    ctx = make_ctx(DARKROOM_CURATION__ORIENT="false")
    process(ctx)
    status, attempts, reason = ctx.store.stage_of(asset_id, curate.STAGE)
    assert status == "quarantined" and attempts == 1
    assert "score: no valid answer in 3 attempts" in reason
    assert ctx.store.curation(asset_id) is None  # nothing partial kept
    state = immich.asset(asset_id)
    assert (state.description, state.rating, state.tags) == ("", None, ())


def test_score_valid_on_third_attempt(
    immich: ImmichServer, ollama: OllamaServer, make_ctx: Any
) -> None:
    asset_id = immich.add_asset(make_jpeg("coffee"))
    good = Answer.json(dict.fromkeys(DEFAULT_SCORES, 9))
    ollama.responder = AnswerQueue("A cup of coffee seen from above.", "nope", "{}", good)
    ctx = make_ctx(DARKROOM_CURATION__ORIENT="false")
    process(ctx)
    assert immich.asset(asset_id).rating == 5


def test_refusal_is_never_a_caption(
    immich: ImmichServer, ollama: OllamaServer, make_ctx: Any
) -> None:
    asset_id = immich.add_asset(make_jpeg("coffee"))
    ollama.responder = AnswerQueue("I'm sorry, I can't help with that.", "", "   ")
    ctx = make_ctx(DARKROOM_CURATION__SCORE="false", DARKROOM_CURATION__ORIENT="false")
    process(ctx)
    status, _, reason = ctx.store.stage_of(asset_id, curate.STAGE)
    assert status == "quarantined" and "description" in reason
    assert immich.asset(asset_id).description == ""


def test_human_description_and_rating_never_overwritten(
    immich: ImmichServer, make_ctx: Any
) -> None:
    before = immich.add_asset(make_jpeg("astronaut"), description="Me at the museum", rating=2)
    after = immich.add_asset(make_jpeg("chelsea"))
    ctx = make_ctx()
    process(ctx)
    assert (immich.asset(before).description, immich.asset(before).rating) == (
        "Me at the museum",
        2,
    )
    assert ctx.store.is_human(before, "description") and ctx.store.is_human(before, "rating")
    # A person edits what darkroom wrote; a later curation must leave it alone.
    immich.human_update(after, description="Our cat Chelsea")
    ctx.store.mark(after, writeback.STAGE, "pending")
    drain(ctx, writeback.STAGE)
    assert immich.asset(after).description == "Our cat Chelsea"
    assert ctx.store.is_human(after, "description")
    assert not ctx.store.is_human(after, "rating")


def test_rerun_after_crash_writes_nothing_twice(immich: ImmichServer, make_ctx: Any) -> None:
    asset_id = immich.add_asset(make_jpeg("rocket", rotate=90))
    ctx = make_ctx()
    process(ctx)
    writes = ctx.store.write_count(asset_id)
    requests = _write_requests(immich)
    # A crash just before the stage was marked done: the whole write-back runs again.
    ctx.store.mark(asset_id, writeback.STAGE, "pending")
    drain(ctx, writeback.STAGE)
    assert _write_requests(immich) == requests
    assert ctx.store.write_count(asset_id) == writes
    # A crash between a write and its confirmation: settled by what Immich holds.
    write_id = ctx.store.intend_write(asset_id, "rating", CRITIC_STARS)
    ctx.store.mark(asset_id, writeback.STAGE, "pending")
    drain(ctx, writeback.STAGE)
    assert _write_requests(immich) == requests
    assert ctx.store.unfinished_writes(asset_id) == []
    assert ctx.store.write_count(asset_id) == writes + 1  # confirmed, not repeated
    assert write_id


def _write_requests(immich: ImmichServer) -> int:
    return sum(
        1
        for r in immich.requests
        if r.method in ("PUT", "POST", "DELETE") and r.operation_id != "searchAssets"
    )


def test_write_lost_in_a_crash_is_redone(
    immich: ImmichServer, critic: Critic, make_ctx: Any
) -> None:
    asset_id = immich.add_asset(make_jpeg("astronaut"))
    critic.scores["astronaut"] = dict.fromkeys(DEFAULT_SCORES, 9)
    ctx = make_ctx()
    discover(ctx.store, ctx.immich, ctx.settings.discovery)
    # The connection drops on the write carrying description and rating: both are
    # recorded as intended, and whether they landed is unknown.
    immich.drop(("PUT", "/assets/{id}"), times=1)
    with pytest.raises(ServiceDownError):
        drain(ctx, curate.STAGE)  # curation goes straight on to write-back
    assert ctx.store.stage_of(asset_id, curate.STAGE)[0] == "done"
    assert [w[1] for w in ctx.store.unfinished_writes(asset_id)] == ["description", "rating"]
    drain(ctx, writeback.STAGE)
    assert ctx.store.unfinished_writes(asset_id) == []
    assert immich.asset(asset_id).rating == 5
    assert ctx.store.last_written(asset_id, "rating") == (True, 5)


def test_dry_run_writes_nothing(immich: ImmichServer, make_ctx: Any) -> None:
    asset_id = immich.add_asset(make_jpeg("rocket", rotate=180))
    ctx = make_ctx(DARKROOM_CURATION__DRY_RUN="true")
    process(ctx)
    assert _write_requests(immich) == 0
    assert ctx.store.curation(asset_id)["stars"] == CRITIC_STARS
    assert ctx.store.stage_counts()[writeback.STAGE] == {"pending": 1}


def test_never_modes(immich: ImmichServer, make_ctx: Any) -> None:
    asset_id = immich.add_asset(make_jpeg("astronaut"))
    ctx = make_ctx(
        DARKROOM_CURATION__DESCRIPTION_MODE="never", DARKROOM_CURATION__RATING_MODE="never"
    )
    process(ctx)
    state = immich.asset(asset_id)
    assert (state.description, state.rating) == ("", None)
    assert "darkroom/score/7" in state.tags


def test_ollama_busy_leaves_asset_pending(
    immich: ImmichServer, ollama: OllamaServer, make_ctx: Any
) -> None:
    asset_id = immich.add_asset(make_jpeg("astronaut"))
    ctx = make_ctx()
    discover(ctx.store, ctx.immich, ctx.settings.discovery)
    ollama.inject(Fault.busy(), times=1)
    with pytest.raises(ServiceDownError, match="503"):
        drain(ctx, curate.STAGE)
    status, _, reason = ctx.store.stage_of(asset_id, curate.STAGE)
    assert status == "pending" and "busy" in reason
    drain(ctx, curate.STAGE)  # Ollama is back
    assert ctx.store.stage_of(asset_id, curate.STAGE)[0] == "done"


def test_immich_401_is_fatal(immich: ImmichServer, make_ctx: Any) -> None:
    immich.add_asset(make_jpeg("astronaut"))
    ctx = make_ctx()
    discover(ctx.store, ctx.immich, ctx.settings.discovery)
    immich.revoke_key()
    with pytest.raises(FatalError, match="API key rejected"):
        drain(ctx, curate.STAGE)


def test_missing_or_blind_model_named_clearly(
    tmp_path: Path, immich: ImmichServer, ollama: OllamaServer
) -> None:
    env = settings_env(tmp_path, immich, ollama, DARKROOM_OLLAMA__MODEL="llava:missing")
    with pytest.raises(VisionModelMissingError, match="ollama pull llava:missing"):
        open_context(load_settings(None, env))
    env = settings_env(tmp_path, immich, ollama, DARKROOM_OLLAMA__MODEL="llama3.2:3b")
    with pytest.raises(VisionModelMissingError, match="cannot see images"):
        open_context(load_settings(None, env))


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (make_jpeg("astronaut")[:2000], "truncated"),
        (b"<html>not an image</html>", "cannot identify"),
        (b"", "cannot identify"),
    ],
)
def test_broken_preview_is_a_reason_to_quarantine(data: bytes, why: str) -> None:
    with pytest.raises(curate.QuarantineError, match=why):
        curate.prepare_image(data, 1024, 512)


def test_prepared_views_are_downscaled_and_turned_clockwise() -> None:
    image = curate.prepare_image(make_jpeg("astronaut", scale=2.0), 512, 256)
    assert Image.open(io.BytesIO(image.upright)).size == (512, 512)
    sizes = {angle: Image.open(io.BytesIO(view)).size for angle, view in image.views.items()}
    assert sizes == {0: (256, 256), 90: (256, 256), 180: (256, 256), 270: (256, 256)}
    for long_side in (300, 600, 1024):
        wide = curate.prepare_image(make_jpeg("rocket", scale=3.0), long_side, long_side // 2)
        width, height = Image.open(io.BytesIO(wide.upright)).size
        assert abs(max(width, height) - long_side) <= long_side * curate.SIZE_TOLERANCE
        assert width > height  # still landscape
        small = Image.open(io.BytesIO(wide.views[0])).size
        assert abs(max(small) - long_side // 2) <= long_side // 2 * curate.SIZE_TOLERANCE
        assert Image.open(io.BytesIO(wide.views[90])).size == (small[1], small[0])
    tiny = curate.prepare_image(make_jpeg("rocket", scale=0.5), 1024, None)
    assert Image.open(io.BytesIO(tiny.upright)).size == (320, 214)  # never enlarged
    assert tiny.views == {}
    critic = Critic()
    view = Image.open(io.BytesIO(wide.views[90]))
    assert critic.identify(view) == ("rocket", 90)


def test_waits_for_the_thumbnail(immich: ImmichServer, make_ctx: Any) -> None:
    asset_id = immich.add_asset(make_jpeg("chelsea"), thumbhash_ready=False)
    ctx = make_ctx()
    process(ctx)
    assert ctx.store.stage_of(asset_id, curate.STAGE)[0] == "pending"
    assert immich.request_count("viewAsset") == 0
    immich.mark_thumbnail_ready(asset_id)
    process(ctx)
    assert ctx.store.stage_of(asset_id, curate.STAGE)[0] == "done"


def test_tag_deleted_in_immich_is_made_again(immich: ImmichServer, make_ctx: Any) -> None:
    asset_id = immich.add_asset(make_jpeg("astronaut"))
    ctx = make_ctx()
    ctx.store.set_value(writeback.TAG_ID_KEY + "darkroom/score/7", str(uuid.uuid4()))
    process(ctx)
    assert "darkroom/score/7" in immich.asset(asset_id).tags
    assert ctx.store.stage_of(asset_id, writeback.STAGE)[0] == "done"


def test_live_photo_is_never_rotated(immich: ImmichServer, make_ctx: Any) -> None:
    asset_id = immich.add_asset(make_jpeg("chelsea", rotate=180), live_photo=True)
    ctx = make_ctx()
    process(ctx)
    assert immich.asset(asset_id).edits == ()
    proposal = ctx.store.reviews()[0][2]
    assert proposal["correction"] == 180 and proposal["reason"] == "live photo"
    assert immich.albums()["darkroom · check rotation"] == [asset_id]
