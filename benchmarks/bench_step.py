"""One full training step (forward, backward, optimizer) per method, on a model built from a config with
random weights (memory and time do not depend on the weights).

Methods:
  fpo              ours: offline cache, fused kernels, select="policy"
  fpo-ref          ours, select="reference" (only k columns of W_enc)
  fpo-authors      as the FPO authors' code runs it: reference model online every step, full logits through TDPO's
                   log-prob function (with the full-vocabulary KL it never uses), SAE on full [tokens, width]
  tdpo1/2-authors  as TDPO's code runs them: the policy's log_softmax, the reference's softmax().log(), the KL
                   over the vocabulary from those
  tdpo1/2-lean     our TDPO: online reference body, then fused_linear_logprobs_kl (both log-probs and the KL, one pass)
  simpo, dpo       fused log-probs (dpo with the cached reference log-probs)
  simpo-authors    as SimPO's code runs it: the full logits upcast to fp32, their log_softmax
  dpo-full-logits  materialised logits + log_softmax

Every method runs under one precision policy (fpo.precision; bf16-mixed on a GPU, what a real run uses), and
a few rows are repeated under another: bf16-compensated (the memory-lean policy that keeps every update) and
bf16-pure (bf16 weights under plain Adam, as code that trains that way runs; updates at lr 5e-7 round away),
labelled method@policy. With --body, the listed methods run again with the model body compiled (`fpo train
--compile`: each decoder layer, regionally) or under liger-kernel's body kernels (`--body-kernels liger`), labelled
method+compile and method+liger-body, each on a model of its own; the first step (compilation) is reported apart.
Memory floor (every method): weights + gradients + Adam states, 16 bytes per
parameter under bf16-mixed (fp32), 10 under bf16-compensated, 8 under bf16-pure; bf16-mixed adds autocast's
bf16 copy of the weights (2 bytes) while the forward's activations hold it. TDPO adds the reference model
(bf16 weights: 2 bytes per parameter) and one reference forward per step; as its authors run it, several
[tokens x vocab] fp32 tensors (log_softmax, softmax, log, the product) on top.
FPO's floor is SimPO's: the policy step plus one SAE GEMM of [tokens, d] x [d, m].
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch

from benchmarks.common import environment, write_results
from fpo.feature_files import ProtectSet
from fpo.model import (
    ActivationCapture,
    apply_body_kernels,
    compile_body,
    enable_activation_checkpointing,
    lm_head,
    run_body,
    transformers_patches_undone,
)
from fpo.packing import MicroBatch
from fpo.precision import Precision, resolve_precision
from fpo.precision import make_optimizer as _make_optimizer
from fpo.protection import ProtectTerm
from fpo.sae import SAESpec
from fpo.step import PolicyStats
from fpo_kernels import SAEWeights, pack_topk
from fpo_kernels.losses import preference_loss
from fpo_kernels.sequence_stats import SequenceStats

PRESETS = {
    "gemma2-2b": dict(
        arch="gemma2",
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        vocab_size=256000,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
        sae_layer=12,
        sae_width=16384,
    ),
    "llama3-8b": dict(
        arch="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=500000.0,
        sae_layer=16,
        sae_width=65536,
    ),
    "tiny": dict(
        arch="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        sae_layer=2,
        sae_width=256,
    ),
}
METHODS = [
    "simpo",
    "simpo-authors",
    "dpo",
    "dpo-full-logits",
    "fpo",
    "fpo-ref",
    "tdpo1-lean",
    "tdpo2-lean",
    "tdpo1-authors",
    "tdpo2-authors",
    "fpo-authors",
]
PROTECTED = 20  # the protected set of the +protect rows
NEEDS_REF = {"tdpo1-lean", "tdpo2-lean", "tdpo1-authors", "tdpo2-authors", "fpo-authors"}
# how the model body runs: transformers' eager code, fpo train's --compile, its --body-kernels liger
BODIES = ("eager", "compile", "liger-body")
# Rows repeated under another policy than the run's, beside it (method@policy)
OTHER_POLICIES = {"bf16-compensated": ["fpo", "simpo"], "bf16-pure": ["fpo", "tdpo2-authors", "fpo-authors"]}


def other_policies(others=None, log=print) -> dict:
    """OTHER_POLICIES less what this machine cannot run: bf16-compensated needs torch-optimi (a pure-Python
    wheel: `pip install torch-optimi`)."""
    out = dict(OTHER_POLICIES if others is None else others)
    if "bf16-compensated" in out:
        try:
            import optimi  # noqa: F401
        except ImportError:
            log("[bench] torch-optimi is not installed: no bf16-compensated rows (pip install torch-optimi)")
            del out["bf16-compensated"]
    return out


def liger_methods() -> list:
    """SimPO through Liger-Kernel's LigerFusedLinearSimPOLoss, beside ours, when liger-kernel is installed."""
    try:
        import liger_kernel.chunked_loss  # noqa: F401

        return ["simpo-liger"]
    except ImportError:
        return []


