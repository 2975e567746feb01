"""FPO and TDPO inside TRL's DPOTrainer: a few steps on the demo model, then TRL's loss on a batch against our own
loss code on the same tokens, TRL's precomputed reference column against our fused log-probs, and the version
pin. Skipped, with the reason, where TRL is not installed (CI installs it)."""

import json

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'fpo-kernels[trl]')")

from fpo import assets  # noqa: E402
from fpo.model import load_model, load_tokenizer  # noqa: E402
from fpo.packing import from_padded  # noqa: E402
from fpo.sae import SAESpec
from fpo.step import PolicyStats  # noqa: E402
from fpo_kernels import SAEWeights  # noqa: E402
from fpo_kernels.losses import fpo_loss  # noqa: E402


def _pairs():
    from datasets import Dataset

    rows = [r for r in map(json.loads, open(assets.TRAIN_PAIRS)) if len(r["prompt"]) < 150][:2]  # prompts that fit
    return Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])


def _config(tmp_path, **kw):
    return trl.DPOConfig(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        max_length=128,
        save_strategy="no",
        seed=0,
        use_cpu=True,
        bf16=False,
        beta=0.1,
        disable_tqdm=True,
        **kw,
    )


@pytest.mark.slow
def test_fpo_in_trl_equals_our_loss(tmp_path):
    """TRL's precomputed reference column equals our fused log-probs; after two steps, TRL's loss on a batch
    with the trained weights equals our own loss code on the same tokens."""
    from fpo.integrations.trl import FPOTrainer

    model_dir = assets.ensure_demo_model()
    sae = SAEWeights.from_file(assets.DEMO_SAE)
    trainer = FPOTrainer(
        load_model(model_dir),
        args=_config(tmp_path, precompute_ref_log_probs=True, label_smoothing=0.1),
        train_dataset=_pairs(),
        eval_dataset=_pairs(),
        processing_class=load_tokenizer(model_dir),
        sae=sae,
        sae_layer=15,
        alpha=200.0,
        k=16,
        cache_k=64,
    )
    assert len(trainer.train_dataset) == 2 and "ref_chosen_idx" in trainer.eval_dataset.column_names
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    b = from_padded(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    ref_idx = torch.cat([batch["ref_chosen_idx"], batch["ref_rejected_idx"]])
    ref_val = torch.cat([batch["ref_chosen_val"], batch["ref_rejected_val"]])
    ref_sum = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).float()

    def ours(model):
        stats = PolicyStats(model, saes=[SAESpec(sae, 15, 1.0, "sae")], k=16)
        with torch.no_grad():
            s = stats(b, ref_features=[(ref_idx, ref_val)])
        stats.remove_hooks()
        ref_mean = ref_sum / s.length
        loss, _ = fpo_loss(
            s.logp_mean[:2],
            s.logp_mean[2:],
            ref_mean[:2],
            ref_mean[2:],
            s.d[:2],
            s.d[2:],
            0.1,
            200.0,
            label_smoothing=0.1,
        )
        return s, loss.mean()

    start, start_loss = ours(load_model(model_dir))
    assert torch.allclose(start.logp_sum, ref_sum, rtol=1e-5, atol=1e-4)  # TRL's reference column is ours
    before = trainer.evaluate()  # eval at init works
    assert before["eval_loss"] == pytest.approx(start_loss.item(), rel=1e-5) and "eval_fpo/d_chosen" in before
    held_out = trainer.evaluate(eval_dataset=_pairs(), metric_key_prefix="held")  # a new dataset: features made
    assert held_out["held_loss"] == pytest.approx(before["eval_loss"], rel=1e-5)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and {
        "fpo/d_chosen",
        "rewards/accuracies",
        "entropy",
        "logits/chosen",
        "mean_token_accuracy",
        "num_tokens",
        "fpo/mean_logps/chosen",
    } <= set(logs[0])
    # TRL's names keep TRL's meanings: logps/* are summed log-probs (the first step's batch is both pairs)
    assert logs[0]["logps/chosen"] == pytest.approx(start.logp_sum[:2].mean().item(), rel=1e-4)
    assert logs[0]["fpo/mean_logps/chosen"] == pytest.approx(start.logp_mean[:2].mean().item(), rel=1e-4)
    with pytest.raises(ValueError, match="after training has started"):  # TRL's rule: the reference is gone
        trainer.evaluate(eval_dataset=_pairs())
    assert "fpo/constraint_share" in logs[1]  # step 1's margin is ~0: no ratio over it is logged there
    assert abs(logs[0]["rewards/margins"]) < 1e-4 < abs(logs[1]["rewards/margins"])  # starts at the reference
    _, want = ours(trainer.model)
    with torch.no_grad():
        got = trainer._compute_loss(trainer.model, batch, False)
    assert got.item() == pytest.approx(want.item(), rel=1e-5) and abs(want.item() - 0.6931) > 1e-3


