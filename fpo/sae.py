"""Loading the SAE for training and precompute: a sae-lens directory or file (JumpReLU, standard, TopK,
BatchTopK, Matryoshka-BatchTopK), an EleutherAI sparsify directory, a Gemma Scope params.npz, or a sae-lens
release/id pair when a hub is reachable (sae-lens 6: SAE.from_pretrained returns the SAE). Returns the kernels'
SAEWeights and the decoder layer the SAE reads (from its hook name, e.g. model.layers.15 or
blocks.12.hook_resid_post, or a sparsify folder's name, layers.23)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fpo_kernels import SAEWeights

from ._types import Device, Model
from .model import decoder_layers

if TYPE_CHECKING:
    from .reference_cache import ReferenceCache

__all__ = ["load_sae", "load_saes", "hook_site", "SAESpec", "check_sae_fits", "cached_sae_keys"]

# the part of a hook name after its block, by the site it names: TransformerLens / sae-lens names
# (blocks.L.hook_resid_post), Hugging Face module paths (model.layers.L, model.layers.L.mlp) and sparsify's
# hookpoints (layers.L, layers.L.mlp)
_SITE_OF = {
    "": "resid_post",
    "hook_resid_post": "resid_post",
    "output": "resid_post",
    "hook_resid_pre": "resid_pre",
    "input": "resid_pre",
    "hook_mlp_out": "mlp_out",
    "mlp": "mlp_out",
    "feed_forward": "mlp_out",
    "hook_attn_out": "attn_out",
    "self_attn": "attn_out",
    "attn": "attn_out",
}


def hook_site(hook_name: str | None) -> tuple[int | None, str]:
    """(block, site) an SAE was trained on, from its hook name: blocks.12.hook_resid_pre -> (12, "resid_pre"),
    model.layers.15 -> (15, "resid_post"), layers.3.mlp -> (3, "mlp_out"). No hook name, or one without a block:
    (None, "resid_post"). A site fpo cannot read (an attention head's z, an MLP's hidden layer, the residual
    stream between attention and MLP) is a ValueError naming the sites it can."""
    m = re.search(r"(?:layers|blocks|h)\.(\d+)\.?(.*)$", hook_name or "")
    if not m:
        return None, "resid_post"
    rest = m.group(2)
    if rest not in _SITE_OF:
        raise ValueError(
            f"the SAE's hook {hook_name!r} reads {rest!r} of block {m.group(1)}: fpo reads an SAE at a block's "
            "residual stream (hook_resid_pre: its input; hook_resid_post: its output), or at what its MLP or "
            "attention adds to it (hook_mlp_out, hook_attn_out); pick an SAE trained at one of those"
        )
    return int(m.group(1)), _SITE_OF[rest]


def load_sae(spec: str, device: Device = "cpu") -> tuple[SAEWeights, int | None, str]:
    """spec: a path (sae-lens dir, .safetensors, params.npz) or 'release:sae_id' (sae-lens, needs a hub).
    Returns (SAEWeights, layer or None, site): where the SAE was trained, from its hook name."""
    spec = os.fspath(spec)
    if os.path.exists(spec):
        sae = SAEWeights.from_file(spec, device)
        layer, site = None, "resid_post"
        cfg = os.path.join(spec, "cfg.json") if os.path.isdir(spec) else None
        if cfg and os.path.exists(cfg):
            with open(cfg) as f:
                c = json.load(f)
            meta = c.get("metadata") if isinstance(c.get("metadata"), dict) else {}
            hook = c.get("hook_name") or meta.get("hook_name")
            if hook is not None and not isinstance(hook, str):
                raise ValueError(
                    f"sae {spec}: cfg.json's hook_name is {hook!r}, not a name such as blocks.12.hook_resid_post"
                )
            layer, site = hook_site(hook)
            np_id = c.get("neuronpedia_id") or meta.get("neuronpedia_id")
            if isinstance(np_id, str) and np_id:
                sae.neuronpedia_id = np_id  # its features' pages: https://www.neuronpedia.org/<id>/<feature>
        if layer is None and os.path.isdir(spec):  # sparsify names each SAE's folder after its hookpoint: layers.23
            layer, site = hook_site(os.path.basename(os.path.normpath(spec)))
        return sae, layer, site
    if ":" in spec:
        release, sae_id = spec.split(":", 1)
        try:
            from sae_lens import SAE

            lens = SAE.from_pretrained(release, sae_id, device=str(device))
            lens = lens[0] if isinstance(lens, tuple) else lens
        except Exception as e:
            raise ValueError(f"sae '{spec}' could not be loaded from sae-lens (release:id; needs a hub): {e}") from e
        meta = getattr(lens.cfg, "metadata", None)
        hook = getattr(meta, "hook_name", None) if meta is not None else None
        weights = SAEWeights.from_sae_lens(lens, name=spec).to(device)
        return (weights, *hook_site(hook))
    raise ValueError(f"sae '{spec}' is neither an existing path nor a sae-lens 'release:id'")


@dataclass
class SAESpec:
    """One SAE of a run, the one record carried from the command to the step and the cache: its encoder, the
    decoder block it reads and where in it (site: fpo.model.SITES), its weight in D, the name its cached
    features go by (unique within a cache); once a run has read its cache, the suffix of its tensors there
    (key: idx<key>, val<key>), what its D is divided by (scale: 1, or the recorded reference feature scale,
    constraint_norm "ref") and its per-feature weights in D (feature_weights: [width], or None for 1)."""

    sae: SAEWeights
    layer: int | None
    weight: float
    name: str
    site: str = "resid_post"
    key: str | None = None
    scale: float = 1.0
    feature_weights: torch.Tensor | None = None


def load_saes(specs: Sequence[tuple], device: Device = "cpu") -> list[SAESpec]:
    """[(spec or SAEWeights, layer or None, weight)] -> [SAESpec]. A layer given wins over the SAE's own; two
    SAEs with one name on one layer are an error (their cached features could not be told apart)."""
    out = []
    for spec, layer, weight in specs:
        if isinstance(spec, SAEWeights):
            sae, own, site = spec.to(device), None, "resid_post"
        else:
            sae, own, site = load_sae(spec, device)
        layer = layer if layer is not None else own
        out.append(SAESpec(sae, layer, float(weight), sae.name, site))
    seen = {}
    for s in out:
        key = (s.name, s.layer, s.site)
        if key in seen:
            raise ValueError(f"two SAEs named '{s.name}' read layer {s.layer}: give them different layers or names")
        seen[key] = s
    return out


def check_sae_fits(model: Model, sae: SAEWeights, layer: int | None) -> None:
    hidden = model.config.hidden_size
    if sae.d_in != hidden:
        raise ValueError(
            f"the SAE reads d_in={sae.d_in} but the model's hidden size is {hidden}: pick the SAE trained on this model"
        )
    n = len(decoder_layers(model))
    if layer is None:
        raise ValueError(
            "the SAE layer is unknown: pass sae_layer (--sae-layer), the decoder block whose output the SAE reads"
        )
    if not 0 <= layer < n:
        raise ValueError(f"sae_layer {layer} is outside the model's {n} decoder layers [0, {n})")


def cached_sae_keys(
    cache: ReferenceCache, saes: Sequence[SAESpec], model: Model, k: int, select: str = "policy"
) -> list[str]:
    """The key of each SAE's tensors in `cache`, for a run or an eval that compares against them: one SAE
    without a layer takes the cache's; each must fit the model and be in the cache; k must not exceed the
    cache's cache_k."""
    if len(saes) == 1 and saes[0].layer is None and len(cache.saes) == 1:
        saes[0].layer = cache.saes[0]["layer"]
    keys = []
    for spec in saes:
        check_sae_fits(model, spec.sae, spec.layer)
        keys.append(cache.find_sae(spec.sae.fingerprint(), spec.layer, spec.name, spec.site)["key"])
    if cache.cache_k is not None and k > cache.cache_k:
        raise ValueError(
            f"k ({k}) exceeds the cache's cache_k ({cache.cache_k}): "
            + (
                "select='reference' needs k cached features"
                if select == "reference"
                else "selected features outside the cached top-K would count as 0 for the reference and inflate D "
                "many times over"
            )
            + f"; rebuild the cache with --cache-k >= {k} or pass --k <= {cache.cache_k}"
        )
    return keys
