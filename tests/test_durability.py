"""Training durability: SIGTERM / SIGINT save and stop, checkpoint rotation and fallback, stale
temp files, one run per folder, failed saves that lose nothing."""
from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from swinkit.files import FolderInUseError, FolderLock, atomic_write, remove_stale_temps
from swinkit.train import load_config, train
from swinkit.train.trainer import Trainer
from swinkit.weights.io import CheckpointError
from test_train import NANO, _env, assert_same_tensors, finish, run_config, swinkit_train, synthetic

# 16 synthetic images, batch 4: 4 steps per epoch; 3 epochs = 12 steps.
EPOCHS = ("schedule.epochs=3", "train.save_every=2", "train.log_every=1", "train.seed=3",
          "model.drop_path_rate=0.1")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def ckpt_step(path: Path) -> int:
    return torch.load(path, weights_only=True)["position"]["global_step"]


def weights_step(path: Path) -> int:
    with safe_open(str(path), "pt") as f:
        return int(f.metadata()["swinkit_step"])


def temp_files(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".tmp"))


def signal_at_step(monkeypatch, step: int, signum: int = signal.SIGINT) -> None:
    """Send `signum` to this process while optimizer step `step` runs (as a preempting cluster or Ctrl-C would)."""
    original = Trainer._optimizer_step

    def stepping(self):
        if self.position["global_step"] + 1 == step:
            os.kill(os.getpid(), signum)
        return original(self)

    monkeypatch.setattr(Trainer, "_optimizer_step", stepping)


def metrics(run: Path) -> list[tuple]:
    return [(r["step"], r.get("loss"), r.get("val_top1")) for r in map(json.loads, (run / "metrics.jsonl").open())]


# The SIGTERM run: 48 images, 12 steps per epoch, 36 in all; the same keys on the command line and in-process.
LONG = [f"model.name={NANO}", "data.synthetic=true", "data.synthetic_train_size=48", "data.synthetic_val_size=16",
        "data.workers=0", "train.batch_size=4", "schedule.warmup_epochs=0", "schedule.epochs=3",
        "train.save_every=5", "train.log_every=4", "model.drop_path_rate=0.1", "train.seed=7", "optim.scale_lr=false",
        "optim.lr=1e-3", "output.tensorboard=false", "output.curves=false"]


