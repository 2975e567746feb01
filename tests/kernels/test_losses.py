"""Losses against hand-computed values and the formulas as their authors state them."""

import math

import pytest
import torch

from fpo_kernels.losses import (
    LOSSES,
    MARGIN_FLOOR,
    LossSettings,
    constraint_share,
    dpo_loss,
    fpo_loss,
    preference_loss,
    simpo_loss,
    tdpo_loss,
)
from fpo_kernels.sequence_stats import SequenceStats


def nls(u):  # -log sigmoid(u)
    return math.log1p(math.exp(-u))


def t(*v):
    return torch.tensor(v, dtype=torch.float32)


def test_dpo_hand_computed():
    loss, m = dpo_loss(t(-10.0), t(-14.0), t(-11.0), t(-12.0), beta=0.1)
    # u = 0.1 * ((-10 + 11) - (-14 + 12)) = 0.3
    assert loss.item() == pytest.approx(nls(0.3), rel=1e-6)
    assert m["reward_chosen"].item() == pytest.approx(0.1) and m["reward_rejected"].item() == pytest.approx(-0.2)
    assert m["accuracy"].item() == 1.0 and m["margin"].item() == pytest.approx(0.3)


def test_simpo_hand_computed_and_gamma_beta_ratio():
    loss, _ = simpo_loss(t(-1.2), t(-1.5), beta=2.0, gamma=0.5)
    # u = 2 * -1.2 - 2 * -1.5 - 0.5 = 0.1
    assert loss.item() == pytest.approx(nls(0.1), rel=1e-5)
    # the official code's gamma_beta_ratio = gamma / beta: 0.25 * 2.0 is gamma 0.5
    ratio_form = -torch.nn.functional.logsigmoid(2.0 * (t(-1.2) - t(-1.5) - 0.25))
    assert torch.allclose(loss, ratio_form)


@pytest.mark.parametrize("variant", [1, 2])
def test_tdpo_hand_computed_and_gradient(variant):
    sw, sl = t(-10.0).requires_grad_(), t(-14.0).requires_grad_()
    kw, kl = t(0.4).requires_grad_(), t(0.9).requires_grad_()
    loss, m = tdpo_loss(sw, sl, t(-11.0), t(-12.0), kw, kl, beta=0.1, alpha=0.5, variant=variant)
    pref = 0.1 * ((-10 + 11) - (-14 + 12))
    u = pref - 0.1 * (0.9 - 0.4) if variant == 1 else pref - 0.5 * 0.1 * (0.9 - 0.4)
    assert loss.item() == pytest.approx(nls(u), rel=1e-6)
    loss.backward()
    s = 1 / (1 + math.exp(u))  # -dL/du
    assert kl.grad.item() == pytest.approx(s * 0.1 * (1 if variant == 1 else 0.5), rel=1e-5)
    # TDPO2 stops the gradient through the chosen KL; TDPO1 does not
    if variant == 1:
        assert kw.grad.item() == pytest.approx(-s * 0.1, rel=1e-5)
    else:
        assert kw.grad is None  # no gradient reaches it at all
    assert m["kl_chosen"].item() == pytest.approx(0.4)


def test_fpo_hand_computed_and_stopgrad():
    aw, al = t(-1.0).requires_grad_(), t(-1.6).requires_grad_()
    dw, dl = t(0.02).requires_grad_(), t(0.05).requires_grad_()
    loss, m = fpo_loss(aw, al, t(-1.1), t(-1.4), dw, dl, beta=0.1, alpha=0.5)
    # u = beta ((aw - al) - (ref_w - ref_l) - alpha (dl - dw)) = 0.1 (0.6 - 0.3 - 0.5 * 0.03)
    u = 0.1 * (0.6 - 0.3 - 0.5 * 0.03)
    assert loss.item() == pytest.approx(nls(u), rel=1e-5)
    loss.backward()
    s = 1 / (1 + math.exp(u))
    assert dw.grad is None  # stopgrad(D(y_w))
    assert dl.grad.item() == pytest.approx(s * 0.1 * 0.5, rel=1e-5)
    assert aw.grad.item() == pytest.approx(-s * 0.1, rel=1e-5)
    assert m["d_rejected"].item() == pytest.approx(0.05)


