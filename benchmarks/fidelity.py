"""Fidelity of the offline top-K cache: the FPO constraint D computed from the cache (top-K reference
features, values in bf16) against D computed with the reference online and dense (every feature, fp32),
on the real demo model (SmolLM2-135M-Instruct) and SAE, for K in 32..1024 and both select modes.

The policy is the reference with its weights perturbed (relative noise sigma), so that D > 0.
Reported: median and max over responses of |D_cache - D_dense| / D_dense, with k = 50.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import environment, write_results
from fpo import assets
from fpo.model import ActivationCapture, load_model, load_tokenizer, run_body
from fpo.packing import collate
from fpo.pairs import load_pairs, tokenize_pairs
from fpo_kernels import SAEWeights, pack_topk, sae_feature_mse, sae_pooled_features
from fpo_kernels.cache import VALUE_DTYPES


@torch.no_grad()
def pooled_features(model, batches, sae, layer):
    cap = ActivationCapture(model, layer)
    out = []
    for batch in batches:
        run_body(model, batch.input_ids, batch.attention_mask)
        out.append(sae_pooled_features(cap.pop(), sae, mask=batch.response_mask))
    cap.remove()
    return torch.cat(out)


def dense_constraint(p, p_ref, k, select):
    idx = (p if select == "policy" else p_ref).topk(k, dim=1).indices
    return ((p.gather(1, idx) - p_ref.gather(1, idx)) ** 2).mean(1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--sigma", type=float, default=0.02, help="relative weight noise of the policy")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    model_dir = assets.ensure_demo_model()
    tok = load_tokenizer(model_dir)
    ref = load_model(model_dir).eval()
    policy = load_model(model_dir).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(1 + args.sigma * torch.randn(p.shape, generator=g))
    sae = SAEWeights.from_file(assets.DEMO_SAE)
    items = tokenize_pairs(load_pairs(assets.EVAL_PAIRS, args.pairs), tok, args.max_length, args.max_length // 2)
    batches = [collate(items[i : i + 4], "off", tok.pad_token_id) for i in range(0, len(items), 4)]
    p_ref = pooled_features(ref, batches, sae, 15)
    p_pol = pooled_features(policy, batches, sae, 15)
    cap = ActivationCapture(policy, 15)
    resid = []
    with torch.no_grad():
        for batch in batches:
            run_body(policy, batch.input_ids, batch.attention_mask)
            resid.append(cap.pop())
    cap.remove()
    active = (p_ref > 0).sum(1).float()
    rows = []
    for select in ("policy", "reference"):
        dense = dense_constraint(p_pol.double(), p_ref.double(), args.k, select)
        for vdt in VALUE_DTYPES:
            for K in (32, 64, 128, 256, 512, 1024):
                if select == "reference" and K < args.k:
                    continue
                idx, val = pack_topk(p_ref, K, VALUE_DTYPES[vdt])
                got, off = [], 0
                for batch, r in zip(batches, resid):
                    n = r.shape[0]
                    got.append(
                        sae_feature_mse(
                            r,
                            sae,
                            idx[off : off + n],
                            val[off : off + n],
                            mask=batch.response_mask,
                            k=args.k,
                            select=select,
                        )
                    )
                    off += n
                rel = (torch.cat(got).double() - dense).abs() / dense.clamp(min=1e-30)
                rows.append(
                    {
                        "select": select,
                        "values": vdt,
                        "K": K,
                        "bytes_per_response": K * (2 + val.element_size()),
                        "rel_err_median": float(rel.median()),
                        "rel_err_max": float(rel.max()),
                        "mean_D_dense": float(dense.mean()),
                    }
                )
    notes = (
        f"{len(items)} held-out pairs ({2 * len(items)} responses), max_length {args.max_length}, k = {args.k}, "
        f"policy = reference with {args.sigma} relative weight noise; active reference features per response: "
        f"median {int(active.median())}, max {int(active.max())} of {sae.width}."
    )
    write_results("fidelity", rows, environment(), args.out, notes)
    return rows


if __name__ == "__main__":
    main()
