"""Drop-in for Liger-Kernel's chunked SimPO and DPO losses: every case of Liger's own SimPO and DPO tests
(their shapes, options and loss types, their way of masking targets), stated here against our own float64
reference written out from the formulas (so CI runs them without Liger), then side by side with
liger_kernel where it is installed: loss, the 7 outputs and the gradients."""

import itertools
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from fpo_kernels.losses import DPO_LOSS_TYPES
from fpo_kernels.preference import FusedLinearDPOLoss, FusedLinearSimPOLoss

pytestmark = pytest.mark.usefixtures("no_interpreter")  # the ops' PyTorch path; the kernels are tested apart

SHAPES = [(2, 2, 8, 8), (3, 47, 31, 123)]  # Liger's small and odd shapes (B pairs, T, H, V)
EXTRA = {"robust": {"label_smoothing": 0.1}, "exo_pair": {"label_smoothing": 1e-3}, "discopop": {"discopop_tau": 0.05}}


def _seed(*key):
    return zlib.crc32(repr(key).encode())  # the same inputs for a case on every run


def _case(B, T, H, V, bias, ref_bias, ignore_index, seed, keep_every_row):
    """Liger's test inputs: 2B sequences, random weights, a random number (1 to B*T - 1) of target positions set
    to ignore_index. keep_every_row: a row left with none keeps its first position (a mean over none is
    undefined)."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * B
    x = {
        "h": torch.randn(n, T, H, generator=g),
        "w": torch.randn(V, H, generator=g),
        "ref_h": torch.randn(n, T, H, generator=g),
        "ref_w": torch.randn(V, H, generator=g),
        "b": torch.randn(V, generator=g) if bias else None,
        "ref_b": torch.randn(V, generator=g) if ref_bias else None,
    }
    target = torch.randint(0, V, (n, T), generator=g)
    k = int(torch.randint(1, max(2, n * T // 2), (1,), generator=g))
    target.view(-1)[torch.randperm(n * T, generator=g)[:k]] = ignore_index
    if keep_every_row:
        empty = (target == ignore_index).all(1)
        target[empty, 0] = torch.randint(0, V, (int(empty.sum()),), generator=g)
    x["target"] = target
    return x


def _logps64(h, w, b, target, ignore_index):
    """(sums, means, per-token log-probs, mask, logits) from full float64 logits."""
    logits = h.double() @ w.double().T + (0 if b is None else b.double())
    mask = target != ignore_index
    tok = torch.log_softmax(logits, -1).gather(-1, torch.where(mask, target, 0).unsqueeze(-1)).squeeze(-1) * mask
    sums = tok.sum(-1)
    return sums, sums / mask.sum(-1), tok, mask, logits


def _reference(
    kind,
    x,
    ignore_index,
    beta,
    alpha,
    compute_nll,
    average_log_prob,
    loss_type="sigmoid",
    label_smoothing=0.0,
    discopop_tau=0.05,
    gamma=0.5,
    use_ref_model=True,
):
    """The loss and Liger's 7 outputs in float64, with the gradient graph to h, w and b."""
    h, w = x["h"].double().requires_grad_(), x["w"].double().requires_grad_()
    b = None if x["b"] is None else x["b"].double().requires_grad_()
    sums, means, tok, mask, logits = _logps64(h, w, b, x["target"], ignore_index)
    P = len(sums) // 2
    logps = means if average_log_prob else sums
    cw, cl = logps[:P], logps[P:]
    nll = -tok[:P].sum() / mask[:P].sum()
    eps = label_smoothing
    if kind == "simpo":
        u = beta * (cw - cl) - gamma
        losses = -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u)
        rw, rl = beta * cw, beta * cl
    else:
        rw_, rl_ = torch.zeros(P, dtype=torch.float64), torch.zeros(P, dtype=torch.float64)
        if use_ref_model:
            with torch.no_grad():
                rs, rm, *_ = _logps64(x["ref_h"], x["ref_w"], x["ref_b"], x["target"], ignore_index)
            ref = rm if average_log_prob else rs
            rw_, rl_ = ref[:P], ref[P:]
        a, c = cw - rw_, cl - rl_  # the chosen and rejected log-ratios
        rw, rl = beta * a, beta * c
        u = rw - rl
        losses = {
            "sigmoid": lambda: -(1 - eps) * F.logsigmoid(u) - eps * F.logsigmoid(-u),
            "hinge": lambda: torch.relu(1 - u),
            "exo_pair": lambda: (
                torch.sigmoid(u) * (F.logsigmoid(u) - math.log(1 - eps))
                + torch.sigmoid(-u) * (F.logsigmoid(-u) - math.log(eps))
            ),
            "nca_pair": lambda: -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl),
            "robust": lambda: ((1 - eps) * -F.logsigmoid(u) - eps * -F.logsigmoid(-u)) / (1 - 2 * eps),
            "bco_pair": lambda: -F.logsigmoid(rw) - F.logsigmoid(-rl),
            "sppo_hard": lambda: (a - 1 / (2 * beta)) ** 2 + (c + 1 / (2 * beta)) ** 2,
            "apo_zero": lambda: (1 - torch.sigmoid(rw)) + torch.sigmoid(rl),
            "apo_down": lambda: torch.sigmoid(rw) + (1 - torch.sigmoid(u)),
            "discopop": lambda: (
                -F.logsigmoid(u) * (1 - torch.sigmoid(u / discopop_tau))
                + torch.exp(-u) * torch.sigmoid(u / discopop_tau)
            ),
        }[loss_type]()
    loss = losses.mean() + (alpha * nll if compute_nll else 0)
    T, V = x["h"].shape[1], x["w"].shape[0]
    cm, rm = logits[:P].sum() / (P * T * V), logits[P:].sum() / (P * T * V)
    outs = (cw, cl, cm, rm, nll if compute_nll else torch.zeros((), dtype=torch.float64), rw, rl)
    return loss, outs, [t for t in (h, w, b) if t is not None]


