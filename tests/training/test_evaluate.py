"""`fpo eval`'s metrics against a plain computation on the tiny models: every sequence alone through the
model with its full logits (no packing, no fused op), the reference's log-probs and features from the
reference model itself (not the cache), the SAE features encoded from hidden_states by hand."""

import pytest
import tiny as t
import torch

from fpo.evaluate import evaluate
from fpo.model import load_model, load_tokenizer
from fpo.pairs import load_pairs, tokenize_pairs
from fpo.precompute import precompute
from fpo_kernels import SAEWeights
from fpo_kernels.reference import pack_topk_ref, sae_pooled_features_ref

LEN = dict(max_length=96, max_prompt_length=48)
PAIRS, K, k = 6, 32, 8


def _plain(model, items, sae):
    """Per sequence (chosen of every pair, then rejected): the mean log-prob of its response tokens, the
    full log-softmax at the positions that predict them, and the SAE's pooled features over them."""
    means, logps, pooled = [], [], []
    for side in ("chosen_ids", "rejected_ids"):
        for it in items:
            ids = torch.tensor([it.prompt_ids + getattr(it, side)])
            n_prompt = len(it.prompt_ids)
            with torch.no_grad():
                out = model(ids, output_hidden_states=True)
            logp = torch.log_softmax(out.logits[0, n_prompt - 1 : -1].double(), -1)  # predicts the response
            means.append(logp.gather(1, ids[0, n_prompt:, None]).mean())
            logps.append(logp)
            mask = torch.zeros(ids.shape, dtype=torch.bool)
            mask[0, n_prompt:] = True  # the response's own rows
            h = out.hidden_states[t.SAE_LAYER + 1]  # after block SAE_LAYER
            pooled.append(sae_pooled_features_ref(h.double(), mask, sae)[0])
    return torch.stack(means), logps, torch.stack(pooled)


@pytest.mark.parametrize(
    "packing,precision", [("off", "fp32"), ("share-prompt", "fp32"), ("share-prompt", "bf16-mixed")]
)
def test_eval_metrics_match_a_plain_computation(tiny, tmp_path, packing, precision):
    """bf16-mixed: the models in bf16 under CPU bf16 autocast, as a GPU eval runs, against the fp64 computation."""
    rel = 1e-4 if precision == "fp32" else 2e-2
    cache = str(tmp_path / "cache")
    precompute(tiny["model"], tiny["pairs"], cache, sae=tiny["sae"], cache_k=K, max_pairs=PAIRS, progress=False, **LEN)
    got = evaluate(
        tiny["model_b"],
        tiny["pairs"],
        cache=cache,
        sae=tiny["sae"],
        reference_model=tiny["model"],
        k=k,
        max_pairs=PAIRS,
        packing=packing,
        micro_batch_size=4,
        precision=precision,
        **LEN,
    )

    tok = load_tokenizer(tiny["model"])
    items = tokenize_pairs(load_pairs(tiny["pairs"], PAIRS), tok, LEN["max_length"], LEN["max_prompt_length"])
    sae = SAEWeights.from_file(tiny["sae"])
    policy, reference = load_model(tiny["model_b"]), load_model(tiny["model"])
    mean, logp, pooled = _plain(policy, items, sae)
    ref_mean, ref_logp, ref_pooled = _plain(reference, items, sae)
    P = len(items)
    assert got["pairs"] == P == PAIRS
    assert got["accuracy_logp"] == pytest.approx((mean[:P] > mean[P:]).double().mean().item())
    reward = mean - ref_mean
    assert got["accuracy_reward"] == pytest.approx((reward[:P] > reward[P:]).double().mean().item())
    kl = torch.stack([(q.exp() * (q - p)).sum() for p, q in zip(logp, ref_logp)])  # KL(ref || policy), summed
    assert got["kl"] == pytest.approx(kl.mean().item(), rel=rel)
    # D: the policy's top-k pooled features against the reference's top-K (absent ones count as 0)
    ref_idx, ref_val = pack_topk_ref(ref_pooled, K)
    ref_dense = torch.zeros_like(ref_pooled).scatter(1, ref_idx, ref_val.double())
    top = pooled.topk(k, dim=1).indices
    d = ((pooled.gather(1, top) - ref_dense.gather(1, top)) ** 2).mean(1)
    assert got["d"] > 0 and got["d"] == pytest.approx(d.mean().item(), rel=max(rel, 2e-3))
