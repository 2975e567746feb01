"""LoRA through peft: only the adapters train, the saved adapters reload to the same logits (peft's own loader),
the merge equals peft's, TDPO's reference is the base model with the adapters off (no second model), resume is
exact, two ranks equal one."""

import json
import os
import sys

import pytest
import torch

from fpo.config import config_from_dict
from fpo.model import body_hidden, load_model
from fpo.packing import collate
from fpo.precompute import precompute
from fpo.train import Trainer, train
from fpo_kernels import sequence_logprobs

sys.path.insert(0, os.path.dirname(__file__))
from run_setup import LEN  # noqa: E402
from test_train import _cfg, _torchrun  # noqa: E402

peft = pytest.importorskip("peft")
QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def cache(tiny, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cache") / "c")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "0")  # CPU tensors on the plain-PyTorch path: fast
        precompute(tiny["model"], tiny["pairs"], out, sae=tiny["sae"], cache_k=32, progress=False, **LEN)
    return out


def _lora(tiny, cache, tmp_path, method="fpo", **kw):
    return _cfg(tiny, cache, tmp_path, method, lora_r=4, lr=1e-2, **kw)


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x).logits


def test_lora_trains_the_adapters_only_and_they_reload_to_the_same_logits(tiny, cache, tmp_path):
    trainer = Trainer(config_from_dict(_lora(tiny, cache, tmp_path, merge_lora=True)), **QUIET)
    try:
        base_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if ".lora_" not in k}
        summary = trainer.fit()
        x = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
        live = _logits(trainer.model, x)
        after = trainer.model.state_dict()
        assert all(torch.equal(v, after[k]) for k, v in base_before.items())  # the base is frozen
        assert any(
            not torch.equal(v, torch.zeros_like(v)) for k, v in after.items() if ".lora_B." in k
        )  # adapters moved
    finally:
        trainer.close()
    # the SAE hook reads the residual stream with the adapters on: D is 0 while they are zero (step 1), then not
    hist = [json.loads(line) for line in open(tmp_path / "fpo" / "metrics.jsonl")]
    assert hist[0]["d_chosen"] < 1e-7 and hist[1]["d_chosen"] > 100 * max(
        hist[0]["d_chosen"], 1e-9
    )  # step 1: fp16 rounding
    final = summary["final"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(final))
    assert not any(n.startswith("model") for n in os.listdir(final))  # no copy of the base
    reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(final)  # peft's own loader
    torch.testing.assert_close(_logits(reloaded, x), live, rtol=0, atol=1e-5)
    # what `fpo eval --model OUT/final` loads: transformers reads the adapter folder through peft
    torch.testing.assert_close(_logits(load_model(final), x), live, rtol=0, atol=1e-5)
    merged = load_model(os.path.join(os.path.dirname(final), "final-merged"))  # a plain model
    assert not any(".lora_" in k or "base_layer" in k for k in merged.state_dict())
    torch.testing.assert_close(_logits(merged, x), live, rtol=0, atol=1e-4)
    # the merge equals peft's own merge_and_unload of the same adapters
    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(final).merge_and_unload().state_dict()
    ours = merged.state_dict()
    assert set(theirs) <= set(ours) and all(torch.allclose(ours[k], theirs[k], atol=1e-6) for k in theirs)


