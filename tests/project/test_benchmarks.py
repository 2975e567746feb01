"""The benchmark harnesses at CPU sizes: smoke runs, and pytest-benchmark entries for a training step."""

import os

import pytest
import torch
from helpers import ROOT


@pytest.fixture(autouse=True)
def _reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_kernel_benchmarks_run(capsys):
    from benchmarks import bench_logprobs, bench_sae_constraint

    rows = bench_sae_constraint.main([])
    assert {r["provider"] for r in rows} == {"fused", "fused, 25% prompt", "naive"}
    assert all(r["spread"] >= 0 for r in rows) and all("time_vs_fused" in r for r in rows)
    assert all(r["ms"] > 0 for r in rows)
    rows = bench_sae_constraint.main(["--activation", "topk"])
    assert {r["provider"] for r in rows} == {"fused", "fused jumprelu", "naive"} and all(r["ms"] > 0 for r in rows)
    rows = bench_logprobs.main([])
    assert {"logprobs/fused", "kl/naive-tdpo"} <= {r["provider"] for r in rows}
    assert "smoke run" in capsys.readouterr().out


def test_step_benchmark_ratios(tmp_path):
    from benchmarks import bench_step

    rows, ratios = bench_step.main(["--steps", "2", "--out", str(tmp_path)])
    others = {f"{m}@{p}" for p, ms in bench_step.OTHER_POLICIES.items() for m in ms}
    assert {r["method"] for r in rows} == set(bench_step.METHODS + bench_step.liger_methods()) | others
    assert all(r["step_ms"] > 0 for r in rows)
    assert {r["precision"] for r in rows} == {"fp32", "bf16-compensated", "bf16-pure"}  # the CPU's run: fp32
    assert "fpo/tdpo2-authors step_ms" in ratios["2x64"] and "fpo@bf16-compensated/fpo step_ms" in ratios["2x64"]
    assert (tmp_path / "bench_step_tiny_2x64.png").exists()


def test_step_benchmark_protection_rows(tmp_path):
    """The +protect rows (the pooled form) and +protect-token rows (the per-token form) run beside their method,
    with their ratio to it, as run_gpu.sh's step stage asks for them."""
    from benchmarks import bench_step

    methods = "simpo,fpo,simpo+protect,fpo+protect,simpo+protect-token,fpo+protect-token"
    rows, ratios = bench_step.main(
        ["--steps", "2", "--methods", methods, "--no-other-policies", "--out", str(tmp_path)]
    )
    assert [r["method"] for r in rows] == methods.split(",") and all(r["step_ms"] > 0 for r in rows)
    assert {"simpo+protect-token/simpo step_ms", "fpo+protect-token/fpo step_ms"} <= set(ratios["2x64"])


def test_step_benchmark_body_rows(tmp_path):
    """--body: the methods again with the body compiled per decoder layer (as fpo train --compile), in the same
    run, each row on disk as it is measured; the first step (compilation) reported apart."""
    import json

    from benchmarks import bench_step
    from fpo.model import decoder_layers

    argv = ["--steps", "2", "--methods", "fpo,simpo", "--no-other-policies", "--out", str(tmp_path)]
    rows, ratios = bench_step.main(argv + ["--body", "eager,compile", "--compile-backend", "aot_eager"])
    assert [r["method"] for r in rows] == ["fpo", "simpo", "fpo+compile", "simpo+compile"]
    assert all(r["step_ms"] > 0 and r["first_step_ms"] > 0 for r in rows)
    assert {"fpo+compile/fpo step_ms", "simpo+compile/simpo step_ms"} <= set(ratios["2x64"])
    written = json.loads((tmp_path / "bench_step_tiny_2x64_body.json").read_text())
    assert [r["method"] for r in written["rows"]] == [r["method"] for r in rows]
    step = bench_step.Step("tiny", 1, 16, "cpu", body="compile", compile_backend="aot_eager")
    assert all(getattr(layer, "_compiled_call_impl", None) is not None for layer in decoder_layers(step.policy))
    with pytest.raises(SystemExit):  # Liger's body kernels need CUDA: an argparse error, not a crash
        bench_step.main(argv + ["--body", "liger-body"])
    with pytest.raises(SystemExit):
        bench_step.main(argv + ["--body", "eager,jit"])


