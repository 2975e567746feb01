"""Preference losses on per-sequence statistics. Each returns (losses [P], metrics dict of [P] tensors);
the training loss is losses.mean(). Shapes: every argument is [P] (one value per pair), float32.
Notation: s = summed response log-prob, a = s / |y| (length-normalised), w = chosen, l = rejected.
All: L = -log sigmoid(u)."""
from __future__ import annotations

import torch.nn.functional as F

__all__ = ["dpo_loss", "simpo_loss", "tdpo_loss", "fpo_loss", "LOSSES", "constraint_share", "MARGIN_FLOOR"]


def _metrics(reward_w, reward_l, **extra):
    m = {"reward_chosen": reward_w.detach(), "reward_rejected": reward_l.detach(),
         "margin": (reward_w - reward_l).detach(), "accuracy": (reward_w > reward_l).float().detach()}
    m.update({k: v.detach() for k, v in extra.items()})
    return m


MARGIN_FLOOR = 1e-6   # mean |beta x margin| below this is rounding noise (a policy at its reference): no share


def constraint_share(constraint_abs: float, margin_abs: float):
    """mean |constraint term| / mean |beta x margin| (means over pairs, or over steps), or None where the margin
    term is below MARGIN_FLOOR: at the start the policy is the reference, the margin is 0 up to rounding, and
    the ratio would read 1e21."""
    return None if not margin_abs > MARGIN_FLOOR else constraint_abs / margin_abs


def _share(margin, constraint):
    """|margin term| and |constraint term| per pair: their means' ratio is the constraint's share of u
    (the trainer reports it as constraint_share)."""
    return {"margin_abs": margin.abs(), "constraint_abs": constraint.abs()}


def dpo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, beta: float = 0.1):
    """DPO (Rafailov et al. 2023): u = beta ((s_w - s_ref_w) - (s_l - s_ref_l)); s_ref from the offline cache."""
    rw, rl = beta * (logp_w - ref_logp_w), beta * (logp_l - ref_logp_l)
    return -F.logsigmoid(rw - rl), _metrics(rw, rl)


def simpo_loss(mean_logp_w, mean_logp_l, beta: float = 2.0, gamma: float = 0.5):
    """SimPO (Meng et al. 2024): u = beta a_w - beta a_l - gamma, a = s / |y|.

    gamma is the absolute target margin. The official SimPO code takes gamma_beta_ratio = gamma / beta
    instead: gamma_beta_ratio 0.25 with beta 2.0 is gamma 0.5 here."""
    rw, rl = beta * mean_logp_w, beta * mean_logp_l
    return -F.logsigmoid(rw - rl - gamma), _metrics(rw, rl)


def tdpo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, kl_w, kl_l, beta: float = 0.1, alpha: float = 0.5,
              variant: int = 2):
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
    return -F.logsigmoid(rw - rl - term), _metrics(rw, rl, kl_chosen=kl_w, kl_rejected=kl_l, **_share(rw - rl, term))


def fpo_loss(mean_logp_w, mean_logp_l, ref_mean_logp_w, ref_mean_logp_l, d_w, d_l, beta: float = 0.1,
             alpha: float = 0.5):
    """FPO (arXiv 2411.07618): u = beta ((a_w - a_l) - g_ref - alpha (D_l - stopgrad(D_w))),
    g_ref = a_ref_w - a_ref_l from the offline cache, D = the SAE feature constraint (fpo_kernels.sae_feature_mse;
    divided by the reference's feature scale under constraint_norm "ref", which the caller applies)."""
    rw, rl = beta * (mean_logp_w - ref_mean_logp_w), beta * (mean_logp_l - ref_mean_logp_l)
    term = beta * alpha * (d_l - d_w.detach())
    return -F.logsigmoid(rw - rl - term), _metrics(rw, rl, d_chosen=d_w, d_rejected=d_l, **_share(rw - rl, term))


LOSSES = {"dpo": dpo_loss, "simpo": simpo_loss, "tdpo1": tdpo_loss, "tdpo2": tdpo_loss, "fpo": fpo_loss}
