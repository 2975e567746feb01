"""A tiny Llama built from a config (random weights, the demo tokenizer), a random SAE on its layer 2 and a
slice of the shipped pairs: enough to run every code path in seconds."""

import json
import os
import shutil

import torch

from fpo import assets

D_MODEL, LAYERS, SAE_LAYER, SAE_WIDTH = 64, 4, 2, 200
TRAIN_PAIRS = assets.TRAIN_PAIRS


def make_model(out, seed=0, softcap=None, sliding_window=None, layers=LAYERS, bf16_grid=False, tie=True):
    """bf16_grid: weights rounded to bf16 (then saved in fp32), so that a bf16 load and an fp32 load start
    from the same values."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(assets.ensure_demo_model())
    common = dict(
        hidden_size=D_MODEL,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tok),
        tie_word_embeddings=tie,
        max_position_embeddings=256,
    )
    if softcap:  # a Gemma-2 body: final logit softcap, attention softcap 50, every other layer sliding-window
        extra = {} if sliding_window is None else {"sliding_window": sliding_window}
        model = Gemma2ForCausalLM(Gemma2Config(head_dim=16, final_logit_softcapping=softcap, **extra, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    if bf16_grid:
        model = model.to(torch.bfloat16).float()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def make_sae(out, width=SAE_WIDTH, seed=0, layer=SAE_LAYER, hook_name=None):
    """A random JumpReLU SAE in sae-lens' folder layout, read at hook_name (default: the output of `layer`)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    os.makedirs(out, exist_ok=True)
    save_file(
        {
            "W_enc": torch.randn(D_MODEL, width, generator=g) / 4,
            "b_enc": torch.randn(width, generator=g) * 0.1,
            "threshold": torch.rand(width, generator=g) * 0.2,
            "b_dec": torch.randn(D_MODEL, generator=g) * 0.1,
        },
        os.path.join(out, "sae_weights.safetensors"),
    )
    with open(os.path.join(out, "cfg.json"), "w") as f:
        json.dump(
            {
                "architecture": "jumprelu",
                "apply_b_dec_to_input": True,
                "hook_name": hook_name or f"model.layers.{layer}",
                "d_in": D_MODEL,
                "d_sae": width,
            },
            f,
        )
    return out


def make_pairs(out, n=16, src=TRAIN_PAIRS):
    with open(src) as f, open(out, "w") as g:
        for i, line in enumerate(f):
            if i >= n:
                break
            g.write(line)
    return out


def copy_tree(src, dst):
    shutil.copytree(src, dst)
    return dst