def test_library_patches_undone():
    """What liger-kernel patches into transformers' modeling modules is put back after the liger-body rows."""
    from transformers.models.llama import modeling_llama

    from fpo.model import transformers_patches_undone

    rope, norm = modeling_llama.apply_rotary_pos_emb, modeling_llama.LlamaRMSNorm
    with transformers_patches_undone():
        modeling_llama.apply_rotary_pos_emb = lambda *a: a
        modeling_llama.LlamaRMSNorm = object
        modeling_llama.added_by_patch = 1
    assert modeling_llama.apply_rotary_pos_emb is rope and modeling_llama.LlamaRMSNorm is norm
    assert not hasattr(modeling_llama, "added_by_patch")


def test_every_step_method_gives_a_finite_scalar_loss():
    from benchmarks.bench_step import Step

    s = Step("tiny", 1, 32, "cpu", "fp32")
    for method in ("simpo", "dpo-full-logits", "fpo", "tdpo2-lean", "tdpo2-authors"):
        if "tdpo" in method:
            s.load_reference()
        loss = s.loss(method)
        assert loss.dim() == 0 and torch.isfinite(loss)


def test_tdpo_as_its_code_runs_it_is_the_same_loss_as_ours():
    """The tdpo-authors rows follow TDPO's code path (policy log_softmax, reference softmax().log()), and
    simpo-authors SimPO's (fp32 full logits); each loss is our fused path's to fp32 rounding, so the rows compare
    equal work."""
    from benchmarks.bench_step import Step

    s = Step("tiny", 2, 32, "cpu", "fp32")
    s.load_reference()
    with torch.no_grad():  # a reference other than the policy: a KL that is not 0
        for p in s.ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for variant in ("tdpo1", "tdpo2"):
        with torch.no_grad():
            assert s.loss(f"{variant}-authors").item() == pytest.approx(s.loss(f"{variant}-lean").item(), rel=1e-5)
    with torch.no_grad():  # SimPO as its code runs it: the same loss as ours
        assert s.loss("simpo-authors").item() == pytest.approx(s.loss("simpo").item(), rel=1e-5)


@pytest.mark.parametrize("method", ["fpo", "simpo", "tdpo2-lean"])
def test_step_benchmark_entry(benchmark, method):
    from benchmarks.bench_step import Step

    s = Step("tiny", 1, 32, "cpu", "fp32")
    if method in ("tdpo2-lean",):
        s.load_reference()
    opt = torch.optim.Adam(s.policy.parameters(), lr=1e-6)

    def step():
        s.loss(method).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)


def test_step_estimate_on_fake_tensors(tmp_path, monkeypatch):
    """estimate_step at a tiny size: every method runs on fake tensors; bench_step finds the estimate."""
    from benchmarks import bench_step, estimate_step
    from fpo import assets

    rows, ratios, info = estimate_step.main(
        [
            "--preset",
            "tiny",
            "--seq-len",
            "32",
            "--methods",
            "simpo,fpo,fpo-ref,tdpo2-lean,tdpo2-authors",
            "--out",
            str(tmp_path),
            "--dataset",
            assets.EVAL_PAIRS,
        ]
    )
    hours = info["epoch"]["hours"]["fpo"]
    assert 0 < hours["share-prompt"] < hours["pack"] < hours["off"]
    by = {r["method"]: r for r in rows}
    assert by["fpo"]["phases_ms"]["sae"] > by["fpo-ref"]["phases_ms"]["sae"] > 0
    assert by["tdpo2-lean"]["tflop"] > by["simpo"]["tflop"] > 0  # the reference forward
    for m in ("tdpo2-lean", "tdpo2-authors"):  # the reference weights
        assert by[m]["peak_gb_estimate"] > by["simpo"]["peak_gb_estimate"]
    assert 0 < ratios["fpo sae share of step"] < 1
    # one policy for every method (bf16-mixed: fp32 weights, grads and Adam states), a few rows under others
    assert info["precision"] == "bf16-mixed" and by["fpo"]["bytes_per_param"] == 16
    comp, pure = by["fpo@bf16-compensated"], by["fpo@bf16-pure"]
    assert (comp["bytes_per_param"], pure["bytes_per_param"]) == (10, 8)
    assert pure["peak_gb_estimate"] < comp["peak_gb_estimate"] < by["fpo"]["peak_gb_estimate"]
    assert "fpo@bf16-compensated/fpo peak_gb_estimate" in ratios
    monkeypatch.setattr(bench_step, "ESTIMATES", str(tmp_path))
    measured = [{"method": "fpo"}, {"method": "dpo"}]
    assert bench_step.attach_estimates(measured, "tiny", 2, 32, False)
    assert measured[0]["peak_gb_est"] == by["fpo"]["peak_gb_estimate"] and measured[1]["step_ms_est"] is None