def test_lora_tdpo_reference_is_the_base_model_without_a_second_model(tiny, tmp_path, monkeypatch):
    import fpo.runtime as runtime

    loads = []
    real = runtime.load_model_for_layout
    monkeypatch.setattr(runtime, "load_model_for_layout", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    trainer = Trainer(config_from_dict(_lora(tiny, None, tmp_path, "tdpo2", max_steps=2)), **QUIET)
    try:
        assert trainer.ref_model is None and loads == [tiny["model"]]  # one model loaded
        trainer.fit()  # the adapters have moved
        items = trainer.micro_batches(0)[0]
        batch = collate(items, trainer.cfg.packing, trainer.tokenizer.pad_token_id, trainer.row_scale)
        with torch.no_grad():
            stats = trainer.wrapped(batch, reference_without_adapters=True)
        base = load_model(tiny["model"])  # the reference, loaded apart
        with torch.no_grad():
            hidden = body_hidden(base, batch, "cpu")
            ref_sum, _, _ = sequence_logprobs(
                hidden,
                base.lm_head.weight,
                rows=batch.pred_rows,
                labels=batch.labels,
                seq_ids=batch.seq_ids,
                num_seqs=batch.num_seqs,
            )
        torch.testing.assert_close(stats.ref_logp_sum, ref_sum, rtol=1e-5, atol=1e-4)
        assert not torch.allclose(stats.logp_sum, ref_sum, atol=1e-3)  # the policy is not the base
        assert (stats.kl > 0).all()
    finally:
        trainer.close()


def test_lora_tdpo_first_step_equals_full_tdpo_with_a_reference_model(tiny, tmp_path):
    """At step 1 the adapters are zero (peft's B = 0), so the policy is the base: LoRA TDPO's first loss is the
    full-fine-tuning run's with its reference loaded as a second model."""
    a = train(_lora(tiny, None, tmp_path, "tdpo2", max_steps=1, output_dir=str(tmp_path / "lora")), **QUIET)
    b = train(_cfg(tiny, None, tmp_path, "tdpo2", max_steps=1, output_dir=str(tmp_path / "full")), **QUIET)
    assert a["last"]["loss"] == pytest.approx(b["last"]["loss"], rel=1e-5)
    assert a["last"]["kl_chosen"] == pytest.approx(0, abs=1e-6)


def test_lora_resume_reproduces_the_uninterrupted_run(tiny, cache, tmp_path):
    full = train(_lora(tiny, cache, tmp_path, max_steps=4, save_every=2, output_dir=str(tmp_path / "full")), **QUIET)
    train(_lora(tiny, cache, tmp_path, max_steps=2, save_every=2, output_dir=str(tmp_path / "part")), **QUIET)
    part = train(
        _lora(tiny, cache, tmp_path, max_steps=4, save_every=2, output_dir=str(tmp_path / "part"), resume="latest"),
        **QUIET,
    )
    a = [json.loads(line)["loss"] for line in open(tmp_path / "full" / "metrics.jsonl")]
    b = [json.loads(line)["loss"] for line in open(tmp_path / "part" / "metrics.jsonl")]
    assert a == b and len(a) == 4
    from safetensors.torch import load_file

    wa, wb = (load_file(os.path.join(s["final"], "adapter_model.safetensors")) for s in (full, part))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # a full-fine-tuning resume of a LoRA checkpoint is refused by name
    with pytest.raises(ValueError, match="lora_r"):
        train(
            _cfg(tiny, cache, tmp_path, lr=1e-2, max_steps=6, output_dir=str(tmp_path / "part"), resume="latest"),
            **QUIET,
        )


@pytest.mark.dist
@pytest.mark.parametrize("fsdp,method", [(False, "fpo"), (True, "tdpo2")])
def test_lora_two_ranks_equal_one_rank_with_twice_the_batch(tiny, cache, tmp_path, fsdp, method):
    """DDP, and FSDP2 with TDPO's reference (the adapters off) run inside the sharded forward."""
    one = _lora(tiny, cache, tmp_path, method, max_steps=2, micro_batch_size=4, output_dir=str(tmp_path / "one"))
    train(one, **QUIET)
    two = dict(one, micro_batch_size=2, output_dir=str(tmp_path / "two"), fsdp=fsdp)
    r = _torchrun(two, port=29661 + fsdp)
    assert r.returncode == 0, r.stderr[-4000:]
    a = [json.loads(line)["loss"] for line in open(tmp_path / "one" / "metrics.jsonl")]
    b = [json.loads(line)["loss"] for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    from safetensors.torch import load_file

    wa, wb = (load_file(str(tmp_path / d / "final" / "adapter_model.safetensors")) for d in ("one", "two"))
    assert wa.keys() == wb.keys()
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


def test_lora_bad_settings_are_refused_by_name(tiny, cache, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="merge_lora is set but lora_r is not"):
        config_from_dict(_cfg(tiny, cache, tmp_path, merge_lora=True))
    with pytest.raises(ValueError, match="applies to the merged model"):
        config_from_dict(_cfg(tiny, cache, tmp_path, lora_r=4, save_dtype="bfloat16"))
    with pytest.raises(ValueError, match="lora_r must be >= 1"):
        config_from_dict(_cfg(tiny, cache, tmp_path, lora_r=0))
    with pytest.raises(ValueError, match="lora_target_modules"):
        train(_lora(tiny, cache, tmp_path, lora_target_modules="no_such_proj"), **QUIET)
    with pytest.raises(ValueError, match="adapter on the lm head"):
        train(_lora(tiny, cache, tmp_path, lora_target_modules=["q_proj", "lm_head"]), **QUIET)
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ValueError, match=r"fpo-kernels\[lora\]"):
        train(_lora(tiny, cache, tmp_path, output_dir=str(tmp_path / "nopeft")), **QUIET)


def test_cli_lora_flags(tiny):
    from fpo.cli import _load_train_config, build_parser

    args = build_parser().parse_args(
        [
            "train",
            "--method",
            "simpo",
            "--model",
            tiny["model"],
            "--dataset",
            tiny["pairs"],
            "--lora-r",
            "8",
            "--lora-alpha",
            "32",
            "--lora-dropout",
            "0.1",
            "--lora-target-modules",
            "q_proj",
            "--lora-target-modules",
            "v_proj",
            "--merge-lora",
        ]
    )
    cfg = _load_train_config(args)
    assert (cfg.lora_r, cfg.lora_alpha_value, cfg.lora_dropout, cfg.lora_target_modules, cfg.merge_lora) == (
        8,
        32.0,
        0.1,
        ["q_proj", "v_proj"],
        True,
    )
    assert config_from_dict(dict(method="simpo", model="m", dataset="d", lora_r=4)).lora_alpha_value == 8.0


def test_lora_with_gradient_checkpointing_gives_the_same_losses(tiny, tmp_path):
    """Non-reentrant recompute needs no input that requires grad: the frozen embeddings are fine."""
    runs = [
        train(
            _lora(tiny, None, tmp_path, "tdpo2", gradient_checkpointing=gc, output_dir=str(tmp_path / str(gc))), **QUIET
        )
        for gc in (False, True)
    ]
    a, b = ([json.loads(line)["loss"] for line in open(tmp_path / str(gc) / "metrics.jsonl")] for gc in (False, True))
    assert a == pytest.approx(b, rel=1e-6) and len(a) == 2 and runs[1]["last"]["kl_chosen"] > 0


def test_lora_on_the_embeddings_is_saved_resumed_and_merged(tiny, tmp_path):
    """Adapters on embed_tokens (an untied model): saved with the others in peft's names (they were dropped, so a
    resume re-initialised them and --merge-lora failed with a KeyError), reloaded on resume, merged as peft
    merges them; a tied model refuses them with a sentence."""
    import tiny as t

    untied = t.make_model(str(tmp_path / "untied"), tie=False)
    cfg = dict(
        _cfg(tiny, None, tmp_path, "simpo", output_dir=str(tmp_path / "run")),
        model=untied,
        lora_r=4,
        lr=1e-2,
        lora_target_modules=["embed_tokens", "q_proj"],
        merge_lora=True,
    )
    trainer = Trainer(config_from_dict(cfg), **QUIET)
    try:
        summary = trainer.fit()
        x = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
        live = _logits(trainer.model, x)
        trained = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_embedding" in k}
    finally:
        trainer.close()
    assert trained and all(v.abs().sum() > 0 for v in trained.values())
    from safetensors import safe_open

    with safe_open(os.path.join(summary["final"], "adapter_model.safetensors"), "pt") as f:
        saved = set(f.keys())
    assert {k for k in saved if "lora_embedding" in k} == {
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "base_model.model.model.embed_tokens.lora_embedding_B",
    }
    reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(summary["final"])  # peft's own loader
    torch.testing.assert_close(_logits(reloaded, x), live, rtol=0, atol=1e-5)
    merged = load_model(os.path.join(tmp_path, "run", "final-merged"))
    torch.testing.assert_close(_logits(merged, x), live, rtol=0, atol=1e-4)
    resumed = Trainer(config_from_dict(dict(cfg, resume=summary["final"])), **QUIET)
    try:
        state = resumed.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in trained.items())
    finally:
        resumed.close()
    with pytest.raises(ValueError, match="ties to its lm head"):
        Trainer(config_from_dict(dict(cfg, model=tiny["model"], output_dir=str(tmp_path / "tied"))), **QUIET)


def test_one_target_module_given_once_is_a_list_of_one(tiny):
    """peft reads a string as a regular expression over whole module paths: `--lora-target-modules q_proj` given
    once must put adapters on every q_proj, as the flag given twice does."""
    from fpo.lora import add_adapters

    model = load_model(tiny["model"])
    peft_model = add_adapters(model, 4, 8.0, 0.0, "q_proj", torch.float32)
    names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert names and all("q_proj.lora_" in n for n in names)


def test_lora_resume_on_a_changed_base_is_refused(tiny, cache, tmp_path):
    """The adapters of a LoRA run are only meaningful on the base they were trained on: a base model replaced in
    place between a checkpoint and its resume is refused by content, not resumed silently."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny["model"], base)
    cfg = dict(_lora(tiny, cache, tmp_path / "run", method="simpo"), model=str(base), cache=None, save_every=1)
    train(cfg, **QUIET)
    shutil.rmtree(base)
    shutil.copytree(tiny["model_b"], base)
    with pytest.raises(ValueError, match="the base model's weights"):
        train(dict(cfg, resume="latest", max_steps=3), **QUIET)
