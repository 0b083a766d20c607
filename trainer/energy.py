"""What training costs in electricity: a configured power draw, or the device's own reading.

The seed article priced its runs per step and per image; darkroom does the same at every
logging interval.  A configured ``device_watts`` wins (a wall meter is the honest figure
for a whole machine); otherwise an NVIDIA card's own reading is used when torch can get it
(it needs pynvml); otherwise there is no estimate, rather than an invented one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MILLIWATTS_PER_WATT = 1000.0
SECONDS_PER_HOUR = 3600.0
WH_PER_KWH = 1000.0


def device_power_watts(device: torch.device) -> float | None:
    """The device's current power draw in watts, when it can report one."""
    if device.type != "cuda":
        return None
    try:
        return float(torch.cuda.power_draw(device)) / MILLIWATTS_PER_WATT
    except (ModuleNotFoundError, RuntimeError):  # pynvml missing, or the driver refuses
        return None


@dataclass
class EnergyMeter:
    """Adds up the energy of a run from the power draw and the time of each interval."""

    configured_watts: float | None
    price_per_kwh: float | None
    total_wh: float = 0.0

    def interval(self, device: torch.device, seconds: float, steps: int, images: int) -> dict:
        """Figures of one logging interval (empty when no power figure is known)."""
        watts = self.configured_watts or device_power_watts(device)
        if watts is None:
            return {}
        wh = watts * seconds / SECONDS_PER_HOUR
        self.total_wh += wh
        figures = {
            "watts": watts,
            "wh_per_step": wh / max(steps, 1),
            "wh_per_image": wh / max(images, 1),
            "total_kwh": self.total_wh / WH_PER_KWH,
        }
        if self.price_per_kwh is not None:
            price_per_wh = self.price_per_kwh / WH_PER_KWH
            figures["cost_per_step"] = figures["wh_per_step"] * price_per_wh
            figures["cost_per_image"] = figures["wh_per_image"] * price_per_wh
            figures["total_cost"] = self.total_wh * price_per_wh
        return figures
