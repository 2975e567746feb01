"""`fpo demo` at its smallest setting, end to end on the real shipped model and SAE."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_smallest_setting(tmp_path):
    out = tmp_path / "demo"
    env = dict(os.environ, TRITON_INTERPRET="0")  # the real model on the CPU path; kernels are tested on their own
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fpo.cli",
            "demo",
            "--pairs",
            "2",
            "--eval-pairs",
            "2",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--max-length",
            "48",
            "--entropy-samples",
            "1",
            "--no-progress",
            "--output-dir",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    assert "not alignment quality" in r.stdout
    for method in ("fpo", "simpo", "tdpo2"):
        assert any(line.startswith(method) for line in r.stdout.splitlines()), r.stdout
    assert (out / "demo.png").stat().st_size > 1000
    # a demo keeps metrics and the plot: no models, no optimizer states
    assert not list(out.rglob("*.safetensors*")) or all("cache-" in str(p) for p in out.rglob("*.safetensors*"))
    assert not list(out.rglob("trainer_state.pt"))
    assert "1/9" in r.stdout and "9/9" in r.stdout
    result = json.loads((out / "demo.json").read_text())
    assert [row["method"] for row in result["table"]] == ["fpo", "simpo", "tdpo2"]
    for row in result["table"]:
        assert row["loss_ratio"] > 0 and row["margin"] == row["margin"] and row["acc_after"] is not None
    fpo = next(r for r in result["table"] if r["method"] == "fpo")
    assert fpo["d"] is not None and fpo["kl"] is not None
    # fpo's alpha is adapted to hold its constraint at 10% of the margin term; the table shows what it realised
    assert result["runs"]["fpo"]["target_share"] == 0.10
    assert fpo["alpha"] > 0 and "share early/mid/late" in r.stdout
    simpo = next(r for r in result["table"] if r["method"] == "simpo")
    assert simpo["d_vs_simpo"] in (None, 1.0) and 0 <= fpo["acc_se"] <= 0.5
    assert "± s.e." in r.stdout and "D/simpo" in r.stdout
    # the tables and their notes fit 100 columns; nothing announces what the demo then removes or never wrote
    report = r.stdout[r.stdout.index("[fpo demo] held-out, after training") :].splitlines()
    assert report and max(map(len, report)) <= 100, max(report, key=len)
    assert "optimizer, scheduler and RNG state" not in r.stdout
    assert r.stdout.count("trained models removed once evaluated") == 1
    # the feature view: the features SimPO moved most, and how far each method moved them
    features = json.loads((out / "features.json").read_text())
    assert features["runs"] == ["fpo", "simpo", "tdpo2"] and features["settings"]["rank_by"] == "simpo"
    simpo_drift = [f["drift"][1] for f in features["features"]]
    assert len(simpo_drift) == 10 and simpo_drift == sorted(simpo_drift, reverse=True)
    assert "features of" in r.stdout and result["features"]["runs"] == features["runs"]


def test_demo_never_writes_into_a_folder_it_did_not_make(tmp_path):
    """A user's runs in the folder (fpo train's default is runs/fpo, so `--output-dir runs` holds them) are
    refused before anything is written; an earlier demo's folder is taken."""
    from fpo.demo import DEMO_MARK, claim_demo_dir

    runs = tmp_path / "runs"
    (runs / "simpo").mkdir(parents=True)
    (runs / "simpo" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="was not made by `fpo demo`"):
        claim_demo_dir(str(runs))
    assert sorted(os.listdir(runs)) == ["simpo"] or sorted(os.listdir(runs)) == [".fpo.lock", "simpo"]
    assert (runs / "simpo" / "metrics.jsonl").read_text() == "{}\n"
    fresh = tmp_path / "demo"
    claim_demo_dir(str(fresh)).release()
    (fresh / "simpo").mkdir()
    claim_demo_dir(str(fresh)).release()  # the demo's own folder, run again
    assert (fresh / DEMO_MARK).exists()
    lock = claim_demo_dir(str(fresh))
    with pytest.raises(ValueError, match="in use by another process"):
        claim_demo_dir(str(fresh))
    lock.release()


def test_a_stopped_parent_takes_its_training_child_with_it(tmp_path):
    """SIGKILL to the process that started a child through run_child: the child ends too."""
    import signal
    import time

    script = tmp_path / "parent.py"
    pidfile = tmp_path / "child.pid"
    child_script = tmp_path / "child.py"
    child_script.write_text(f"import os, time\nopen({str(pidfile)!r}, 'w').write(str(os.getpid()))\ntime.sleep(60)\n")
    script.write_text(
        f"import sys\nfrom fpo.demo import run_child\nrun_child([sys.executable, {str(child_script)!r}], 'x')\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)])
    deadline = time.time() + 300  # the parent imports torch before it starts the child: slow on a loaded machine
    while not (pidfile.exists() and pidfile.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    child = int(pidfile.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    for _ in range(300):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the child outlived its parent")


def test_a_killed_conversion_leaves_nothing_behind_for_long(tmp_path, monkeypatch):
    """The temporary folder a conversion killed part-way left (about 500 MB) is removed by the next conversion,
    which holds a lock so that it never removes one still being written."""
    import fpo.model
    from fpo import assets

    class Fake:
        def save_pretrained(self, folder):
            with open(os.path.join(folder, "config.json"), "w") as f:
                f.write("{}")

    monkeypatch.setenv("FPO_HOME", str(tmp_path))
    monkeypatch.setattr(assets, "_gguf_path", lambda: "model.gguf")
    monkeypatch.setattr(fpo.model, "load_model", lambda *a, **k: Fake())
    monkeypatch.setattr(fpo.model, "load_tokenizer", lambda *a, **k: Fake())
    models = tmp_path / "models"
    stale = models / "SmolLM2-135M-Instruct.tmpk1ll3d"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    out = assets.ensure_demo_model(lambda *a: None)
    assert os.path.exists(os.path.join(out, "config.json")) and not stale.exists()
    assert sorted(os.listdir(models)) == [".convert.lock", "SmolLM2-135M-Instruct"]
