"""Packed micro-batches: the layouts themselves, and exactness against the padded path on the demo model
(Llama) and a tiny Gemma-2 (attention softcap 50, a sliding window shorter than the sequences)."""

import pytest
import torch

from fpo import assets
from fpo.config import TrainConfig
from fpo.model import body_hidden, load_model, load_tokenizer
from fpo.packed_attention import attention_mask_for
from fpo.packing import (
    LAYOUTS,
    collate,
    micro_batch_tokens,
    pair_tokens,
    plan_micro_batches,
)
from fpo.pairs import load_pairs, tokenize_pairs
from fpo.sae import SAESpec
from fpo.step import PolicyStats, compute_loss
from fpo_kernels import SAEWeights, SequenceStats, pack_topk, sae_pooled_features


def _items(tok, n=3, max_length=64, max_prompt_length=32, max_tokens=None):
    return tokenize_pairs(load_pairs(assets.TRAIN_PAIRS, max_pairs=n), tok, max_length, max_prompt_length, max_tokens)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(assets.ensure_demo_model())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("scale", [None, 30.0])  # one stream; rows (attention dear enough to split)
def test_layout_rows_labels_and_spans(tok, layout, scale):
    """Each response's tokens sit at its span; each label is predicted by the row holding the token before it
    in the unshared sequence (for a shared prompt, the last prompt token predicts both first tokens)."""
    items = _items(tok, 4)
    b = collate(items, layout, tok.pad_token_id, scale)
    flat = b.input_ids.reshape(-1)
    P = len(items)
    for p, it in enumerate(items):
        for side, resp in ((0, it.chosen_ids), (1, it.rejected_ids)):
            s = side * P + p
            a, e = b.spans[s].tolist()
            assert flat[a:e].tolist() == list(resp)
            mine = b.seq_ids == s
            assert b.labels[mine].tolist() == list(resp)
            before = flat[b.pred_rows[mine]].tolist()
            assert before == [it.prompt_ids[-1]] + list(resp[:-1])
            if b.position_ids is not None:  # positions continue from the prompt's end, as unshared
                pos = b.position_ids.reshape(-1)
                assert pos[a:e].tolist() == list(range(len(it.prompt_ids), len(it.prompt_ids) + len(resp)))
    assert b.tokens == micro_batch_tokens(items, layout, scale) == b.input_ids.numel()
    assert b.response_tokens == sum(len(it.chosen_ids) + len(it.rejected_ids) for it in items)
    if layout != "off" and scale is None:
        assert b.input_ids.shape[0] == 1 and b.tokens == sum(pair_tokens(it, layout) for it in items)
    if layout != "off" and scale is not None:
        assert b.input_ids.shape[0] > 1


def test_rows_cost_no_more_than_a_stream_or_one_unit_per_row():
    from fpo.packing import _place

    g = torch.Generator().manual_seed(0)
    for scale in (50.0, 500.0, 5000.0):
        for _ in range(20):
            lengths = (torch.randint(5, 400, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g)).tolist()
            rows = _place(lengths, scale)
            assert sorted(i for r in rows for i in r) == list(range(len(lengths)))

            def cost(rows, lengths=lengths, scale=scale):
                L = max(sum(lengths[i] for i in r) for r in rows)
                return len(rows) * (L + L * L / scale)

            assert cost(rows) <= min(cost([list(range(len(lengths)))]), cost([[i] for i in range(len(lengths))]))
    assert _place([10, 20, 30], None) == [[0, 1, 2]]


