"""Precision policies: updates kept at the paper's lr 5e-7 (bf16-mixed, bf16-compensated) or lost (bf16-pure),
exact resume under each, and the fused ops' mixed entry (low-precision activations, fp32 weights) against
float64 references. Kernels run under the Triton interpreter in fp16 (its bf16 tl.dot is wrong)."""

import json
import os

import pytest
import torch
from helpers import TOL, poison, random_sae

import fpo_kernels.logprobs as lpmod
from fpo.config import config_from_dict
from fpo.model import load_model
from fpo.precision import describe_precision, make_optimizer, resolve_precision
from fpo.precompute import precompute
from fpo.train import Trainer, train
from fpo_kernels import fused_linear_logprobs, fused_linear_logprobs_kl, reference, sae_feature_mse

LEN = dict(max_length=64, max_prompt_length=32)
LR = 5e-7  # the paper's


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A tiny Llama (hidden 64, 2 layers) whose weights lie on the bf16 grid (bf16 and fp32 loads start equal),
    an SAE on its layer 1, 8 pairs and their reference cache."""
    import tiny as t

    root = tmp_path_factory.mktemp("precision")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        model = t.make_model(str(root / "model"), layers=2, bf16_grid=True)
        sae = t.make_sae(str(root / "sae"), layer=1)
        pairs = t.make_pairs(str(root / "pairs.jsonl"), n=8)
        precompute(model, pairs, str(root / "cache"), sae=sae, cache_k=32, progress=False, **LEN)
    finally:
        os.environ["TRITON_INTERPRET"] = old or "0"
    return {"model": model, "sae": sae, "pairs": pairs, "cache": str(root / "cache"), "root": root}


def _cfg(small, out, **kw):
    base = dict(
        method="fpo",
        model=small["model"],
        dataset=small["pairs"],
        cache=small["cache"],
        sae=small["sae"],
        batch_size=2,
        micro_batch_size=2,
        max_steps=2,
        epochs=50,
        lr=LR,
        warmup_steps=0,
        k=16,
        output_dir=str(out),
        log_every=1,
        progress=False,
        **LEN,
    )
    base.update(kw)
    return config_from_dict(base)


def _run(small, out, **kw):
    """(trainer after fit, its final weights, its log lines)."""
    lines = []
    trainer = Trainer(_cfg(small, out, **kw), log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    try:
        trainer.fit()
    finally:
        trainer.close()
    weights = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return trainer, weights, lines


def _initial(small):
    return {n: p.detach() for n, p in load_model(small["model"]).named_parameters()}


def _kept(w, w_fp32, w0):
    """Of the weights the fp32 run changed, the share this run changed too."""
    moved = sum((w_fp32[n] != w0[n]).sum().item() for n in w0)
    kept = sum(((w_fp32[n] != w0[n]) & (w[n].float() != w0[n])).sum().item() for n in w0)
    return kept / moved


def _total_change(w, w0):
    return sum((w[n].double() - w0[n].double()).abs().sum().item() for n in w0)


def test_bf16_mixed_keeps_the_updates_that_bf16_pure_loses(small, tmp_path):
    w0 = _initial(small)
    fp32, w32, _ = _run(small, tmp_path / "fp32", precision="fp32")
    mixed, wm, log_m = _run(small, tmp_path / "mixed", precision="bf16-mixed")
    pure, wp, log_p = _run(small, tmp_path / "pure", precision="bf16-pure")
    assert all(p.dtype == torch.float32 for p in mixed.model.parameters())
    assert all(p.dtype == torch.bfloat16 for p in pure.model.parameters())
    assert _kept(wm, w32, w0) > 0.9
    assert _kept(wp, w32, w0) < 0.1
    # the same losses up to bf16 rounding of the forward (the margin is ~0 at the start: loss ~ log 2)
    for a, b in zip(fp32.history, mixed.history):
        assert abs(a["loss"] - b["loss"]) < 1e-3 * a["loss"], (a["loss"], b["loss"])
    assert any(
        "warning: precision bf16-pure at lr 5e-07" in line and "--precision bf16-mixed" in line for line in log_p
    )
    assert not any("warning: precision" in line for line in log_m)
    assert any("precision bf16-mixed" in line and "16 bytes" in line for line in log_m)


def test_bf16_compensated_tracks_the_fp32_run(small, tmp_path):
    """50 steps at lr 5e-7: the compensated optimizer's weights (bf16 value + Kahan compensation) move as far
    as the fp32 run's, and the bf16 weights themselves are the fp32 run's weights rounded to bf16."""
    w0 = _initial(small)
    _, w32, _ = _run(small, tmp_path / "fp32", precision="fp32", max_steps=50)
    comp, wc, log_c = _run(small, tmp_path / "comp", precision="bf16-compensated", max_steps=50)
    assert all(p.dtype == torch.bfloat16 for p in comp.model.parameters())
    effective = {
        n: wc[n].double() + comp.optimizer.state[p]["kahan_comp"].double() for n, p in comp.model.named_parameters()
    }
    total, total32 = _total_change(effective, w0), _total_change(w32, w0)
    assert abs(total / total32 - 1) < 0.1, total / total32
    same = sum((wc[n] == w32[n].to(torch.bfloat16)).sum().item() for n in w0) / sum(v.numel() for v in w0.values())
    assert same > 0.98, same
    assert any("precision bf16-compensated" in line and "10 bytes" in line for line in log_c)


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed", "bf16-compensated", "bf16-pure"])
def test_resume_is_exact_under_every_policy(small, tmp_path, precision):
    kw = dict(precision=precision, lr=1e-4, save_every=2)
    full = train(_cfg(small, tmp_path / "full", max_steps=4, **kw), log=lambda *a: None)
    train(_cfg(small, tmp_path / "part", max_steps=2, **kw), log=lambda *a: None)
    train(_cfg(small, tmp_path / "part", max_steps=4, resume="latest", **kw), log=lambda *a: None)
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / d / "metrics.jsonl")] for d in ("full", "part")]
    assert losses[0] == losses[1]
    wa = load_model(full["final"], dtype="auto").state_dict()
    wb = load_model(str(tmp_path / "part" / "final"), dtype="auto").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert next(iter(wa.values())).dtype == resolve_precision(precision, "cpu").param_dtype


def test_save_dtype_and_precision_changes(small, tmp_path):
    run, w, _ = _run(small, tmp_path / "run", precision="bf16-mixed", save_dtype="bfloat16", lr=1e-4)
    final = tmp_path / "run" / "final"
    assert json.loads((final / "config.json").read_text())["dtype"] == "bfloat16"
    saved = load_model(str(final), dtype="auto").state_dict()
    assert all(saved[n].dtype == torch.bfloat16 and torch.equal(saved[n], w[n].to(torch.bfloat16)) for n in w)
    with pytest.raises(ValueError, match="save_dtype other than"):
        train(
            _cfg(small, tmp_path / "run", precision="bf16-mixed", max_steps=4, resume=str(final)), log=lambda *a: None
        )
    # a checkpoint resumes only under the precision it was trained in
    train(_cfg(small, tmp_path / "ck", precision="fp32", save_every=2, lr=1e-4), log=lambda *a: None)
    with pytest.raises(ValueError, match="precision"):
        train(_cfg(small, tmp_path / "ck", precision="bf16-pure", max_steps=4, resume="latest"), log=lambda *a: None)


def test_precision_is_the_one_key(small, tmp_path):
    """precision names the policy; there is no dtype key beside it."""
    with pytest.raises(ValueError, match="unknown config keys \\['dtype'\\]"):
        config_from_dict(dict(method="simpo", model=small["model"], dataset=small["pairs"], dtype="bfloat16"))
    with pytest.raises(ValueError, match="precision must be one of"):
        _cfg(small, tmp_path, precision="fp16")


def test_optimizers(tmp_path):
    """adam / adamw / rmsprop with their betas and eps; torch-optimi's Adam and AdamW (bf16-compensated) are
    torch's Adam and AdamW on fp32 weights, weight decay included."""
    pytest.importorskip("optimi")
    fp32, comp = resolve_precision("fp32", "cpu"), resolve_precision("bf16-compensated", "cpu")
    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("rmsprop", torch.optim.RMSprop)):
        opt = make_optimizer([torch.nn.Parameter(torch.zeros(3))], fp32, name, 1e-3, 0.1, (0.8, 0.95), 1e-6)
        assert type(opt) is cls and opt.defaults["eps"] == 1e-6 and opt.defaults["weight_decay"] == 0.1
        if name != "rmsprop":
            assert opt.defaults["betas"] == (0.8, 0.95)
    for name in ("adam", "adamw"):
        w = torch.randn(64)
        a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
        oa = make_optimizer([a], fp32, name, 1e-2, 0.1, (0.9, 0.95), 1e-8)
        ob = make_optimizer([b], comp, name, 1e-2, 0.1, (0.9, 0.95), 1e-8)
        for _ in range(5):
            g = torch.randn(64)
            a.grad, b.grad = g.clone(), g.clone()
            oa.step()
            ob.step()
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), (name, (a - b).abs().max())
    with pytest.raises(ValueError, match="bf16-compensated has no RMSprop"):
        make_optimizer([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))], comp, "rmsprop", 1e-3)