def build_model(preset, device, dtype):
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    p = {k: v for k, v in PRESETS[preset].items() if k not in ("arch", "sae_layer", "sae_width")}
    arch = PRESETS[preset]["arch"]
    cfg = Gemma2Config(**p) if arch == "gemma2" else LlamaConfig(**p)
    cfg.use_cache = False
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: no fp32 copy first (and fake tensors can't be cast in place)
    try:
        with torch.device(device):
            return (Gemma2ForCausalLM if arch == "gemma2" else LlamaForCausalLM)(cfg)
    finally:
        torch.set_default_dtype(prev)


RATIO_PAIRS = (
    ("fpo", "tdpo2-authors"),
    ("fpo", "simpo-authors"),
    ("simpo", "simpo-authors"),
    ("fpo", "tdpo2-lean"),
    ("fpo", "simpo"),
    ("fpo-ref", "simpo"),
    ("fpo", "fpo-authors"),
    ("tdpo2-lean", "tdpo2-authors"),
    ("simpo", "simpo-liger"),
    ("simpo+protect", "simpo"),
    ("fpo+protect", "fpo"),
    ("simpo+protect-token", "simpo"),
    ("fpo+protect-token", "fpo"),
    ("fpo+compile", "fpo"),
    ("simpo+compile", "simpo"),
    ("fpo+liger-body", "fpo"),
    ("simpo+liger-body", "simpo"),
    ("fpo@bf16-compensated", "fpo"),
    ("fpo@bf16-pure", "fpo"),
    ("fpo", "tdpo2-authors@bf16-pure"),
    ("fpo", "fpo-authors@bf16-pure"),
)


def method_ratios(rows, keys):
    """{"a/b key": a's value / b's value} for the method pairs the targets are stated in, from one run's rows."""
    by = {r["method"]: r for r in rows}
    ratios = {}
    for a, b in RATIO_PAIRS:
        if a in by and b in by:
            for key in keys:
                x, y = by[a][key], by[b][key]
                if x is not None and y:
                    ratios[f"{a}/{b} {key}"] = x / y
    return ratios


def make_optimizer(model, precision: Precision, device):
    """The optimizer `fpo train` makes under this policy (Adam; Kahan-summed under bf16-compensated)."""
    return _make_optimizer(model.parameters(), precision, "adam", 1e-7, device=device)


def static_gb(n_params, precision: Precision, reference: bool) -> float:
    """Weights + gradients + optimizer states (+ a bf16 reference model), before activations."""
    return (
        n_params
        * (precision.bytes_per_parameter("adam") + (precision.frozen_dtype.itemsize if reference else 0))
        / 2**30
    )


class Step:
    """The per-method step closures over one shared policy (and a reference model when a method needs one)."""

    def __init__(
        self,
        preset,
        pairs,
        seq_len,
        device,
        precision="fp32",
        k=50,
        cache_k=256,
        grad_ckpt=False,
        body="eager",
        compile_backend="inductor",
    ):
        pr = PRESETS[preset]
        self.precision = precision if isinstance(precision, Precision) else resolve_precision(precision, device)
        self.device, self.k, self.layer = device, k, pr["sae_layer"]
        self.policy = build_model(preset, device, self.precision.param_dtype)
        if body == "liger-body":  # as `fpo train --body-kernels liger` does it: before checkpointing
            apply_body_kernels(self.policy, "liger")
        if grad_ckpt and body != "compile":
            enable_activation_checkpointing(self.policy)
        if body == "compile":  # as `fpo train --compile`: checkpointed inside the compiled layers
            compile_body(self.policy, compile_backend, checkpoint=grad_ckpt)
        self.policy.train()
        self.preset, self.ref = preset, None
        d, m, V = pr["hidden_size"], pr["sae_width"], pr["vocab_size"]
        g = torch.Generator(device="cpu").manual_seed(0)
        self.sae = SAEWeights.from_tensors(
            torch.randn(d, m, generator=g) / d**0.5,
            torch.randn(m, generator=g) * 0.1,
            torch.rand(m, generator=g) * 0.2,
            torch.randn(d, generator=g) * 0.1,
            True,
        ).to(device)
        B, T = 2 * pairs, seq_len
        self.P = pairs
        self.ids = torch.randint(0, V, (B, T), generator=g).to(device)
        self.attn = torch.ones(B, T, dtype=torch.long, device=device)
        self.resp = torch.zeros(B, T, dtype=torch.bool, device=device)
        self.resp[:, T // 4 :] = True  # a quarter prompt, the rest response
        # fpo.packing.from_padded(ids, attn, resp), written out (it reads values, which fake tensors lack):
        # the rows predicting response tokens and the response spans, as the data loader finds them on the host
        p0 = T // 4
        seq = torch.arange(B).repeat_interleave(T - p0)
        pos = torch.arange(p0, T).repeat(B)
        base = torch.arange(B) * T
        spans = torch.stack([base + p0, base + T], 1)  # on the host
        self.batch = MicroBatch(
            layout="off",
            input_ids=self.ids,
            attention_mask=self.attn,
            position_ids=None,
            segment=None,
            branch=None,
            pred_rows=(seq * T + pos - 1).to(device),
            labels=self.ids[seq.to(device), pos.to(device)],
            seq_ids=seq.to(device),
            spans=spans,
            num_seqs=B,
            ids=None,
            row_hash=None,
            tokens=B * T,
            response_tokens=B * (T - p0),
            pool_spans=spans,
        )
        pooled = torch.rand(B, m, generator=g) * (torch.rand(B, m, generator=g) < 0.02)
        idx, val = pack_topk(pooled.to(device), cache_k)
        # the reference side as the cache gives it to the loss: [2P] statistics, chosen first
        self.cache = {"logp_sum": -torch.rand(B, device=device) * 500, "logp_mean": -torch.rand(B, device=device)}
        self.ref_idx, self.ref_val = idx, val  # [2P, cache_k], chosen first: what the trainer passes the op
        self.tokens = B * T  # no padding
        self.stats = None

    def release_fpo(self):
        """Remove the FPO residual hook: left in place it would pin an activation during other methods' steps."""
        if self.stats is not None:
            self.stats.remove_hooks()
            self.stats = None

    def load_reference(self):
        if self.ref is None:
            self.ref = build_model(self.preset, self.device, self.precision.frozen_dtype).eval().requires_grad_(False)

    def drop_reference(self):
        self.ref = None
        if self.device == "cuda":
            torch.cuda.empty_cache()

    # ---- the losses of one step ---------------------------------------------------------------
    def _protect(self, form):
        """A protected set of PROTECTED features (ids spread over the width) with random reference values, as
        `fpo train --protect --protect-form FORM` runs it: the term's cost, beside the same method without it."""
        terms = self.__dict__.setdefault("_protect_terms", {})
        if form not in terms:
            m = self.sae.width
            ids = tuple(range(0, m, max(1, m // PROTECTED)))[:PROTECTED]
            spec = SAESpec(self.sae, self.layer, 1.0, "sae")
            ps = ProtectSet(None, ids, (1.0,) * len(ids), ("both",) * len(ids))
            scale = torch.full((len(ids),), 0.5)
            terms[form] = ProtectTerm(ps, spec, scale, 1.0, self.device, form=form, token_scale=scale)
            n = int(self.batch.pool_spans[:, 1].sum() - self.batch.pool_spans[:, 0].sum())  # response tokens
            rows = 2 * self.P if form == "pooled" else n
            self._protect_ref = getattr(self, "_protect_ref", {})
            self._protect_ref[form] = torch.rand(rows, len(ids), device=self.device)
        return terms[form]

    def _ours(self, method):
        c = self.cache
        if method.endswith(("+protect", "+protect-token")):
            base, _, tail = method.partition("+")
            form = "token" if tail == "protect-token" else "pooled"
            protect = self._protect(form)
            saes = [SAESpec(self.sae, self.layer, 1.0, "sae")] if base == "fpo" else []
            stats = PolicyStats(self.policy, saes=saes, k=self.k, protect=protect)
            try:
                kw = dict(ref_features=[(self.ref_idx, self.ref_val)]) if saes else {}
                s = stats(self.batch, **kw)
            finally:
                stats.remove_hooks()
            losses = preference_loss(base, s, c, beta=2.0 if base == "simpo" else 0.1)[0]
            if form == "token":
                assert s.protect_tokens is not None and s.length is not None
                R = protect.token_penalty(s.protect_tokens, self._protect_ref[form], s.length.long())
            else:
                R = protect.penalty(s.protect, self._protect_ref[form])
            return losses + protect.coef * (R[: self.P] + R[self.P :]) / 2
        if method.startswith("fpo"):
            spec = SAESpec(self.sae, self.layer, 1.0, "sae")
            self.stats = self.stats or PolicyStats(self.policy, saes=[spec], k=self.k)
            self.stats.select = "reference" if method == "fpo-ref" else "policy"
            s = self.stats(self.batch, ref_features=[(self.ref_idx, self.ref_val)])
            return preference_loss("fpo", s, c, beta=0.1)[0]
        plain = PolicyStats(self.policy)
        if method.startswith("tdpo"):
            with torch.no_grad():
                rh = run_body(self.ref, self.ids, self.attn)
            s = plain(self.batch, ref_hidden=rh.reshape(-1, rh.shape[-1]), ref_weight=lm_head(self.ref)[0])
            return preference_loss(method[:5], s, SequenceStats(logp_sum=s.ref_logp_sum), beta=0.1)[0]
        s = plain(self.batch)
        return preference_loss(method, s, c, beta=2.0 if method == "simpo" else 0.1)[0]

    def _full_logits(self, model, capture=None):
        """[B, T-1] per-token log-probs via materialised logits (the HF forward applies Gemma-2's softcap)."""
        logits = model(input_ids=self.ids, attention_mask=self.attn).logits[:, :-1].float()
        return logits, torch.log_softmax(logits, -1).gather(2, self.ids[:, 1:, None]).squeeze(2)

    def _naive_pooled(self, resid):
        z = (resid @ self.sae.weight_as(resid.dtype).t()).float() + self.sae.bias
        f = torch.where(z > self.sae.threshold, z, torch.zeros_like(z))
        m = self.resp.unsqueeze(-1).float()
        return (f * m).sum(1) / m.sum(1)

    def _authors(self, method):
        tgt = self.resp[:, 1:].float()
        if method == "dpo-full-logits":
            _, lp = self._full_logits(self.policy)
            s = (lp * tgt).sum(1)
            return preference_loss("dpo", {"logp_sum": s}, self.cache, beta=0.1)[0]
        if method == "simpo-authors":
            # SimPO's own code (princeton-nlp/SimPO, concatenated_forward and get_batch_logps): the full logits
            # upcast to fp32, their log_softmax, the mean over the response tokens
            _, lp = self._full_logits(self.policy)
            a = (lp * tgt).sum(1) / tgt.sum(1)
            return preference_loss("simpo", {"logp_mean": a}, beta=2.0, gamma=0.5)[0]
        cap_p = ActivationCapture(self.policy, self.layer) if method == "fpo-authors" else None
        cap_r = ActivationCapture(self.ref, self.layer) if method == "fpo-authors" else None
        try:
            # TDPO's own code (Vance0124/Token-level-Direct-Preference-Optimization, _tdpo_get_batch_logps), which
            # the FPO authors' code calls too: the reference's softmax and its .log() (no grad), the policy's one
            # log_softmax, the per-position KL from those, and both models' token log-probs gathered from them
            lab = self.ids[:, 1:, None]
            with torch.no_grad():
                q = self.ref(input_ids=self.ids, attention_mask=self.attn).logits[:, :-1].float().softmax(-1)
                q_log = q.log()
            vocab_logps = (
                self.policy(input_ids=self.ids, attention_mask=self.attn).logits[:, :-1].float().log_softmax(-1)
            )
            kl = ((q * (q_log - vocab_logps)).sum(-1) * tgt).sum(1)  # the FPO authors compute it and never use it
            lp, r_lp = vocab_logps.gather(2, lab).squeeze(2), q_log.gather(2, lab).squeeze(2)
            if method == "fpo-authors":
                with torch.no_grad():
                    ref_pooled = self._naive_pooled(cap_r.pop())
                pooled = self._naive_pooled(cap_p.pop())
                idx = pooled.detach().topk(self.k, dim=1).indices
                d = ((pooled.gather(1, idx) - ref_pooled.gather(1, idx)) ** 2).mean(1)
                n = tgt.sum(1)
                a, ra = (lp * tgt).sum(1) / n, (r_lp * tgt).sum(1) / n
                return preference_loss("fpo", {"logp_mean": a, "d": d}, {"logp_mean": ra}, beta=0.1)[0]
            s, rs = (lp * tgt).sum(1), (r_lp * tgt).sum(1)
            return preference_loss(method[:5], {"logp_sum": s, "kl": kl}, {"logp_sum": rs}, beta=0.1)[0]
        finally:
            for cap in (cap_p, cap_r):
                if cap is not None:
                    cap.remove()

    def _liger_simpo(self):
        """Liger's fused SimPO module on the response positions only (equal work: ours skips the prompt rows;
        no final-logit softcap, which Liger lacks)."""
        from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss

        if getattr(self, "_liger", None) is None:
            self._liger = LigerFusedLinearSimPOLoss(
                beta=2.0, gamma=0.5, compute_nll_loss=False, compiled=torch.cuda.is_available()
            )  # torch.compile: GPU only
        hidden = run_body(self.policy, self.ids, self.attn)
        p0 = self.ids.shape[1] // 4
        return self._liger(lm_head(self.policy)[0], hidden[:, p0 - 1 : -1], self.ids[:, p0:])[0]

    def loss(self, method):
        """The scalar training loss (mean over pairs) of one step of `method`, its forward under the policy's
        autocast (the backward runs outside it)."""
        with self.precision.autocast(self.device):
            if method == "simpo-liger":
                return self._liger_simpo()
            if method.endswith("-authors") or method == "dpo-full-logits":
                return self._authors(method).mean()
            return self._ours(method).mean()


def run(
    preset="gemma2-2b",
    pairs=2,
    seq_len=1024,
    methods=METHODS,
    warmup=2,
    steps=5,
    grad_ckpt=False,
    precision="auto",
    others=OTHER_POLICIES,
    bodies=("eager",),
    compile_backend="inductor",
    log=print,
    on_row=None,
):
    """Every method under `precision`, then the `others` rows (policy -> methods) as method@policy, then each
    other body in `bodies` under `precision` (method+body). on_row(rows) is called after every row."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    main = resolve_precision(precision, device)
    rows = []
    for body in bodies:
        plan = policy_plan(main, methods, others, device) if body == "eager" else [(main, list(methods))]
        for prec, names in plan:
            with transformers_patches_undone() if body == "liger-body" else contextlib.nullcontext():
                info = _run_policy(
                    preset,
                    pairs,
                    seq_len,
                    names,
                    warmup,
                    steps,
                    grad_ckpt,
                    prec,
                    prec is not main,
                    rows,
                    log,
                    body=body,
                    compile_backend=compile_backend,
                    on_row=on_row,
                )
    info["precision"] = main.name
    return rows, method_ratios(rows, ("peak_gb", "step_ms")), info


def policy_plan(main: Precision, methods, others, device) -> list:
    """[(policy, methods)]: every method under the main policy, then each other policy's listed methods that
    this run includes (rows named method@policy)."""
    plan = [(main, list(methods))] + [
        (resolve_precision(p, device), [m for m in ms if m in methods])
        for p, ms in (others or {}).items()
        if p != main.name
    ]
    return [(prec, names) for prec, names in plan if names]


def _run_policy(
    preset,
    pairs,
    seq_len,
    methods,
    warmup,
    steps,
    grad_ckpt,
    precision,
    label,
    rows,
    log,
    body="eager",
    compile_backend="inductor",
    on_row=None,
):
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    bench = Step(
        preset, pairs, seq_len, device, precision, grad_ckpt=grad_ckpt, body=body, compile_backend=compile_backend
    )
    n_params = sum(p.numel() for p in bench.policy.parameters())
    order = [m for m in methods if m not in NEEDS_REF] + [m for m in methods if m in NEEDS_REF]
    for method in order:
        if method in NEEDS_REF:
            bench.load_reference()
        opt = make_optimizer(bench.policy, precision, device)
        times = []
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            for _ in range(warmup + steps):
                t = time.perf_counter()
                bench.loss(method).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t) * 1e3)
            ms = statistics.median(times[warmup:])
            peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        except torch.OutOfMemoryError:
            ms, peak = float("nan"), float("nan")
        del opt
        bench.release_fpo()
        bench.policy.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
        name = f"{method}@{precision.name}" if label else method
        name += "" if body == "eager" else f"+{body}"
        spread = (min(times[warmup:]), max(times[warmup:])) if ms == ms else (None, None)
        rows.append(
            {
                "method": name,
                "precision": precision.name,
                "step_ms": ms,
                "step_ms_min": spread[0],
                "step_ms_max": spread[1],
                "first_step_ms": times[0] if times else None,  # compilation included under --body compile
                "tokens_per_s": bench.tokens / ms * 1e3 if ms == ms else None,
                "peak_gb": peak,
                "floor_gb_estimate": static_gb(n_params, precision, method in NEEDS_REF),
                "bytes_per_param": precision.bytes_per_parameter("adam"),
            }
        )
        log(f"[bench_step] {name}: {ms:.1f} ms, peak {peak if peak is None else round(peak, 2)} GB")
        if on_row is not None:
            on_row(rows)
    bench.drop_reference()
    del bench
    if cuda:
        torch.cuda.empty_cache()
    return {"preset": preset, "pairs": pairs, "seq_len": seq_len, "params": n_params, "tokens": 2 * pairs * seq_len}


ESTIMATES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "estimates")


def attach_estimates(rows, preset, pairs, seq_len, grad_ckpt):
    """Put estimate_step.py's predictions for this shape (committed under results/estimates) beside the
    measurements: peak_gb_est and step_ms_est. Returns the estimate file's path, or None when there is none."""
    path = os.path.join(ESTIMATES, f"estimate_step_{preset}_{pairs}x{seq_len}{'_ckpt' if grad_ckpt else ''}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        est = {r["method"]: r for r in json.load(f)["rows"]}
    for r in rows:
        e = est.get(r["method"])
        r["peak_gb_est"] = e["peak_gb_estimate"] if e else None
        r["step_ms_est"] = e["step_ms_estimate"] if e else None
    return path


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), dpi=120)
    for ax, key, label in ((axes[0], "step_ms", "step time (ms)"), (axes[1], "peak_gb", "peak memory (GB)")):
        vals = [r[key] if r[key] is not None else 0 for r in rows]
        colors = ["tab:green" if n.startswith("fpo") and "authors" not in n else "tab:gray" for n in names]
        ax.barh(names, vals, color=colors)
        ax.set_xlabel(label)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=list(PRESETS), default=None, help="default gemma2-2b on a GPU, tiny on the CPU")
    ap.add_argument("--pairs", type=int, nargs="*", default=None, help="pairs per step (a sweep)")
    ap.add_argument("--seq-len", type=int, nargs="*", default=None, help="tokens per sequence (a sweep)")
    ap.add_argument("--methods", default=",".join(METHODS + liger_methods()))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16-mixed", "bf16-compensated", "bf16-pure"],
        help="the policy every method runs under (auto: bf16-mixed on a GPU, fp32 on the CPU)",
    )
    ap.add_argument(
        "--no-other-policies",
        action="store_true",
        help="skip the rows repeated under other policies ("
        + "; ".join(f"{p}: {', '.join(ms)}" for p, ms in OTHER_POLICIES.items())
        + ")",
    )
    ap.add_argument(
        "--body",
        default="eager",
        help=f"comma-separated, from {','.join(BODIES)}: how the model body runs; the methods run once per body "
        "(compile: fpo train --compile; liger-body: fpo train --body-kernels liger, CUDA only)",
    )
    ap.add_argument(
        "--compile-backend", default="inductor", help="torch.compile backend of --body compile (default inductor)"
    )
    ap.add_argument("--out", default=None, help="write bench_step_<preset>.{json,md,png} here")
    args = ap.parse_args(argv)
    bodies = [b.strip() for b in args.body.split(",")]
    if [b for b in bodies if b not in BODIES]:
        ap.error(f"--body: unknown {[b for b in bodies if b not in BODIES]}; choose from {list(BODIES)}")
    if "liger-body" in bodies and not torch.cuda.is_available():
        ap.error("--body liger-body: liger-kernel's body kernels are Triton kernels for CUDA devices")
    if "liger-body" in bodies and not liger_methods():
        print("[bench_step] liger-kernel is not installed: no liger-body rows (pip install liger-kernel)")
        bodies.remove("liger-body")
        if not bodies:
            ap.error("--body: nothing left to run")
    cuda = torch.cuda.is_available()
    preset = args.preset or ("gemma2-2b" if cuda else "tiny")
    all_rows, all_ratios = [], {}
    env = environment()
    methods = [m.strip() for m in args.methods.split(",")]
    if "simpo-liger" in methods and not liger_methods():
        print("[bench_step] liger-kernel is not installed: no simpo-liger row")
        methods.remove("simpo-liger")
    tag = ("_ckpt" if args.gradient_checkpointing else "") + ("" if bodies == ["eager"] else "_body")
    for pairs in args.pairs or [2]:
        for T in args.seq_len or ([1024] if cuda else [64]):
            name = f"bench_step_{preset}_{pairs}x{T}{tag}"

            def partial(rows, name=name):  # each row on disk the moment it is measured
                write_results(name, rows, env, args.out, "partial: the run had not finished", echo=False)

            rows, ratios, info = run(
                preset,
                pairs,
                T,
                methods,
                steps=args.steps,
                grad_ckpt=args.gradient_checkpointing,
                precision=args.precision,
                others=None if args.no_other_policies else other_policies(),
                bodies=bodies,
                compile_backend=args.compile_backend,
                on_row=partial if args.out else None,
            )
            for r in rows:
                r.update(pairs=pairs, seq_len=T)
            est = attach_estimates(rows, preset, pairs, T, args.gradient_checkpointing)
            all_rows += rows
            all_ratios[f"{pairs}x{T}"] = ratios
            notes = "ratios measured in this run: " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items())
            notes += (
                f"\nmodel: {preset}, {info['params'] / 1e9:.2f}B parameters; {info['tokens']} tokens per step; "
                f"precision {info['precision']} (rows named method@policy run under that policy instead). "
                "floor_gb_estimate = weights + grads + optimizer states (bytes_per_param) + a bf16 reference "
                "model (2 B/param) where used."
            )
            if est:
                notes += (
                    f"\npeak_gb_est, step_ms_est: predicted on the CPU by benchmarks/estimate_step.py "
                    f"({os.path.relpath(est, os.path.dirname(ESTIMATES))}), for an H100 SXM."
                )
            if bodies != ["eager"]:
                notes += (
                    "\nmethod+compile: the body compiled per decoder layer (fpo train --compile, backend "
                    f"{args.compile_backend}); method+liger-body: liger-kernel's body kernels; each on a model of "
                    "its own. first_step_ms: the first step, compilation included; step_ms: the median after "
                    "the warm-up steps."
                )
            if not cuda:
                notes += "\nCPU: a smoke run of the harness at a tiny size, not a measurement."
            write_results(name, rows, env, args.out, notes)
            if args.out:
                plot(
                    rows,
                    os.path.join(args.out, f"{name}.png"),
                    f"{preset}, {pairs} pairs x {T} tokens, {env['device']}",
                )
    if args.out:
        with open(os.path.join(args.out, f"bench_step_{preset}{tag}_ratios.json"), "w") as f:
            json.dump({"environment": env, "ratios": all_ratios}, f, indent=1)
    return all_rows, all_ratios


if __name__ == "__main__":
    main()