def _ours(
    kind,
    x,
    ignore_index,
    beta,
    alpha,
    compute_nll,
    average_log_prob,
    loss_type="sigmoid",
    label_smoothing=0.0,
    discopop_tau=0.05,
    gamma=0.5,
    use_ref_model=True,
    module=None,
):
    h, w = x["h"].clone().requires_grad_(), x["w"].clone().requires_grad_()
    b = None if x["b"] is None else x["b"].clone().requires_grad_()
    if module is None and kind == "simpo":
        module = FusedLinearSimPOLoss(
            ignore_index=ignore_index,
            beta=beta,
            alpha=alpha,
            label_smoothing=label_smoothing,
            compute_nll_loss=compute_nll,
            gamma=gamma,
            average_log_prob=average_log_prob,
        )
    elif module is None:
        module = FusedLinearDPOLoss(
            ignore_index=ignore_index,
            beta=beta,
            alpha=alpha,
            compute_nll_loss=compute_nll,
            use_ref_model=use_ref_model,
            average_log_prob=average_log_prob,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
            discopop_tau=discopop_tau,
        )
    if kind == "simpo":
        loss, outs = module(w, h, x["target"], b)
    else:
        loss, outs = module(w, h, x["target"], b, x["ref_h"], x["ref_w"], x["ref_b"])
    return loss, outs, [t for t in (h, w, b) if t is not None]


def _same(got, want, what, rtol=5e-4, atol=1e-5):
    """Liger's fp32 tolerances (its tests' atol 1e-5, rtol 5e-4): summed log-probs of a few hundred in fp32."""
    loss, outs, leaves = got
    loss_w, outs_w, leaves_w = want
    assert len(outs) == 7, what
    assert loss.item() == pytest.approx(loss_w.item(), rel=rtol, abs=atol), what
    for i, (a, b) in enumerate(zip(outs, outs_w)):
        torch.testing.assert_close(a.double(), b.double().detach(), rtol=rtol, atol=atol, msg=f"{what}: output {i}")
    for a, b in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(loss_w, leaves_w)):
        scale = b.norm().item()
        assert (a.double() - b.double()).norm().item() <= rtol * scale + atol, what


# ---- Liger's cases against our float64 statement -----------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("compute_nll", [True, False])
@pytest.mark.parametrize("ignore_index,beta", [(-100, 0.1), (42, 0.2)])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_cases(shape, bias, compute_nll, ignore_index, beta, label_smoothing):
    x = _case(
        *shape, bias, False, ignore_index, seed=_seed(shape, bias, compute_nll, ignore_index), keep_every_row=True
    )
    kw = dict(
        ignore_index=ignore_index,
        beta=beta,
        alpha=1.0,
        compute_nll=compute_nll,
        average_log_prob=True,
        label_smoothing=label_smoothing,
    )
    _same(_ours("simpo", x, **kw), _reference("simpo", x, **kw), kw)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias,ref_bias", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("compute_nll", [True, False])
@pytest.mark.parametrize("ignore_index,beta", [(-100, 0.1), (42, 0.2)])
@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_cases(shape, bias, ref_bias, compute_nll, ignore_index, beta, loss_type):
    """DPO's sums admit a response with no token left (its sum is 0): Liger's masking is kept as it is."""
    x = _case(*shape, bias, ref_bias, ignore_index, seed=_seed(shape, bias, ref_bias, loss_type), keep_every_row=False)
    kw = dict(
        ignore_index=ignore_index,
        beta=beta,
        alpha=1.0,
        compute_nll=compute_nll,
        average_log_prob=False,
        loss_type=loss_type,
        **EXTRA.get(loss_type, {}),
    )
    _same(_ours("dpo", x, **kw), _reference("dpo", x, **kw), kw)


