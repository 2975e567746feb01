"""Memory claims at real sizes, without a GPU: the ops run on fake tensors (FakeTensorMode), where they take
their GPU path with the Triton launches skipped, and benchmarks.step_tracer.StepTracer counts live bytes."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from benchmarks.step_tracer import GEMM_EFFICIENCY, H100_SXM, StepTracer
from fpo_kernels import SAEWeights, fused_linear_logprobs, reference, sae_feature_mse
from fpo_kernels._dispatch import on_fake_launch
from fpo_kernels.logprobs import backward_blocks, default_chunk_size

GB = 2**30


def test_tracer_counts_live_storage():
    tr = StepTracer()
    with tr:
        a = torch.ones(1000)  # 4000 B
        b = a * 2  # 8000 B live
        v = b.view(10, 100)  # a view: no new storage
        del a  # 4000 B live
        c = torch.zeros(500, dtype=torch.float64)
        b += 1  # in place: nothing new
    assert (tr.peak, tr.now) == (8000, 8000)
    del b, c, v
    assert tr.now == 0


def test_tracer_costs_a_gemm_at_its_flops():
    with FakeTensorMode():
        x = torch.empty(8192, 8192, dtype=torch.bfloat16)
        tr = StepTracer()
        tr.timing = True
        with tr:
            x @ x
    flops = 2 * 8192**3
    assert tr.flops == flops
    assert tr.seconds["model"] == pytest.approx(flops / (H100_SXM["tensor_flops"] * GEMM_EFFICIENCY))


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_fused_logprobs_holds_one_chunk_of_logits(softcap):
    """Gemma-2's vocabulary, 4096 tokens: the fused op's extra memory is the gradients it returns plus one
    forward chunk or backward block of logits; the reference holds [N, V] fp32 logits several times over."""
    N, d, V = 4096, 2304, 256000
    with FakeTensorMode():
        h = torch.empty(N, d, dtype=torch.bfloat16, requires_grad=True)
        w = torch.empty(V, d, dtype=torch.bfloat16, requires_grad=True)
        y = torch.zeros(N, dtype=torch.long)
        launches = []
        peaks = {}
        for name, op in (("fused", fused_linear_logprobs), ("reference", reference.fused_linear_logprobs_ref)):
            tr = StepTracer()
            tr.hold([h, w, y])
            base = tr.now
            with on_fake_launch(lambda k, a, c: launches.append(k.name)), tr:
                op(h, w, y, softcap).sum().backward()
            peaks[name] = tr.peak - base
            h.grad = w.grad = None
    C = default_chunk_size(V)
    Cb, VB = backward_blocks(N, V)
    grads = (N + V) * d * 2
    # one forward chunk's fp32 logits, or one backward block's logits and dL/dlogits, and grad_hidden's fp32
    # accumulator: never [N, V]
    extra = max(C * V * 4, Cb * VB * 6) + N * d * 4 + 16 * N * 4
    assert (C, Cb) == (512, 4096) and peaks["fused"] <= grads + extra, peaks["fused"] / GB
    assert peaks["fused"] < 2 * GB < 8 * GB < peaks["reference"]
    assert peaks["reference"] >= grads + 2 * N * V * 4
    assert launches.count("_logprobs_fwd_kernel") == -(-N // C)
    assert launches.count("_logprobs_bwd_kernel") == -(-N // Cb) * -(-V // VB)


@pytest.mark.parametrize("select", ["policy", "reference"])
def test_sae_constraint_never_holds_token_by_feature_activations(select):
    """Gemma Scope's 16k SAE on 4 x 1024 tokens: no [B, T, m] tensor (fp32, 256 MiB) at any point, forward
    or backward; the reference path builds it."""
    B, T, d, m, k, K = 4, 1024, 2304, 16384, 50, 256
    with FakeTensorMode():
        sae = SAEWeights.from_tensors(torch.empty(d, m), torch.empty(m), torch.empty(m), torch.empty(d), True)
        h = torch.empty(B, T, d, dtype=torch.bfloat16, requires_grad=True)
        mask = torch.ones(B, T, dtype=torch.bool)
        idx = torch.zeros(B, K, dtype=torch.int16)
        val = torch.empty(B, K, dtype=torch.float16)
        peaks = {}
        fused = lambda h, mask, sae, idx, val, k, select: sae_feature_mse(
            h, sae, idx, val, mask=mask, k=k, select=select
        )
        for name, op in (("fused", fused), ("reference", reference.sae_feature_mse_ref)):
            sae._cast.clear()
            tr = StepTracer()
            tr.hold([h, mask, idx, val, sae.W_enc_t, sae.bias, sae.threshold, sae.b_enc, sae.b_dec])
            base = tr.now
            with tr:
                op(h, mask, sae, idx, val, k, select).sum().backward()
            peaks[name] = tr.peak - base
            h.grad = None
    activations = B * T * m * 4
    # what the fused op may hold: the grad (bf16) and its fp32 accumulator, a bf16 copy of W_enc, [B, m] rows
    allowed = B * T * d * (2 + 4) + m * d * 2 + 8 * B * m * 4
    assert peaks["fused"] <= allowed < activations
    assert peaks["reference"] >= activations
