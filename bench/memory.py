"""Peak memory of one 1024 px training step of PixArt-Sigma XL-2 under the 12gb preset.

The real XL-2 transformer architecture (diffusers ``PixArtTransformer2DModel``: 28 layers,
16 heads x 72 = 1152 wide, patch 2, 4 in / 8 out channels, sample_size 128, caption width
4096, micro-conditions off; 610,856,096 parameters) is built with random weights, in bf16,
with gradient checkpointing (diffusers' ``enable_gradient_checkpointing()``, i.e.
``torch.utils.checkpoint`` with ``use_reentrant=False``), and the 12gb preset's optimizer
(``build_optimizer``: CAME, bf16 momentum, stochastic rounding).  Then ONE step as training
takes it: latent 1 x 4 x 128 x 128 and a 300 x 4096 caption embedding (both bf16), a
timestep, forward, MSE on the first 4 of the 8 output channels, backward, optimizer step.

Steady state, not a first step: before the step the optimizer state is created
(``optimizer.prepare_state()``, the zeros a first update would create) and the gradients
are allocated and stay so, as they do between the micro-batches of gradient accumulation
(the preset accumulates 4).  So weights, gradients and optimizer state are all resident
while the activations peak.

The step runs in a child process (this interpreter, ``--child step``) and a second child
(``--child baseline``) only imports torch (and darkroom's config module, which needs nothing
else); each reports its own ``ru_maxrss``.  The figure
is the step's peak RSS minus that baseline, split into weights, gradients and optimizer
state (bytes of their tensors), the libraries imported beyond torch (RSS measured after
the imports), and activations: the rest of the peak.  The largest batch for a 12 GB card
extrapolates the activations linearly:
``floor((12 GiB - weights - grads - state - allowance) / activations per sample)``, with
ALLOWANCE_GIB for the CUDA context and the caching allocator's fragmentation.

GB here are GiB (2^30 bytes), as card sizes and nvidia-smi count them.  Takes ~3-5 minutes
and ~7 GiB of RAM on a 2-core CPU.  Exit status 1 when the peak is above the 9 GB target.

The children run with ``OMP_WAIT_POLICY=PASSIVE`` (unless set otherwise): on a shared
machine, OpenMP's default spin-then-sleep barrier makes every parallel region wait out a
scheduler time slice whenever another process holds the other core -- measured here, a
1152 x 1152 elementwise op took 6 ns per element instead of 0.9, and one optimizer step
75 s instead of ~15.

    python bench/memory.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.config import PRESETS, STATE_DTYPES  # noqa: E402  (torch only, no diffusers)

TARGET_GIB = 9.0
CARD_GIB = 12.0
ALLOWANCE_GIB = 1.0  # CUDA context (~0.3-0.5) plus caching-allocator fragmentation
REQUIRED_FREE_GIB = 8.0  # refuse to start unless this much RAM is available
CHILD_TIMEOUT_S = 900
GIB = 1024**3
KIB = 1024
SEED = 7
PRESET = "12gb"
EXPECTED_PARAMETERS = 610_856_096
LATENT_SHAPE = (1, 4, 128, 128)
CAPTION_TOKENS, CAPTION_WIDTH = 300, 4096
LOSS_CHANNELS = 4  # MSE on the first 4 of the 8 output channels (the epsilon prediction)
TRAIN_TIMESTEPS = 1000

# PixArt-Sigma XL-2 1024-MS's transformer configuration.
XL2_CONFIG: dict[str, Any] = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "cross_attention_dim": 1152,
    "attention_bias": True,
    "sample_size": 128,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
    "caption_channels": CAPTION_WIDTH,
    "use_additional_conditions": False,  # None would turn micro-conditions ON at size 128
}


def _max_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KIB


def _current_rss_bytes() -> int:
    """This process's resident set size now (second field of /proc/self/statm, in pages)."""
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _available_bytes() -> int:
    """MemAvailable from /proc/meminfo."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * KIB
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def child_baseline() -> dict[str, Any]:
    """An idle interpreter with torch imported: its peak RSS is the baseline."""
    import torch  # noqa: F401

    return {"max_rss": _max_rss_bytes()}


def _tensor_bytes(tensors: Any) -> int:
    """Total bytes of the tensors in an iterable."""
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def _build_model(torch: Any, model_class: Any) -> Any:
    """The XL-2 transformer with random weights, created directly in bf16."""
    torch.manual_seed(SEED)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = model_class(**XL2_CONFIG)
    finally:
        torch.set_default_dtype(previous)
    model.to(torch.bfloat16).train()
    model.enable_gradient_checkpointing()
    return model


def _inputs(torch: Any) -> dict[str, Any]:
    """One 1024 px sample: latent, caption embedding (all 300 tokens real), timestep."""
    generator = torch.Generator().manual_seed(SEED)
    return {
        "hidden_states": torch.randn(LATENT_SHAPE, generator=generator).bfloat16(),
        "encoder_hidden_states": torch.randn(
            (1, CAPTION_TOKENS, CAPTION_WIDTH), generator=generator
        ).bfloat16(),
        "encoder_attention_mask": torch.ones((1, CAPTION_TOKENS), dtype=torch.long),
        "timestep": torch.randint(0, TRAIN_TIMESTEPS, (1,), generator=generator),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def child_step(state_dtype: str) -> dict[str, Any]:
    """Build the model and optimizer, take one 1024 px step, report sizes and peak RSS."""
    import torch
    import torch.nn.functional as functional
    from diffusers import PixArtTransformer2DModel

    from trainer.config import config_for
    from trainer.optim import build_optimizer

    timings: dict[str, float] = {}
    libraries_rss = _current_rss_bytes()
    started = time.perf_counter()
    model = _build_model(torch, PixArtTransformer2DModel)
    params = list(model.parameters())
    built = sum(param.numel() for param in params)
    if built != EXPECTED_PARAMETERS:
        raise RuntimeError(f"built {built:,} parameters, expected {EXPECTED_PARAMETERS:,}")
    with tempfile.TemporaryDirectory() as scratch:
        config = config_for(
            PRESET,
            model="random-xl2",
            cache_dir=scratch,
            output_dir=scratch,
            optimizer_state_dtype=state_dtype,
        )
    optimizer = build_optimizer(params, config)
    timings["build"] = time.perf_counter() - started

    optimizer.prepare_state()  # steady state: states exist, gradients stay allocated
    for param in params:
        param.grad = torch.zeros_like(param)

    inputs = _inputs(torch)
    target = torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(SEED + 1))
    started = time.perf_counter()
    output = model(**inputs).sample
    loss = functional.mse_loss(output[:, :LOSS_CHANNELS].float(), target)
    timings["forward"] = time.perf_counter() - started
    started = time.perf_counter()
    loss.backward()
    timings["backward"] = time.perf_counter() - started
    max_rss_backward = _max_rss_bytes()
    del output, loss
    started = time.perf_counter()
    optimizer.step()
    timings["optimizer"] = time.perf_counter() - started

    states = [value for state in optimizer.state.values() for value in state.values()]
    return {
        "parameters": built,
        "weights": _tensor_bytes(params),
        "grads": _tensor_bytes(param.grad for param in params),
        "state": _tensor_bytes(value for value in states if torch.is_tensor(value)),
        "libraries_rss": libraries_rss,
        "max_rss": _max_rss_bytes(),
        "max_rss_backward": max_rss_backward,
        "state_dtype": state_dtype,
        "timings": timings,
        "optimizer": type(optimizer).__name__,
    }


def _run_child(mode: str, state_dtype: str) -> dict[str, Any]:
    """Run this script as ``--child mode`` with the same interpreter; its JSON report."""
    environment = {**os.environ}
    environment.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    completed = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            mode,
            "--state-dtype",
            state_dtype,
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"the {mode} child failed ({completed.returncode}):\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _gib(size: float) -> str:
    """Bytes as GiB with two decimals."""
    return f"{size / GIB:.2f} GB"


def report(baseline: dict[str, Any], step: dict[str, Any]) -> float:
    """Print the split and the batch estimate; returns the peak above baseline in bytes."""
    peak = step["max_rss"] - baseline["max_rss"]
    libraries = max(0, step["libraries_rss"] - baseline["max_rss"])
    fixed = step["weights"] + step["grads"] + step["state"]
    activations = peak - fixed - libraries
    timings = step["timings"]
    print(
        f"PixArt-Sigma XL-2 transformer, {step['parameters']:,} parameters (random weights); "
        f"preset {PRESET}: bf16 weights + stochastic rounding, gradient checkpointing, "
        f"{step['optimizer']} ({step['state_dtype']} momentum, fp32 factored statistics)"
    )
    print(
        f"one 1024 px step (latent {'x'.join(map(str, LATENT_SHAPE))}, {CAPTION_TOKENS} tokens "
        f"x {CAPTION_WIDTH}): build {timings['build']:.0f} s, "
        f"forward {timings['forward']:.0f} s, backward {timings['backward']:.0f} s, "
        f"optimizer {timings['optimizer']:.0f} s"
    )
    print(f"baseline (idle interpreter, torch imported): {_gib(baseline['max_rss'])}")
    print(f"peak RSS {_gib(step['max_rss'])}, {_gib(peak)} above the baseline:")
    print(f"  weights          {_gib(step['weights'])}  (bf16)")
    print(f"  gradients        {_gib(step['grads'])}  (bf16, kept between micro-batches)")
    print(f"  optimizer state  {_gib(step['state'])}  (tensor bytes after the step)")
    print(f"  libraries        {_gib(libraries)}  (diffusers & co. beyond torch, measured)")
    print(f"  activations      {_gib(activations)}  (the rest of the peak; batch 1)")
    optimizer_rise = step["max_rss"] - step["max_rss_backward"]
    when = (
        "in forward/backward"
        if optimizer_rise == 0
        else (f"in the optimizer step ({_gib(optimizer_rise)} above the backward's peak)")
    )
    print(f"the peak was reached {when}")
    room = CARD_GIB * GIB - fixed - ALLOWANCE_GIB * GIB
    batch = max(0, math.floor(room / activations)) if activations > 0 else 0
    print(
        f"largest batch in {CARD_GIB:.0f} GB: {batch}  = floor(({CARD_GIB:.0f} GB - "
        f"{_gib(fixed)} weights+grads+state - {ALLOWANCE_GIB:.1f} GB CUDA context/allocator) "
        f"/ {_gib(activations)} activations per sample)"
    )
    print(f"memory: {peak / GIB:.1f} GB peak for one 1024 px step (target: <= {TARGET_GIB:.0f} GB)")
    return peak


def main() -> int:
    """Run both children and report; 1 above the target, 2 when RAM is short."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=("baseline", "step"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--state-dtype",
        choices=STATE_DTYPES,
        default=PRESETS[PRESET]["optimizer_state_dtype"],
        help="CAME's momentum dtype (default: the preset's); fp32 to compare",
    )
    args = parser.parse_args()
    if args.child is not None:
        measured = child_baseline() if args.child == "baseline" else child_step(args.state_dtype)
        print(json.dumps(measured))
        return 0
    available = _available_bytes()
    if available < REQUIRED_FREE_GIB * GIB:
        print(f"only {_gib(available)} RAM available; this needs {REQUIRED_FREE_GIB:.0f} GB")
        return 2
    baseline = _run_child("baseline", args.state_dtype)
    step = _run_child("step", args.state_dtype)
    peak = report(baseline, step)
    return 1 if peak > TARGET_GIB * GIB else 0


if __name__ == "__main__":
    sys.exit(main())