@pytest.mark.parametrize(
    "average_log_prob,use_ref_model,label_smoothing,alpha",
    [
        (True, True, 0.0, 1.0),
        (False, False, 0.0, 1.0),
        (False, True, 0.2, 1.0),
        (False, True, 0.0, 0.3),
        (False, True, 0.0, 0.0),
    ],
)
def test_dpo_options(average_log_prob, use_ref_model, label_smoothing, alpha):
    """average_log_prob, no reference (use_ref_model=False), cDPO label smoothing on sigmoid, alpha scaling the
    NLL term (Liger's test_alpha_scales_nll_loss)."""
    x = _case(3, 47, 31, 123, True, True, -100, seed=7, keep_every_row=True)
    kw = dict(
        ignore_index=-100,
        beta=0.1,
        alpha=alpha,
        compute_nll=True,
        average_log_prob=average_log_prob,
        use_ref_model=use_ref_model,
        label_smoothing=label_smoothing,
    )
    _same(_ours("dpo", x, **kw), _reference("dpo", x, **kw), kw)


def test_precomputed_reference_equals_the_online_one():
    x = _case(3, 47, 31, 123, True, True, -100, seed=3, keep_every_row=True)
    sums, *_ = _logps64(x["ref_h"], x["ref_w"], x["ref_b"], x["target"], -100)
    mod = FusedLinearDPOLoss(compute_nll_loss=True)
    online = mod(x["w"], x["h"], x["target"], x["b"], x["ref_h"], x["ref_w"], x["ref_b"])
    pre = mod(
        x["w"], x["h"], x["target"], x["b"], ref_chosen_logps=sums[:3].float(), ref_rejected_logps=sums[3:].float()
    )
    assert online[0].item() == pytest.approx(pre[0].item(), rel=1e-5)


def test_liger_defaults_and_refusals():
    """Liger's defaults (SimPO: beta 0.1 with the NLL term; DPO: summed log-probs, an online reference), and
    what Liger refuses, refused alike."""
    s, d = FusedLinearSimPOLoss(), FusedLinearDPOLoss()
    assert (s.beta, s.alpha, s.gamma, s.compute_nll_loss, s.label_smoothing) == (0.1, 1.0, 0.5, True, 0.0)
    assert (d.beta, d.alpha, d.compute_nll_loss, d.use_ref_model, d.average_log_prob, d.loss_type) == (
        0.1,
        1.0,
        False,
        True,
        False,
        "sigmoid",
    )
    for kw, match in (
        (dict(loss_type="ipo"), "Unsupported loss_type: ipo"),
        (dict(loss_type="exo_pair"), "must be > 0"),
        (dict(loss_type="robust", label_smoothing=0.5), r"\[0.0, 0.5\) for loss_type='robust'"),
    ):
        with pytest.raises(ValueError, match=match):
            FusedLinearDPOLoss(**kw)
    x = _case(2, 2, 8, 8, False, False, -100, seed=1, keep_every_row=True)
    with pytest.raises(ValueError, match="ref_input and ref_weight"):
        d(x["w"], x["h"], x["target"])
    x["target"][0] = -100  # a chosen response with no token: a mean over none is refused
    with pytest.raises(ValueError, match="no response token"):
        s(x["w"], x["h"], x["target"])


# ---- side by side with liger_kernel itself ---------------------------------------------------------------
def _liger():
    return pytest.importorskip("liger_kernel.chunked_loss", reason="liger-kernel is not installed")


CASES = list(itertools.product(SHAPES, [(True, True), (False, False)], [True, False], [(-100, 0.1), (42, 0.2)]))


@pytest.mark.parametrize("shape,biases,compute_nll,ii_beta", CASES)
def test_simpo_side_by_side_with_liger(shape, biases, compute_nll, ii_beta):
    liger = _liger()
    (ignore_index, beta), bias = ii_beta, biases[0]
    x = _case(*shape, bias, False, ignore_index, seed=11, keep_every_row=True)
    kw = dict(
        ignore_index=ignore_index, beta=beta, alpha=1.0, label_smoothing=0.1, compute_nll_loss=compute_nll, gamma=0.5
    )
    theirs = _ours(
        "simpo",
        x,
        ignore_index,
        beta,
        1.0,
        compute_nll,
        True,
        module=liger.LigerFusedLinearSimPOLoss(compiled=False, **kw),
    )
    ours = _ours("simpo", x, ignore_index, beta, 1.0, compute_nll, True, module=FusedLinearSimPOLoss(**kw))
    _same(ours, theirs, kw)


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
@pytest.mark.parametrize("shape,biases,compute_nll,ii_beta", CASES)
def test_dpo_side_by_side_with_liger(loss_type, shape, biases, compute_nll, ii_beta):
    liger = _liger()
    (ignore_index, beta), (bias, ref_bias) = ii_beta, biases
    x = _case(*shape, bias, ref_bias, ignore_index, seed=13, keep_every_row=False)
    kw = dict(
        ignore_index=ignore_index,
        beta=beta,
        alpha=1.0,
        compute_nll_loss=compute_nll,
        loss_type=loss_type,
        **EXTRA.get(loss_type, {}),
    )
    theirs = _ours(
        "dpo",
        x,
        ignore_index,
        beta,
        1.0,
        compute_nll,
        False,
        module=liger.LigerFusedLinearDPOLoss(compiled=False, **kw),
    )
    ours = _ours("dpo", x, ignore_index, beta, 1.0, compute_nll, False, module=FusedLinearDPOLoss(**kw))
    _same(ours, theirs, kw)
