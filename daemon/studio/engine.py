"""The studio's model side: one loaded pipeline, the checkpoints it may use, and renders.

:class:`Engine` is made once when the studio starts (the model loads once) and is used by
the run queue's single worker, so renders never overlap on the GPU.  Requests are checked
here before they are queued (:meth:`Engine.prepare`), so a bad field is refused at once
with what is wrong, not after the queue.  Checkpoints are only ever named by step, looked
up in the configured checkpoint folder: no request can point the studio at a path.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon.studio.pictures import png_bytes
from trainer.checkpoints import list_checkpoints
from trainer.introspect import Blend, Inspector, InspectRequest, InspectResult, Strength
from trainer.sample_defaults import BASE_LABEL, step_label
from trainer.sampling import PipelineOptions, Sampler, SampleSettings, resolve_checkpoint

LOOPBACK_NAMES = ("localhost",)
MIN_TOKEN_LENGTH = 16  # a token short enough to guess protects nothing


@dataclass(frozen=True)
class StudioConfig:
    """How the studio runs: the model, where checkpoints are, the form's defaults, where it
    listens, the token
    (None: none needed, only allowed on a loopback address) and the memory it may keep."""

    pipeline: PipelineOptions
    checkpoint_dir: Path
    defaults: SampleSettings = field(default_factory=SampleSettings)
    host: str = "127.0.0.1"
    port: int = 8178
    token: str | None = field(default=None, repr=False)
    max_runs: int = 16
    max_bytes: int = 2 * 1024**3
    max_waiting: int = 8

    def check(self) -> None:
        """ValueError when the studio would be reachable from the network without a
        token, or the token is too short to protect anything."""
        if self.token is not None and len(self.token) < MIN_TOKEN_LENGTH:
            raise ValueError(f"studio.token must be at least {MIN_TOKEN_LENGTH} characters")
        if self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"studio.host {self.host} is reachable from other machines: set studio.token"
                " (DARKROOM_STUDIO__TOKEN) to require it, or keep the default 127.0.0.1"
            )


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class RunSpec:
    """A checked request: what to render and with which checkpoint (step 0: the base)."""

    request: InspectRequest
    checkpoint: str
    step: int
    path: Path | None

    def describe(self) -> dict[str, Any]:
        """The request as resolved, for the API (the path stays on the server)."""
        request, settings = self.request, self.request.settings
        return {
            "prompt": request.prompt,
            "negative": settings.negative,
            "seed": settings.seed,
            "steps": settings.steps,
            "guidance": settings.guidance,
            "width": settings.width,
            "height": settings.height,
            "checkpoint": self.checkpoint,
            "blocks": None if request.blocks is None else list(request.blocks),
            "strength": None if request.strength is None else vars(request.strength),
            "blend": None if request.blend is None else vars(request.blend),
        }


@dataclass(eq=False)
class Finished:
    """A run's result with its pictures encoded once, so serving them costs nothing."""

    result: InspectResult
    label: str
    image_png: bytes
    preview_pngs: list[bytes]

    @property
    def nbytes(self) -> int:
        """Memory held, for the run queue's budget."""
        return self.result.nbytes + len(self.image_png) + sum(map(len, self.preview_pngs))


class Engine:
    """The loaded model and what it may render."""

    def __init__(self, config: StudioConfig) -> None:
        """Load the pipeline (once: minutes for the real model)."""
        self.config = config
        self.sampler = Sampler(config.pipeline)
        self.inspector = Inspector(self.sampler)

    def checkpoints(self) -> list[dict[str, str]]:
        """What the checkpoint picker offers: the base model, then every valid checkpoint."""
        steps = [info.step for info in list_checkpoints(self.config.checkpoint_dir) if info.valid]
        base = {"spec": BASE_LABEL, "label": BASE_LABEL}
        return [base, *({"spec": str(step), "label": step_label(step)} for step in steps)]

    def prepare(
        self,
        prompt: str,
        settings: SampleSettings,
        *,
        checkpoint: str,
        blocks: tuple[int, ...] | None,
        strength: Strength | None,
        blend: Blend | None,
    ) -> RunSpec:
        """The checked run; ValueError or LookupError naming what cannot work."""
        request = InspectRequest(prompt, settings, blocks, strength, blend)
        settings.check()
        self.inspector.check(request, len(self.inspector.tokens(prompt)))
        step, path = resolve_checkpoint(self.config.checkpoint_dir, checkpoint)
        return RunSpec(request, checkpoint, step, path)

    def render(self, spec: RunSpec, progress: Any) -> Finished:
        """Render ``spec`` with its checkpoint's weights (runs in the queue's worker)."""
        self.sampler.use_checkpoint(spec.path, spec.step)
        result = self.inspector.run(spec.request, on_progress=progress)
        return Finished(
            result=result,
            label=self.sampler.label,
            image_png=png_bytes(result.image),
            preview_pngs=[png_bytes(preview) for preview in result.previews],
        )

    def close(self) -> None:
        """Give the model's memory back."""
        self.sampler.close()
