"""Fused linear log-probs and KL vs the float64 reference (CPU: Triton interpreter)."""

import pytest
import torch
from helpers import poison

import fpo_kernels._vocab_head as vocab_head
import fpo_kernels.logprobs as lpmod
from fpo_kernels import (
    fused_linear_kl,
    fused_linear_logprobs,
    fused_linear_logprobs_kl,
    reference,
    sequence_logprobs,
    sequence_logprobs_kl,
)


def _rel_rms(got, want):
    return (
        (got.double() - want.double()).pow(2).mean().sqrt() / want.double().pow(2).mean().sqrt().clamp(min=1e-30)
    ).item()


TOL = {torch.float32: 1e-5, torch.float16: 3e-3}


@pytest.mark.parametrize(
    "N,d,V,chunk", [(37, 24, 300, 16), (50, 33, 257, 64), (5, 16, 1000, None), (9, 16, 5000, 4)]
)  # 5000: two vocabulary tiles under the interpreter
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_logprobs_forward_backward(N, d, V, chunk, softcap, with_bias, dtype, monkeypatch, device):
    poison(monkeypatch, lpmod)
    hidden = torch.randn(N, d, device=device).to(dtype)
    weight = (torch.randn(V, d, device=device) * 0.4).to(dtype)
    bias = (torch.randn(V, device=device) * 0.5).to(dtype) if with_bias else None
    labels = torch.randint(0, V, (N,), device=device)
    labels[torch.rand(N, device=device) < 0.2] = -100
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if with_bias else None
    got = fused_linear_logprobs(h, w, labels, softcap=softcap, bias=b, chunk_size=chunk)
    g = torch.randn(N, device=device)
    got.backward(g)
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    br = bias.double().requires_grad_() if with_bias else None
    want = reference.fused_linear_logprobs_ref(hr, wr, labels, softcap, -100, br)
    want.backward(g.double())
    assert got.dtype == torch.float32 and got.shape == (N,)
    assert (got[labels == -100] == 0).all()
    tol = TOL[dtype]
    assert _rel_rms(got, want) < tol
    assert _rel_rms(h.grad, hr.grad) < 3 * tol and h.grad.dtype == dtype
    assert _rel_rms(w.grad, wr.grad) < 3 * tol
    if with_bias:
        assert _rel_rms(b.grad, br.grad) < 3 * tol


def test_all_ignored_gives_zeros(device):
    h = torch.randn(6, 16, device=device, requires_grad=True)
    w = torch.randn(40, 16, device=device, requires_grad=True)
    labels = torch.full((6,), -100, device=device)
    out = fused_linear_logprobs(h, w, labels)
    assert torch.equal(out, torch.zeros(6, device=device))
    out.sum().backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk", [8, None])
def test_kl_forward_backward(softcap, chunk, monkeypatch, device):
    poison(monkeypatch, lpmod)
    N, d, dr, V = 29, 20, 12, 301
    h = torch.randn(N, d, device=device, requires_grad=True)
    w = (torch.randn(V, d, device=device) * 0.5).requires_grad_()
    rh, rw = torch.randn(N, dr, device=device), torch.randn(V, dr, device=device) * 0.5
    mask = torch.rand(N, device=device) > 0.3
    got = fused_linear_kl(h, w, rh, rw, mask, softcap=softcap, chunk_size=chunk)
    g = torch.randn(N, device=device)
    got.backward(g)
    hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = reference.fused_linear_kl_ref(hr, wr, rh.double(), rw.double(), mask, softcap)
    want.backward(g.double())
    assert (got >= -1e-6).all() and (got[~mask] == 0).all()
    assert _rel_rms(got, want) < 1e-5
    assert _rel_rms(h.grad, hr.grad) < 3e-5 and _rel_rms(w.grad, wr.grad) < 3e-5


