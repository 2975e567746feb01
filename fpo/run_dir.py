"""A run's directory: claiming it (one run per directory, never another run's files), its checkpoints
(written whole or not at all, with checksums; `Checkpointer` saves and restores a run's model, optimizer,
scheduler and RNG) and reading one back to resume (only safe types, only the same run)."""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from . import distributed as dist_utils
from ._types import Log, Model, PathLike, Tokenizer
from .config import RESUMABLE_CHANGES
from .files import atomic_write_json, sha256_of, temp_dir
from .locking import DirectoryLock
from .lora import ADAPTER_WEIGHTS, adapter_weights, load_adapter_weights, merged_weights, save_adapter_config

if TYPE_CHECKING:
    from .config import TrainConfig
    from .precision import Precision

__all__ = [
    "RUN_FILES",
    "CHECKSUMS",
    "Checkpointer",
    "load_adapters",
    "claim_output_dir",
    "checkpoints",
    "find_checkpoint",
    "read_state",
    "check_resumable",
    "check_resumable_inputs",
    "RUN_CONFIG",
    "write_folder",
    "write_checksums",
    "verify_checksums",
    "set_config_dtype",
    "written",
]

RUN_FILES = ("metrics.jsonl", "summary.json", "final", "final-merged", "tensorboard")  # with checkpoint-*: a run's own
CHECKSUMS = "checksums.json"
RUN_CONFIG = "run_config.json"  # in every checkpoint and final folder: the run's config as readable JSON
REPLACED = ".replaced"  # a model folder moved aside while its successor is renamed into place (write_folder)


def checkpoints(d: PathLike) -> list[str]:
    """The finished checkpoint-* folders in d, oldest first."""
    return sorted(n for n in os.listdir(d) if re.fullmatch(r"checkpoint-\d+", n)) if os.path.isdir(d) else []


def claim_output_dir(d: str, resume: str | None, overwrite: bool, log: Log) -> DirectoryLock:
    """output_dir must be writable, and must not hold another run unless this run resumes it or was told to
    replace it (overwrite, which removes only a run's own files). Returns the directory's lock, held for the run."""
    if os.path.lexists(d) and not os.path.isdir(d):
        raise ValueError(
            f"output_dir {d} is {'a broken symlink' if os.path.islink(d) else 'a file'}, not a "
            "directory: choose another --output-dir"
        )
    try:
        os.makedirs(d, exist_ok=True)
        lock = DirectoryLock(d, "output_dir")  # one run per directory at a time
    except OSError as e:
        raise ValueError(f"output_dir {d} is not writable ({e.strerror}): choose another --output-dir") from None
    try:
        _finish_interrupted_writes(d, log)
        held = sorted(n for n in os.listdir(d) if n in RUN_FILES or n.startswith("checkpoint-"))
        if not held or resume:
            return lock
        if not overwrite:
            if not any(n.startswith("checkpoint-") or n == "final" for n in held):  # stopped before its first save
                raise ValueError(
                    f"output_dir {d} holds a run that stopped before saving any checkpoint "
                    f"({', '.join(held[:4])}): nothing to resume; pass --overwrite to start it again, "
                    "or choose another --output-dir"
                )
            raise ValueError(
                f"output_dir {d} holds another run ({', '.join(held[:4])}): pass --resume latest to "
                "continue it, --overwrite to replace it, or choose another --output-dir"
            )
        for n in held:
            path = os.path.join(d, n)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        log(f"[fpo] overwrite: removed the previous run in {d}")
        return lock
    except BaseException:
        lock.release()
        raise


def _own(name) -> bool:
    return name in RUN_FILES or name.startswith("checkpoint-")


