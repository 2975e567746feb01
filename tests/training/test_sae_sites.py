"""Each SAE is read where it was trained: the residual stream after its block (hook_resid_post), entering it
(hook_resid_pre: one block earlier, the embeddings for block 0), or what the block's MLP or attention adds to it
(hook_mlp_out, hook_attn_out); a site fpo cannot read is refused when the SAE is loaded."""

import json

import pytest
import tiny as t
import torch
from run_setup import LEN, QUIET

from fpo.model import ActivationCapture, load_model, load_tokenizer
from fpo.precompute import precompute
from fpo.reference_cache import ReferenceCache
from fpo.sae import hook_site, load_sae
from fpo_kernels import reference


@pytest.mark.parametrize(
    "name,want",
    [
        ("blocks.12.hook_resid_post", (12, "resid_post")),
        ("blocks.0.hook_resid_pre", (0, "resid_pre")),
        ("blocks.3.hook_mlp_out", (3, "mlp_out")),
        ("blocks.3.hook_attn_out", (3, "attn_out")),
        ("model.layers.15", (15, "resid_post")),
        ("model.layers.7.mlp", (7, "mlp_out")),
        ("model.layers.7.self_attn", (7, "attn_out")),
        ("layers.23", (23, "resid_post")),
        ("layers.23.mlp", (23, "mlp_out")),
        ("sae", (None, "resid_post")),
        (None, (None, "resid_post")),
    ],
)
def test_hook_names_give_block_and_site(name, want):
    assert hook_site(name) == want


@pytest.mark.parametrize("name", ["blocks.4.attn.hook_z", "blocks.4.hook_mlp_in", "blocks.4.hook_resid_mid"])
def test_sites_fpo_cannot_read_are_refused_by_name(name):
    with pytest.raises(ValueError, match="hook_resid_pre: its input"):
        hook_site(name)


def _points(model, ids, layer):
    caps = {s: ActivationCapture(model, layer, s) for s in ("resid_pre", "resid_post", "mlp_out", "attn_out")}
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
        return {s: c.pop() for s, c in caps.items()}, out.hidden_states
    finally:
        for c in caps.values():
            c.remove()


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("layer", [0, 2])
def test_each_site_holds_its_activation(tiny, tmp_path, arch, layer):
    """Against transformers' own hidden states: resid_pre of block L is hidden_states[L] (the embeddings, scaled
    as the model scales them, for L = 0), resid_post is hidden_states[L + 1]; and the block's output is its input
    plus what attention and MLP add (the normed branches, for Gemma-2)."""
    path = tiny["model"] if arch == "llama" else t.make_model(str(tmp_path / "g"), softcap=30.0, sliding_window=8)
    model = load_model(path)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    got, hidden = _points(model, ids, layer)
    torch.testing.assert_close(got["resid_pre"], hidden[layer])
    torch.testing.assert_close(got["resid_post"], hidden[layer + 1])
    torch.testing.assert_close(got["resid_pre"] + got["attn_out"] + got["mlp_out"], got["resid_post"])


def test_a_resid_pre_sae_is_cached_from_its_blocks_input(tiny, tmp_path):
    """An SAE trained on blocks.2.hook_resid_pre gets block 2's input (hidden_states[2]), not its output (read
    one block late before), and the cache records the site; training then reads the same point."""
    sae_dir = t.make_sae(str(tmp_path / "sae_pre"), hook_name="blocks.2.hook_resid_pre")
    out = str(tmp_path / "cache")
    precompute(tiny["model"], tiny["pairs"], out, sae=sae_dir, cache_k=16, max_pairs=4, progress=False, **LEN, **QUIET)
    cache = ReferenceCache(out)
    [entry] = cache.saes
    assert (entry["layer"], entry["site"]) == (2, "resid_pre")
    # by hand: the SAE on transformers' hidden_states[2] of each chosen response, pooled over its own tokens
    from fpo.packing import collate
    from fpo.pairs import load_pairs, tokenize_pairs

    tok, model = load_tokenizer(tiny["model"]), load_model(tiny["model"])
    items = tokenize_pairs(load_pairs(tiny["pairs"], max_pairs=4), tok, **LEN)
    batch = collate(items, "off", tok.pad_token_id)
    with torch.no_grad():
        h = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True)
    sae, _, _ = load_sae(sae_dir)
    pooled = reference.sae_pooled_features_ref(h.hidden_states[2].double(), batch.response_mask, sae)
    ref = cache.lookup(batch.ids)
    top = pooled[: len(items)].topk(16, dim=1)
    assert torch.equal(ref["chosen_idx"].long().sort(1).values, top.indices.sort(1).values)
    torch.testing.assert_close(ref["chosen_val"].double(), top.values, rtol=2e-3, atol=1e-3)  # stored in fp16
    # a run reads the SAE where the cache did: its D at step 0 is the policy-equals-reference D, ~0
    from fpo.train import train

    summary = train(
        dict(
            method="fpo",
            model=tiny["model"],
            dataset=tiny["pairs"],
            cache=out,
            sae=sae_dir,
            k=8,
            max_pairs=4,
            batch_size=2,
            micro_batch_size=2,
            max_steps=1,
            lr=1e-9,
            output_dir=str(tmp_path / "run"),
            progress=False,
            **LEN,
        ),
        **QUIET,
    )
    assert summary["last"]["d_chosen"] < 1e-6
    meta = json.loads(open(f"{out}/meta.json").read())
    assert meta["saes"][0]["site"] == "resid_pre"