@pytest.mark.parametrize(
    "N,V,chunk", [(29, 301, 8), (9, 5000, None)]
)  # 5000: two vocabulary tiles under the interpreter
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_logprobs_kl_forward_backward(N, V, chunk, softcap, with_bias, dtype, monkeypatch, device):
    """TDPO's three per-token terms in one pass, against the float64 reference, under a weighted sum of
    logp and kl (the gradient of both flows through one rewrite of the logits)."""
    poison(monkeypatch, lpmod)
    d, dr = 20, 12
    hidden = torch.randn(N, d, device=device).to(dtype)
    weight = (torch.randn(V, d, device=device) * 0.5).to(dtype)
    bias = (torch.randn(V, device=device) * 0.5).to(dtype) if with_bias else None
    rh, rw = torch.randn(N, dr, device=device).to(dtype), (torch.randn(V, dr, device=device) * 0.5).to(dtype)
    rb = (torch.randn(V, device=device) * 0.5).to(dtype) if with_bias else None
    labels = torch.randint(0, V, (N,), device=device)
    labels[torch.rand(N, device=device) < 0.25] = -100
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b = bias.clone().requires_grad_() if with_bias else None
    got = fused_linear_logprobs_kl(h, w, labels, rh, rw, softcap, b, rb, chunk_size=chunk)
    g_lp, g_kl = torch.randn(N, device=device), torch.randn(N, device=device)
    (got[0] * g_lp + got[2] * g_kl).sum().backward()
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    br = bias.double().requires_grad_() if with_bias else None
    want = reference.fused_linear_logprobs_kl_ref(
        hr, wr, labels, rh.double(), rw.double(), softcap, br, None if rb is None else rb.double()
    )
    (want[0] * g_lp.double() + want[2] * g_kl.double()).sum().backward()
    ignored = labels == -100
    tol = TOL[dtype]
    for name, x, y in zip(("logp", "ref_logp", "kl"), got, want):
        assert x.dtype == torch.float32 and x.shape == (N,), name
        assert (x[ignored] == 0).all(), name
        assert _rel_rms(x, y) < tol, name
    assert not got[1].requires_grad
    assert _rel_rms(h.grad, hr.grad) < 3 * tol and h.grad.dtype == dtype
    assert _rel_rms(w.grad, wr.grad) < 3 * tol
    if with_bias:
        assert _rel_rms(b.grad, br.grad) < 3 * tol


def test_logprobs_kl_agrees_with_the_separate_ops(device):
    N, d, V = 21, 16, 700
    h, w = torch.randn(N, d, device=device), torch.randn(V, d, device=device) * 0.3
    rh, rw = torch.randn(N, d, device=device), torch.randn(V, d, device=device) * 0.3
    y = torch.randint(0, V, (N,), device=device)
    logp, ref_logp, kl = fused_linear_logprobs_kl(h, w, y, rh, rw, softcap=5.0)
    assert torch.allclose(logp, fused_linear_logprobs(h, w, y, softcap=5.0), atol=1e-5)
    assert torch.allclose(ref_logp, fused_linear_logprobs(rh, rw, y, softcap=5.0), atol=1e-5)
    assert torch.allclose(
        kl, fused_linear_kl(h, w, rh, rw, torch.ones(N, dtype=torch.bool, device=device), 5.0), atol=1e-5
    )


def test_kl_zero_for_same_model(device):
    h = torch.randn(17, 24, device=device)
    w = torch.randn(99, 24, device=device)
    kl = fused_linear_kl(h, w, h, w, torch.ones(17, dtype=torch.bool, device=device), softcap=10.0)
    assert kl.abs().max() < 1e-5


def test_sequence_logprobs_matches_masked_sums(device):
    B, T, d, V = 3, 12, 16, 50
    hidden = torch.randn(B, T, d, device=device)
    weight = torch.randn(V, d, device=device)
    ids = torch.randint(0, V, (B, T), device=device)
    resp = torch.zeros(B, T, dtype=torch.bool, device=device)
    resp[0, 4:9] = True
    resp[1, 1:] = True
    resp[2, 11] = True
    total, mean, count = sequence_logprobs(hidden, weight, input_ids=ids, response_mask=resp)
    logp = torch.log_softmax(hidden.double() @ weight.double().t(), -1)[:, :-1].gather(2, ids[:, 1:, None]).squeeze(2)
    want = (logp * resp[:, 1:]).sum(1)
    assert torch.allclose(total.double(), want, atol=1e-4)
    assert torch.equal(count, resp[:, 1:].sum(1).float())
    assert torch.allclose(mean.double(), want / count.double(), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])  # the kernels, and the reference path
