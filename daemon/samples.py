"""Stage 6, samples: what each checkpoint learned (``darkroom samples``).

Runs in a process of its own after training (``hooks.samples_command``) or by hand, with the
GPU free of the trainer.  In order:

1. render    -- every validation prompt (``samples.prompts``, each with its fixed seed) by the
                base model (step 0) and by each checkpoint that has not rendered it yet;
2. evaluate  -- the held-out loss by timestep bin of each checkpoint not yet evaluated on the
                current held-out set (``trainer/evaluate.py``), drawn with the loss curve;
3. cards     -- a model card beside each milestone checkpoint that has none;
4. timelapse -- per prompt an animation across checkpoints, a contact sheet of checkpoints x
                prompts, and a before/after against the base model (``daemon/timelapse.py``);
5. upload    -- what is new into the Immich album (``daemon/gallery.py``).

Renders live in ``<checkpoint_dir>/samples/`` (``base/``, ``step-00000500/``...), beside the
checkpoints rather than inside them, so the time-lapse keeps the frames of checkpoints that
retention deleted.  A render is keyed by its prompt, seed and sampling settings: changing
any of them renders anew.  One checkpoint that cannot be loaded is logged and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.results import SAMPLE, Evaluation, Render, Results
from daemon.settings import Settings
from trainer.progress_file import step_folder
from trainer.sample_defaults import step_label

if TYPE_CHECKING:
    from trainer.cache import Cache
    from trainer.clip_score import ClipScorer
    from trainer.sampling import PipelineOptions, Sampler, SampleSettings

log = logging.getLogger("darkroom.samples")

SAMPLES_DIR = "samples"
BASE_DIR = "base"
BASE_STEP = 0  # the base model, before any fine-tuning
KEY_CHARS = 12  # of a prompt key's sha256: plenty to tell prompts apart, short in file names


@dataclass(frozen=True)
class Prompt:
    """A prompt with its seed, keyed by everything that decides its image."""

    index: int
    text: str
    seed: int
    key: str


@dataclass(frozen=True)
class Checkpoint:
    """A set of weights to render with: the base model (path None) or a checkpoint."""

    step: int
    path: Path | None
    milestone: bool = False

    @property
    def label(self) -> str:
        return step_label(self.step)


@dataclass(frozen=True)
class HeldOut:
    """The held-out cache and the digest naming its samples (computed once per run)."""

    cache: Cache
    digest: str


@dataclass
class SamplesReport:
    """What one ``darkroom samples`` (or ``timelapse``) run did."""

    rendered: list[Path] = field(default_factory=list)
    evaluated: list[int] = field(default_factory=list)
    cards: list[Path] = field(default_factory=list)
    sheets: list[Path] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    uploaded: int = 0
    notes: list[str] = field(default_factory=list)


def prompt_key(text: str, seed: int, sample: SampleSettings, model: str) -> str:
    """A short stable key for an image: prompt, seed, sampling settings and base model."""
    fields = {
        "prompt": text, "seed": seed, "settings": sample.describe(), "model": model,
        "negative": sample.negative,
    }  # fmt: skip
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return digest[:KEY_CHARS]


def sample_settings(settings: Settings, seed: int) -> SampleSettings:
    """The ``[samples]`` settings as the sampler takes them, for one seed."""
    from trainer.sampling import SampleSettings

    samples = settings.samples
    return SampleSettings(
        steps=samples.steps, guidance=samples.guidance, seed=seed,
        width=samples.width, height=samples.height, negative=samples.negative,
    )  # fmt: skip


def pipeline_options(settings: Settings) -> PipelineOptions:
    """How to load the base pipeline, from the ``[samples]`` and ``[cache]`` settings."""
    from trainer.sampling import PipelineOptions

    samples = settings.samples
    return PipelineOptions(
        model=settings.cache.model, device=samples.device, dtype=samples.precision,
        cpu_offload=samples.cpu_offload, vae_tiling=samples.vae_tiling,
        max_length=settings.cache.max_caption_tokens,
    )  # fmt: skip


def validation_prompts(settings: Settings) -> list[Prompt]:
    """The configured validation prompts, keyed."""
    return [
        Prompt(i, p.prompt, p.seed, prompt_key(p.prompt, p.seed, sample_settings(settings, p.seed),
                                               settings.cache.model))
        for i, p in enumerate(settings.samples.prompts)
    ]  # fmt: skip


def checkpoints(settings: Settings) -> list[Checkpoint]:
    """The base model, then every valid checkpoint by step."""
    from trainer.checkpoints import list_checkpoints

    found = [Checkpoint(BASE_STEP, None)]
    for info in list_checkpoints(settings.paths.checkpoint_dir):
        if info.valid:
            found.append(Checkpoint(info.step, info.path, info.milestone))
        else:
            log.warning("checkpoint %s left out: %s", info.path.name, info.problem)
    return found


def samples_root(settings: Settings) -> Path:
    """Where renders, time-lapses and sheets are written."""
    return settings.paths.checkpoint_dir / SAMPLES_DIR


def render_path(root: Path, kind: str, checkpoint: Checkpoint, prompt: Prompt) -> Path:
    """``samples/base/00-<key>.png``, ``samples/step-00000500/00-<key>.png`` (time-lapse
    frames of other prompts under ``samples/timelapse-frames/<key>/``)."""
    folder = BASE_DIR if checkpoint.step == BASE_STEP else step_folder(checkpoint.step)
    if kind != SAMPLE:
        return root / f"{kind}-frames" / prompt.key / f"{folder}.png"
    return root / folder / f"{prompt.index:02d}-{prompt.key}.png"


class LazySampler:
    """The base pipeline, loaded the first time a render or an evaluation needs it."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._sampler: Sampler | None = None

    def on(self, checkpoint: Checkpoint) -> Sampler:
        """The sampler with ``checkpoint``'s weights in place."""
        from trainer.checkpoints import verify_checkpoint

        if self._sampler is None:
            from trainer.sampling import Sampler

            self._sampler = Sampler(pipeline_options(self.settings))
        if checkpoint.path is not None and self._sampler.step != checkpoint.step:
            # Every byte against the manifest: a damaged file must not render garbage.
            verify_checkpoint(checkpoint.path, hashes=True)
        self._sampler.use_checkpoint(checkpoint.path, checkpoint.step)
        return self._sampler