def test_the_logged_cost_and_the_bf16_pure_warning():
    """The bytes a policy costs per trained parameter, times their count; bf16-pure warns at the paper's lr
    (a median weight of 0.02 moves in steps of about 8e-5, far above 5e-7) and not at a learning rate that
    bf16 resolves; the other policies never warn."""
    n = int(torch.randint(1000, 5000, ()).item())
    params = [torch.full((n,), 0.02, dtype=torch.bfloat16), torch.full((3,), 0.02, dtype=torch.bfloat16)]
    pure = resolve_precision("bf16-pure", "cpu")
    lines = describe_precision(pure, params, "adam", 5e-7)
    assert len(lines) == 2 and "most Adam updates round away" in lines[1]
    assert f"{pure.bytes_per_parameter('adam')} bytes x {(n + 3) / 1e6:.3f}M parameters" in lines[0]
    assert len(describe_precision(pure, params, "adam", 1e-2)) == 1
    for name in ("fp32", "bf16-mixed", "bf16-compensated"):
        lines = describe_precision(resolve_precision(name, "cpu"), params, "adam", 5e-7, trained="trained ")
        assert len(lines) == 1 and f"precision {name}:" in lines[0] and "M trained parameters" in lines[0]


# ---- the fused ops' mixed entry ----------------------------------------------------------------------------
def _rel_rms(got, want):
    return ((got.double() - want.double()).pow(2).mean().sqrt() / want.double().pow(2).mean().sqrt()).item()