def test_varlen_shared_prompt_equals_padded(dtype, device):
    """A pair as one stream [prompt, chosen, rejected]: the last prompt row predicts both first response
    tokens (a repeated row); sums, means, reference sums, KL and gradients equal the padded [2, T] layout."""
    d, V, Lp, Lc, Lr = 20, 300, 5, 7, 4
    N = Lp + Lc + Lr
    stream = torch.randn(N, d, device=device, dtype=dtype)
    ref_stream = torch.randn(N, d, device=device, dtype=dtype)
    ids = torch.randint(0, V, (N,), device=device)
    weight = torch.randn(V, d, device=device, dtype=dtype) * 0.3
    chosen = list(range(Lp)) + list(range(Lp, Lp + Lc))  # stream rows of each unshared sequence
    rejected = list(range(Lp)) + list(range(Lp + Lc, N))
    rows = torch.tensor(chosen[Lp - 1 : -1] + rejected[Lp - 1 : -1], device=device)
    labels = ids[torch.tensor(chosen[Lp:] + rejected[Lp:], device=device)]
    seq_ids = torch.tensor([0] * Lc + [1] * Lr, device=device)
    T = Lp + max(Lc, Lr)
    padded = torch.zeros(2, T, d, device=device, dtype=dtype)
    ref_padded = torch.zeros_like(padded)
    pids = torch.zeros(2, T, dtype=torch.long, device=device)
    resp = torch.zeros(2, T, dtype=torch.bool, device=device)
    for b, seq in enumerate((chosen, rejected)):
        padded[b, : len(seq)], ref_padded[b, : len(seq)] = stream[seq], ref_stream[seq]
        pids[b, : len(seq)] = ids[seq]
        resp[b, Lp : len(seq)] = True
    h = stream.clone().requires_grad_()
    hp = padded.clone().requires_grad_()
    got = sequence_logprobs(h, weight, softcap=5.0, rows=rows, labels=labels, seq_ids=seq_ids, num_seqs=2)
    want = sequence_logprobs(hp, weight, input_ids=pids, response_mask=resp, softcap=5.0)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert got[2].tolist() == [Lc, Lr]
    (got[0] * torch.tensor([0.3, -1.1], device=device, dtype=dtype)).sum().backward()
    (want[0] * torch.tensor([0.3, -1.1], device=device, dtype=dtype)).sum().backward()
    expect = torch.zeros_like(stream)
    for b, seq in enumerate((chosen, rejected)):
        expect.index_add_(0, torch.tensor(seq, device=device), hp.grad[b, : len(seq)])
    assert torch.allclose(h.grad, expect, rtol=1e-5, atol=1e-7)
    got_kl = sequence_logprobs_kl(
        stream, weight, ref_stream, weight * 1.1, rows=rows, labels=labels, seq_ids=seq_ids, num_seqs=2
    )
    want_kl = sequence_logprobs_kl(padded, weight, ref_padded, weight * 1.1, input_ids=pids, response_mask=resp)
    for a, b in zip(got_kl, want_kl):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_varlen_bad_input(device):
    h, w = torch.randn(6, 8, device=device), torch.randn(20, 8, device=device)
    rows, labels, seq = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="labels must be a 1-D"):
        sequence_logprobs(h, w, rows=rows, labels=labels[:2], seq_ids=seq, num_seqs=2)
    with pytest.raises(ValueError, match="seq_ids must be an integer"):
        sequence_logprobs(h, w, rows=rows, labels=labels, seq_ids=seq.float(), num_seqs=2)
    with pytest.raises(ValueError, match="hidden must be"):
        sequence_logprobs(h[None], w, rows=rows, labels=labels, seq_ids=seq, num_seqs=2)
    ids, mask = torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="not both"):
        sequence_logprobs(h[None], w, input_ids=ids, response_mask=mask, labels=labels, seq_ids=seq, num_seqs=2)
    with pytest.raises(ValueError, match="pass input_ids and response_mask"):
        sequence_logprobs(h, w)
    with pytest.raises(ValueError, match="ref_hidden must be"):
        sequence_logprobs_kl(h, w, h[:5], w, rows=rows, labels=labels, seq_ids=seq, num_seqs=2)


