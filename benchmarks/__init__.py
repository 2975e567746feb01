"""Benchmarks: kernels (bench_sae_constraint, bench_logprobs) and whole training steps (bench_step)."""