def test_fpo_alpha_zero_is_length_normalised_dpo():
    aw, al, rw, rl = t(-1.0, -2.0), t(-1.6, -1.5), t(-1.1, -1.9), t(-1.4, -1.6)
    loss, _ = fpo_loss(aw, al, rw, rl, t(0.3, 0.1), t(0.9, 0.2), beta=0.1, alpha=0.0)
    want = -torch.nn.functional.logsigmoid(0.1 * ((aw - al) - (rw - rl)))
    assert torch.allclose(loss, want)


def test_registry():
    assert set(LOSSES) == {"dpo", "simpo", "tdpo1", "tdpo2", "fpo"}
    with pytest.raises(ValueError, match="variant"):
        tdpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), t(0.0), t(0.0), variant=3)


def test_constraint_share_by_hand():
    """FPO and TDPO report |constraint term| and |beta x margin| per pair; the trainer's constraint_share is
    the ratio of their means over the pairs."""
    aw, al, rw, rl = t(-1.0, -2.0), t(-1.5, -1.0), t(-1.2, -1.8), t(-1.4, -1.1)
    dw, dl = t(0.02, 0.01), t(0.05, 0.03)
    _, m = fpo_loss(aw, al, rw, rl, dw, dl, beta=0.1, alpha=0.5)
    margin = [0.1 * ((-1.0 + 1.2) - (-1.5 + 1.4)), 0.1 * ((-2.0 + 1.8) - (-1.0 + 1.1))]  # 0.03, -0.03
    term = [0.1 * 0.5 * (0.05 - 0.02), 0.1 * 0.5 * (0.03 - 0.01)]  # 0.0015, 0.001
    assert m["margin_abs"].tolist() == pytest.approx([abs(x) for x in margin], rel=1e-5)
    assert m["constraint_abs"].tolist() == pytest.approx(term, rel=1e-5)
    share = constraint_share(m["constraint_abs"].mean().item(), m["margin_abs"].mean().item())
    assert share == pytest.approx((0.0015 + 0.001) / 0.06, rel=1e-5)
    # at the start the policy is the reference: a margin of rounding noise gives no ratio, not 1e21
    assert constraint_share(1e-9, 3e-8) is None and constraint_share(0.0, 0.0) is None
    assert constraint_share(1e-9, 2 * MARGIN_FLOOR) == pytest.approx(1e-9 / (2 * MARGIN_FLOOR))
    _, m = tdpo_loss(t(-10.0), t(-14.0), t(-11.0), t(-12.0), t(0.4), t(0.9), beta=0.1, alpha=0.5, variant=2)
    assert m["constraint_abs"].item() == pytest.approx(0.5 * 0.1 * 0.5, rel=1e-5)
    assert m["margin_abs"].item() == pytest.approx(0.3, rel=1e-5)


def test_label_smoothing_is_the_conservative_sigmoid_on_each_margin():
    """FPO's and TDPO's label smoothing: -(1 - eps) log sigmoid(u) - eps log sigmoid(-u) on their own u, written
    out here from the formulas in float64 (FusedLinearFPOLoss and FusedLinearTDPOLoss pass label_smoothing to them)."""
    import torch.nn.functional as F

    from fpo_kernels.losses import fpo_loss, tdpo_loss

    g = torch.Generator().manual_seed(0)
    aw, al, rw, rl, dw, dl = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(6))
    eps, beta, alpha = 0.2, 0.1, 3.0
    u = beta * ((aw - rw) - (al - rl)) - beta * alpha * (dl - dw)
    want = -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)
    got, _ = fpo_loss(aw, al, rw, rl, dw, dl, beta, alpha, label_smoothing=eps)
    torch.testing.assert_close(got, want)
    kw, kl = torch.rand(5, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64)
    for variant in (1, 2):
        term = beta * (kl - kw) * (1 if variant == 1 else alpha)
        u = beta * ((aw - rw) - (al - rl)) - term
        got, _ = tdpo_loss(aw, al, rw, rl, kw, kl, beta, alpha, variant, label_smoothing=eps)
        torch.testing.assert_close(got, -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u))