def test_trl_version_pin_and_bad_arguments(monkeypatch, tmp_path):
    from fpo.integrations import trl as integration

    monkeypatch.setattr(trl, "__version__", "1.15.2")
    with pytest.raises(ImportError, match="trl >= 1.16"):
        integration.check_trl()
    monkeypatch.setattr(trl, "__version__", "1.16.0")
    assert integration.check_trl() is trl
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        integration.FPOTrainer(
            "m",
            args=trl.DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True),
            train_dataset=[],
            sae=SAEWeights.from_file(assets.DEMO_SAE),
            sae_layer=15,
        )
    with pytest.raises(ValueError, match="sae="):
        integration.FPOTrainer("m", args=None, train_dataset=[], sae=None, sae_layer=15)
    # DPOConfig's loss options that are not FPO's or TDPO's are refused by name, before any model work
    for kw, match in (
        (dict(loss_type=["hinge"]), "loss_type"),
        (dict(use_weighting=True), "use_weighting"),
        (dict(ld_alpha=0.5), "ld_alpha"),
        (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]), "loss_type"),
        (dict(f_divergence_type="js_divergence"), "f_divergence_type"),
    ):
        args = trl.DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, precompute_ref_log_probs=True, **kw)
        with pytest.raises(ValueError, match=f"does not support DPOConfig's {match}"):
            integration.FPOTrainer(
                "m", args=args, train_dataset=[], sae=SAEWeights.from_file(assets.DEMO_SAE), sae_layer=15
            )
        args.precompute_ref_log_probs = False
        with pytest.raises(ValueError, match=f"does not support DPOConfig's {match}"):
            integration.TDPOTrainer("m", args=args, train_dataset=[])


@pytest.mark.slow
@pytest.mark.parametrize("variant", [1, 2])
def test_tdpo_in_trl_equals_our_loss(variant, tmp_path):
    """After two steps, TRL's TDPO loss on a batch equals our own loss code (policy, online reference, KL)."""
    from fpo.integrations.trl import TDPOTrainer
    from fpo.model import body_hidden, lm_head
    from fpo_kernels.losses import tdpo_loss

    model_dir = assets.ensure_demo_model()
    trainer = TDPOTrainer(
        load_model(model_dir),
        ref_model=load_model(model_dir),
        args=_config(tmp_path),
        train_dataset=_pairs(),
        processing_class=load_tokenizer(model_dir),
        variant=variant,
        alpha=0.5,
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and abs(logs[0]["tdpo/kl_chosen"]) < 1e-4 < logs[1]["tdpo/kl_chosen"]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    b = from_padded(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    ref = load_model(model_dir)
    with torch.no_grad():
        s = PolicyStats(trainer.model)(b, ref_hidden=body_hidden(ref, b, "cpu"), ref_weight=lm_head(ref)[0])
        got = trainer._compute_loss(trainer.model, batch, False)
    want, _ = tdpo_loss(
        s.logp_sum[:2],
        s.logp_sum[2:],
        s.ref_logp_sum[:2],
        s.ref_logp_sum[2:],
        s.kl[:2],
        s.kl[2:],
        0.1,
        0.5,
        variant,
    )
    assert s.kl.min() > 0 and got.item() == pytest.approx(want.mean().item(), rel=1e-5)