def _finish_interrupted_writes(d, log):
    """What a run killed while writing left behind: half-written temporaries of its own names are removed; a
    model folder moved aside to be replaced (write_folder) goes back in place when its successor never arrived,
    and is removed when it did."""
    for n in os.listdir(d):
        path = os.path.join(d, n)
        if n.endswith(REPLACED) and _own(n.removesuffix(REPLACED)) and not os.path.islink(path):
            target = path.removesuffix(REPLACED)
            if os.path.exists(target):
                shutil.rmtree(path)
            else:
                os.rename(path, target)
                log(f"[fpo] {target} restored: a run was stopped while replacing it")
        elif ".tmp" in n and _own(n.split(".tmp", 1)[0]):
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)


def find_checkpoint(output_dir: str, where: str) -> str:
    """The checkpoint folder `where` names: a path, or 'latest' in output_dir."""
    if where != "latest":
        return where
    found = checkpoints(output_dir)
    if not found:
        raise ValueError(
            f"resume='latest' but {output_dir} holds no checkpoint-* folder: nothing to resume (a run "
            "stopped before its first save starts again with --overwrite instead of --resume)"
        )
    return os.path.join(output_dir, found[-1])


def read_state(where: str, precision: str, device_type: str) -> dict:
    """trainer_state.pt through torch.load(weights_only=True): tensors, numbers, strings and containers
    only, so a crafted file cannot run code. Every file is checked against the checksums recorded when the
    checkpoint was written first; the checkpoint must have been trained under `precision`."""
    state_path = os.path.join(where, "trainer_state.pt")
    if not os.path.exists(state_path):
        raise ValueError(f"resume: {where} is not a checkpoint (no trainer_state.pt)")
    verify_checksums(where)
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"resume: {state_path} holds objects outside the safe set (tensors, numbers, strings, "
            f"containers); not loading it, since unpickling them could run code ({type(e).__name__})"
        ) from None
    if not isinstance(state, dict) or not {"step", "history", "config"} <= set(state):
        raise ValueError(
            f"resume: {state_path} lacks the trainer state (step, history, config): not a checkpoint "
            "this trainer wrote, or a damaged one; resume from another checkpoint"
        )
    if "optimizer" in state and not {"scheduler", "rng"} <= set(state):
        raise ValueError(
            f"resume: {state_path} lacks its scheduler or RNG state (damaged); resume from another checkpoint"
        )
    if "optimizer" not in state:
        raise ValueError(
            f"resume: {where} was saved without its optimizer state (save_optimizer false, or "
            "save_dtype other than the trained weights'): it holds the model only and cannot be resumed"
        )
    saved = state.get("precision")
    if saved is not None and saved != precision:
        raise ValueError(
            f"resume: {where} was trained under precision {saved}, this run resolves to "
            f"{precision} (on {device_type}): pass --precision {saved}"
        )
    return state


_INPUT_NAMES = {
    "feature_weights": "the feature-weights file's content",
    "protect": "the protect file's content",
    "base_model": "the base model's weights (under the LoRA adapters)",
}


def check_resumable_inputs(inputs: dict, saved: dict | None):
    """What the run reads from files (feature weights, a protected set, a LoRA run's base weights) must be what it
    read when it started: compared by content, so a rewritten file, a relative path resumed from another folder,
    or a base model replaced in place is caught."""
    for key, value in inputs.items():
        if saved is not None and key in saved and saved[key] != value:
            raise ValueError(
                f"resume: {_INPUT_NAMES.get(key, key)} differs from what the run started with (a rewritten file, "
                "a relative path resumed from another folder, or a model replaced in place): restore what the run "
                "used, or start a new run in another --output-dir"
            )


def check_resumable(cfg: TrainConfig, saved: dict) -> None:
    """The resumed run must be the saved run: every key but RESUMABLE_CHANGES equal."""
    keys = dataclasses.asdict(cfg)
    for key, value in sorted(keys.items(), key=lambda kv: kv[0] != "method"):  # another method: say that first
        if key in RESUMABLE_CHANGES or key not in saved:  # a key newer than the checkpoint: nothing to compare
            continue
        if saved[key] != value:
            raise ValueError(
                f"resume: {key} is {value!r} but the checkpoint's run used {saved[key]!r}; only "
                f"{', '.join(RESUMABLE_CHANGES)} may change on resume (start a new run in another "
                "--output-dir to change it)"
            )