def test_preference_loss_is_each_method_on_the_2p_layout():
    """The one adapter: per-sequence statistics [2P] (chosen first) in, each method's own loss out, with the
    summed or mean log-probs each method takes and the hyperparameters passed through."""
    P = 5
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))

    def r(scale=1.0):
        return torch.randn(2 * P, generator=g, dtype=torch.float64) * scale

    stats = {"logp_sum": r(50), "logp_mean": r(), "d": r().abs(), "kl": r().abs()}
    ref = {"logp_sum": r(50), "logp_mean": r()}
    w, l = slice(0, P), slice(P, 2 * P)
    want = {
        "simpo": simpo_loss(stats["logp_mean"][w], stats["logp_mean"][l], 2.5, 0.7, 0.1),
        "dpo": dpo_loss(
            stats["logp_sum"][w], stats["logp_sum"][l], ref["logp_sum"][w], ref["logp_sum"][l], 2.5, "sigmoid", 0.1
        ),
        "fpo": fpo_loss(
            stats["logp_mean"][w],
            stats["logp_mean"][l],
            ref["logp_mean"][w],
            ref["logp_mean"][l],
            stats["d"][w],
            stats["d"][l],
            2.5,
            0.3,
            0.1,
        ),
        "tdpo1": tdpo_loss(
            stats["logp_sum"][w],
            stats["logp_sum"][l],
            ref["logp_sum"][w],
            ref["logp_sum"][l],
            stats["kl"][w],
            stats["kl"][l],
            2.5,
            0.3,
            1,
            0.1,
        ),
        "tdpo2": tdpo_loss(
            stats["logp_sum"][w],
            stats["logp_sum"][l],
            ref["logp_sum"][w],
            ref["logp_sum"][l],
            stats["kl"][w],
            stats["kl"][l],
            2.5,
            0.3,
            2,
            0.1,
        ),
    }
    for method, (losses, metrics) in want.items():
        got, got_m = preference_loss(
            method, stats, None if method == "simpo" else ref, beta=2.5, alpha=0.3, gamma=0.7, label_smoothing=0.1
        )
        assert torch.equal(got, losses), method
        assert got_m.keys() == metrics.keys() and all(torch.equal(got_m[k], metrics[k]) for k in metrics)
    # DPO on mean log-probs (Liger's average_log_prob), hinge
    got, _ = preference_loss("dpo", stats, ref, beta=0.5, loss_type="hinge", average_log_prob=True)
    assert torch.equal(
        got,
        dpo_loss(stats["logp_mean"][w], stats["logp_mean"][l], ref["logp_mean"][w], ref["logp_mean"][l], 0.5, "hinge")[
            0
        ],
    )


def test_preference_loss_refuses_what_a_method_lacks():
    stats = {"logp_sum": torch.zeros(4), "logp_mean": torch.zeros(4)}
    with pytest.raises(ValueError, match="method must be one of"):
        preference_loss("ipo", stats, beta=0.1)
    with pytest.raises(ValueError, match="stats has no 'd'"):
        preference_loss("fpo", stats, {"logp_mean": torch.zeros(4)}, beta=0.1)
    with pytest.raises(ValueError, match="reference's 'logp_sum'"):
        preference_loss("dpo", stats, None, beta=0.1)
    with pytest.raises(ValueError, match=r"reference\['logp_sum'\] must be \[2P\] = \[4\]"):
        preference_loss("dpo", stats, {"logp_sum": torch.zeros(6)}, beta=0.1)


