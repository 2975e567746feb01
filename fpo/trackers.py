"""Experiment trackers (`--report-to`): every metric line that goes to metrics.jsonl goes to each tracker too,
under "train/<name>" at its optimizer step, and the run's config once at the start. Each tracker is its own
library, installed as an optional extra (pip install "fpo-kernels[tensorboard]" and so on), and each one works
offline:

- tensorboard: event files in OUTPUT_DIR/tensorboard (`tensorboard --logdir OUTPUT_DIR/tensorboard`).
- wandb: WANDB_MODE as set, else offline; files in OUTPUT_DIR/wandb (`wandb sync` uploads them later).
  Project: WANDB_PROJECT, else "fpo".
- trackio: its local store (TRACKIO_DIR, else trackio's default); project TRACKIO_PROJECT, else "fpo".
- mlflow: MLFLOW_TRACKING_URI, else a SQLite store OUTPUT_DIR/mlflow.db; experiment MLFLOW_EXPERIMENT_NAME,
  else "fpo".
"""

from __future__ import annotations

import json
import os

__all__ = ["TRACKERS", "open_trackers", "Trackers"]

TRACKERS = ("none", "tensorboard", "wandb", "trackio", "mlflow")
_EXTRA = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
}  # name: (module, extra)


def _need(name):
    module, extra = _EXTRA[name]
    try:
        return __import__(module)
    except ImportError:
        raise ValueError(
            f"report_to {name}: the {module} package is not installed; "
            f'pip install "fpo-kernels[{extra}]" (or pip install {module})'
        ) from None


class _TensorBoard:
    def __init__(self, out_dir, run_name, config):
        _need("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=os.path.join(out_dir, "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=1, default=str) + "\n```", 0)

    def log(self, metrics, step):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self):
        self.writer.close()


class _Wandb:
    def __init__(self, out_dir, run_name, config):
        wandb = _need("wandb")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "fpo"),
            name=run_name,
            config=config,
            dir=out_dir,
            mode=os.environ.get("WANDB_MODE", "offline"),
            reinit="create_new",
        )

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


class _Trackio:
    def __init__(self, out_dir, run_name, config):
        self.trackio = _need("trackio")
        self.run = self.trackio.init(project=os.environ.get("TRACKIO_PROJECT", "fpo"), name=run_name, config=config)

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def close(self):
        self.run.finish()


class _MLflow:
    def __init__(self, out_dir, run_name, config):
        mlflow = _need("mlflow")
        uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + os.path.abspath(
            os.path.join(out_dir, "mlflow.db")
        )
        self.client = mlflow.tracking.MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "fpo")
        exp = self.client.get_experiment_by_name(name)
        exp_id = exp.experiment_id if exp is not None else self.client.create_experiment(name)
        self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id
        from mlflow.entities import Param

        # mlflow params are strings of at most 6000 characters
        self.client.log_batch(
            self.run_id, params=[Param(k, json.dumps(v, default=str)[:6000]) for k, v in sorted(config.items())]
        )

    def log(self, metrics, step):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def close(self):
        self.client.set_terminated(self.run_id)


_BACKENDS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "trackio": _Trackio, "mlflow": _MLflow}


def tracker_names(report_to) -> list[str]:
    """The trackers a report_to value names, checked: none alone means no tracker."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"report_to {unknown[0]!r}: not one of {TRACKERS}")
    if "none" in names and len(names) > 1:
        raise ValueError(f"report_to {names}: 'none' cannot be combined with a tracker")
    return list(dict.fromkeys(n for n in names if n != "none"))


class Trackers:
    """The run's trackers as one: log(record, step) sends the numeric metrics of a metrics.jsonl line."""

    def __init__(self, backends: list):
        self.backends = backends

    def log(self, record: dict, step: int):
        metrics = {
            "train/" + k: v
            for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        for b in self.backends:
            b.log(metrics, step)

    def close(self):
        for b in self.backends:
            b.close()
        self.backends = []


def open_trackers(report_to: str | list[str] | None, out_dir: str, run_name: str, config: dict) -> Trackers:
    """Start every tracker report_to names (a missing library is an error naming its extra); each one
    started is closed again if a later one fails."""
    started = []
    try:
        for name in tracker_names(report_to):
            try:
                started.append(_BACKENDS[name](out_dir, run_name, config))
            except (ImportError, ValueError):
                raise
            except Exception as e:  # a tracker's own failure to start: an unusable URI, a store it cannot open
                why = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                hint = "; check MLFLOW_TRACKING_URI" if name == "mlflow" else ""
                raise ValueError(
                    f"report_to {name} could not start ({why}){hint}: fix it, or train without --report-to {name}"
                ) from None
    except BaseException:
        Trackers(started).close()
        raise
    return Trackers(started)