def write_folder(path: str, write: Callable[[str], None], output_dir: str) -> None:
    """Write a model folder at `path` whole or not at all: `write(tmp)` fills a fresh temporary folder (an
    unpredictable name, so nothing planted there is written through), checksums are recorded, and it is renamed
    into place. A failure (a full disk) removes the temporary and names the previous checkpoint, still intact."""
    tmp = temp_dir(path)
    try:
        write(tmp)
        write_checksums(tmp)
    except Exception as e:  # OSError, RuntimeError, and safetensors' own error type (a full disk while it writes)
        shutil.rmtree(tmp, ignore_errors=True)
        previous = checkpoints(output_dir)
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC or "enforce fail" in str(e) or "No space" in str(e)
        raise RuntimeError(
            f"{'the disk is full' if full else 'writing failed'} while saving {path} "
            f"({str(e).splitlines()[0][:200]}); nothing half-written was kept, and "
            + (
                f"the previous checkpoint {previous[-1]} is intact: free space and resume with --resume latest"
                if previous
                else "no earlier checkpoint exists"
            )
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.islink(path):  # a planted link is removed, never written through
        os.remove(path)
    # the folder being replaced (OUT/final on a resume) is moved aside, not deleted, until the new one is in place:
    # a kill in between leaves it under path.replaced, which the next start puts back (_finish_interrupted_writes)
    aside = path + REPLACED if os.path.exists(path) else None
    if aside is not None:
        if os.path.lexists(aside):  # left by an earlier kill after its successor arrived: path is the newer
            shutil.rmtree(aside) if os.path.isdir(aside) and not os.path.islink(aside) else os.remove(aside)
        os.rename(path, aside)
    os.replace(tmp, path)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def write_checksums(folder: str) -> None:
    """sha256 of every file of a checkpoint, recorded beside them (checked before a resume)."""
    sums = {
        n: sha256_of(os.path.join(folder, n))
        for n in sorted(os.listdir(folder))
        if os.path.isfile(os.path.join(folder, n)) and n != CHECKSUMS
    }
    atomic_write_json(os.path.join(folder, CHECKSUMS), sums)


def verify_checksums(folder: str) -> None:
    """Every file checksums.json lists must be there and match (checkpoints written before checksums.json
    existed are read as they are)."""
    path = os.path.join(folder, CHECKSUMS)
    if not os.path.exists(path):
        return
    try:
        with open(path) as f:
            sums = json.load(f)
        assert isinstance(sums, dict)
    except (OSError, ValueError, AssertionError):
        raise ValueError(
            f"resume: {path} is damaged: the checkpoint cannot be verified; resume from another one"
        ) from None
    for name, want in sums.items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise ValueError(
                f"resume: checkpoint {folder} lacks {name} (truncated or partly deleted); "
                "resume from another checkpoint"
            )
        if sha256_of(file) != want:
            raise ValueError(
                f"resume: {file} does not match the checksum recorded when it was written (the file is "
                "corrupted); resume from another checkpoint"
            )


def set_config_dtype(path: str, dtype: torch.dtype) -> None:
    """config.json's dtype set to the saved weights' (save_pretrained records the live model's)."""
    with open(path) as f:
        config = json.load(f)
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    atomic_write_json(path, config)


def _size(*paths) -> str:
    n = sum(os.path.getsize(os.path.join(r, f)) for p in paths for r, _, fs in os.walk(p) for f in fs) + sum(
        os.path.getsize(p) for p in paths if os.path.isfile(p)
    )
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.1f} KB"


