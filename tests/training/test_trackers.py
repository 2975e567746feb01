"""--report-to: every metrics.jsonl line reaches each tracker, read back from its own offline store
(TensorBoard's event files, MLflow's SQLite store, trackio's local database, wandb's offline run file)."""

import json
import os
import sys

import pytest

from fpo.config import config_from_dict
from fpo.trackers import open_trackers
from fpo.train import train

sys.path.insert(0, os.path.dirname(__file__))
from test_train import _cfg  # noqa: E402


def test_every_tracker_gets_every_metric_line_and_the_config(tiny, tmp_path, monkeypatch):
    for lib in ("tensorboard", "mlflow", "trackio", "wandb"):
        pytest.importorskip(lib)
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    for var in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "WANDB_PROJECT", "TRACKIO_PROJECT", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "run"
    cfg = _cfg(
        tiny,
        None,
        tmp_path,
        "simpo",
        max_steps=3,
        output_dir=str(out),
        run_name="simpo-trackers",
        report_to=["tensorboard", "mlflow", "trackio", "wandb"],
    )
    train(cfg, log=lambda *a, **k: None)
    lines = [json.loads(line) for line in open(out / "metrics.jsonl")]
    want = [(r["step"], r["loss"]) for r in lines]
    assert [s for s, _ in want] == [1, 2, 3]

    def same(got):  # the same steps, and the same losses (TensorBoard keeps float32)
        return [s for s, _ in got] == [s for s, _ in want] and [v for _, v in got] == pytest.approx(
            [v for _, v in want], rel=1e-6
        )

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    ea.Reload()
    assert same([(e.step, e.value) for e in ea.Scalars("train/loss")])
    assert {"train/rewards/accuracies", "train/learning_rate", "train/grad_norm", "train/tokens_per_s"} <= set(
        ea.Tags()["scalars"]
    )
    config_text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"method": "simpo"' in config_text

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri="sqlite:///" + str(out / "mlflow.db"))
    [run] = client.search_runs([client.get_experiment_by_name("fpo").experiment_id])
    assert run.info.run_name == "simpo-trackers" and run.info.status == "FINISHED"
    assert same([(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")])
    assert json.loads(run.data.params["method"]) == "simpo" and json.loads(run.data.params["lr"]) == cfg["lr"]

    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs("fpo", "simpo-trackers")
    assert same([(r["step"], r["train/loss"]) for r in logs])
    assert SQLiteStorage.get_run_config("fpo", "simpo-trackers")["method"] == "simpo"

    # wandb keeps an offline run as records in its own binary log: the metric names and the config are in it
    [run_dir] = [d for d in os.listdir(out / "wandb") if d.startswith("offline-run-")]
    [blob] = [f for f in os.listdir(out / "wandb" / run_dir) if f.endswith(".wandb")]
    data = (out / "wandb" / run_dir / blob).read_bytes()
    assert b"train/loss" in data and b"train/rewards/accuracies" in data and b"simpo-trackers" in data


def test_tracker_choices_and_missing_libraries_are_refused_by_name(tiny, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="report_to must be one of"):
        config_from_dict(_cfg(tiny, None, tmp_path, "simpo", report_to="comet"))
    with pytest.raises(ValueError, match="'none' cannot be combined"):
        config_from_dict(_cfg(tiny, None, tmp_path, "simpo", report_to=["none", "wandb"]))
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(ValueError, match=r"fpo-kernels\[mlflow\]"):
        open_trackers(["mlflow"], str(tmp_path), "x", {})
    # a tracker that started is closed again when a later one cannot start
    pytest.importorskip("tensorboard")
    with pytest.raises(ValueError, match="mlflow"):
        open_trackers(["tensorboard", "mlflow"], str(tmp_path), "x", {})
    assert os.listdir(tmp_path / "tensorboard")  # it had started (and wrote its config) before mlflow failed


def test_cli_report_to_is_repeatable(tiny, tmp_path):
    from fpo.cli import _load_train_config, build_parser

    args = build_parser().parse_args(
        [
            "train",
            "--method",
            "simpo",
            "--model",
            tiny["model"],
            "--dataset",
            tiny["pairs"],
            "--report-to",
            "tensorboard",
            "--report-to",
            "mlflow",
            "--run-name",
            "r1",
        ]
    )
    cfg = _load_train_config(args)
    assert cfg.report_to == ["tensorboard", "mlflow"] and cfg.run_name == "r1"


def test_an_unusable_mlflow_uri_is_a_sentence(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    from fpo.trackers import open_trackers

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://nowhere")
    with pytest.raises(ValueError, match="report_to mlflow could not start .*check MLFLOW_TRACKING_URI"):
        open_trackers("mlflow", str(tmp_path), "run", {})
