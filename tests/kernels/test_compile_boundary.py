"""The ops under torch.compile: traced around, never into (a graph break at each call), so a compiled step
through them gives eager's loss and gradients, also with dynamo's capture_dynamic_output_shape_ops on (which
made tracing into their host-side layout planning fail outright)."""

import pytest
import torch
from helpers import random_mask, random_sae

from fpo_kernels import pack_topk, sae_feature_mse, sae_pooled_features, sequence_logprobs


@pytest.mark.parametrize("capture_dynamic", [False, True])
def test_a_compiled_step_through_the_ops_equals_eager(device, capture_dynamic):
    torch._dynamo.reset()
    B, T, d, m, V = 4, 9, 16, 48, 40
    sae = random_sae(d, m, device)
    mask = random_mask(B, T, device)
    resid = torch.randn(B, T, d, device=device)
    ref_idx, ref_val = pack_topk(sae_pooled_features(resid + 0.1 * torch.randn_like(resid), sae, mask=mask), 16)
    weight = torch.randn(V, d, device=device) / 4
    ids = torch.randint(0, V, (B, T), device=device)

    def step(h, w):
        h = torch.tanh(h) * 2  # body work the compiler keeps
        _, mean, _ = sequence_logprobs(h, w, input_ids=ids, response_mask=mask)
        d_ = sae_feature_mse(h, sae, ref_idx, ref_val, mask=mask, k=6)
        return (-mean + 0.5 * d_).sum()

    def run(fn):
        h, w = resid.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        return loss.detach(), h.grad, w.grad

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=capture_dynamic):
        compiled = run(torch.compile(step, backend="aot_eager"))
        explained = torch._dynamo.explain(step)(resid.clone().requires_grad_(), weight.clone())
    eager = run(step)
    for got, want in zip(compiled, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert explained.graph_break_count >= 1  # the ops stay opaque to the compiler