def written(final: str, output_dir: str, optimizer_state: bool) -> str:
    """Where a finished run's files are, and their sizes; optimizer_state: whether trainer_state.pt holds the
    optimizer, scheduler and RNG (without them it holds the step, history and config only)."""
    weights = [os.path.join(final, n) for n in os.listdir(final) if n.endswith(".safetensors")]
    state = os.path.join(final, "trainer_state.pt")
    adapters = os.path.exists(os.path.join(final, ADAPTER_WEIGHTS))
    lines = [
        f"[fpo] written: the {'LoRA adapters (peft format)' if adapters else 'model'} {final} "
        f"({'adapters' if adapters else 'weights'} {_size(*weights)})"
    ]
    merged = os.path.join(output_dir, "final-merged")
    if adapters and os.path.isdir(merged):
        lines.append(f"  the adapters merged into the base weights, a plain model: {merged} ({_size(merged)})")
    if optimizer_state and os.path.exists(state):
        lines.append(
            f"  optimizer, scheduler and RNG state {state} ({_size(state)}; --no-save-optimizer leaves it "
            "out, and the run is then not resumable)"
        )
    for name in ("metrics.jsonl", "summary.json"):
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            lines.append(f"  {name}: {path} ({_size(path)})")
    return "\n".join(lines)


def load_adapters(model: Model, where: str) -> None:
    """A LoRA checkpoint's adapter weights into `model` (before any sharding: plain tensors)."""
    from safetensors.torch import load_file

    path = os.path.join(where, ADAPTER_WEIGHTS)
    if not os.path.exists(path):
        raise ValueError(
            f"resume: {where} holds no {ADAPTER_WEIGHTS}: it was not saved by a LoRA run (resume it without --lora-r)"
        )
    load_adapter_weights(model, load_file(path), where)


