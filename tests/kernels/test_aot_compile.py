"""Every kernel variant compiles for an H100 (sm_90a) with Triton's real compiler and the argument
specialisation a real launch gets, no GPU needed; no bf16/fp16 variant spills registers."""

import json
import os
import subprocess
import sys

import pytest
from helpers import ROOT

from fpo_kernels.kernels import all_kernels


@pytest.mark.slow  # minutes: the full compile report, left out of the fast loop
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_resources", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    rows = json.loads((tmp_path / "kernel_resources.json").read_text())["rows"]
    # SAE: dtypes x (spans or mask x (pool x gather x 4 configs + gate x 2 configs) + dh x 2 configs) + the fp32
    # reduction; lm head: softcap or not x (forwards on fp32 logits: log-probs + KL with labels or not, once;
    # backwards: the same, per dtype)
    assert len(rows) == 3 * (2 * (2 * 4 + 2) + 2) + 1 + 2 * (1 + 2) + 2 * 3 * (1 + 2)
    kernels = {r["kernel"] for r in rows}
    assert kernels == {k.name for k in all_kernels()}, kernels
    spills = [
        (r["kernel"], r["dtype"], r["constexprs"], r["spill_store_bytes"])
        for r in rows
        if r["dtype"] != "fp32" and (r["spill_store_bytes"] or r["spill_load_bytes"])
    ]
    assert not spills, spills
    sae = [r for r in rows if r["kernel"].startswith("_sae") and r["dtype"] == "bf16"]
    assert all(r["wgmma"] and r["cp_async"] for r in sae)  # tl.dot became Hopper's warpgroup MMA, loads are async
    assert all(r["occupancy"] > 0 for r in rows)