@pytest.mark.interpreter
@pytest.mark.parametrize("entry", ["fp16 hidden, fp32 weight", "fp32 under fp16 autocast"])
@pytest.mark.parametrize("chunk", [None, 8])
def test_logprobs_mixed_entry(entry, chunk, monkeypatch, device):
    """The GEMMs run in fp16 (the activations' dtype, or autocast's), the fp32 weight gets an fp32 gradient and
    the hidden states one in their own dtype; against float64 on the operands rounded to fp16."""
    poison(monkeypatch, lpmod)
    N, d, V = 29, 24, 700
    hidden = torch.randn(N, d, device=device)
    weight = torch.randn(V, d, device=device) * 0.4
    labels = torch.randint(0, V, (N,), device=device)
    labels[::5] = -100
    h = (hidden.half() if entry.startswith("fp16") else hidden.clone()).requires_grad_()
    w = weight.clone().requires_grad_()
    g = torch.randn(N, device=device)
    ctx = torch.autocast(device, dtype=torch.float16) if "autocast" in entry else torch.autocast(device, enabled=False)
    with ctx:
        got = fused_linear_logprobs(h, w, labels, softcap=5.0, chunk_size=chunk)
    got.backward(g)
    hr = hidden.half().double().requires_grad_()
    wr = weight.half().double().requires_grad_()
    want = reference.fused_linear_logprobs_ref(hr, wr, labels, 5.0)
    want.backward(g.double())
    tol = TOL[torch.float16][1]
    assert got.dtype == torch.float32 and _rel_rms(got, want) < tol
    assert h.grad.dtype == h.dtype and w.grad.dtype == torch.float32
    assert _rel_rms(h.grad, hr.grad) < 3 * tol and _rel_rms(w.grad, wr.grad) < 3 * tol