def test_share_prompt_mask_by_hand():
    """One pair [p p c c r]: rejected sees the prompt and itself, never chosen; nothing crosses pairs."""
    from fpo.packed_attention import _visible

    seg = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1])
    br = torch.tensor([0, 0, 1, 1, 2, 0, 1, 2])
    pos = torch.tensor([0, 1, 2, 3, 2, 0, 1, 1])
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0, 0, 0],
            [1, 1, 1, 1, 0, 0, 0, 0],
            [1, 1, 0, 0, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 1, 0, 0],
            [0, 0, 0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(_visible(seg[None], br[None], pos[None], None)[0], want)
    # a window of 2 positions: the rejected token at position 2 no longer sees position 0
    windowed = want.clone()
    windowed[2, 0] = windowed[3, 0] = windowed[3, 1] = windowed[4, 0] = False
    assert torch.equal(_visible(seg[None], br[None], pos[None], 2)[0], windowed)


def test_plan_is_deterministic_and_respects_the_budget(tok):
    items = _items(tok, 12, max_length=96, max_prompt_length=48, max_tokens=256)
    for layout in LAYOUTS:
        plan = plan_micro_batches(items, layout, 256)
        assert plan == plan_micro_batches(items, layout, 256)
        assert sorted(it.id for mb in plan for it in mb) == sorted(it.id for it in items)
        assert all(micro_batch_tokens(mb, layout) <= 256 for mb in plan)
        order = {it.id: i for i, it in enumerate(items)}
        assert all([order[it.id] for it in mb] == sorted(order[it.id] for it in mb) for mb in plan)


def test_pairs_longer_than_the_budget_are_truncated_and_reported(tok):
    said = []
    pairs = load_pairs(assets.TRAIN_PAIRS, max_pairs=6)
    full = tokenize_pairs(pairs, tok, 200, 40)
    cut = tokenize_pairs(pairs, tok, 200, 40, max_tokens=120, log=said.append)
    assert len(cut) == len(full)  # never dropped
    long = [a.id for a in full if len(a.prompt_ids) + max(len(a.chosen_ids), len(a.rejected_ids)) > 60]
    assert long and str(len(long)) in said[0] and "truncated" in said[0]
    for a, b in zip(full, cut):
        assert b.prompt_ids == a.prompt_ids  # the prompt keeps its tokens
        assert b.chosen_ids == a.chosen_ids[: 60 - len(a.prompt_ids)]  # responses keep their first tokens
        assert max(pair_tokens(b, layout) for layout in LAYOUTS) <= 120
    with pytest.raises(ValueError, match="max_tokens"):
        tokenize_pairs(pairs, tok, 200, 40, max_tokens=80)


def test_attention_that_cannot_take_the_mask_is_refused(tok):
    model = load_model(assets.ensure_demo_model())
    b = collate(_items(tok, 1), "share-prompt", tok.pad_token_id)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="flash_attention_2"):
        body_hidden(model, b, "cpu")
    with pytest.raises(ValueError, match="packing must be"):
        collate(_items(tok, 1), "padded", tok.pad_token_id)


# ---- exactness against the padded layout ----------------------------------------------------------
def _gemma2(tmp_path):
    import tiny as t

    return t.make_model(str(tmp_path / "gemma2"), softcap=30.0, sliding_window=8)


