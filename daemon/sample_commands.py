"""``darkroom generate``, ``darkroom samples`` and ``darkroom timelapse``.

All three need the ``train`` extra (torch, diffusers); without it they say so and exit 69.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from daemon.cache_commands import EXIT_OK, EXIT_UNAVAILABLE, train_extra_missing
from daemon.settings import Settings
from trainer.sample_defaults import DEFAULT_SEED

if TYPE_CHECKING:
    from daemon.samples import SamplesReport

EXIT_USAGE = 2  # a bad prompt, size or checkpoint: argparse's code for bad arguments
LATEST = "latest"


def cmd_generate(settings: Settings, args: argparse.Namespace) -> int:
    """Render a prompt with the base model or a checkpoint into PNG files."""
    if train_extra_missing("generate"):
        return EXIT_UNAVAILABLE
    from dataclasses import replace

    from daemon.samples import pipeline_options, sample_settings
    from trainer.sampling import Sampler, sample_metadata, save_png

    given = {
        "steps": args.steps, "guidance": args.guidance, "width": args.width,
        "height": args.height, "negative": args.negative,
    }  # fmt: skip
    seed = DEFAULT_SEED if args.seed is None else args.seed
    sample = replace(
        sample_settings(settings, seed),
        **{name: value for name, value in given.items() if value is not None},
    )
    try:
        sample.check()
        step, path = _checkpoint(settings, args.checkpoint)
    except (ValueError, LookupError) as exc:
        print(f"darkroom generate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sampler = Sampler(replace(pipeline_options(settings), **_memory_overrides(args)))
    sampler.use_checkpoint(path, step)
    images = sampler.render(args.prompt, sample, count=args.count, bar=args.progress)
    for index, image in enumerate(images):
        seed = sample.seed + index
        target = _output_path(args.out, sampler.label, seed, index, len(images))
        meta = sample_metadata(
            args.prompt, sample, seed=seed, checkpoint=sampler.label, model=settings.cache.model
        )
        save_png(image, target, meta)
        print(target)
    return EXIT_OK


def _checkpoint(settings: Settings, spec: str) -> tuple[int, Path | None]:
    """The step and folder ``--checkpoint`` names; the base model when none exists yet."""
    from trainer.sampling import resolve_checkpoint

    try:
        return resolve_checkpoint(settings.paths.checkpoint_dir, spec)
    except LookupError:
        if spec != LATEST:
            raise
        print("darkroom generate: no checkpoint yet, using the base model", file=sys.stderr)
        return 0, None


def _memory_overrides(args: argparse.Namespace) -> dict[str, object]:
    """The command line's device and low-memory choices, where given."""
    given = {"device": args.device, "cpu_offload": args.cpu_offload, "vae_tiling": args.vae_tiling}
    return {name: value for name, value in given.items() if value is not None}


def _output_path(out: Path | None, label: str, seed: int, index: int, count: int) -> Path:
    """``--out`` (numbered when several images), else ``darkroom-<checkpoint>-<seed>.png``."""
    if out is None:
        return Path(f"darkroom-{label.replace(' ', '-')}-seed{seed}.png")
    if count == 1:
        return out
    return out.with_name(f"{out.stem}-{index + 1}{out.suffix or '.png'}")


def cmd_samples(settings: Settings, args: argparse.Namespace) -> int:
    """Render the validation prompts, evaluate and upload new checkpoints' results."""
    if train_extra_missing("samples"):
        return EXIT_UNAVAILABLE
    from daemon.samples_job import JobOptions, run_samples

    report = run_samples(settings, JobOptions(upload=args.upload, evaluate=args.evaluate))
    _print_report(report)
    return EXIT_OK


def cmd_timelapse(settings: Settings, args: argparse.Namespace) -> int:
    """The same prompt and seed across every checkpoint: animation and sheets."""
    if train_extra_missing("timelapse"):
        return EXIT_UNAVAILABLE
    from daemon.samples_job import JobOptions, run_timelapse

    seed = DEFAULT_SEED if args.seed is None else args.seed
    report = run_timelapse(settings, JobOptions(upload=args.upload), args.prompt, seed)
    _print_report(report)
    if not report.sheets:
        print("darkroom timelapse: nothing to show yet: no checkpoint has been trained",
              file=sys.stderr)  # fmt: skip
    return EXIT_OK


def _print_report(report: SamplesReport) -> None:
    """What a samples or timelapse run made, one file per line, then a summary."""
    for path in report.sheets:
        print(path)
    for label, reason in report.skipped.items():
        print(f"{label}: skipped: {reason}", file=sys.stderr)
    for note in report.notes:
        print(note, file=sys.stderr)
    print(
        f"{len(report.rendered)} rendered, {len(report.evaluated)} evaluated, "
        f"{len(report.cards)} model cards, {report.uploaded} uploaded"
    )


def add_arguments(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``generate``, ``samples`` and ``timelapse`` on the main parser."""
    generate = commands.add_parser("generate", help=(cmd_generate.__doc__ or "").splitlines()[0])
    generate.set_defaults(func=cmd_generate)
    generate.add_argument("prompt")
    generate.add_argument("--checkpoint", default=LATEST, help="latest (default), base or a step")
    generate.add_argument("--steps", type=int, help="denoising steps (default 30)")
    generate.add_argument("--guidance", type=float, help="classifier-free guidance (4.5)")
    generate.add_argument("--seed", type=int, help="seed of the first image (42)")
    generate.add_argument("--width", type=int, help="one of the nine bucket sizes (1024)")
    generate.add_argument("--height", type=int, help="one of the nine bucket sizes (1024)")
    generate.add_argument("--negative", help="negative prompt (the seed article's by default)")
    generate.add_argument("--out", type=Path, help="PNG file (numbered when -n > 1)")
    generate.add_argument("-n", dest="count", type=int, default=1, help="images, seeds counting up")
    generate.add_argument("--device", help="cuda, xpu, mps, cpu (default: samples.device)")
    generate.add_argument(
        "--cpu-offload", action=argparse.BooleanOptionalAction, default=None,
        help="keep idle parts in RAM (for 12 GB cards)",
    )  # fmt: skip
    generate.add_argument(
        "--vae-tiling", action=argparse.BooleanOptionalAction, default=None,
        help="decode in tiles (less GPU memory)",
    )  # fmt: skip
    _progress_argument(generate)
    samples = commands.add_parser("samples", help=(cmd_samples.__doc__ or "").splitlines()[0])
    samples.set_defaults(func=cmd_samples)
    _upload_argument(samples)
    samples.add_argument(
        "--evaluate", action=argparse.BooleanOptionalAction, default=True,
        help="held-out loss per checkpoint (default: on)",
    )  # fmt: skip
    lapse = commands.add_parser("timelapse", help=(cmd_timelapse.__doc__ or "").splitlines()[0])
    lapse.set_defaults(func=cmd_timelapse)
    lapse.add_argument("--prompt", help="one prompt instead of the validation prompts")
    lapse.add_argument("--seed", type=int, help="seed for --prompt (default 42)")
    _upload_argument(lapse)


def _upload_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--upload", action=argparse.BooleanOptionalAction, default=True,
        help="put results into the Immich album (default: per samples.upload)",
    )  # fmt: skip


def _progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None,
        help="progress bar (default: when stderr is a terminal; log lines otherwise)",
    )  # fmt: skip
