"""What a doctor check reports: a name, an outcome and a line of detail."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Outcome(Enum):
    """How a check went."""

    OK = "ok"
    WARN = "warn"
    FAIL = "FAIL"


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    outcome: Outcome
    detail: str