def render_missing(
    settings: Settings,
    results: Results,
    sampler: LazySampler,
    checkpoint: Checkpoint,
    prompts: Sequence[Prompt],
    done: set[tuple[int, str]],
    *,
    kind: str = SAMPLE,
    scorer: ClipScorer | None = None,
) -> list[Path]:
    """Render the prompts ``checkpoint`` has not rendered yet (``done``: the (step, prompt
    key) pairs on disk, from :meth:`Results.rendered`, kept up to date); the files written."""
    from trainer.sampling import sample_metadata, save_png

    missing = [p for p in prompts if (checkpoint.step, p.key) not in done]
    written = []
    for prompt in missing:
        model = sampler.on(checkpoint)
        sample = sample_settings(settings, prompt.seed)
        image = model.render(prompt.text, sample)[0]
        path = render_path(samples_root(settings), kind, checkpoint, prompt)
        meta = sample_metadata(
            prompt.text, sample, seed=prompt.seed, checkpoint=checkpoint.label,
            model=settings.cache.model,
        )  # fmt: skip
        save_png(image, path, meta)
        score = None if scorer is None else scorer.score([image], [prompt.text])[0]
        results.add_render(
            Render(kind, checkpoint.step, prompt.key, prompt.text, prompt.seed, path, score)
        )
        log.info("%s: rendered %r (seed %d)", checkpoint.label, prompt.text, prompt.seed)
        done.add((checkpoint.step, prompt.key))
        written.append(path)
    return written


def evaluate_missing(
    results: Results,
    sampler: LazySampler,
    checkpoint: Checkpoint,
    held_out: HeldOut,
    *,
    seed: int,
) -> Evaluation | None:
    """The checkpoint's held-out loss by bin, unless known for the current held-out set."""
    from trainer.evaluate import binned_held_out_loss

    if any(e.step == checkpoint.step for e in results.evaluations(held_out.digest)):
        return None
    model = sampler.on(checkpoint)
    loss = binned_held_out_loss(model.transformer, held_out.cache, seed=seed, device=model.device)
    evaluation = Evaluation(
        checkpoint.step, held_out.digest, loss.samples,
        loss.early, loss.middle, loss.late, loss.overall,
    )  # fmt: skip
    results.add_evaluation(evaluation)
    log.info(
        "%s: held-out loss %.4f (early %.4f, middle %.4f, late %.4f) on %d photos",
        checkpoint.label, loss.overall, loss.early, loss.middle, loss.late, loss.samples,
    )  # fmt: skip
    return evaluation