def tied_parameter_names(model) -> list[list[str]]:
    """The names under which one parameter appears more than once (tied embeddings and lm head), grouped."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


@dataclasses.dataclass
class Checkpointer:
    """Saves a run's checkpoints and restores one. `model` is the (peft-wrapped) model, `policy` what the
    optimizer trains (FSDP-sharded when `sharded`); `peft_model` is set for a LoRA run (the adapters are
    saved, the base is the run's --model)."""

    cfg: TrainConfig
    model: torch.nn.Module
    policy: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tokenizer: Tokenizer
    peft_model: Any
    precision: Precision
    sharded: bool
    log: Log = print
    saved_optimizer_state: bool = False  # whether the last save wrote the optimizer, scheduler and RNG
    inputs: dict = dataclasses.field(default_factory=dict)  # the loss's inputs read from files, by content
    controller: Any = None  # a state_dict()-able part of the loss that changes as the run goes (AlphaController)

    def _state_dicts(self):
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            msd, osd = get_state_dict(self.policy, self.optimizer, options=opts)
            msd = {k.removeprefix("model."): v for k, v in msd.items()}
            # the gathered copies of a tied weight (embeddings and lm head) are separate tensors: made one again,
            # so that save_pretrained writes it once, as it does for the unsharded model
            for names in tied_parameter_names(self.model):
                for name in names[1:]:
                    if name in msd and names[0] in msd:
                        msd[name] = msd[names[0]]
            return msd, osd
        return self.model.state_dict(), self.optimizer.state_dict()

    def save(
        self,
        step: int,
        history: list,
        name: str | None = None,
        with_state: bool = True,
        dtype: torch.dtype | None = None,
    ) -> str:
        """output_dir/checkpoint-<step>: the model (save_pretrained) and trainer_state.pt (optimizer,
        scheduler, RNG, step; with_state False: step, history and config only). Written under a temporary
        name and renamed: never half a checkpoint; a full disk leaves the previous one intact.
        dtype: the saved weights' dtype when it is not the trained weights' own (then never resumable)."""
        msd, osd = self._state_dicts()
        cast = dtype is not None and dtype != self.precision.param_dtype and self.peft_model is None
        if self.peft_model is not None:  # the adapters only (the base is the run's --model)
            msd = adapter_weights(msd)
        if cast:
            msd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in msd.items()}
            with_state = False
        path = os.path.join(self.cfg.output_dir, name or f"checkpoint-{step:06d}")
        state = {
            "step": step,
            "history": history,
            "config": dataclasses.asdict(self.cfg),
            "inputs": self.inputs,
            "precision": self.precision.name,
        }
        if self.controller is not None and self.controller.state_dict():
            state["controller"] = self.controller.state_dict()
        if with_state:
            state.update(
                optimizer=osd,
                scheduler=self.scheduler.state_dict(),
                rng={
                    "torch": torch.get_rng_state(),
                    "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                },
            )

        def write(tmp):
            if self.peft_model is not None:
                from safetensors.torch import save_file

                save_file(
                    {k: v.contiguous() for k, v in msd.items()},
                    os.path.join(tmp, ADAPTER_WEIGHTS),
                    metadata={"format": "pt"},
                )
                save_adapter_config(self.peft_model, tmp, self.cfg.model)
            else:
                self.model.save_pretrained(tmp, state_dict=msd)
            if cast:
                set_config_dtype(os.path.join(tmp, "config.json"), dtype)
            self.tokenizer.save_pretrained(tmp)
            torch.save(state, os.path.join(tmp, "trainer_state.pt"))
            # the run's settings, readable without torch: what trained this model
            with open(os.path.join(tmp, RUN_CONFIG), "w") as f:
                json.dump({"config": state["config"], "inputs": self.inputs, "step": step}, f, indent=1, sort_keys=True)

        if dist_utils.is_main():
            write_folder(path, write, self.cfg.output_dir)
        dist_utils.barrier()
        self.saved_optimizer_state = with_state  # what written() may announce
        return path

    def save_merged(self, dtype: torch.dtype) -> str:
        """output_dir/final-merged: the adapters merged into the base weights (computed in fp32), saved in
        `dtype` as a plain model; written under a temporary name and renamed."""
        msd, _ = self._state_dicts()
        assert self.cfg.lora_r is not None  # a LoRA run's
        merged = merged_weights(msd, self.cfg.lora_alpha_value / self.cfg.lora_r, dtype)
        path = os.path.join(self.cfg.output_dir, "final-merged")

        def write(tmp):
            self.peft_model.get_base_model().save_pretrained(tmp, state_dict=merged)
            set_config_dtype(os.path.join(tmp, "config.json"), dtype)
            self.tokenizer.save_pretrained(tmp)

        if dist_utils.is_main():
            write_folder(path, write, self.cfg.output_dir)
            self.log(
                f"[fpo] LoRA adapters merged into the base weights in {str(dtype).removeprefix('torch.')}: "
                f"{path} (a plain model)"
            )
        dist_utils.barrier()
        return path

    def restore(self, where: str, state: dict):
        """The weights (LoRA: already loaded by load_adapters, before wrapping), optimizer, scheduler and RNG
        of checkpoint `where`, whose trainer_state.pt read_state returned as `state`. Returns (step, history)."""
        from safetensors.torch import load_file

        weights = None
        if self.peft_model is None:
            weights = {}
            for n in sorted(os.listdir(where)):
                if n.endswith(".safetensors"):
                    weights.update(load_file(os.path.join(where, n)))
        if self.sharded:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                set_optimizer_state_dict,
                set_state_dict,
            )

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            if weights is None:
                set_optimizer_state_dict(self.policy, self.optimizer, state["optimizer"], options=opts)
            else:
                set_state_dict(
                    self.policy,
                    self.optimizer,
                    model_state_dict={"model." + k: v for k, v in weights.items()},
                    optim_state_dict=state["optimizer"],
                    options=opts,
                )
        else:
            if weights is not None:
                missing, unexpected = self.model.load_state_dict(weights, strict=False)
                tied = set(getattr(self.model, "_tied_weights_keys", None) or [])
                if unexpected or [k for k in missing if k not in tied and "lm_head" not in k]:
                    raise ValueError(
                        f"resume: checkpoint {where} does not match the model (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]})"
                    )
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.log(f"[fpo] resumed from {where} at step {state['step']}")
        return state["step"], state["history"]