def test_layout_arguments_are_keywords():
    """The layout's tensors are keyword-only: a positional input_ids is refused by Python."""
    h, w = torch.randn(1, 6, 8), torch.randn(20, 8)
    ids, mask = torch.zeros(1, 6, dtype=torch.long), torch.ones(1, 6, dtype=torch.bool)
    with pytest.raises(TypeError):
        sequence_logprobs(h, w, ids, mask)
    with pytest.raises(TypeError):
        sequence_logprobs_kl(h, w, h, w, ids, mask)


@pytest.mark.parametrize(
    "case,match",
    [
        ("d", "d="),
        ("labels_shape", "labels must be"),
        ("label_range", r"labels\[2\]"),
        ("dtype", "weight must be bf16"),
        ("softcap", "softcap"),
        ("labels_float", "integer"),
        ("bias", "bias"),
    ],
)
def test_bad_input(case, match):
    h, w, y = torch.randn(4, 8), torch.randn(20, 8), torch.randint(0, 20, (4,))
    kw = {}
    if case == "d":
        w = torch.randn(20, 9)
    elif case == "labels_shape":
        y = y[:3]
    elif case == "label_range":
        y[2] = 20
    elif case == "dtype":  # another float dtype is a mixed entry (tested above); an integer weight is refused
        w = w.long()
    elif case == "softcap":
        kw["softcap"] = 0.0
    elif case == "labels_float":
        y = y.float()
    elif case == "bias":
        kw["bias"] = torch.randn(19)
    with pytest.raises(ValueError, match=match):
        fused_linear_logprobs(h, w, y, **kw)


