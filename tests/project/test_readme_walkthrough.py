"""The README's "Now your own data" commands, run as written (the same lines, read from the README), on small
files of the shipped pairs, with the demo model scripts/setup.sh converts."""

import os
import shlex
import subprocess
import sys

import pytest

from fpo import assets

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _walkthrough() -> list[str]:
    text = open(os.path.join(ROOT, "README.md")).read()
    section = text[text.index("## Now your own data") :]
    block = section[section.index("```bash") + len("```bash") : section.index("```", section.index("```bash") + 7)]
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


@pytest.mark.slow
def test_the_own_data_walkthrough_runs_as_written(tmp_path):
    commands = _walkthrough()
    assert [c.split()[1] for c in commands if c.startswith(".venv/bin/fpo")] == [
        "precompute", "precompute", "train", "eval", "features"
    ]  # fmt: skip
    model = assets.ensure_demo_model(lambda *a: None)
    with open(assets.TRAIN_PAIRS) as f:
        rows = f.readlines()
    (tmp_path / "my_pairs.jsonl").write_text("".join(rows[:8]))
    (tmp_path / "my_heldout.jsonl").write_text("".join(rows[100:104]))
    env = dict(os.environ, TRITON_INTERPRET="0")
    where = {"$SAE": os.path.join(ROOT, "assets", "sae-smollm2-135m-layer15"), "$M": model}
    fpo = [sys.executable, "-m", "fpo.cli"]
    for line in commands:
        if "=" in line.split()[0]:  # M=..., SAE=...: the test sets them, to this machine's paths
            continue
        words = shlex.split(line.split("#")[0])
        words = [where.get(w, w) for w in words]
        assert words[0] == ".venv/bin/fpo"
        if words[1] == "train":
            words += ["--no-progress"]
        r = subprocess.run(fpo + words[1:], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{line}\n{r.stderr[-3000:]}"
        if words[1] == "eval":  # the table: a header, a rule, one row; no column left blank
            lines = [x for x in r.stdout.splitlines() if x.strip()]
            head = next(k for k, x in enumerate(lines) if "accuracy_reward" in x)
            names, values = lines[head].split(), lines[head + 2].split()
            assert {"accuracy_reward", "kl", "d", "entropy"} <= set(names)
            assert len(values) == len(names) and "-" not in values, f"a blank column:\n{lines[head]}\n{lines[head + 2]}"
            assert "blank;" not in r.stdout
    assert (tmp_path / "runs" / "features.html").exists()
    assert (tmp_path / "runs" / "fpo" / "final" / "run_config.json").exists()
