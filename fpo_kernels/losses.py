"""Preference losses on per-sequence statistics. Each returns (losses [P], metrics dict of [P] tensors);
the training loss is losses.mean(). Shapes: every argument is [P] (one value per pair), float32.
Notation: s = summed response log-prob, a = s / |y| (length-normalised), w = chosen, l = rejected.
All: L = -log sigmoid(u) (DPO's other loss types and label smoothing as Liger-Kernel and TRL define them)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .sequence_stats import SequenceStats

__all__ = [
    "DPO_LOSS_TYPES",
    "check_dpo_options",
    "dpo_loss",
    "simpo_loss",
    "tdpo_loss",
    "fpo_loss",
    "LOSSES",
    "METHODS",
    "preference_loss",
    "LossSettings",
    "constraint_share",
    "MARGIN_FLOOR",
]


def _metrics(reward_w, reward_l, **extra):
    m = {
        "reward_chosen": reward_w.detach(),
        "reward_rejected": reward_l.detach(),
        "margin": (reward_w - reward_l).detach(),
        "accuracy": (reward_w > reward_l).float().detach(),
    }
    m.update({k: v.detach() for k, v in extra.items()})
    return m


MARGIN_FLOOR = 1e-6  # mean |beta x margin| below this is rounding noise (a policy at its reference): no share


def constraint_share(constraint_abs: float, margin_abs: float) -> float | None:
    """mean |constraint term| / mean |beta x margin| (means over pairs, or over steps), or None where the margin
    term is below MARGIN_FLOOR: at the start the policy is the reference, the margin is 0 up to rounding, and
    the ratio would read 1e21."""
    return None if not margin_abs > MARGIN_FLOOR else constraint_abs / margin_abs


def _share(margin, constraint):
    """|margin term| and |constraint term| per pair: their means' ratio is the constraint's share of u
    (the trainer reports it as constraint_share)."""
    return {"margin_abs": margin.abs(), "constraint_abs": constraint.abs()}


def _smoothed(u, label_smoothing):
    """-(1 - eps) log sigmoid(u) - eps log sigmoid(-u) = -log sigmoid(u) + eps u: the conservative loss of a
    preference label flipped with probability eps (cDPO; TRL's label_smoothing on its sigmoid loss)."""
    return -F.logsigmoid(u) + label_smoothing * u if label_smoothing else -F.logsigmoid(u)


# DPO's variants as Liger-Kernel and TRL name them; each is a function of the chosen and rejected log-ratios
# r = s - s_ref (sums, or means under average_log_prob) and beta. ipo needs lengths: not one of them.
DPO_LOSS_TYPES = (
    "sigmoid",
    "hinge",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
)


def check_dpo_options(loss_type: str, label_smoothing: float) -> None:
    """The option combinations each DPO variant is defined for (Liger's and TRL's rules)."""
    # the messages are Liger's, so that code catching Liger's errors catches ours
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"Unsupported loss_type: {loss_type}. Supported types are: {', '.join(DPO_LOSS_TYPES)}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0.0, 0.5) for loss_type='robust'. Got {label_smoothing}.")
    if loss_type == "exo_pair" and not label_smoothing > 0:
        raise ValueError("label_smoothing must be > 0 for loss_type='exo_pair'. The EXO paper recommends 1e-3.")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0.0, 0.5], got {label_smoothing}")