def _all_method_stats(model_dir, ref_dir, sae, layer, layout, items, pad_id, ref_idx, ref_val):
    """Every method's per-sequence statistics, losses and the gradients of a few parameters, in one layout."""
    torch.manual_seed(0)
    policy = load_model(model_dir)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # the policy moved off the reference: non-zero KL and margins
    ref_model = load_model(ref_dir).eval()
    batch = collate(items, layout, pad_id)
    with torch.no_grad():
        ref_hidden = body_hidden(ref_model, batch, "cpu")
    ps = PolicyStats(policy, saes=[SAESpec(sae, layer, 1.0, "sae")], k=8, select="policy")
    stats = ps(
        batch, ref_features=[(ref_idx, ref_val)], ref_hidden=ref_hidden, ref_weight=ref_model.lm_head.weight.detach()
    )
    ps.remove_hooks()
    cache = SequenceStats(logp_sum=stats.ref_logp_sum.detach(), logp_mean=(stats.ref_logp_sum / stats.length).detach())
    named = dict(policy.named_parameters())
    watch = [
        n
        for n in named
        if n.endswith(
            ("layers.0.self_attn.q_proj.weight", "layers.1.mlp.down_proj.weight", "norm.weight", "embed_tokens.weight")
        )
    ]
    out = {"stats": {k: v.detach() for k, v in stats.as_dict().items()}, "loss": {}, "grad": {}}
    for method in ("fpo", "dpo", "simpo", "tdpo1", "tdpo2"):
        cfg = TrainConfig(
            method=method, model="m", dataset="d", cache="c", sae="s", alpha=50.0 if method == "fpo" else 0.5
        )
        losses, _ = compute_loss(cfg.loss_settings, stats, cache)
        grads = torch.autograd.grad(losses.mean(), [named[n] for n in watch], retain_graph=True)
        out["loss"][method] = losses.detach()
        out["grad"][method] = dict(zip(watch, grads))
    return out


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["demo", "gemma2"])
def test_packed_layouts_equal_the_padded_layout(model, tok, tiny, tmp_path):
    """Per-sequence summed and mean log-probs, D, KL and every method's loss to 1e-5 relative in fp32, and the
    gradients of a few parameter tensors to 1e-4, for both packed layouts."""
    if model == "demo":
        model_dir, sae, layer = assets.ensure_demo_model(), SAEWeights.from_file(assets.DEMO_SAE), 15
        ref_dir = model_dir
    else:
        import tiny as t

        model_dir, sae, layer = _gemma2(tmp_path), SAEWeights.from_file(tiny["sae"]), t.SAE_LAYER
        ref_dir = model_dir
        assert load_model(model_dir).config._attn_implementation == "eager"  # Gemma-2's softcap needs eager here
    items = _items(tok, 3, max_length=48, max_prompt_length=24)
    assert max(len(it.prompt_ids) + len(it.chosen_ids) for it in items) > 8  # longer than the sliding window
    g = torch.Generator().manual_seed(1)
    ref_idx, ref_val = pack_topk(
        torch.rand(6, sae.width, generator=g) * (torch.rand(6, sae.width, generator=g) < 0.2), 32
    )
    runs = {
        lay: _all_method_stats(model_dir, ref_dir, sae, layer, lay, items, tok.pad_token_id, ref_idx, ref_val)
        for lay in LAYOUTS
    }
    want = runs["off"]
    assert want["stats"]["kl"].abs().min() > 0 and want["stats"]["d"].abs().min() > 0
    for lay in ("pack", "share-prompt"):
        got = runs[lay]
        for k in ("logp_sum", "logp_mean", "len", "ref_logp_sum", "kl", "d"):
            assert _rel(got["stats"][k], want["stats"][k]) < 1e-5, (lay, k)
        for method in want["loss"]:
            assert _rel(got["loss"][method], want["loss"][method]) < 1e-5, (lay, method)
            for n, gw in want["grad"][method].items():
                assert _rel(got["grad"][method][n], gw) < 1e-4, (lay, method, n)


@pytest.mark.slow
def test_flex_attention_block_mask_equals_dense_mask(tok, tiny, monkeypatch):
    """The FlexAttention path (a BlockMask; what CUDA runs by default) gives the dense mask's hidden states,
    on both packed layouts. What is checked is our BlockMask, so flex_attention runs eagerly (torch's own
    reference, which applies the mask_mod as written) rather than through transformers' torch.compile:
    inductor's CPU kernel for it returns NaN rows on AVX2-only CPUs with torch 2.13. Forward only: torch
    has no CPU backward for FlexAttention (the GPU test run covers the compiled kernel and training)."""
    flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")
    import transformers.integrations.flex_attention as hf_flex

    monkeypatch.setattr(hf_flex.WrappedFlexAttention, "__call__", lambda self: flex_mod.flex_attention)
    items = _items(tok, 2, max_length=40, max_prompt_length=20)
    sdpa = load_model(tiny["model"], attn_implementation="sdpa")
    flex = load_model(tiny["model"], attn_implementation="flex_attention")
    for layout in ("pack", "share-prompt"):
        for scale in (None, 30.0):  # one stream, and rows
            b = collate(items, layout, tok.pad_token_id, scale)
            with torch.no_grad():
                assert _rel(body_hidden(flex, b, "cpu"), body_hidden(sdpa, b, "cpu")) < 1e-5, (layout, scale)


