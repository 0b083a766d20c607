"""The studio's web app: the JSON API of docs/studio-api.md and the browser UI.

Every route is a few lines over :class:`~daemon.studio.engine.Engine` (checks and renders)
and :class:`~daemon.studio.runs.RunQueue` (one render at a time, results kept).  Only two
kinds of files are ever served: the UI's own files in ``static/`` (FastAPI's StaticFiles
refuses paths outside it) and pictures made from kept runs; no route takes a path.

With a token configured every request needs it (``Authorization: Bearer …`` or the
cookie that opening ``/?token=…`` once sets), compared in constant time.  On a loopback
address without a token, requests must also name a loopback host, so a web page elsewhere
cannot reach the studio by pointing a DNS name at 127.0.0.1.
"""

from __future__ import annotations

import hmac
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.middleware.trustedhost import TrustedHostMiddleware

from daemon.studio.engine import Engine, Finished, RunSpec, StudioConfig, is_loopback
from daemon.studio.pictures import heatmap_png
from daemon.studio.runs import QueueFull, Run, RunQueue, State
from trainer.buckets import BUCKETS
from trainer.introspect import MAX_STRENGTH, SUGGESTIONS, Blend, Strength, piece_text
from trainer.sample_defaults import BASE_LABEL
from trainer.sampling import MAX_SEED

log = logging.getLogger("darkroom.studio")

STATIC_DIR = Path(__file__).parent / "static"
COOKIE = "darkroom_studio"
MAX_STEPS = 100  # more steps change little and make scrubbing slow
MAX_GUIDANCE = 30.0
MAX_PROMPT_CHARS = 2000
MAX_SUGGESTIONS = 32
HEATMAP_PNGS_KEPT = 64  # recently asked overlays, so flipping between tokens is instant
LOOPBACK_HOSTS = ["127.0.0.1", "localhost"]


class StrengthIn(BaseModel):
    """Scale one token of the prompt."""

    model_config = ConfigDict(extra="forbid")
    index: int = Field(ge=0)
    scale: float = Field(ge=0, le=MAX_STRENGTH)


class BlendIn(BaseModel):
    """Switch to a second prompt at a step."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    switch_step: int = Field(ge=0)


class RunIn(BaseModel):
    """POST /api/runs: what to render; fields left out take the studio's defaults."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    negative: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    steps: int | None = Field(default=None, ge=1, le=MAX_STEPS)
    guidance: float | None = Field(default=None, ge=0, le=MAX_GUIDANCE)
    width: int | None = None
    height: int | None = None
    checkpoint: str = BASE_LABEL
    blocks: list[int] | None = None
    strength: StrengthIn | None = None
    blend: BlendIn | None = None


