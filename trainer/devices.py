"""Pick the compute device and name dtypes the way darkroom's settings spell them.

darkroom runs on whatever one home server has: an NVIDIA card (``cuda``), an Intel Arc card
(``xpu``, through ``torch.xpu`` itself — intel-extension-for-pytorch is never required), an
Apple GPU (``mps``) or only the CPU.  ``"auto"`` takes the first of those that is usable;
an explicitly named device is checked, so a setting that asks for a GPU the machine does not
have fails at start-up with a message saying so, instead of deep inside a model load.
"""

from __future__ import annotations

from types import ModuleType

import torch

AUTO = "auto"
# The order "auto" tries accelerators in (the CPU is the fallback).
AUTO_ORDER = ("cuda", "xpu", "mps")
SUPPORTED_TYPES = (*AUTO_ORDER, "cpu")

# Settings spell dtypes as short names; these are the only ones darkroom computes in.
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
}


class DeviceUnavailableError(ValueError):
    """A device was asked for by name but this machine (or this torch build) lacks it."""


def _xpu_module() -> ModuleType | None:
    """``torch.xpu`` when this torch build has it (torch >= 2.4), else None."""
    return getattr(torch, "xpu", None)


def _count(device_type: str) -> int:
    """How many devices of a type are usable right now (0 when none or unsupported)."""
    if device_type == "cpu":
        return 1
    if device_type == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device_type == "xpu":
        xpu = _xpu_module()
        return xpu.device_count() if xpu is not None and xpu.is_available() else 0
    if device_type == "mps":
        return 1 if torch.backends.mps.is_available() else 0
    return 0


def _why_absent(device_type: str) -> str:
    """A short human reason for a missing accelerator, naming the likely cause."""
    if device_type == "cuda" and torch.version.cuda is None:
        return "this torch build has no CUDA support (a CPU-only or non-CUDA wheel)"
    if device_type == "xpu" and _xpu_module() is None:
        return "this torch build has no torch.xpu (XPU support needs torch >= 2.4)"
    if device_type == "mps" and not torch.backends.mps.is_built():
        return "this torch build has no MPS support (MPS needs macOS on Apple silicon)"
    return f"torch sees no {device_type} device (driver missing or device not visible)"


def _parse(preference: str) -> torch.device:
    """Turn a setting such as ``"cuda:1"`` into a torch.device, with a clear error."""
    try:
        device = torch.device(preference)
    except RuntimeError as error:
        raise ValueError(
            f"unknown device {preference!r}: use auto, {', '.join(SUPPORTED_TYPES)} "
            f"(optionally with an index, e.g. cuda:1)"
        ) from error
    if device.type not in SUPPORTED_TYPES:
        raise ValueError(
            f"device type {device.type!r} is not supported: use auto, {', '.join(SUPPORTED_TYPES)}"
        )
    return device


def pick_device(preference: str = AUTO) -> torch.device:
    """The device to compute on: ``"auto"`` tries cuda, xpu, mps, then falls back to cpu.

    Any other value names a device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"xpu"``, ``"mps"``)
    and is checked: DeviceUnavailableError (a ValueError) says why it cannot be used here.
    """
    wanted = preference.strip().lower()
    if wanted == AUTO:
        for device_type in AUTO_ORDER:
            if _count(device_type) > 0:
                return torch.device(device_type)
        return torch.device("cpu")
    device = _parse(wanted)
    available = _count(device.type)
    if available == 0:
        raise DeviceUnavailableError(
            f"device {preference!r} was asked for but {_why_absent(device.type)}; "
            f"use device 'auto' or 'cpu'"
        )
    if device.index is not None and device.index >= available:
        raise DeviceUnavailableError(
            f"device {preference!r} was asked for but only {available} {device.type} "
            f"device(s) are visible (indices 0..{available - 1})"
        )
    return device


def dtype_named(name: str) -> torch.dtype:
    """The torch dtype for a settings name: ``"fp32"``, ``"fp16"`` or ``"bf16"``."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """The settings name of a dtype (inverse of dtype_named); ValueError for other dtypes."""
    for name, known in DTYPES.items():
        if known == dtype:
            return name
    raise ValueError(f"dtype {dtype} has no darkroom name: use one of {', '.join(DTYPES)}")


def check_dtype_supported(device: torch.device, dtype: torch.dtype) -> None:
    """Refuse bf16 on a CUDA card that cannot do it natively (pre-Ampere), with advice.

    Such cards would silently emulate bf16 very slowly or fail in a kernel; saying so at
    load time lets the user pick fp32 (or 8-bit for T5) instead.
    """
    if dtype != torch.bfloat16 or device.type != "cuda":
        return
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        name = torch.cuda.get_device_name(device)
        raise ValueError(f"{name} has no native bf16 support: use fp32 (or 8bit for T5)")


def empty_cache(device: torch.device) -> None:
    """Hand cached, unused accelerator memory back to the driver after a model is dropped."""
    if device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif device.type == "xpu" and _count("xpu") > 0:
        torch.xpu.empty_cache()
    elif device.type == "mps" and torch.backends.mps.is_available():
        torch.mps.empty_cache()