def test_precompute_packed_equals_padded(tiny, tmp_path):
    """The cache written from packed micro-batches equals the padded one's up to the values' rounding, in
    dataset order, with a token budget too."""
    from fpo.precompute import precompute
    from fpo.reference_cache import ReferenceCache

    caches = {}
    for name, kw in (
        ("off", dict(packing="off")),
        ("share", dict(packing="share-prompt")),
        ("budget", dict(packing="pack", max_tokens=300)),
    ):
        out = str(tmp_path / name)
        precompute(
            tiny["model"],
            tiny["pairs"],
            out,
            sae=tiny["sae"],
            cache_k=32,
            max_length=64,
            max_prompt_length=32,
            shard_rows=7,
            micro_batch_size=3,
            progress=False,
            **kw,
        )
        caches[name] = ReferenceCache(out).data
    want = caches["off"]
    for name in ("share", "budget"):
        got = caches[name]
        assert torch.equal(got["ids"], want["ids"]) and torch.equal(got["row_hash"], want["row_hash"])
        for k in want:
            if k.endswith(("logp_sum", "logp_mean", "len")):
                assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-5), (name, k)
            elif k.endswith("_idx"):
                assert torch.equal(got[k], want[k]), (name, k)
            elif k.endswith("_val"):
                assert torch.allclose(got[k].float(), want[k].float(), rtol=2e-3, atol=1e-6), (name, k)


def test_varlen_pooling_of_a_packed_stream_equals_padded(tok, tiny):
    """The residual stream of a shared-prompt micro-batch, pooled over its spans, equals the padded one."""
    from fpo.model import ActivationCapture

    model = load_model(tiny["model"])
    sae = SAEWeights.from_file(tiny["sae"])
    items = _items(tok, 3)
    pooled = []
    for layout in ("off", "share-prompt"):
        b = collate(items, layout, tok.pad_token_id)
        cap = ActivationCapture(model, 2)
        with torch.no_grad():
            body_hidden(model, b, "cpu")
        resid = cap.pop()
        cap.remove()
        pooled.append(sae_pooled_features(resid.reshape(-1, resid.shape[-1]), sae, spans=b.spans))
    assert torch.allclose(pooled[0], pooled[1], rtol=1e-5, atol=1e-6)


def test_attention_mask_kinds_for_gemma2(tok, tmp_path):
    """A model mixing full and sliding-window layers gets one mask per layer kind."""
    model = load_model(_gemma2(tmp_path))
    b = collate(_items(tok, 1), "share-prompt", tok.pad_token_id)
    masks = attention_mask_for(model, b.segment, b.branch, b.position_ids)
    assert set(masks) == {"full_attention", "sliding_attention"}
    assert masks["full_attention"].dtype == torch.float32  # eager: additive
    assert (masks["sliding_attention"] < 0).sum() > (masks["full_attention"] < 0).sum()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flex_attention_trains_like_the_dense_mask_on_gpu(dtype):
    """On CUDA the packed layouts default to FlexAttention: its hidden states and gradients (torch has no CPU
    backward for it) equal the dense-mask sdpa path on a random Llama and synthetic pairs (no downloads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fpo.pairs import TokenizedPair

    g = torch.Generator().manual_seed(0)

    def ids(n):
        return tuple(torch.randint(5, 1000, (n,), generator=g).tolist())

    items = [
        TokenizedPair(i, ids(lp), ids(lc), ids(lr), i)
        for i, (lp, lc, lr) in enumerate([(40, 90, 33), (7, 150, 200), (120, 5, 61)])
    ]
    cfg = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        max_position_embeddings=512,
    )
    outs = {}
    for impl in ("sdpa", "flex_attention"):
        torch.manual_seed(0)
        cfg._attn_implementation = impl
        model = LlamaForCausalLM(cfg).to("cuda", dtype)
        for layout in ("pack", "share-prompt"):
            b = collate(items, layout, 0, None)
            h = body_hidden(model, b, "cuda")
            h.float().pow(2).mean().backward()
            outs[impl, layout] = (
                h.detach().float(),
                model.model.layers[0].self_attn.q_proj.weight.grad.float().clone(),
            )
            model.zero_grad()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for layout in ("pack", "share-prompt"):
        (h_d, g_d), (h_f, g_f) = outs["sdpa", layout], outs["flex_attention", layout]
        assert _rel(h_f, h_d) < tol and _rel(g_f, g_d) < tol, layout
