"""Discovery against the stand-in: what is picked up, what is not, and what it costs."""

from __future__ import annotations

import time
from typing import Any

from daemon import curate
from daemon.discover import discover, reconcile
from daemon.pipeline import Context
from tests.curation_harness import process
from tests.immich_library import make_jpeg
from tests.immich_server import ImmichServer

QUIET = {"DARKROOM_DISCOVERY__SAFETY_MARGIN_S": "0.5"}


def poll(ctx: Context) -> Any:
    return discover(ctx.store, ctx.immich, ctx.settings.discovery)


def test_first_poll_picks_up_the_owners_images(immich: ImmichServer, make_ctx: Any) -> None:
    photo = immich.add_asset(make_jpeg("astronaut"))
    archived = immich.add_asset(make_jpeg("chelsea"), visibility="archive")
    trashed = immich.add_asset(make_jpeg("coffee"), trashed=True)
    hidden = immich.add_asset(make_jpeg("rocket"), visibility="hidden")
    video = immich.add_asset(b"video bytes", type="VIDEO")
    partner = immich.add_user("Partner")
    theirs = immich.add_asset(make_jpeg("rocket"), owner_id=partner)
    ctx = make_ctx()
    report = poll(ctx)
    assert report.counts.new == 3 and report.counts.skipped == 1
    known = {row[0] for row in ctx.store.read("SELECT id FROM assets")}
    assert known == {photo, archived, trashed, video}
    assert hidden not in known and theirs not in known
    assert set(ctx.store.pending(curate.STAGE, 10)) == {photo, archived}  # not the trash
    assert ctx.store.stage_of(video, curate.STAGE)[:1] == ("skipped",)
    assert "video assets are not curated" in ctx.store.stage_of(video, curate.STAGE)[2]
    assert ctx.store.asset_counts()["trashed"] == 1


def test_own_writes_do_not_cause_new_work(immich: ImmichServer, make_ctx: Any) -> None:
    photo = immich.add_asset(make_jpeg("astronaut"))
    ctx = make_ctx()
    process(ctx)  # curates and writes back: updatedAt moves in Immich
    before = ctx.store.stage_of(photo, curate.STAGE)
    report = poll(ctx)
    assert report.counts.new == report.counts.replaced == 0
    assert report.counts.updated == 1  # seen again, only refreshed
    assert ctx.store.stage_of(photo, curate.STAGE) == before
    assert ctx.store.pending(curate.STAGE, 10) == []


def test_replaced_photo_is_new_again(immich: ImmichServer, make_ctx: Any) -> None:
    photo = immich.add_asset(make_jpeg("astronaut"))
    ctx = make_ctx()
    process(ctx)
    immich.replace_file(photo, make_jpeg("chelsea"))
    report = poll(ctx)
    assert report.counts.replaced == 1
    assert ctx.store.pending(curate.STAGE, 10) == [photo]


def test_trash_and_restore_are_followed(immich: ImmichServer, make_ctx: Any) -> None:
    photo = immich.add_asset(make_jpeg("astronaut"))
    ctx = make_ctx()
    poll(ctx)
    immich.trash(photo)
    poll(ctx)
    assert ctx.store.asset_counts()["trashed"] == 1
    assert ctx.store.pending(curate.STAGE, 10) == []
    immich.restore(photo)
    poll(ctx)
    assert ctx.store.pending(curate.STAGE, 10) == [photo]


def test_reconciliation_notices_hard_deletes(immich: ImmichServer, make_ctx: Any) -> None:
    keep = immich.add_asset(make_jpeg("astronaut"))
    gone = immich.add_asset(make_jpeg("chelsea"))
    ctx = make_ctx()
    poll(ctx)
    immich.hard_delete(gone)
    assert poll(ctx).counts.new == 0  # a hard delete leaves nothing to poll
    assert reconcile(ctx.store, ctx.immich, ctx.settings.discovery) == 1
    deleted = {row[0] for row in ctx.store.read("SELECT id FROM assets WHERE is_deleted")}
    assert deleted == {gone}
    assert ctx.store.pending(curate.STAGE, 10) == [keep]


def test_quiet_poll_costs_one_request_per_visibility(immich: ImmichServer, make_ctx: Any) -> None:
    photo = make_jpeg("astronaut")
    for index in range(2500):
        immich.add_asset(photo + index.to_bytes(2, "big"))
    ctx = make_ctx(**QUIET)
    first = poll(ctx)
    assert first.counts.new == 2500 and first.requests == 4  # 3 timeline pages + archive
    time.sleep(0.6)  # past the safety margin
    before = immich.request_count()
    quiet = poll(ctx)
    assert quiet.counts.new == 0
    assert immich.request_count() - before == quiet.requests == 2
    new = immich.add_asset(make_jpeg("chelsea"))
    changed = poll(ctx)
    assert changed.counts.new == 1 and changed.requests == 2
    assert new in ctx.store.pending(curate.STAGE, 3000)
