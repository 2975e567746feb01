"""The training loop on a tiny model: every method, fused == reference, exact resume, ranks, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import DIST_DRIVER
from run_setup import run_config

from fpo.config import TrainConfig, config_from_dict, load_config
from fpo.model import body_hidden, load_model, load_tokenizer
from fpo.packing import collate
from fpo.pairs import load_pairs, tokenize_pairs
from fpo.sae import SAESpec
from fpo.step import PolicyStats
from fpo.train import NonFiniteLossError, Trainer, train
from fpo_kernels import SAEWeights, SequenceStats, sequence_logprobs


@pytest.fixture(scope="module")
def cache(tiny_cache):
    """The tiny reference cache (tests/conftest.py), under the name these tests take it by."""
    return tiny_cache


def _cfg(tiny, cache, tmp_path, method="fpo", **kw):
    """A two-step run of `method` in tmp_path/method (run_setup.run_config)."""
    return run_config(tiny, cache, tmp_path / method, method, **kw)


@pytest.mark.parametrize("method", ["fpo", "dpo", "simpo", "tdpo1", "tdpo2"])
def test_every_method_trains(tiny, cache, tmp_path, method):
    before = load_model(tiny["model"]).state_dict()
    out = train(_cfg(tiny, cache, tmp_path, method), log=lambda *a: None)
    hist = [json.loads(line) for line in open(tmp_path / method / "metrics.jsonl")]
    assert len(hist) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    after = load_model(out["final"]).state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    assert {"fpo": "d_chosen", "tdpo1": "kl_chosen", "tdpo2": "kl_rejected"}.get(method, "rewards/accuracies") in hist[
        0
    ]


@pytest.mark.interpreter
@pytest.mark.parametrize("select,softcap,layout", [("policy", None, "off"), ("reference", 20.0, "share-prompt")])
def test_fused_path_equals_reference_path(tiny, tmp_path, monkeypatch, select, softcap, layout):
    """PolicyStats through the Triton kernels (interpreter) vs the plain-PyTorch path: outputs and gradients."""
    import tiny as t

    model_dir = tiny["model"] if softcap is None else t.make_model(str(tmp_path / "gemma"), softcap=softcap)
    tok = load_tokenizer(model_dir)
    sae = SAEWeights.from_file(tiny["sae"])
    items = tokenize_pairs(load_pairs(tiny["pairs"], max_pairs=2), tok, 40, 20)
    batch = collate(items, layout, tok.pad_token_id)
    g = torch.Generator().manual_seed(0)
    ref_idx = torch.stack([torch.randperm(sae.width, generator=g)[:16] for _ in range(4)])
    ref_val = torch.rand(4, 16, generator=g).to(torch.bfloat16)
    ref_model = load_model(model_dir)
    with torch.no_grad():
        ref_hidden = body_hidden(ref_model, batch, "cpu")
    results = []
    for interp in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", interp)
        torch.manual_seed(0)
        model = load_model(model_dir)
        with torch.no_grad():  # move the policy off the reference so the KL is not zero
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        ps = PolicyStats(model, saes=[SAESpec(sae, 2, 1.0, "sae")], k=5, select=select)
        out = ps(
            batch,
            ref_features=[(ref_idx, ref_val)],
            ref_hidden=ref_hidden,
            ref_weight=ref_model.lm_head.weight.detach(),
        )
        (out.logp_sum.sum() * 0.01 + out.d.sum() * 10 + out.kl.sum() * 0.1).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(({k: v.detach() for k, v in out.as_dict().items()}, grads))
        ps.remove_hooks()
    (fo, fg), (ro, rg) = results
    for k in ro:
        assert torch.allclose(fo[k], ro[k], rtol=1e-4, atol=1e-5), k
    # the reference's log-probs that come with the KL are the reference model's own
    ref_sum = sequence_logprobs(
        ref_hidden,
        ref_model.lm_head.weight.detach(),
        softcap=softcap,
        rows=batch.pred_rows,
        labels=batch.labels,
        seq_ids=batch.seq_ids,
        num_seqs=4,
    )[0]
    assert torch.allclose(fo["ref_logp_sum"], ref_sum, rtol=1e-4, atol=1e-4)
    assert fg.keys() == rg.keys()
    for n in rg:
        rel = (fg[n] - rg[n]).norm() / rg[n].norm().clamp(min=1e-12)
        assert rel < 1e-3, (n, rel.item())


def test_resume_reproduces_the_uninterrupted_run(tiny, cache, tmp_path):
    full = train(
        _cfg(tiny, cache, tmp_path, max_steps=4, save_every=2, output_dir=str(tmp_path / "full")), log=lambda *a: None
    )
    train(
        _cfg(tiny, cache, tmp_path, max_steps=2, save_every=2, output_dir=str(tmp_path / "part")), log=lambda *a: None
    )
    train(
        _cfg(tiny, cache, tmp_path, max_steps=4, save_every=2, output_dir=str(tmp_path / "part"), resume="latest"),
        log=lambda *a: None,
    )
    a = [json.loads(line)["loss"] for line in open(tmp_path / "full" / "metrics.jsonl")]
    b = [json.loads(line)["loss"] for line in open(tmp_path / "part" / "metrics.jsonl")]
    assert len(a) == len(b) == 4
    assert a == b  # exactly
    # a run killed after logging step 3 (past its last checkpoint) resumes without a duplicate step 3
    with open(tmp_path / "part" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.1}\n{"step": 6, "lo')  # a logged step and a torn line
    train(
        _cfg(
            tiny,
            cache,
            tmp_path,
            max_steps=4,
            output_dir=str(tmp_path / "part"),
            resume=str(tmp_path / "part" / "checkpoint-000004"),
        ),
        log=lambda *a: None,
    )
    steps = [json.loads(line)["step"] for line in open(tmp_path / "part" / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]
    wa = load_model(full["final"]).state_dict()
    wb = load_model(str(tmp_path / "part" / "final")).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _saved_tensors(folder) -> dict:
    """{name: shape} of every tensor in a saved model's safetensors files."""
    from safetensors import safe_open

    out = {}
    for n in sorted(os.listdir(folder)):
        if n.endswith(".safetensors"):
            with safe_open(os.path.join(folder, n), "pt") as f:
                out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return out


