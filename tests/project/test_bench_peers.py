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


def test_compiled_rows_face_the_compiled_peer_and_the_best_faces_the_best():
    rows = [
        {"run": "trl-simpo", "s_per_pair": 10.0, "timed_s": 100.0, "peak_mb": 1000.0},
        {"run": "trl-simpo+compile", "s_per_pair": 6.0, "timed_s": 90.0, "peak_mb": 800.0},
        {"run": "trl-simpo+liger", "s_per_pair": 8.0, "timed_s": 70.0, "peak_mb": 700.0},
        {"run": "fpo-simpo", "s_per_pair": 5.0, "timed_s": 50.0, "peak_mb": 600.0},
        {"run": "fpo-simpo+compile", "s_per_pair": 3.0, "timed_s": 45.0, "peak_mb": 560.0},
        {"run": "fpo-fpo+compile", "s_per_pair": 4.5, "timed_s": 40.0, "peak_mb": 640.0},
    ]
    checks = {(c["ours"], c["column"]): c for c in bench_peers.compare(rows)}
    by = {r["run"]: r for r in rows}
    assert by["fpo-simpo+compile"]["vs"] == "trl-simpo+compile" and by["fpo-simpo"]["vs"] == "trl-simpo"
    assert by["fpo-simpo+compile"]["time_ratio"] == pytest.approx(0.5)
    assert checks[("fpo-simpo+compile", "s_per_pair")]["met"] and not checks[("fpo-fpo+compile", "s_per_pair")]["met"]
    best = {b["method"]: b for b in bench_peers.best_of_each_side(rows)}
    assert set(best) == {"simpo", "fpo"}  # no dpo row on either side
    assert (best["simpo"]["ours"], best["simpo"]["peer"]) == ("fpo-simpo+compile", "trl-simpo+compile")
    assert best["simpo"]["s_per_pair_ratio"] == pytest.approx(0.5)
    assert best["simpo"]["peak_mb_ratio"] == pytest.approx(0.7)
    assert (best["fpo"]["ours"], best["fpo"]["peer"]) == ("fpo-fpo+compile", "trl-simpo+compile")


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
        assert r["steps"] == 2 and r["s_per_pair"] > 0 and r["peak_mb"] > 0 and r["graphs"] == 0
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


@pytest.mark.usefixtures("no_interpreter")
def test_compiled_runs_on_the_tiny_model(tiny, tmp_path):
    """TRL with its own torch_compile=True and ours with --compile, on the same pairs (a backend that generates no
    code, to keep the test short); each compiled row is judged against the compiled peer."""
    argv = ["--model", tiny["model"], "--dataset", tiny["pairs"], "--pairs", "4", "--max-length", "128"]
    argv += ["--max-prompt-length", "64", "--device", "cpu", "--compile-backend", "aot_eager"]
    rows, checks = bench_peers.main(argv + ["--runs", "trl-simpo+compile,fpo-simpo+compile", "--out", str(tmp_path)])
    by = {r["run"]: r for r in rows}
    assert all(r["steps"] == 2 and r["s_per_pair"] > 0 and r["graphs"] > 0 for r in rows)  # both compiled
    assert by["fpo-simpo+compile"]["vs"] == "trl-simpo+compile"
    assert [(c["ours"], c["column"]) for c in checks] == [("fpo-simpo+compile", "s_per_pair")]
    doc = json.loads((tmp_path / "peers_cpu.json").read_text())
    assert doc["settings"]["compile_backend"] == "aot_eager" and doc["best_of_each_side"][0]["method"] == "simpo"
