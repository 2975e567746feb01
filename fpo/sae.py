"""Loading the SAE for training and precompute: a sae-lens directory or file (JumpReLU, standard, TopK,
BatchTopK, Matryoshka-BatchTopK), an EleutherAI sparsify directory, a Gemma Scope params.npz, or a sae-lens
release/id pair when a hub is reachable (sae-lens 6: SAE.from_pretrained returns the SAE). Returns the kernels'
SAEWeights and the decoder layer the SAE reads (from its hook name, e.g. model.layers.15 or
blocks.12.hook_resid_post, or a sparsify folder's name, layers.23)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass

from fpo_kernels import SAEWeights

from .model import decoder_layers

__all__ = ["load_sae", "load_saes", "layer_from_hook_name", "SAESpec", "check_sae_fits", "cached_sae_keys"]


def layer_from_hook_name(hook_name: str | None):
    if not hook_name:
        return None
    m = re.search(r"(?:layers|blocks|h)\.(\d+)", hook_name)
    return int(m.group(1)) if m else None


def load_sae(spec: str, device="cpu"):
    """spec: a path (sae-lens dir, .safetensors, params.npz) or 'release:sae_id' (sae-lens, needs a hub).
    Returns (SAEWeights, layer or None)."""
    spec = os.fspath(spec)
    if os.path.exists(spec):
        sae = SAEWeights.from_file(spec, device)
        layer = None
        cfg = os.path.join(spec, "cfg.json") if os.path.isdir(spec) else None
        if cfg and os.path.exists(cfg):
            with open(cfg) as f:
                c = json.load(f)
            layer = layer_from_hook_name(c.get("hook_name") or (c.get("metadata") or {}).get("hook_name"))
        if layer is None and os.path.isdir(spec):  # sparsify names each SAE's folder after its hookpoint: layers.23
            layer = layer_from_hook_name(os.path.basename(os.path.normpath(spec)))
        return sae, layer
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
        return weights, layer_from_hook_name(hook)
    raise ValueError(f"sae '{spec}' is neither an existing path nor a sae-lens 'release:id'")


@dataclass
class SAESpec:
    """One SAE of a run: its encoder, the decoder block it reads, its weight in D, and the name its cached
    features go by (unique within a cache)."""

    sae: SAEWeights
    layer: int | None
    weight: float
    name: str


def load_saes(specs, device="cpu") -> list:
    """[(spec or SAEWeights, layer or None, weight)] -> [SAESpec]. A layer given wins over the SAE's own; two
    SAEs with one name on one layer are an error (their cached features could not be told apart)."""
    out = []
    for spec, layer, weight in specs:
        if isinstance(spec, SAEWeights):
            sae, own = spec.to(device), None
        else:
            sae, own = load_sae(spec, device)
        layer = layer if layer is not None else own
        out.append(SAESpec(sae, layer, float(weight), sae.name))
    seen = {}
    for s in out:
        key = (s.name, s.layer)
        if key in seen:
            raise ValueError(f"two SAEs named '{s.name}' read layer {s.layer}: give them different layers or names")
        seen[key] = s
    return out


def check_sae_fits(model, sae: SAEWeights, layer):
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


def cached_sae_keys(cache, saes, model, k, select="policy") -> list[str]:
    """The key of each SAE's tensors in `cache`, for a run or an eval that compares against them: one SAE
    without a layer takes the cache's; each must fit the model and be in the cache; k must not exceed the
    cache's cache_k."""
    if len(saes) == 1 and saes[0].layer is None and len(cache.saes) == 1:
        saes[0].layer = cache.saes[0]["layer"]
    keys = []
    for spec in saes:
        check_sae_fits(model, spec.sae, spec.layer)
        keys.append(cache.find_sae(spec.sae.fingerprint(), spec.layer, spec.name)["key"])
    if k > cache.cache_k:
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
