"""An alpha that means what it says: `--target-share S` keeps the constraint term (FPO's beta alpha (D_l - D_w),
TDPO2's alpha beta (KL_l - KL_w)) at S of the margin term over the whole run, instead of an alpha fixed from a
probe early in training, where the policy is still almost the reference: D grows with the square of the drift and
the margin linearly, so a fixed alpha's share grows as training goes (measured: 0.30 early, 3.4 late).

After every step the controller updates running means (an exponential moving average, bias-corrected) of the
margin term |beta x margin| and of the constraint per unit alpha |constraint term| / alpha; the alpha that would
give the target share is S x margin / constraint-per-alpha. The first step past the margin's floor (the first
step: the policy is the reference) sets alpha to it outright, however far --alpha was; after that alpha moves
towards it by at most MAX_STEP per step (one step's estimate is noisy). Every step logs the alpha it ran at; a
checkpoint keeps the controller's state, so a resumed run goes on as the run would have.
"""

from __future__ import annotations

import math

from fpo_kernels.losses import MARGIN_FLOOR

__all__ = ["AlphaController", "phase_shares"]

EMA = 0.9  # weight of the past in the running means: about the last 10 steps
MAX_STEP = 1.5  # alpha changes by at most this factor (or its inverse) per step


class AlphaController:
    def __init__(self, alpha: float, target: float):
        self.alpha, self.target = float(alpha), float(target)
        self._margin = self._per_alpha = 0.0
        self._weight = 0.0
        self._calibrated = False

    def state_dict(self) -> dict:
        return {
            "alpha": self.alpha,
            "margin": self._margin,
            "per_alpha": self._per_alpha,
            "weight": self._weight,
            "calibrated": self._calibrated,
        }

    def load_state_dict(self, state: dict):
        self.alpha, self._margin = float(state["alpha"]), float(state["margin"])
        self._per_alpha, self._weight = float(state["per_alpha"]), float(state["weight"])
        self._calibrated = bool(state.get("calibrated", True))

    def update(self, constraint_abs: float, margin_abs: float) -> float:
        """One step's mean |constraint term| (at the current alpha) and mean |beta x margin|: the next alpha."""
        if not (math.isfinite(constraint_abs) and math.isfinite(margin_abs)) or margin_abs <= MARGIN_FLOOR:
            return self.alpha
        per_alpha = constraint_abs / max(self.alpha, 1e-30)
        self._margin = EMA * self._margin + (1 - EMA) * margin_abs
        self._per_alpha = EMA * self._per_alpha + (1 - EMA) * per_alpha
        self._weight = EMA * self._weight + (1 - EMA)
        if self._per_alpha <= 0:
            return self.alpha
        want = self.target * self._margin / self._per_alpha  # the weights cancel in the ratio of bias-corrected means
        if not self._calibrated:
            self.alpha, self._calibrated = want, True
        else:
            self.alpha *= min(max(want / self.alpha, 1 / MAX_STEP), MAX_STEP)
        return self.alpha


def phase_shares(history: list[dict]) -> dict:
    """The constraint's realised share of the margin term over the first, middle and last third of a run's logged
    steps (sum of |constraint term| / sum of |beta x margin| over each third); None where nothing was logged."""
    rows = [h for h in history if "constraint_abs" in h and "margin_abs" in h]
    out = {}
    n = len(rows)
    for name, lo, hi in (("early", 0, n // 3), ("middle", n // 3, 2 * n // 3), ("late", 2 * n // 3, n)):
        part = rows[lo:hi]
        margin = sum(h["margin_abs"] for h in part)
        out[name] = sum(h["constraint_abs"] for h in part) / margin if part and margin > MARGIN_FLOOR else None
    return out