@pytest.mark.slow
def test_packing_benchmark_runs(tiny, tmp_path, monkeypatch):
    """bench_packing at a toy size: the token table (share-prompt never more tokens than pack, pack never more
    than off) and the timed FPO runs of every layout (on the tiny model: the runs' mechanics, not their speed)."""
    from benchmarks import bench_packing
    from fpo import assets

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the cache: the plain-PyTorch path (the kernels have own tests)
    rows, time_rows = bench_packing.main(
        [
            "--dataset",
            assets.EVAL_PAIRS,
            "--max-lengths",
            "64",
            "--pairs-per-mb",
            "2",
            "--time-steps",
            "2",
            "--time-max-length",
            "64",
            "--model",
            tiny["model"],
            "--sae",
            tiny["sae"],
            "--out",
            str(tmp_path),
        ]
    )
    by = {r["layout"]: r["tokens"] for r in rows}
    for how in ("stream", "rows"):
        assert by[f"share-prompt {how}"] <= by[f"pack {how}"] <= by["off"] and by[f"share-prompt {how}"] < by["off"]
    assert [r["layout"] for r in time_rows][:3] == ["off", "pack", "share-prompt"]
    assert all(r["step_s"] > 0 and r["peak_rss_mb"] > 0 for r in time_rows)
    assert time_rows[2]["tokens_per_step"] < time_rows[0]["tokens_per_step"]
    assert (tmp_path / "bench_packing_time.md").exists()


