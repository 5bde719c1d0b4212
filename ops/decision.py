"""The one answer type of the loop's judges: the retraining policy, the validation gate and the canary each return
a :class:`Decision` — a verdict, the reasons for it and the figures it was based on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def fmt(x: float | None) -> str:
    """A metric in a reason: four decimals, ``n/a`` when undefined."""
    return "n/a" if x is None else f"{x:.4f}"


@dataclass(frozen=True)
class Decision:
    """``verdict`` is one of the judge's words (policy: retrain | wait; gate: pass | fail; canary: promote |
    rollback); ``reasons`` say why, in order of importance; ``details`` hold the inputs and figures."""

    verdict: str
    reasons: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict, "reasons": list(self.reasons), **self.details}