def create_app(engine: Engine, config: StudioConfig | None = None) -> FastAPI:
    """The studio's app over a loaded ``engine``, with access and memory limits from
    ``config`` (default: the engine's); its run queue stops with the app."""
    config = engine.config if config is None else config
    queue: RunQueue[Finished] = RunQueue(
        engine.render,
        size_of=lambda finished: finished.nbytes,
        max_waiting=config.max_waiting,
        max_runs=config.max_runs,
        max_bytes=config.max_bytes,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        queue.close()

    app = FastAPI(title="darkroom studio", lifespan=lifespan, docs_url=None, redoc_url=None)
    _guard(app, config)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _page_routes(app)
    _model_routes(app, engine)
    _run_routes(app, engine, queue)
    return app


# --- access ---------------------------------------------------------------------------------


def _guard(app: FastAPI, config: StudioConfig) -> None:
    """Require the token when there is one; otherwise accept loopback host names only."""
    if config.token is None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=LOOPBACK_HOSTS)
        return
    token = config.token

    @app.middleware("http")
    async def require_token(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if _presented(request, token):
            return await call_next(request)
        offered = request.query_params.get("token")
        if request.url.path == "/" and offered is not None and _same(offered, token):
            page = RedirectResponse("/", status_code=303)
            page.set_cookie(COOKIE, token, httponly=True, samesite="strict")
            return page
        return JSONResponse(
            {"detail": "this studio needs its token: open /?token=… once, or send it as Bearer"},
            status_code=401,
        )


def _presented(request: Request, token: str) -> bool:
    """Whether the request carries ``token`` as a Bearer header or the studio's cookie."""
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and _same(value.strip(), token):
        return True
    return _same(request.cookies.get(COOKIE, ""), token)


def _same(offered: str, token: str) -> bool:
    """Constant-time comparison, so response times do not leak the token."""
    return hmac.compare_digest(offered.encode(), token.encode())


# --- pages and model facts -------------------------------------------------------------------


def _page_routes(app: FastAPI) -> None:
    """The UI's page."""

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")


def _model_routes(app: FastAPI, engine: Engine) -> None:
    """What the form offers, and the prompt's tokens."""
    inspector = engine.inspector

    @app.get("/api/options")
    def options() -> dict[str, Any]:
        defaults = engine.config.defaults
        return {
            "model": engine.config.pipeline.model,
            "blocks": inspector.block_count,
            "max_length": engine.config.pipeline.max_length,
            "checkpoints": engine.checkpoints(),
            "sizes": [{"width": b.width, "height": b.height, "name": b.name} for b in BUCKETS],
            "defaults": {"prompt": "", **vars(defaults), "checkpoint": BASE_LABEL},
            "limits": {"max_steps": MAX_STEPS, "max_strength": MAX_STRENGTH},
        }

    @app.get("/api/tokens")
    def tokens(prompt: str) -> dict[str, Any]:
        return {"tokens": [_token_json(t) for t in inspector.tokens(prompt)]}

    @app.get("/api/tokens/nearest")
    def nearest(prompt: str, index: int, k: int = SUGGESTIONS) -> dict[str, Any]:
        listed = inspector.tokens(prompt)
        if not 0 <= index < len(listed) or listed[index].special:
            raise HTTPException(422, f"index must name a word of the prompt (0..{len(listed) - 2})")
        token = listed[index]
        found = inspector.nearest_tokens(token.token_id, k=min(max(k, 1), MAX_SUGGESTIONS))
        pieces = engine.sampler.pipeline.tokenizer.convert_ids_to_tokens([i for i, _ in found])
        suggestions = [
            {
                "piece": piece,
                "text": piece_text(piece),
                "similarity": round(similarity, 4),
                "prompt": inspector.substitute(listed, index, token_id),
            }
            for (token_id, similarity), piece in zip(found, pieces, strict=True)
        ]
        return {"token": _token_json(token), "suggestions": suggestions}


def _token_json(token: Any) -> dict[str, Any]:
    """A token for the API."""
    return {
        "index": token.index,
        "piece": token.piece,
        "text": token.text,
        "token_id": token.token_id,
        "special": token.special,
    }


# --- runs -------------------------------------------------------------------------------------


def _run_routes(app: FastAPI, engine: Engine, queue: RunQueue[Finished]) -> None:
    """Queue runs, follow them, and serve their pictures and maps."""

    @app.post("/api/runs", status_code=202)
    def submit(body: RunIn) -> dict[str, Any]:
        spec = _prepare(engine, body)
        try:
            run = queue.submit(spec, spec.request.settings.steps)
        except QueueFull as exc:
            raise HTTPException(503, str(exc)) from exc
        return _run_json(queue, run)

    @app.get("/api/runs")
    def listing() -> dict[str, Any]:
        return {
            "runs": [
                {"id": r.id, "state": r.state.value, "request": r.spec.describe()}
                for r in queue.runs()
            ]
        }

    @app.get("/api/runs/{run_id}")
    def status(run_id: str) -> dict[str, Any]:
        return _run_json(queue, _known(queue, run_id))

    @app.get("/api/runs/{run_id}/image.png")
    def image(run_id: str) -> Response:
        return _png(_finished(queue, run_id).image_png)

    @app.get("/api/runs/{run_id}/preview/{step}.png")
    def preview(run_id: str, step: int) -> Response:
        previews = _finished(queue, run_id).preview_pngs
        if not 0 <= step < len(previews):
            raise HTTPException(422, f"step must be in 0..{len(previews) - 1}")
        return _png(previews[step])

    @lru_cache(maxsize=HEATMAP_PNGS_KEPT)
    def overlay(run_id: str, token: int, step: int | None, block: int | None) -> bytes:
        finished = _finished(queue, run_id)
        values = _heatmap(finished, token, step, block)
        return heatmap_png(values, finished.result.image.size)

    @app.get("/api/runs/{run_id}/heatmap.png")
    def heatmap_picture(
        run_id: str, token: int, step: int | None = None, block: int | None = None
    ) -> Response:
        return _png(overlay(run_id, token, step, block))

    @app.get("/api/runs/{run_id}/heatmap")
    def heatmap_values(
        run_id: str, token: int, step: int | None = None, block: int | None = None
    ) -> dict[str, Any]:
        values = _heatmap(_finished(queue, run_id), token, step, block)
        return {
            "grid": list(values.shape),
            "values": values.round(6).tolist(),
            "max": float(values.max()),
            "sum": float(values.sum()),
        }


def _prepare(engine: Engine, body: RunIn) -> RunSpec:
    """The checked run of a request body; 422 naming the field that cannot work."""
    defaults = engine.config.defaults
    given = body.model_dump(include={"negative", "seed", "steps", "guidance", "width", "height"})
    settings = replace(
        defaults, **{name: value for name, value in given.items() if value is not None}
    )
    try:
        return engine.prepare(
            body.prompt,
            settings,
            checkpoint=body.checkpoint,
            blocks=None if body.blocks is None else tuple(body.blocks),
            strength=None if body.strength is None else Strength(**body.strength.model_dump()),
            blend=None if body.blend is None else Blend(**body.blend.model_dump()),
        )
    except (ValueError, LookupError) as exc:
        raise HTTPException(422, str(exc).strip("'\"")) from exc


def _known(queue: RunQueue[Finished], run_id: str) -> Run[Finished]:
    """The run, or 404."""
    run = queue.get(run_id)
    if run is None:
        raise HTTPException(404, f"no run {run_id} (unknown, or dropped from memory)")
    return run


def _finished(queue: RunQueue[Finished], run_id: str) -> Finished:
    """The run's result, or 404 while it is not done."""
    run = _known(queue, run_id)
    if run.result is None:
        raise HTTPException(404, f"run {run_id} is {run.state.value}: no pictures yet")
    return run.result


def _heatmap(finished: Finished, token: int, step: int | None, block: int | None) -> Any:
    """A token's map from a kept run; 422 for a token, step or block out of range."""
    try:
        return finished.result.heatmap(token, step=step, block=block)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc


def _png(data: bytes) -> Response:
    """PNG bytes; runs never change, so browsers may keep them."""
    return Response(
        data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
    )


def _run_json(queue: RunQueue[Finished], run: Run[Finished]) -> dict[str, Any]:
    """A run's state for the API."""
    body: dict[str, Any] = {
        "id": run.id,
        "state": run.state.value,
        "position": queue.position(run) if run.state is State.QUEUED else 0,
        "done": run.done,
        "total": run.total,
        "error": run.error,
        "request": run.spec.describe(),
        "result": None,
    }
    if run.result is not None:
        body["result"] = _result_json(run.result, run.seconds)
    return body


def _result_json(finished: Finished, seconds: float | None) -> dict[str, Any]:
    """What the UI draws from a done run."""
    result = finished.result
    change = [
        [None if math.isnan(v) else round(float(v), 5) for v in row] for row in result.block_change
    ]
    return {
        "width": result.image.width,
        "height": result.image.height,
        "steps": len(result.previews),
        "blocks": list(result.blocks),
        "block_count": result.block_count,
        "tokens": [_token_json(t) for t in result.tokens],
        "captured_steps": [int(s) for s in result.captured.nonzero()[0]],
        "block_change": change,
        "block_change_measure": "‖block(x) − x‖ / ‖x‖ on the prompt's row",
        "checkpoint": finished.label,
        "seconds": None if seconds is None else round(seconds, 2),
    }


def serve(config: StudioConfig) -> None:
    """Load the model and serve the studio until interrupted (ValueError for an unsafe
    config, before anything loads)."""
    import uvicorn

    config.check()
    if not is_loopback(config.host):
        log.warning("studio listening on %s: reachable from other machines", config.host)
    engine = Engine(config)
    try:
        log.info("darkroom studio on http://%s:%d/", config.host, config.port)
        # No access log: the one request that signs in carries the token in its query.
        uvicorn.run(
            create_app(engine),
            host=config.host,
            port=config.port,
            log_config=None,
            access_log=False,
        )
    finally:
        engine.close()
