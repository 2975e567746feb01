"""benchmarks/bench_peers: fpo train against TRL's trainers, each run in its own process, on the tiny model. The
rows must describe equal work: the same pairs, the same padded positions for the padded runs, and the real
tokens of each trainer's own tokenisation within one per response."""

import json

import pytest

from benchmarks import bench_peers


def test_compare_judges_each_row_against_its_peer():
    rows = [
        {"run": "trl-simpo", "s_per_pair": 10.0, "timed_s": 100.0, "peak_mb": 1000.0},
        {"run": "fpo-simpo", "s_per_pair": 5.0, "timed_s": 70.0, "peak_mb": 900.0},
        {"run": "fpo-fpo", "s_per_pair": 7.0, "timed_s": 60.0, "peak_mb": 950.0},
        {"run": "trl-dpo", "s_per_pair": 8.0, "timed_s": 80.0, "peak_mb": 1200.0},
        {"run": "fpo-dpo", "s_per_pair": 4.0, "timed_s": 20.0, "peak_mb": 600.0},
    ]
    checks = {(c["ours"], c["column"]): c for c in bench_peers.compare(rows)}
    by = {r["run"]: r for r in rows}
    assert by["fpo-dpo"]["vs"] == "trl-dpo" and by["fpo-dpo"]["time_ratio"] == pytest.approx(0.5)
    assert by["fpo-dpo"]["total_ratio"] == pytest.approx(0.25)
    assert by["fpo-fpo"]["vs"] == "trl-simpo" and by["fpo-fpo"]["memory_ratio"] == pytest.approx(0.95)
    assert "vs" not in by["trl-simpo"]
    assert checks[("fpo-simpo", "s_per_pair")]["met"] and checks[("fpo-simpo", "s_per_pair")]["ratio"] == 0.5
    assert not checks[("fpo-simpo", "peak_mb")]["met"]  # 0.9 > 0.8
    assert not checks[("fpo-fpo", "s_per_pair")]["met"]  # 0.7 > 0.65
    assert not checks[("fpo-simpo", "timed_s")]["met"] and checks[("fpo-fpo", "timed_s")]["met"]  # 0.7; 0.6


@pytest.mark.usefixtures("no_interpreter")
def test_runs_do_equal_work_on_the_tiny_model(tiny, tmp_path):
    out = tmp_path / "res"
    rows, checks = bench_peers.main(
        [
            "--model",
            tiny["model"],
            "--dataset",
            tiny["pairs"],
            "--pairs",
            "4",
            "--max-length",
            "128",
            "--max-prompt-length",
            "64",
            "--runs",
            "trl-simpo,fpo-simpo-padded,fpo-simpo",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    by = {r["run"]: r for r in rows}
    assert set(by) == {"trl-simpo", "fpo-simpo-padded", "fpo-simpo"}
    for r in rows:
        assert r["steps"] == 2 and r["s_per_pair"] > 0 and r["peak_mb"] > 0
    # padded both: the same positions; each trainer's own tokenisation: within a token per response
    assert by["trl-simpo"]["positions_per_pair"] == by["fpo-simpo-padded"]["positions_per_pair"]
    assert abs(by["trl-simpo"]["real_tokens_per_pair"] - by["fpo-simpo-padded"]["real_tokens_per_pair"]) <= 2
    assert by["fpo-simpo"]["positions_per_pair"] < by["fpo-simpo-padded"]["positions_per_pair"]  # the prompt once
    assert by["fpo-simpo"]["vs"] == "trl-simpo"
    doc = json.loads((out / "peers_cpu.json").read_text())
    assert doc["settings"]["max_length"] == 128 and doc["settings"]["gradient_checkpointing"] is True
    assert [c["ours"] for c in doc["targets"]] == [c["ours"] for c in checks]
    assert doc["environment"]["trl"]
    _, again = bench_peers.main(["--report", str(out / "peers_cpu.json")])  # the table again, from the rows
    assert again == checks
