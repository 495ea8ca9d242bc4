"""Over-budget state with hysteresis: one event at onset, one at resolution, no flapping.

A job must be over budget for `after` consecutive samples to enter violation, and within
budget for as many to leave it, so short-lived tf.data threads do not make it flap.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum


class Transition(Enum):
    ONSET = "onset"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class ViolationState:
    active: bool = False
    streak: int = 0  # consecutive samples that disagree with `active`

    def observe(self, over_budget: bool, after: int) -> tuple[ViolationState, Transition | None]:
        if over_budget == self.active:
            return replace(self, streak=0), None
        streak = self.streak + 1
        if streak < after:
            return replace(self, streak=streak), None
        return ViolationState(active=over_budget), (
            Transition.ONSET if over_budget else Transition.RESOLVED
        )
