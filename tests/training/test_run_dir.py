"""The output directory, checkpoints and resume: a run never loses data, never continues or overwrites
another, and never loads code from a checkpoint."""

import errno
import json
import os
import pickle

import pytest
import torch
from run_setup import LEN, QUIET, run_config

from fpo.precompute import precompute
from fpo.train import NonFiniteLossError, train


class _Exploit:
    """Unpickling this runs a command: what a crafted trainer_state.pt could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_never_unpickles_code(tiny, tmp_path):
    train(run_config(tiny, None, tmp_path / "run", save_every=2), **QUIET)
    state = tmp_path / "run" / "checkpoint-000002" / "trainer_state.pt"
    marker = tmp_path / "pwned"
    good = torch.load(state, weights_only=True)  # what we write loads safely
    assert "optimizer" in good and "rng" in good
    good["history"].append({"note": _Exploit(marker)})
    with open(state, "wb") as f:
        pickle.dump(good, f)
    with pytest.raises(ValueError, match="does not match the checksum"):  # the recorded checksum catches it first
        train(run_config(tiny, None, tmp_path / "run", max_steps=4, resume="latest"), **QUIET)
    from fpo.run_dir import write_checksums

    write_checksums(str(state.parent))  # an attacker rewrites checksums.json too: the load is safe
    with pytest.raises(ValueError, match="safe set"):
        train(run_config(tiny, None, tmp_path / "run", max_steps=4, resume="latest"), **QUIET)
    assert not marker.exists()


def test_a_run_never_continues_or_overwrites_another(tiny, tiny_cache, tmp_path):
    out = tmp_path / "run"
    train(run_config(tiny, tiny_cache, out, "fpo", save_every=2), **QUIET)
    final = (out / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="holds another run"):  # a plain run into a finished run's directory
        train(run_config(tiny, tiny_cache, out), **QUIET)
    assert (out / "metrics.jsonl").read_text() == final
    with pytest.raises(ValueError, match="method is 'simpo'.*'fpo'"):  # resuming another method's checkpoint
        train(run_config(tiny, tiny_cache, out, resume="latest", max_steps=4), **QUIET)
    with pytest.raises(ValueError, match="lr is 0.01"):  # a changed learning rate is not ignored
        train(run_config(tiny, tiny_cache, out, "fpo", resume="latest", max_steps=4, lr=1e-2), **QUIET)
    train(
        run_config(tiny, tiny_cache, out, "fpo", resume="latest", max_steps=3, log_every=2), **QUIET
    )  # allowed changes
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    train(run_config(tiny, tiny_cache, out, overwrite=True), **QUIET)  # asked: replaced
    assert json.loads((out / "summary.json").read_text())["method"] == "simpo"
    assert not any(n.startswith("checkpoint-") for n in os.listdir(out))


def test_a_diverged_model_is_never_checkpointed(tiny, tmp_path):
    """lr 1e10 leaves finite but huge weights whose next loss is NaN: no checkpoint may hold them."""
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="after step 1.*none \\(no checkpoint"):
        train(run_config(tiny, None, out, lr=1e10, save_every=1, max_steps=3), **QUIET)
    assert not any(n.startswith("checkpoint-") for n in os.listdir(out))


def test_a_full_disk_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    import fpo.train as tr

    out = tmp_path / "run"
    real = tr.torch.save
    calls = {"n": 0}

    def save(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *a, **k)

    monkeypatch.setattr(tr.torch, "save", save)
    with pytest.raises(RuntimeError, match="disk is full.*checkpoint-000001 is intact"):
        train(run_config(tiny, None, out, save_every=1, max_steps=3), **QUIET)
    assert sorted(os.listdir(out)) == [".fpo.lock", "checkpoint-000001", "metrics.jsonl"]  # the lock: see below


def test_one_process_per_run_directory_and_cache(tiny, tiny_cache, tmp_path):
    """A second run on a directory in use stops before touching it, naming the holder; the lock goes with the
    process (and with a run that fails to start)."""
    from fpo.locking import DirectoryLock

    out = tmp_path / "run"
    out.mkdir()
    held = DirectoryLock(str(out), "output_dir")  # what a running `fpo train` holds
    with pytest.raises(ValueError, match=f"in use by another process \\(pid {os.getpid()}\\)"):
        train(run_config(tiny, tiny_cache, out), **QUIET)
    assert os.listdir(out) == [".fpo.lock"]
    held.release()
    with pytest.raises(ValueError, match="batch_size"):  # fails to start: leaves the directory free
        train(run_config(tiny, tiny_cache, out, batch_size=3), **QUIET)
    train(run_config(tiny, tiny_cache, out), **QUIET)
    c = tmp_path / "c"
    c.mkdir()
    held = DirectoryLock(str(c), "cache")
    with pytest.raises(ValueError, match="cache .* is in use by another process"):
        precompute(tiny["model"], tiny["pairs"], str(c), cache_k=8, progress=False, **LEN)
    held.release()


def test_temporary_files_never_follow_a_planted_link(tiny, tiny_cache, tmp_path):
    """Symlinks planted at the names temporaries used to have (metrics.jsonl.tmp, checkpoint-*.tmp, final) are
    never written through: the victim file outside the run is untouched."""
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    victim_dir = tmp_path / "victim_dir"
    victim_dir.mkdir()
    for name in ("metrics.jsonl.tmp", f"metrics.jsonl.tmp{os.getpid()}"):
        os.symlink(victim, out / name)
    os.symlink(victim_dir, out / "checkpoint-000002.tmp")
    train(run_config(tiny, tiny_cache, out, save_every=2), **QUIET)
    assert victim.read_text() == "precious" and not os.listdir(victim_dir)
    assert (out / "checkpoint-000002" / "trainer_state.pt").exists()
    assert not [n for n in os.listdir(out) if ".tmp" in n]  # leftovers of the run's own names removed


def test_a_final_model_gets_the_soundness_check(tiny, tiny_cache, tmp_path, monkeypatch):
    """A last step that leaves non-finite weights stops with the error a checkpoint would get; no final model
    holds NaN weights."""
    import fpo.train as tr

    real = tr.Trainer.train_step

    def poisoned(self, step):
        out = real(self, step)
        if self.step == self.total_steps - 1:  # the last step corrupts one weight
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = float("nan")
        return out

    monkeypatch.setattr(tr.Trainer, "train_step", poisoned)
    with pytest.raises(NonFiniteLossError, match="after step 2"):
        train(run_config(tiny, tiny_cache, tmp_path / "run", max_steps=2, log_every=5), **QUIET)
    assert not (tmp_path / "run" / "final").exists()


def test_a_corrupted_checkpoint_is_not_resumed(tiny, tmp_path):
    """Flipped bits in a checkpoint's weights (it used to resume and 'finish' at loss 1e34), or a file gone:
    resume stops, naming the file."""
    out = tmp_path / "run"
    train(run_config(tiny, None, out, save_every=2, max_steps=2), **QUIET)
    ckpt = out / "checkpoint-000002"
    weights = next(ckpt.glob("model*.safetensors"))
    raw = bytearray(weights.read_bytes())
    raw[-100] ^= 0x40
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"{weights.name} does not match the checksum"):
        train(run_config(tiny, None, out, max_steps=4, resume="latest"), **QUIET)
    weights.unlink()
    with pytest.raises(ValueError, match=f"lacks {weights.name}"):
        train(run_config(tiny, None, out, max_steps=4, resume="latest"), **QUIET)


def test_a_kill_while_final_is_replaced_loses_nothing(tiny, tmp_path, monkeypatch):
    """Replacing OUT/final (a resume from it, or a preemption at the end): killed after the old folder moved aside
    and before the new one arrived, the next start puts the old one back; killed after, the old one goes."""
    import fpo.run_dir as rd

    train(run_config(tiny, None, tmp_path, max_steps=1), **QUIET)
    final = str(tmp_path / "final")
    before = sorted(os.listdir(final))

    real_replace = os.replace

    def killed(src, dst):
        if os.fspath(dst) == final:  # the process dies between moving the old folder aside and renaming the new in
            raise KeyboardInterrupt
        return real_replace(src, dst)

    with monkeypatch.context() as m:
        m.setattr(rd.os, "replace", killed)
        with pytest.raises(KeyboardInterrupt):
            rd.write_folder(final, lambda tmp: open(os.path.join(tmp, "new.txt"), "w").close(), str(tmp_path))
    assert not os.path.exists(final)  # the state a kill leaves: final aside, the new one a temporary
    said = []
    rd.claim_output_dir(str(tmp_path), "latest", False, said.append).release()
    assert sorted(os.listdir(final)) == before and any("restored" in s for s in said)
    assert sorted(os.listdir(tmp_path)) == sorted(n for n in os.listdir(tmp_path) if ".tmp" not in n)
    # killed after the new folder arrived: the old one, still aside, is removed; the new one stays
    rd.write_folder(final, lambda tmp: open(os.path.join(tmp, "new.txt"), "w").close(), str(tmp_path))
    os.makedirs(final + rd.REPLACED)
    rd.claim_output_dir(str(tmp_path), "latest", False, said.append).release()
    assert "new.txt" in os.listdir(final) and not os.path.exists(final + rd.REPLACED)