def _random_stats(P, n_saes=2, K=3):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return SequenceStats(
        logp_sum=r(2 * P),
        logp_mean=r(2 * P),
        length=torch.randint(1, 9, (2 * P,)),
        d=r(2 * P).abs(),
        kl=r(2 * P).abs(),
        ref_logp_sum=r(2 * P),
        d_each=r(n_saes, 2 * P).abs(),
        protect=r(2 * P, 4),
        features={
            "": (torch.randint(0, 50, (2 * P, K)), r(2 * P, K)),
            "@3": (torch.randint(0, 50, (2 * P, K)), r(2 * P, K)),
        },
    )


def test_sequence_stats_dict_form_round_trips_and_names_what_is_wrong():
    s = _random_stats(3)
    d = s.as_dict()
    assert set(d) == {
        "logp_sum",
        "logp_mean",
        "len",
        "d",
        "kl",
        "ref_logp_sum",
        "d_each",
        "protect",
        "idx",
        "val",
        "idx@3",
        "val@3",
    }
    back = SequenceStats.of(d)
    for name in ("logp_sum", "logp_mean", "length", "d", "kl", "ref_logp_sum", "d_each", "protect"):
        assert torch.equal(getattr(back, name), getattr(s, name)), name
    assert back.features.keys() == s.features.keys()
    assert all(torch.equal(a, b) for k in s.features for a, b in zip(back.features[k], s.features[k]))
    assert SequenceStats.of(s) is s
    chosen, rejected = s.pair("kl")
    assert torch.equal(torch.cat([chosen, rejected]), s.kl) and chosen.shape == (3,)
    with pytest.raises(ValueError, match="unknown statistic 'logps'"):
        SequenceStats.of({"logps": torch.zeros(4)})
    with pytest.raises(ValueError, match="both idx<key> and val<key>"):
        SequenceStats.of({"idx@3": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="no 'kl'"):
        SequenceStats(logp_sum=torch.zeros(4)).pair("kl")
    with pytest.raises(TypeError, match="SequenceStats or a dict"):
        SequenceStats.of([torch.zeros(4)])


def test_sequence_stats_tensors_are_found_by_ddp_and_pytree():
    """DDP finds a forward's output tensors (to hook the backward) in dataclasses; pytree (FSDP, compile) once the
    record is registered: every set tensor, none twice."""
    from torch.nn.parallel.distributed import _find_tensors
    from torch.utils._pytree import tree_flatten, tree_unflatten

    s = _random_stats(2)
    want = {id(t) for t in s.as_dict().values()}
    assert {id(t) for t in _find_tensors(s)} == want
    leaves, spec = tree_flatten(s)
    assert {id(t) for t in leaves if isinstance(t, torch.Tensor)} == want
    again = tree_unflatten(leaves, spec)
    assert isinstance(again, SequenceStats) and again.d is s.d and again.features["@3"][1] is s.features["@3"][1]


@pytest.mark.parametrize("method", list(LOSSES))
def test_a_loss_on_the_record_equals_the_loss_on_its_dict_form(method):
    """preference_loss takes SequenceStats or its dict form alike; LossSettings is preference_loss with its
    settings given once, the step's alpha in place of the run's when one is passed."""
    s, ref = _random_stats(3), _random_stats(3)
    kw = dict(beta=0.7, alpha=0.4, gamma=0.3, label_smoothing=0.05)
    reference = None if method == "simpo" else ref
    want, want_m = preference_loss(method, s.as_dict(), None if reference is None else reference.as_dict(), **kw)
    got, got_m = preference_loss(method, s, reference, **kw)
    assert torch.equal(got, want) and got_m.keys() == want_m.keys()
    settings = LossSettings(method, **kw)
    assert torch.equal(settings(s, reference)[0], want)
    other = preference_loss(method, s, reference, **dict(kw, alpha=2.5))[0]
    assert torch.equal(settings(s, reference, alpha=2.5)[0], other)
    if method in ("fpo", "tdpo2"):
        assert not torch.equal(other, want)  # alpha acts


def test_loss_settings_are_checked_when_made():
    with pytest.raises(ValueError, match="method must be one of"):
        LossSettings("ipo", 0.1)
    for beta in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="beta must be a positive number"):
            LossSettings("dpo", beta)