def test_topk_estimate_holds_one_chunk():
    """The TopK prediction on fake tensors: the fused forward holds one [C, m] fp32 chunk, naive [N, m] several
    times over; both take time."""
    from benchmarks import estimate_sae_topk
    from fpo_kernels.sae_topk import MIN_CHUNK_ROWS

    m, N = 8192, 4 * 1024
    rows = {r["provider"]: r for r in estimate_sae_topk.estimate([("t", 512, m, 4, 1024)], (16,))}
    chunk_mib = max(MIN_CHUNK_ROWS, (1 << 26) // (4 * m)) * m * 4 / 2**20
    assert chunk_mib <= rows["fused"]["peak_extra_mib"] <= 1.2 * chunk_mib
    assert rows["naive"]["peak_extra_mib"] >= 2 * N * m * 4 / 2**20
    assert all(r["predicted_ms"] > 0 for r in rows.values())


def test_run_gpu_quick_dry_run(tmp_path):
    """`run_gpu.sh quick` on the CPU (DRY_RUN=1): every stage is listed, every test file it would run collects and
    every benchmark it would run imports and parses its arguments, so the script cannot rot without a GPU."""
    import subprocess
    import sys

    root = ROOT
    env = dict(
        os.environ,
        DRY_RUN="1",
        OUT=str(tmp_path),
        PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
    )
    r = subprocess.run(
        ["bash", "benchmarks/run_gpu.sh", "quick"], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    log = (tmp_path / "quick.log").read_text()
    stages = [line.split(" (at most")[0] for line in log.splitlines() if line.startswith("[quick] ")]
    assert stages == [
        f"[quick] tests {f}"
        for f in (
            "kernels/test_sae_constraint",
            "kernels/test_sae_topk",
            "kernels/test_logprobs",
            "kernels/test_cache_pack",
            "training/test_precision",
            "training/test_packing",
            "training/test_compile",
            "training/test_body_kernels",
        )
    ] + [f"[quick] {s}" for s in ("step", "body", "sae", "topk", "logprobs", "heads", "profile")]
    quick = [line for line in log.splitlines() if line.startswith("[quick] ")]
    limits = [int(line.split(" (at most ")[1].split("s)")[0]) for line in quick]
    assert sum(limits) <= 480  # one call of at most 8 minutes
    summary = (tmp_path / "gpu_tests_summary.txt").read_text().splitlines()
    assert len(summary) == 8 and all(line.split(": ")[-1].isdigit() for line in summary)  # tests collected per file


def test_lm_head_peers_match_float64_where_they_run_here():
    """bench_heads' check on the CPU: ours and TRL's chunked head (torch tiles); Liger's Triton head under the
    interpreter in a process of its own (Triton decides interpretation when a kernel's module is imported)."""
    import subprocess
    import sys

    from benchmarks.bench_heads import check

    for name in ("ours", "trl", "naive"):
        assert check(name, "cpu", N=40, d=24, V=300)["ok"], name
    code = "from benchmarks.bench_heads import check; print(check('liger', 'cpu', N=24, d=16, V=100)['ok'])"
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.split()[-1] == "True", r.stderr[-2000:]


def test_evidence_methods_reads_a_curve_at_a_gain_and_claims_only_what_every_seed_shows():
    from benchmarks.evidence_methods import at_gain, paired_claim

    curve = [
        {"margin": 0.0, "d": 0.0},
        {"margin": 0.02, "d": 1.0},
        {"margin": 0.01, "d": 5.0},  # the margin fell back: the first crossing counts
        {"margin": 0.06, "d": 9.0},
    ]
    assert at_gain(curve, 0.01, "d") == pytest.approx(0.5)
    assert at_gain(curve, 0.04, "d") == pytest.approx(5.0 + 4.0 * (0.03 / 0.05))
    assert at_gain(curve, 0.07, "d") is None  # never reached
    c = paired_claim([0.5, 0.6, 0.55])
    assert c["claimed"] and c["mean"] == pytest.approx(0.55)
    assert not paired_claim([0.5, 1.2, 0.55])["claimed"]  # one seed on the other side of 1
    assert not paired_claim([0.9, 0.5, 0.99])["claimed"]  # one sign, but the mean within 2 standard errors


def test_evidence_methods_summary_table_and_plot_from_synthetic_runs(tmp_path):
    """The whole tail of the benchmark (equal gain, claims, finals, its markdown and plot) on made-up curves: FPO
    reaches each gain with half SimPO's D in every seed."""
    from benchmarks.evidence_methods import _plot, markdown, summarise

    settings = dict(seeds=[0, 1, 2], methods=["fpo", "simpo"], eval_pairs=8, pairs=16, steps=4, every=2,
                    batch_size=2, max_length=64, lr=1e-5, warmup=0, target_share=0.1)  # fmt: skip
    runs = {}
    for seed in settings["seeds"]:
        for m, slope in (("fpo", 1.0), ("simpo", 2.0)):
            curve = [{"step": 0, "margin": 0.0, "acc": 0.5, "kl": 0.0, "d": 0.0}]
            for step in (2, 4):
                g = 0.01 * step * (1 + seed) * (1.5 if m == "simpo" else 1.0)
                curve.append({"step": step, "margin": g, "acc": 0.6, "kl": 3 * g, "d": slope * g})
            runs[f"{m}-s{seed}"] = {"curve": curve, "two_steps": curve[1], "drift_total": 1.0, "shares": None}
    res = summarise(runs, settings)
    c = res["claims"]["d fpo/simpo"]
    assert c["ratios"] == pytest.approx([0.5, 0.5, 0.5]) and c["claimed"]  # one side of 1 in every seed, no spread
    assert res["claims"]["kl fpo/simpo"]["ratios"] == pytest.approx([1.0, 1.0, 1.0])
    assert res["matched"]["0"]["gain"] == pytest.approx(0.04)  # FPO's highest margin, the smaller
    text = markdown(res)
    assert "| d fpo/simpo | 0.5, 0.5, 0.5 |" in text
    _plot(res, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000
    runs["fpo-s1"]["curve"][-1]["margin"] = -0.05  # fell back below 0 after reaching 0.04 at step 2
    again = summarise(runs, settings)
    assert again["matched"]["1"]["gain"] == pytest.approx(0.04) and again["claims"]["d fpo/simpo"] is not None