def _torchrun(args, nproc=2, port=29621):
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1")
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(port),
            DIST_DRIVER,
            json.dumps(dict(kind="train", **args)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


@pytest.mark.dist
@pytest.mark.parametrize("fsdp,max_tokens", [(False, None), (True, None), (True, 130)])
def test_two_ranks_equal_one_rank_with_twice_the_batch(tiny, cache, tmp_path, fsdp, max_tokens):
    """DDP and FSDP2 on two gloo ranks; with a token budget each rank packs its own share of the step's
    pairs, and the ranks run equal numbers of micro-batches."""
    one = _cfg(tiny, cache, tmp_path, max_steps=3, micro_batch_size=4, output_dir=str(tmp_path / "one"))
    train(one, log=lambda *a: None)
    two = dict(one, micro_batch_size=2, output_dir=str(tmp_path / "two"), fsdp=fsdp, max_tokens=max_tokens)
    r = _torchrun(two, port=29631 + fsdp + (max_tokens is not None))
    assert r.returncode == 0, r.stderr[-4000:]
    a = [json.loads(line)["loss"] for line in open(tmp_path / "one" / "metrics.jsonl")]
    b = [json.loads(line)["loss"] for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert len(a) == len(b) == 3
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    saved = [_saved_tensors(tmp_path / run / "final") for run in ("one", "two")]
    assert saved[0] == saved[1]  # the same tensors on disk: a tied lm head written once, sharded or not
    wa = load_model(str(tmp_path / "one" / "final")).state_dict()
    wb = load_model(str(tmp_path / "two" / "final")).state_dict()
    # Adam turns rounding in near-zero gradients (rare embedding rows) into up to lr-sized moves: 1e-4 is a
    # tenth of one step's update, far below what a wrongly weighted or missing micro-batch would change
    worst = max(((wa[k] - wb[k]).abs().max().item(), k) for k in wa)
    assert worst[0] < 1e-4, worst


@pytest.mark.dist
@pytest.mark.parametrize("fsdp", [False, True])
def test_two_compiled_ranks_equal_one_eager_rank(tiny, cache, tmp_path, fsdp):
    """--compile under DDP and FSDP2 (the layers compiled before they are sharded or wrapped): the losses of one
    eager rank with twice the batch."""
    one = _cfg(tiny, cache, tmp_path, max_steps=2, micro_batch_size=4, output_dir=str(tmp_path / "one"))
    train(one, log=lambda *a: None)
    two = dict(one, micro_batch_size=2, output_dir=str(tmp_path / "two"), fsdp=fsdp, compile=True)
    r = _torchrun(dict(two, compile_backend="aot_eager"), port=29641 + fsdp)
    assert r.returncode == 0, r.stderr[-4000:]
    a = [json.loads(line)["loss"] for line in open(tmp_path / "one" / "metrics.jsonl")]
    b = [json.loads(line)["loss"] for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert len(a) == len(b) == 2 and a == pytest.approx(b, rel=1e-4, abs=1e-5)
    assert json.loads(open(tmp_path / "two" / "metrics.jsonl").readline())["first_step_s"] > 0  # it compiled


@pytest.mark.parametrize("method", ["fpo", "tdpo2"])
def test_layouts_and_token_budgets_train_alike(tiny, cache, tmp_path, method):
    """The whole loop (reference side included) in every layout, and with a token budget instead of a fixed
    number of pairs per micro-batch: the same losses; metrics.jsonl records the tokens through the model body."""
    runs = {}
    for name, kw in (
        ("off", dict(packing="off")),
        ("pack", dict(packing="pack")),
        ("share", {}),
        ("budget", dict(max_tokens=130, batch_size=8, micro_batch_size=1)),
    ):
        base = dict(batch_size=8, micro_batch_size=4) if name != "budget" else {}
        train(
            _cfg(tiny, cache, tmp_path, method, output_dir=str(tmp_path / name), **{**base, **kw}), log=lambda *a: None
        )
        runs[name] = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
    want = [h["loss"] for h in runs["off"]]
    for name in ("pack", "share", "budget"):
        assert [h["loss"] for h in runs[name]] == pytest.approx(want, rel=1e-5), name
    tok = {name: runs[name][0]["tokens_processed"] for name in runs}
    assert tok["share"] < tok["pack"] <= tok["off"]
    assert (
        runs["share"][0]["response_tokens"] == runs["off"][0]["response_tokens"] == runs["budget"][0]["response_tokens"]
    )


def test_alpha_zero_fpo_gradient_is_length_normalised_dpo(tiny, cache, tmp_path):
    """With alpha = 0, FPO's gradient equals that of -log sigmoid(beta ((a_w - a_l) - g_ref)) with the cached margin."""
    trainer = Trainer(config_from_dict(_cfg(tiny, cache, tmp_path, alpha=0.0, max_grad_norm=None)), log=lambda *a: None)
    items = next(iter(trainer.micro_batches(0)))
    batch = collate(items, "off", trainer.tokenizer.pad_token_id)
    from fpo.train import compute_loss

    ref = trainer.cache.reference(batch.ids, batch.row_hash)  # [2P], chosen first
    stats = trainer.policy(batch, ref_features=[ref.features[""]])
    loss, _ = compute_loss(trainer.cfg.loss_settings, stats, ref)
    loss.mean().backward()
    g_fpo = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    trainer.model.zero_grad()
    w = trainer.model.lm_head.weight
    hidden = trainer.model.get_decoder()(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask
    ).last_hidden_state
    _, mean, _ = sequence_logprobs(hidden, w, input_ids=batch.input_ids, response_mask=batch.response_mask)
    g_ref = ref.logp_mean[:2] - ref.logp_mean[2:]
    want = -torch.nn.functional.logsigmoid(0.1 * ((mean[:2] - mean[2:]) - g_ref))
    want.mean().backward()
    for n, p in trainer.model.named_parameters():
        assert torch.allclose(g_fpo[n], p.grad, rtol=1e-4, atol=1e-7), n
    trainer.close()


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny, cache, tmp_path, monkeypatch):
    """Losses turn NaN once checkpoint-000002 is written: the run stops at step 3 naming that checkpoint."""
    import fpo.train as tr

    real_loss, real_save = tr.compute_loss, tr.Trainer.save_checkpoint
    armed = {"on": False}

    def poisoned(*a, **k):
        losses, m = real_loss(*a, **k)
        return (losses * float("nan") if armed["on"] else losses), m

    def save_then_arm(self, *a, **k):
        path = real_save(self, *a, **k)
        armed["on"] = True
        return path

    monkeypatch.setattr(tr, "compute_loss", poisoned)
    monkeypatch.setattr(tr.Trainer, "save_checkpoint", save_then_arm)
    with pytest.raises(NonFiniteLossError, match=r"step 3.*checkpoint-000002"):
        train(
            _cfg(tiny, cache, tmp_path, method="simpo", batch_size=4, micro_batch_size=2, max_steps=4, save_every=2),
            log=lambda *a: None,
        )
    ckpt = tmp_path / "simpo" / "checkpoint-000002"
    assert ckpt.exists() and not (tmp_path / "simpo" / "checkpoint-000004").exists()


def test_bad_configs(tiny, cache, tmp_path):
    with pytest.raises(ValueError, match="unknown config keys"):
        config_from_dict(dict(_cfg(tiny, cache, tmp_path), learning_rate=1.0))
    with pytest.raises(ValueError, match="lr must be float"):
        config_from_dict(dict(_cfg(tiny, cache, tmp_path), lr="fast"))
    with pytest.raises(ValueError, match="needs a reference cache"):
        config_from_dict(dict(_cfg(tiny, cache, tmp_path), cache=None))
    with pytest.raises(ValueError, match="method must be"):
        config_from_dict(dict(_cfg(tiny, cache, tmp_path), method="ppo"))
    with pytest.raises(ValueError, match="model is required"):
        TrainConfig(dataset="x", method="simpo")
    with pytest.raises(ValueError, match="batch_size 6 must be a multiple"):
        train(_cfg(tiny, cache, tmp_path, method="simpo", batch_size=6, micro_batch_size=4), log=lambda *a: None)
    with pytest.raises(ValueError, match="sae_layer 7 is outside"):
        train(_cfg(tiny, cache, tmp_path, sae_layer=7), log=lambda *a: None)
    with pytest.raises(ValueError, match="another model"):  # a cache made for another architecture
        import tiny as t

        other = t.make_model(str(tmp_path / "gem"), softcap=10.0)
        train(_cfg(tiny, cache, tmp_path, model=other), log=lambda *a: None)
    yaml_path = tmp_path / "c.yaml"
    yaml_path.write_text("method: simpo\nmodel: m\ndataset: d\nlr: 1e-6\n")
    assert load_config(str(yaml_path), beta=3.0).lr == 1e-6


def test_gradient_checkpointing_gives_the_same_losses(tiny, cache, tmp_path):
    """Checkpointing recomputes block outputs (the residual hook fires again in backward): same numbers."""
    a = train(_cfg(tiny, cache, tmp_path, max_steps=2, output_dir=str(tmp_path / "plain")), log=lambda *a: None)
    b = train(
        _cfg(tiny, cache, tmp_path, max_steps=2, gradient_checkpointing=True, output_dir=str(tmp_path / "ckpt")),
        log=lambda *a: None,
    )
    la = [h["loss"] for h in (json.loads(x) for x in open(tmp_path / "plain" / "metrics.jsonl"))]
    lb = [h["loss"] for h in (json.loads(x) for x in open(tmp_path / "ckpt" / "metrics.jsonl"))]
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-6)
    assert a["last"]["d_chosen"] == pytest.approx(b["last"]["d_chosen"], rel=1e-4)


def test_constraint_norm_ref_divides_d_by_the_recorded_scale(tiny, cache, tmp_path):
    """constraint_norm 'ref': D / scale in the loss (the policy's statistics divide each SAE's D by its scale);
    alpha 0 gives the same loss either way; the share is reported per step; a cache without the recorded scale
    is refused with the fix."""
    from fpo.reference_cache import ReferenceCache
    from fpo.train import Trainer, compute_loss

    c = ReferenceCache(cache)
    scale = c.feature_scale(16)
    vals = torch.cat([c.data["chosen_val"], c.data["rejected_val"]]).double()[:, :16]
    assert scale == pytest.approx((vals**2).mean().item(), rel=1e-6)  # the mean squared top-16 value
    stats = SequenceStats(logp_sum=torch.randn(4, dtype=torch.float64), logp_mean=torch.randn(4, dtype=torch.float64))
    ref = SequenceStats(logp_mean=torch.randn(4, dtype=torch.float64))
    ds = {}
    for norm in ("none", "ref"):  # the same first micro-batch, the same weights: D divided by the scale
        trainer = Trainer(TrainConfig(**_cfg(tiny, cache, tmp_path / norm, constraint_norm=norm)), log=lambda *a: None)
        try:
            assert [x.scale for x in trainer.policy.saes] == ([1.0] if norm == "none" else [pytest.approx(scale)])
            with torch.no_grad():
                _, metrics, _ = trainer._losses(trainer.micro_batches(0)[0])
            ds[norm] = metrics["constraint_abs"]
        finally:
            trainer.close()
    torch.testing.assert_close(ds["ref"], ds["none"] / scale)
    for alpha in (0.0, 3.0):
        cfg = TrainConfig(**_cfg(tiny, cache, tmp_path, alpha=alpha))
        d = (torch.rand(4, dtype=torch.float64) * 0.01).requires_grad_()
        if alpha == 0.0:  # alpha 0: D, scaled or not, leaves the loss as it is
            base, _ = compute_loss(cfg.loss_settings, stats.replace(d=d), ref)
            normed, _ = compute_loss(cfg.loss_settings, stats.replace(d=d / scale), ref)
            assert torch.equal(base, normed)
    out = train(_cfg(tiny, cache, tmp_path, constraint_norm="ref", alpha=2.0), log=lambda *a: None)
    assert out["last"]["constraint_share"] == pytest.approx(out["last"]["constraint_abs"] / out["last"]["margin_abs"])
    import shutil

    old = str(tmp_path / "old-cache")
    shutil.copytree(cache, old)
    meta = json.load(open(os.path.join(old, "meta.json")))
    for entry in meta["saes"]:
        del entry["feature_scale"]
    json.dump(meta, open(os.path.join(old, "meta.json"), "w"))
    with pytest.raises(ValueError, match="no recorded feature scale"):
        train(_cfg(tiny, old, tmp_path, constraint_norm="ref", output_dir=str(tmp_path / "o2")), log=lambda *a: None)


def test_a_large_alpha_holds_d_down_more_than_alpha_zero(tiny, cache, tmp_path):
    """Two steps on one batch: the policy starts at the reference, where D is at its minimum (only the cache's
    rounding), so every update raises it; with a large alpha the rejected responses' D rises far less than with
    alpha 0 (the constraint acts on D_l; D_w is stop-gradient)."""
    from fpo.train import Trainer

    drops = {}
    for alpha in (0.0, 3e4):
        tr = Trainer(
            TrainConfig(
                **_cfg(
                    tiny,
                    cache,
                    tmp_path,
                    alpha=alpha,
                    batch_size=2,
                    max_steps=2,
                    lr=1e-4,
                    output_dir=str(tmp_path / f"a{alpha}"),
                )
            ),
            log=lambda *a: None,
        )
        items = tr.micro_batches(0)[0]
        with torch.no_grad():
            before = tr._losses(items)[1]["d_rejected"].mean().item()
        for _ in range(2):
            losses, _, _ = tr._losses(items)
            losses.mean().backward()
            tr.optimizer.step()
            tr.optimizer.zero_grad()
        with torch.no_grad():
            after = tr._losses(items)[1]["d_rejected"].mean().item()
        drops[alpha] = before - after
        tr.close()
    assert drops[0.0] < 0 and drops[3e4] > 0.5 * drops[0.0]


def test_negligible_constraint_warns_and_step_one_logs_no_share(tiny, cache, tmp_path):
    """At the first step the policy is the reference and the margin is rounding noise: no share is logged there
    (it read 1e21). At the default log_every 10 the < 1% warning then fires once, judged on the ratio of the
    recent steps' summed terms."""
    lines = []
    train(
        _cfg(tiny, cache, tmp_path, alpha=1e-6, max_steps=10, log_every=10, lr=1e-4, batch_size=2, epochs=2),
        log=lambda *a, **k: lines.append(" ".join(map(str, a))),
    )
    hist = [json.loads(line) for line in open(tmp_path / "fpo" / "metrics.jsonl")]
    assert "constraint_share" not in hist[0] and all(h["constraint_share"] < 0.01 for h in hist[1:])
    warned = [line for line in lines if "feature constraint is" in line]
    assert len(warned) == 1 and "at step 10" in warned[0] and "raise --alpha" in warned[0]


def test_end_of_run_says_where_things_are_and_their_sizes(tiny, cache, tmp_path):
    lines = []
    train(
        _cfg(tiny, cache, tmp_path, lr_scheduler="cosine", warmup_steps=1, max_steps=2),
        log=lambda *a, **k: lines.append(" ".join(map(str, a))),
    )
    said = "\n".join(lines)
    assert "written: the model" in said and "(weights " in said and "trainer_state.pt (" in said
    assert "--no-save-optimizer leaves it out" in said and "metrics.jsonl: " in said
    hist = [json.loads(line) for line in open(tmp_path / "fpo" / "metrics.jsonl")]
    # a 1-step warmup reaches lr at step 1; then the cosine decays it
    assert hist[0]["learning_rate"] == pytest.approx(1e-3) and hist[1]["learning_rate"] < hist[0]["learning_rate"]


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_lr_schedules(name):
    """Warmup: step s runs at (s + 1) / warmup of lr; then constant, or transformers' linear / cosine decay,
    taken one step ahead, so the last step's lr is not 0."""
    import math

    from fpo.train import make_scheduler

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    warm, total = 3, 10
    sched = make_scheduler(opt, name, warm, total)
    got = []
    for _ in range(total):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for s, lr in enumerate(got):
        x = s + 1
        if x < warm:
            want = x / warm
        elif name == "constant":
            want = 1.0
        else:
            progress = (x - warm) / (total + 1 - warm)
            want = 1 - progress if name == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
        assert lr == pytest.approx(want, abs=1e-9), (s, lr, want)
    assert got[-1] > 0


@pytest.mark.parametrize("method", ["fpo", "tdpo2"])
def test_target_share_holds_the_constraint_at_its_share(tiny, tiny_cache, tmp_path, method):
    """--target-share 0.1 from an alpha several times too small: each step logs its alpha, the late third's realised
    share is near 0.1, and a resume goes on as the run would have (the controller's state is in the checkpoint)."""
    from fpo.alpha_control import phase_shares

    out = tmp_path / method
    cfg = run_config(
        tiny, tiny_cache, out, method, batch_size=2, max_steps=30, epochs=10, lr=3e-4,
        alpha=20.0 if method == "fpo" else 0.2, target_share=0.1, save_every=15,
    )  # fmt: skip
    train(cfg, log=lambda *a: None)
    hist = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert len(hist) == 30 and all("alpha" in h for h in hist)
    assert hist[-1]["alpha"] > 3 * hist[0]["alpha"]
    late = phase_shares(hist)["late"]
    assert 0.05 < late < 0.2, phase_shares(hist)
    # resumed from step 15: the first resumed step runs at the alpha the controller had reached
    train(dict(cfg, resume=str(out / "checkpoint-000015"), max_steps=16), log=lambda *a: None)
    again = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert again[15]["alpha"] == pytest.approx(hist[15]["alpha"], rel=1e-6)


def test_target_share_needs_a_method_with_a_constraint(tiny, tmp_path):
    with pytest.raises(ValueError, match="target_share adapts the constraint's alpha"):
        config_from_dict(run_config(tiny, None, tmp_path, "simpo", target_share=0.1))


def test_max_steps_overrides_epochs_and_the_prompt_length_follows_max_length(tiny, tmp_path):
    """As in TRL: --max-steps 6 over 16 pairs in steps of 4 trains 6 steps (into the second epoch). A max length
    without a prompt length keeps the prompt to half of it, so `--max-length 256` alone is a valid command."""
    assert TrainConfig(model="m", dataset="d", method="simpo", max_length=256).max_prompt_length == 128
    with pytest.raises(ValueError, match="pass --max-prompt-length 64 or less"):
        TrainConfig(model="m", dataset="d", method="simpo", max_length=128, max_prompt_length=200)
    out = tmp_path / "r"
    train(run_config(tiny, None, out, batch_size=4, micro_batch_size=4, max_steps=6), log=lambda *a: None)
    hist = [json.loads(x) for x in open(out / "metrics.jsonl")]
    assert [h["step"] for h in hist] == [1, 2, 3, 4, 5, 6] and hist[-1]["epoch"] == 1.5