def dpo_loss(
    logp_w: torch.Tensor,
    logp_l: torch.Tensor,
    ref_logp_w: torch.Tensor,
    ref_logp_l: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
) -> tuple[torch.Tensor, dict]:
    """DPO (Rafailov et al. 2023): u = beta ((s_w - s_ref_w) - (s_l - s_ref_l)); s_ref from the offline cache.
    sigmoid: -log sigmoid(u), with label smoothing eps the conservative cDPO -(1 - eps) log sigmoid(u) - eps
    log sigmoid(-u) (as TRL; Liger's sigmoid ignores eps). The other loss types as Liger and TRL define them."""
    check_dpo_options(loss_type, label_smoothing)
    cw, cl = logp_w - ref_logp_w, logp_l - ref_logp_l
    rw, rl = beta * cw, beta * cl
    u = rw - rl
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = _smoothed(u, eps)
    elif loss_type == "hinge":
        losses = torch.relu(1 - u)
    elif loss_type == "exo_pair":
        losses = torch.sigmoid(u) * (F.logsigmoid(u) - math.log1p(-eps)) + torch.sigmoid(-u) * (
            F.logsigmoid(-u) - math.log(eps)
        )
    elif loss_type == "nca_pair":
        losses = -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)
    elif loss_type == "robust":
        losses = (-(1 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1 - 2 * eps)
    elif loss_type == "bco_pair":
        losses = -F.logsigmoid(rw) - F.logsigmoid(-rl)
    elif loss_type == "sppo_hard":
        losses = (cw - 0.5 / beta) ** 2 + (cl + 0.5 / beta) ** 2
    elif loss_type == "apo_zero":
        losses = 1 - torch.sigmoid(rw) + torch.sigmoid(rl)
    elif loss_type == "apo_down":
        losses = torch.sigmoid(rw) + 1 - torch.sigmoid(u)
    else:  # discopop: logistic and exponential losses blended by sigmoid(u / tau)
        blend = torch.sigmoid(u / discopop_tau)
        losses = -F.logsigmoid(u) * (1 - blend) + torch.exp(-u) * blend
    return losses, _metrics(rw, rl)


def simpo_loss(
    mean_logp_w: torch.Tensor,
    mean_logp_l: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """SimPO (Meng et al. 2024): u = beta a_w - beta a_l - gamma, a = s / |y|; with label smoothing eps,
    -(1 - eps) log sigmoid(u) - eps log sigmoid(-u) (as the SimPO code and Liger).

    gamma is the absolute target margin. The official SimPO code takes gamma_beta_ratio = gamma / beta
    instead: gamma_beta_ratio 0.25 with beta 2.0 is gamma 0.5 here."""
    rw, rl = beta * mean_logp_w, beta * mean_logp_l
    u = rw - rl - gamma
    return _smoothed(u, label_smoothing), _metrics(rw, rl)


def tdpo_loss(
    logp_w: torch.Tensor,
    logp_l: torch.Tensor,
    ref_logp_w: torch.Tensor,
    ref_logp_l: torch.Tensor,
    kl_w: torch.Tensor,
    kl_l: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: int = 2,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """TDPO (Zeng et al. 2024), kl = KL_seq(y) = sum_t KL(pi_ref(.|x,y<t) || pi(.|x,y<t)) over the vocabulary.

    variant 1: u = beta (dw - dl) - beta (kl_l - kl_w)
    variant 2: u = beta (dw - dl) - alpha beta (kl_l - stopgrad(kl_w)),  d = s - s_ref."""
    rw, rl = beta * (logp_w - ref_logp_w), beta * (logp_l - ref_logp_l)
    if variant == 1:
        term = beta * (kl_l - kl_w)
    elif variant == 2:
        term = alpha * beta * (kl_l - kl_w.detach())
    else:
        raise ValueError(f"variant must be 1 or 2, got {variant!r}")
    return _smoothed(rw - rl - term, label_smoothing), _metrics(
        rw, rl, kl_chosen=kl_w, kl_rejected=kl_l, **_share(rw - rl, term)
    )


def fpo_loss(
    mean_logp_w: torch.Tensor,
    mean_logp_l: torch.Tensor,
    ref_mean_logp_w: torch.Tensor,
    ref_mean_logp_l: torch.Tensor,
    d_w: torch.Tensor,
    d_l: torch.Tensor,
    beta: float = 0.1,
    alpha: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """FPO (arXiv 2411.07618): u = beta ((a_w - a_l) - g_ref - alpha (D_l - stopgrad(D_w))),
    g_ref = a_ref_w - a_ref_l from the offline cache, D = the SAE feature constraint (fpo_kernels.sae_feature_mse;
    divided by the reference's feature scale under constraint_norm "ref", which the caller applies)."""
    rw, rl = beta * (mean_logp_w - ref_mean_logp_w), beta * (mean_logp_l - ref_mean_logp_l)
    term = beta * alpha * (d_l - d_w.detach())
    return _smoothed(rw - rl - term, label_smoothing), _metrics(
        rw, rl, d_chosen=d_w, d_rejected=d_l, **_share(rw - rl, term)
    )


LOSSES = {"dpo": dpo_loss, "simpo": simpo_loss, "tdpo1": tdpo_loss, "tdpo2": tdpo_loss, "fpo": fpo_loss}
METHODS = tuple(LOSSES)
_NEEDS = {"simpo": (), "dpo": (), "fpo": ("d",), "tdpo1": ("kl",), "tdpo2": ("kl",)}  # beyond the log-probs


def preference_loss(
    method: str,
    stats: SequenceStats | Mapping,
    reference: SequenceStats | Mapping | None = None,
    *,
    beta: float,
    alpha: float = 0.5,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    discopop_tau: float = 0.05,
    average_log_prob: bool | None = None,
) -> tuple[torch.Tensor, dict]:
    """The loss of P pairs under one method: the one place that maps a method to its loss, for the trainer,
    the FusedLinear*Loss modules, the TRL trainers and the benchmarks.

    Args:
        method: "fpo", "dpo", "simpo", "tdpo1" or "tdpo2".
        stats: the policy's per-sequence statistics in the [2P] layout, chosen first (what the ops return), as a
            SequenceStats or its dict form: logp_sum and / or logp_mean, and d (fpo: the SAE constraint, already
            divided by any scale) or kl (tdpo1, tdpo2).
        reference: the reference's, the same layout: logp_sum (dpo, tdpo1, tdpo2) or logp_mean (fpo; dpo
            with average_log_prob), from the cache or computed online; None for simpo.
        beta: the temperature.
        alpha: fpo's weight of D, tdpo2's of the KL.
        gamma: simpo's target margin.
        label_smoothing: eps of the conservative sigmoid, -(1-eps) log sigmoid(u) - eps log sigmoid(-u).
        loss_type: dpo's loss (sigmoid, hinge, exo_pair, ... as Liger and TRL define them).
        discopop_tau: dpo's discopop temperature.
        average_log_prob: the margin on mean (True) or summed (False) log-probs; None: the method's own (simpo
            and fpo mean, dpo and tdpo summed).

    Returns:
        (losses [P], metrics): the metrics a dict of [P] tensors (rewards, margins, accuracy, D or KL).
    """
    if method not in LOSSES:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    stats = SequenceStats.of(stats)
    reference = None if reference is None else SequenceStats.of(reference)
    mean = method in ("simpo", "fpo") if average_log_prob is None else average_log_prob
    key = "logp_mean" if mean else "logp_sum"
    for name in (key,) + _NEEDS[method]:
        if getattr(stats, name) is None:
            raise ValueError(f"method {method}: stats has no {name!r} (the policy's [2P] statistics)")
    if method != "simpo" and (reference is None or getattr(reference, key) is None):
        raise ValueError(f"method {method}: the reference's {key!r} [2P] is missing")
    P = getattr(stats, key).shape[0] // 2

    def pair(where, name):  # [2P] -> chosen [P], rejected [P]
        t = getattr(where, name)
        if t.shape[0] != 2 * P:
            side = "stats" if where is stats else "reference"
            raise ValueError(f"{side}[{name!r}] must be [2P] = [{2 * P}], chosen first; got {tuple(t.shape)}")
        return t[:P], t[P:]

    w, l = pair(stats, key)
    if method == "simpo":
        return simpo_loss(w, l, beta, gamma, label_smoothing)
    rw, rl = pair(reference, key)
    if method == "dpo":
        return dpo_loss(w, l, rw, rl, beta, loss_type, label_smoothing, discopop_tau)
    if method == "fpo":
        d_w, d_l = pair(stats, "d")
        return fpo_loss(w, l, rw, rl, d_w, d_l, beta, alpha, label_smoothing)
    kl_w, kl_l = pair(stats, "kl")
    return tdpo_loss(w, l, rw, rl, kl_w, kl_l, beta, alpha, 1 if method == "tdpo1" else 2, label_smoothing)


@dataclass(frozen=True)
class LossSettings:
    """A run's loss settings, made once (from a config or by hand) and called on each micro-batch's statistics:
    `settings(stats, reference)` is `preference_loss(settings.method, stats, reference, beta=..., ...)`, with the
    step's alpha in place of the run's when one is given (an adapted alpha)."""

    method: str
    beta: float
    alpha: float = 0.5
    gamma: float = 0.5
    label_smoothing: float = 0.0
    loss_type: str = "sigmoid"
    discopop_tau: float = 0.05
    average_log_prob: bool | None = None

    def __post_init__(self):
        if self.method not in LOSSES:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if not (isinstance(self.beta, (int, float)) and math.isfinite(self.beta) and self.beta > 0):
            raise ValueError(f"beta must be a positive number, got {self.beta!r}")

    def __call__(
        self, stats: SequenceStats | Mapping, reference: SequenceStats | Mapping | None = None, *, alpha=None
    ) -> tuple[torch.Tensor, dict]:
        return preference_loss(
            self.method,
            stats,
            reference,
            beta=self.beta,
            alpha=self.alpha if alpha is None else alpha,
            gamma=self.gamma,
            label_smoothing=self.label_smoothing,
            loss_type=self.loss_type,
            discopop_tau=self.discopop_tau,
            average_log_prob=self.average_log_prob,
        )