@pytest.mark.interpreter
def test_logprobs_kl_under_autocast(monkeypatch, device):
    """TDPO's pass with an fp32 policy and an fp32 reference under fp16 autocast: both models' GEMMs in
    fp16, against float64 on the rounded operands."""
    poison(monkeypatch, lpmod)
    N, d, V = 21, 16, 300
    hidden, weight = torch.randn(N, d, device=device), torch.randn(V, d, device=device) * 0.5
    rh, rw = torch.randn(N, d, device=device), torch.randn(V, d, device=device) * 0.5
    labels = torch.randint(0, V, (N,), device=device)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast(device, dtype=torch.float16):
        logp, ref_logp, kl = fused_linear_logprobs_kl(h, w, labels, rh, rw)
    (logp.sum() + 0.7 * kl.sum()).backward()
    r = lambda t: t.half().double()
    hr, wr = r(hidden).requires_grad_(), r(weight).requires_grad_()
    want = reference.fused_linear_logprobs_kl_ref(hr, wr, labels, r(rh), r(rw))
    (want[0].sum() + 0.7 * want[2].sum()).backward()
    tol = TOL[torch.float16][1]
    for got_t, want_t in zip((logp, ref_logp, kl), want):
        assert got_t.dtype == torch.float32 and _rel_rms(got_t, want_t) < tol
    assert h.grad.dtype == w.grad.dtype == torch.float32
    assert _rel_rms(h.grad, hr.grad) < 3 * tol and _rel_rms(w.grad, wr.grad) < 3 * tol


@pytest.mark.interpreter
def test_sae_constraint_under_autocast(device):
    """An fp32 residual stream under fp16 autocast is encoded in fp16, as an nn.Linear there would be: the
    result equals the op on the fp16 residual, and float64 on it; the gradient comes back in fp32."""
    d, m, N = 24, 96, 40
    sae = random_sae(d, m, device, dtype=torch.float16)
    hidden = torch.randn(N, d, device=device)
    spans = torch.tensor([[0, 9], [9, 20], [22, 31], [31, 40]])
    ref_idx, ref_val = torch.randint(0, m, (4, 32), device=device), torch.rand(4, 32, device=device)
    h = hidden.clone().requires_grad_()
    with torch.autocast(device, dtype=torch.float16):
        got = sae_feature_mse(h, sae, ref_idx, ref_val, k=8, spans=spans)
    got.sum().backward()
    h16 = hidden.half().requires_grad_()
    same = sae_feature_mse(h16, sae, ref_idx, ref_val, k=8, spans=spans)
    same.sum().backward()
    assert torch.equal(got, same) and h.grad.dtype == torch.float32
    assert torch.equal(h.grad, h16.grad.float())
    want = reference.sae_feature_mse_spans_ref(hidden.half().double(), spans, sae, ref_idx, ref_val, 8, "policy", None)
    atol, rtol = TOL[torch.float16]
    assert torch.allclose(got.double(), want, atol=atol, rtol=rtol)


def test_reference_path_under_cpu_bf16_autocast():
    """CPU tensors without the interpreter take the plain-PyTorch path: under bf16 autocast its products use
    bf16-rounded operands and its log-softmax stays fp32 (autocast is off inside the op)."""
    N, d, V = 30, 16, 200
    h, w = torch.randn(N, d), torch.randn(V, d) * 0.5
    labels = torch.randint(0, V, (N,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_linear_logprobs(h, w, labels)
    want = reference.fused_linear_logprobs_ref(h.bfloat16().double(), w.bfloat16().double(), labels)
    assert got.dtype == torch.float32 and _rel_rms(got, want) < 1e-6
