"""What a run reports as it goes: each logged step's metrics, read from the device once per log step and
checked, into OUTPUT_DIR/metrics.jsonl, the trackers (--report-to) and the progress bar; and, once, whether the
constraint is large enough to matter."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from fpo_kernels.losses import constraint_share

from . import distributed as dist_utils
from ._types import Device, Log
from .files import atomic_write_text
from .progress import progress_bar
from .trackers import open_trackers

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["RunLog", "peak_memory_mb", "SHARE_CHECK_STEP", "RECORD_NAMES"]

SHARE_CHECK_STEP = 10  # when the constraint's share of the loss is first judged (mean over the logged steps so far)

# A step's metrics under TRL's names (DPOTrainer, CPOTrainer), so that an fpo run overlays a TRL run in any
# tracker: the losses' per-pair names -> the logged name. learning_rate, grad_norm, epoch and loss are TRL's too.
RECORD_NAMES = {
    "reward_chosen": "rewards/chosen",
    "reward_rejected": "rewards/rejected",
    "margin": "rewards/margins",
    "accuracy": "rewards/accuracies",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
}


def peak_memory_mb(device: Device) -> float:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS on Linux


class RunLog:
    """history: the run's list of metric records (a resumed run's, from its checkpoint), appended to in place.
    Only the main rank writes; every rank takes part in the metrics' all-reduce."""

    def __init__(
        self,
        cfg: TrainConfig,
        history: list,
        step: int,
        total_steps: int,
        steps_per_epoch: int,
        world: int,
        device: torch.device,
        log: Log,
    ):
        self.cfg, self.history, self.total_steps, self.world, self.device, self.log = (
            cfg,
            history,
            total_steps,
            world,
            device,
            log,
        )
        self.steps_per_epoch = steps_per_epoch
        self.file = self.trackers = self.bar = None
        self._share_checked = False
        if not dist_utils.is_main():
            return
        os.makedirs(cfg.output_dir, exist_ok=True)
        path = os.path.join(cfg.output_dir, "metrics.jsonl")
        # on resume, the checkpoint's history is the truth: lines logged after it (or torn by a kill) go
        atomic_write_text(path, "".join(json.dumps(rec) + "\n" for rec in history))
        self.file = open(path, "a")
        try:
            self.trackers = open_trackers(
                cfg.report_to,
                cfg.output_dir,
                cfg.run_name or os.path.basename(os.path.abspath(cfg.output_dir)),
                dataclasses.asdict(cfg),
            )
        except BaseException:
            self.file.close()
            raise
        if cfg.progress:
            self.bar = progress_bar(total_steps, step, f"train {cfg.method}", "step")

    def step_done(self):
        if self.bar is not None:
            self.bar.update(1)

    def flush(
        self,
        pending: list[tuple[int, dict[str, torch.Tensor], float]],
        t_start: float,
        tokens: int,
        on_nonfinite: Callable[[str], None],
        timed: bool = True,
    ) -> None:
        """Read the pending steps' device metrics [(step, {name: tensor}, the lr the step ran at)] once, check them
        (on_nonfinite(what) raises), write them. timed False (a compiled run's first step, compilation included):
        no step time or throughput is recorded, only first_step_s."""
        if not pending:
            return
        keys = sorted(pending[0][1])
        stacked = torch.stack([torch.stack([m[k].float() for k in keys]) for _, m, _ in pending])
        stacked = dist_utils.all_reduce_mean(stacked).cpu()
        elapsed = time.time() - t_start
        for (step, _, lr), row in zip(pending, stacked.tolist()):
            rec: dict[str, Any] = {"step": step, "epoch": step / self.steps_per_epoch}
            rec.update((RECORD_NAMES.get(k, k), v) for k, v in zip(keys, row))
            for k in ("tokens_processed", "response_tokens"):  # totals over ranks, not means
                rec[k] = round(rec[k] * self.world)
            share = constraint_share(rec["constraint_abs"], rec["margin_abs"]) if "constraint_abs" in rec else None
            if share is not None:  # not logged while the margin is ~0 (the first step)
                rec["constraint_share"] = share
            if "protect_term" in rec:  # the protection term against |beta x margin|, as the constraint's share
                share = constraint_share(rec["protect_term"], rec["reward_margin_abs"])
                if share is not None:
                    rec["protect_share"] = share
            if not all(math.isfinite(v) for v in row):
                bad = [k for k, v in rec.items() if isinstance(v, float) and not math.isfinite(v)]
                on_nonfinite(f"non-finite {bad} at step {step}")
            rec.update(
                learning_rate=lr,
                tokens_per_s=tokens * self.world / max(elapsed, 1e-9) if timed else None,
                step_time_s=elapsed / len(pending) if timed else None,
                peak_memory_mb=peak_memory_mb(self.device),
            )
            if not timed:
                rec["first_step_s"] = elapsed
            self.history.append(rec)
            if self.file is not None:
                self.file.write(json.dumps(rec) + "\n")
            if self.trackers is not None:
                self.trackers.log(rec, step)
        if self.file is not None:
            self.file.flush()
        last = self.history[-1]
        # the policy starts at the reference, where D (and TDPO's KL) is 0: judge the share once it has moved
        if (
            not self._share_checked
            and "constraint_abs" in last
            and (last["step"] >= SHARE_CHECK_STEP or last["step"] == self.total_steps)
        ):
            recent = self.history[-SHARE_CHECK_STEP:]
            share = constraint_share(sum(h["constraint_abs"] for h in recent), sum(h["margin_abs"] for h in recent))
            if share is not None:
                self._share_checked = True
                self._warn_if_constraint_is_negligible(share, last["step"])
        if self.bar is not None:
            extra = {"share": f"{last['constraint_share']:.1%}"} if "constraint_share" in last else {}
            self.bar.set_postfix(
                loss=f"{last['loss']:.4g}",
                acc=f"{last['rewards/accuracies']:.2f}",
                **extra,
                lr=f"{last['learning_rate']:.3g}",
                tok_s=f"{last['tokens_per_s']:.0f}" if last["tokens_per_s"] is not None else "-",
            )

    def _warn_if_constraint_is_negligible(self, share, step):
        """Once, at the first log step from step SHARE_CHECK_STEP: a constraint below 1% of the margin term
        changes next to nothing."""
        if share >= 0.01:
            return
        cfg = self.cfg
        knob = "--alpha" + (
            " or --constraint-norm ref (D divided by the reference's feature scale)"
            if cfg.method == "fpo" and cfg.constraint_norm == "none"
            else ""
        )
        self.log(
            f"[fpo] warning: at step {step} the {'feature' if cfg.method == 'fpo' else 'KL'} constraint is "
            f"{share:.2%} of the margin term (mean |constraint term| / mean |beta x margin|): "
            f"at alpha {cfg.alpha} it changes almost nothing; raise {knob}: --alpha "
            f"{cfg.alpha * 0.1 / max(share, 1e-12):.3g} would make it about 10% now, and --target-share 0.1 keeps "
            "it there as training goes"
        )

    def close(self):
        for thing in (self.bar, self.file, self.trackers):
            if thing is not None:
                thing.close()
        self.bar = self.file = self.trackers = None