def test_kl_bad_input():
    h, w = torch.randn(4, 8), torch.randn(20, 8)
    with pytest.raises(ValueError, match="ref_weight has vocabulary"):
        fused_linear_kl(h, w, torch.randn(4, 6), torch.randn(21, 6), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        fused_linear_kl(h, w, h, w, torch.ones(3, dtype=torch.bool))
    y = torch.randint(0, 20, (4,))
    with pytest.raises(ValueError, match="ref_hidden has 3 rows"):
        fused_linear_logprobs_kl(h, w, y, torch.randn(3, 8), w)
    with pytest.raises(ValueError, match="ref_bias"):
        fused_linear_logprobs_kl(h, w, y, h, w, ref_bias=torch.randn(19))
    with pytest.raises(ValueError, match=r"labels\[1\]"):
        fused_linear_logprobs_kl(h, w, torch.tensor([0, 20, 1, 2]), h, w)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_logprobs_kl(h, w, y, h, w, chunk_size=0)


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_bf16_on_gpu(softcap):
    N, d, V = 1000, 256, 32001
    hidden = torch.randn(N, d, device="cuda").bfloat16()
    weight = (torch.randn(V, d, device="cuda") * 0.05).bfloat16()
    labels = torch.randint(0, V, (N,), device="cuda")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = fused_linear_logprobs(h, w, labels, softcap=softcap)
    g = torch.randn(N, device="cuda")
    got.backward(g)
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = reference.fused_linear_logprobs_ref(hr, wr, labels, softcap)
    want.backward(g.double())
    assert _rel_rms(got, want) < 1e-2
    assert _rel_rms(h.grad, hr.grad) < 3e-2 and _rel_rms(w.grad, wr.grad) < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_logprobs_kl_bf16_on_gpu(softcap):
    N, d, V = 600, 256, 32001
    hidden = torch.randn(N, d, device="cuda").bfloat16()
    weight = (torch.randn(V, d, device="cuda") * 0.05).bfloat16()
    rh = (hidden.float() + 0.5 * torch.randn(N, d, device="cuda")).bfloat16()
    labels = torch.randint(0, V, (N,), device="cuda")
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = fused_linear_logprobs_kl(h, w, labels, rh, weight, softcap)
    g_lp, g_kl = torch.randn(N, device="cuda"), torch.randn(N, device="cuda")
    (got[0] * g_lp + got[2] * g_kl).sum().backward()
    hr, wr = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = reference.fused_linear_logprobs_kl_ref(hr, wr, labels, rh.double(), weight.double(), softcap)
    (want[0] * g_lp.double() + want[2] * g_kl.double()).sum().backward()
    for x, y in zip(got, want):
        assert _rel_rms(x, y) < 3e-2
    assert _rel_rms(h.grad, hr.grad) < 3e-2 and _rel_rms(w.grad, wr.grad) < 3e-2


def test_unchecked_out_of_range_labels_are_never_read(device):
    """check_inputs=False skips the label check; the kernels still never read outside the vocabulary: such a
    label's log-prob is NaN (loud), the other rows are exact."""
    N, d, V = 6, 16, 40
    hidden, weight = torch.randn(N, d, device=device), torch.randn(V, d, device=device)
    labels = torch.randint(0, V, (N,), device=device)
    labels[2], labels[4] = V + 1000, -5
    got = fused_linear_logprobs(hidden, weight, labels, check_inputs=False)
    assert torch.isnan(got[2]) and torch.isnan(got[4])
    ok = torch.tensor([0, 1, 3, 5])
    want = reference.fused_linear_logprobs_ref(hidden[ok].double(), weight.double(), labels[ok])
    assert torch.allclose(got[ok].double(), want, atol=1e-5)
    logp, ref_logp, kl = fused_linear_logprobs_kl(hidden, weight, labels, hidden * 0.5, weight, check_inputs=False)
    assert torch.isnan(logp[2]) and torch.isnan(ref_logp[4]) and torch.isfinite(kl).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("op", ["logprobs", "logprobs_kl"])
def test_backward_in_vocabulary_blocks(dtype, op, monkeypatch, device):
    """The backward walks (vocabulary block, token chunk) pairs: with blocks far smaller than the vocabulary
    and several chunks, gradients (fp32-accumulated across blocks and chunks) match the float64 reference."""
    poison(monkeypatch, lpmod)
    monkeypatch.setattr(vocab_head, "BACKWARD_BYTES", 16 * 300 * 6)  # 16-row chunks x 300-column blocks
    N, d, V = 45, 24, 1000
    assert lpmod.backward_blocks(N, V, 6, 16) == (16, 256)
    hidden = torch.randn(N, d, device=device).to(dtype)
    weight = (torch.randn(V, d, device=device) * 0.4).to(dtype)
    bias = (torch.randn(V, device=device) * 0.3).to(dtype)
    labels = torch.randint(0, V, (N,), device=device)
    labels[::7] = -100
    ref_h = hidden.float() + 0.2 * torch.randn(N, d, device=device)
    h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
    if op == "logprobs":
        got = fused_linear_logprobs(h, w, labels, softcap=6.0, bias=b, chunk_size=16)
    else:
        got = sum(
            fused_linear_logprobs_kl(h, w, labels, ref_h.to(dtype), w.detach() * 0.9, 6.0, b, chunk_size=16)[i]
            for i in (0, 2)
        )
    g = torch.randn(N, device=device)
    got.backward(g)
    hr, wr, br = (t.double().requires_grad_() for t in (hidden, weight, bias))
    if op == "logprobs":
        want = reference.fused_linear_logprobs_ref(hr, wr, labels, 6.0, -100, br)
    else:
        lp, _, kl = reference.fused_linear_logprobs_kl_ref(
            hr, wr, labels, ref_h.to(dtype).double(), wr.detach() * 0.9, 6.0, br
        )
        want = lp + kl
    want.backward(g.double())
    tol = TOL[dtype]
    assert _rel_rms(got, want) < tol
    for a, b_ in ((h.grad, hr.grad), (w.grad, wr.grad), (b.grad, br.grad)):
        assert a.dtype == dtype and _rel_rms(a, b_) < tol