def uninterrupted(config) -> Path:
    """An uninterrupted run (one thread, as every run here) that interrupted, resumed ones must reproduce."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures start before the function-scoped `one_thread`
    try:
        train(config)
    finally:
        torch.set_num_threads(threads)
    return Path(config.output.dir)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    return uninterrupted(run_config(tmp_path_factory.mktemp("reference"), *EPOCHS))


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("long_reference") / "run"
    return uninterrupted(load_config(None, [*LONG, f"output.dir={out}"]))


# ----------------------------------------------------------------------------------------- signals
def test_sigterm_mid_epoch_saves_exits_143_and_resume_matches_the_uninterrupted_run(tmp_path, long_reference):
    run = tmp_path / "stopped"
    args = [*LONG, f"output.dir={run}"]
    process = swinkit_train(*args)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():  # past the first steps
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "Traceback" not in output and "SIGTERM: stopped at step" in output
    stopped_at = ckpt_step(run / "last.ckpt")
    assert 4 <= stopped_at < 36 and f"stopped at step {stopped_at}/36" in output
    assert weights_step(run / "last.safetensors") == stopped_at  # the pair is from one step
    assert temp_files(run) == []

    finish(swinkit_train("--resume", *args))
    assert_same_tensors(long_reference / "last.safetensors", run / "last.safetensors")
    assert_same_tensors(long_reference / "best.safetensors", run / "best.safetensors")
    assert metrics(long_reference) == metrics(run)


def test_sigint_stops_at_the_step_boundary_and_train_says_it_was_interrupted(tmp_path, monkeypatch, reference):
    signal_at_step(monkeypatch, 7)
    handlers = [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)]
    result = train(run_config(tmp_path, *EPOCHS))
    run = tmp_path / "run"
    assert result["interrupted"] == "SIGINT" and result["steps"] == 7
    assert ckpt_step(run / "last.ckpt") == 7 and weights_step(run / "last.safetensors") == 7
    assert ckpt_step(run / "previous.ckpt") == 6
    assert [signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)] == handlers  # put back

    monkeypatch.undo()
    result = train(run_config(tmp_path, *EPOCHS, "train.resume=true"))
    assert result["interrupted"] is None and result["steps"] == 12
    assert_same_tensors(reference / "last.safetensors", run / "last.safetensors")
    assert metrics(reference) == metrics(run)


# ---------------------------------------------------------------------------- rotation and fallback
def test_corrupt_last_ckpt_resumes_from_previous_with_a_warning(tmp_path, monkeypatch, caplog, reference):
    signal_at_step(monkeypatch, 7)
    train(run_config(tmp_path, *EPOCHS))
    run = tmp_path / "run"
    data = (run / "last.ckpt").read_bytes()
    (run / "last.ckpt").write_bytes(data[: len(data) // 2])  # a copy cut short

    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="swinkit.train"):
        result = train(run_config(tmp_path, *EPOCHS, "train.resume=true"))
    assert "last.ckpt is unreadable" in caplog.text and "resuming from" in caplog.text
    assert "previous.ckpt (step 6)" in caplog.text
    assert (run / "last.ckpt.unreadable").is_file()  # set aside, never rotated into previous.ckpt
    assert result["steps"] == 12
    assert_same_tensors(reference / "last.safetensors", run / "last.safetensors")
    assert metrics(reference) == metrics(run)


def test_missing_last_ckpt_resumes_from_previous(tmp_path, monkeypatch, caplog):
    signal_at_step(monkeypatch, 3)
    train(run_config(tmp_path, *EPOCHS))
    run = tmp_path / "run"
    (run / "last.ckpt").unlink()  # killed between the two renames of a rotation
    monkeypatch.undo()
    signal_at_step(monkeypatch, 4)
    with caplog.at_level(logging.WARNING, logger="swinkit.train"):
        result = train(run_config(tmp_path, *EPOCHS, "train.resume=true"))
    assert "last.ckpt is missing; resuming from" in caplog.text
    assert result["steps"] == 4 and ckpt_step(run / "previous.ckpt") == 2


def test_both_checkpoints_unreadable_is_one_error_naming_them(tmp_path, monkeypatch):
    signal_at_step(monkeypatch, 3)
    train(run_config(tmp_path, *EPOCHS))
    run = tmp_path / "run"
    for name in ("last.ckpt", "previous.ckpt"):
        (run / name).write_bytes(b"not a checkpoint")
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match=r"last\.ckpt' cannot be resumed from.*; and previous\.ckpt is unread"):
        train(run_config(tmp_path, *EPOCHS, "train.resume=true"))
    assert (run / "previous.ckpt").read_bytes() == b"not a checkpoint"  # nothing renamed or removed


def test_a_checkpoint_that_does_not_read_back_never_replaces_the_last_one(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"the good one")

    def broken_verify(tmp):
        raise CheckpointError(f"'{path}' did not read back as written")

    with pytest.raises(CheckpointError, match="did not read back"):
        atomic_write(path, lambda tmp: tmp.write_bytes(b"garbage"), verify=broken_verify,
                     keep_previous=tmp_path / "previous.ckpt")
    assert path.read_bytes() == b"the good one" and not (tmp_path / "previous.ckpt").exists()
    assert temp_files(tmp_path) == []


# ------------------------------------------------------------------------------ temp files and saves
def test_stale_temp_files_are_removed_when_a_run_starts(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    stale = [".last.ckpt.0123abcd.tmp", ".metrics.jsonl.deadbeef.tmp", ".config.yaml.00000000.tmp"]
    kept = ["notes.tmp", ".last.ckpt.tmp", ".x.ABCDEF12.tmp", "data.0123abcd.tmp"]  # not our pattern
    for name in stale + kept:
        (run / name).write_bytes(b"half written")
    with caplog.at_level(logging.WARNING, logger="swinkit.train"):
        train(run_config(tmp_path, "schedule.max_steps=1"))
    assert sorted(temp_files(run)) == sorted(kept)
    assert "removed 3 temporary file(s)" in caplog.text
    assert remove_stale_temps(tmp_path / "nowhere") == []


def test_failed_save_keeps_the_previous_checkpoint_pair_and_names_the_file(tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def disk_fills_up(obj, f, *args, **kwargs):  # the second checkpoint (step 4) hits a full disk mid-write
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 the first bytes")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_fills_up)
    with pytest.raises(OSError, match=r"cannot write: No space left on device") as caught:
        train(run_config(tmp_path, *EPOCHS))
    run = tmp_path / "run"
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(run / "last.ckpt")
    assert ckpt_step(run / "last.ckpt") == 2 and weights_step(run / "last.safetensors") == 2
    assert not (run / "previous.ckpt").exists() and temp_files(run) == []

    monkeypatch.undo()
    assert train(run_config(tmp_path, *EPOCHS, "train.resume=true"))["steps"] == 12  # and it resumes


# ---------------------------------------------------------------------------------- the folder lock
def test_a_held_run_folder_is_refused_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    with FolderLock(run, "training run"):
        with pytest.raises(FolderInUseError, match=rf"in use by another training run \(pid {os.getpid()} on "):
            train(run_config(tmp_path, "schedule.max_steps=1"))
        assert sorted(os.listdir(run)) == [".lock"]  # nothing else was touched
    assert train(run_config(tmp_path, "schedule.max_steps=1"))["steps"] == 1  # released: free again
    FolderLock(run).release()  # and the run released it too


def test_two_runs_in_one_folder_the_second_gets_a_clear_error(tmp_path):
    run = tmp_path / "run"
    args = synthetic("--batch-size", 4, "--epochs", 1000)  # runs until told to stop
    first = swinkit_train("--output", run, *args)
    deadline = time.monotonic() + 120
    while not (run / "metrics.jsonl").exists():
        assert first.poll() is None, first.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    second = subprocess.run([sys.executable, "-m", "swinkit", "train", "--output", str(run), "--resume",
                             *map(str, args)], env=_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert f"'{run}' is in use by another training run (pid {first.pid} on " in lines[0]
    assert first.poll() is None  # the first run went on, untouched
    first.send_signal(signal.SIGTERM)
    output, _ = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, output
    steps = [record["step"] for record in map(json.loads, (run / "metrics.jsonl").open()) if "loss" in record]
    assert steps == list(range(4, 4 * len(steps) + 1, 4))  # the first run's log, whole
    assert steps[-1] <= ckpt_step(run / "last.ckpt") < steps[-1] + 4


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_rank_at_one_step_and_resume_matches(tmp_path):
    """`--nproc 2`: SIGTERM to the launching process reaches every rank through torchrun; the ranks agree
    on one step boundary, rank 0 saves, and the resumed run ends where an uninterrupted one does."""
    args = synthetic("--batch-size", 4, "--nproc", 2, "--epochs", 3, "--seed", 5)  # 6 steps per epoch
    reference = tmp_path / "reference"
    finish(swinkit_train("--output", reference, *args), timeout=300)

    run = tmp_path / "stopped"
    process = swinkit_train("--output", run, *args)
    deadline = time.monotonic() + 300
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert output.count("SIGTERM: stopped at step") == 1  # rank 0 says it, once
    stopped_at = ckpt_step(run / "last.ckpt")
    assert 4 <= stopped_at < 18 and f"stopped at step {stopped_at}/18" in output
    assert temp_files(run) == []

    finish(swinkit_train("--output", run, "--resume", *args), timeout=300)
    assert_same_tensors(reference / "last.safetensors", run / "last.safetensors")
    assert metrics(reference) == metrics(run)
