"""Every expected failure of the `swinkit` command is one line naming the culprit with exit status 2
(argparse's own for a bad flag); a bug is a traceback, a request to report it and status 1."""
from __future__ import annotations

import errno
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import swinkit
import swinkit.cli
from swinkit.cli import main
from swinkit.files import atomic_write
from swinkit.train import ConfigError, load_config, train
from test_train import NANO, _env, run_config


def swinkit_cli(*args, env: dict | None = None, text: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "swinkit", *args], env=env or _env(), capture_output=True, text=text,
                          timeout=120)


def one_error_line(result, status: int = 2) -> str:
    """The single stderr line of a failed command (after argparse's usage lines, if any)."""
    assert result.returncode == status, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("swinkit ")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "nano.safetensors"
    torch.manual_seed(0)
    swinkit.save_weights(swinkit.create_model(NANO, num_classes=2), path)
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A finished one-step run to resume (with another model, for the errors)."""
    tmp = tmp_path_factory.mktemp("trained")
    train(run_config(tmp, "schedule.max_steps=1", "model.num_classes=3"))
    return tmp / "run"


# ----------------------------------------------------------------------------- numeric arguments
BAD_FLAGS = [
    (["predict", "--weights", "w", "x.png", "--batch-size", "0"], "--batch-size", "must be >= 1, got 0"),
    (["predict", "--weights", "w", "x.png", "--topk", "-2"], "--topk", "must be >= 1"),
    (["eval", "--weights", "w", "--data", "d", "--threads", "-1"], "--threads", "must be >= 1, got -1"),
    (["eval", "--weights", "w", "--data", "d", "--workers", "-1"], "--workers", "must be >= 0"),
    (["eval", "--weights", "w", "--data", "d", "--crop-pct", "0"], "--crop-pct", "must be in (0, 1]"),
    (["eval", "--weights", "w", "--data", "d", "--batch-size", "many"], "--batch-size", "expected an integer"),
    (["train", "--synthetic", "--epochs", "0", "--max-steps", "5"], "--epochs", "must be >= 1, got 0"),
    (["train", "--synthetic", "--max-steps", "0"], "--max-steps", "must be >= 1"),
    (["train", "--synthetic", "--lr", "0"], "--lr", "must be > 0"),
    (["train", "--synthetic", "--lr", "nan"], "--lr", "must be a finite number"),
    (["train", "--synthetic", "--lr", "-0.001"], "--lr", "must be > 0"),
    (["train", "--synthetic", "--workers", "-1"], "--workers", "must be >= 0"),
    (["train", "--synthetic", "--batch-size", "0"], "--batch-size", "must be >= 1"),
    (["train", "--synthetic", "--save-every", "-5"], "--save-every", "must be >= 0"),
    (["train", "--synthetic", "--drop-path", "1.5"], "--drop-path", "must be in [0, 1)"),
    (["train", "--synthetic", "--nproc", "0"], "--nproc", "must be >= 1"),
    (["train", "--synthetic", "--seed", "-1"], "--seed", "must be >= 0"),
    (["export", "onnx", "--weights", "w", "--out", "o", "--opset", "0"], "--opset", "must be >= 1"),
    (["quantize", "--weights", "w", "--calib", "c", "--out", "o", "--images", "0"], "--images", "must be >= 1"),
    (["bench", "infer", "--model", NANO, "--rounds", "0"], "--rounds", "must be >= 1"),
    (["bench", "infer", "--model", NANO, "--warmup", "-1"], "--warmup", "must be >= 0"),
    (["bench", "train", "--model", NANO, "--memory-budget", "1GB", "--steps", "0"], "--steps", "must be >= 1"),
    (["data", "fashion-mnist", "--out", "o", "--workers", "-3"], "--workers", "must be >= 0"),
    (["eval", "--weights", "w", "--data", "d", "--device", "nope"], "--device", "'nope' is not a device"),
    (["train", "--synthetic", "--device", "meta"], "--device", "'meta': swinkit runs on cpu or cuda"),
    (["eval", "--weights", "w", "--data", "d", "--device", "tpu"], "--device", "'tpu' is not a device"),
]


@pytest.mark.parametrize("args,flag,message", BAD_FLAGS, ids=[" ".join(case[0][:1] + case[0][-2:]) for case in
                                                              BAD_FLAGS])
def test_numeric_and_device_flags_are_checked_where_they_are_parsed(args, flag, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: argument {flag}: {message}" in last


@pytest.mark.parametrize("args,flag", [(["predict", "--weights", "w", "x.png", "--batch-size", "0"], "--batch-size"),
                                       (["eval", "--weights", "w", "--data", "d", "--device", "nope"], "--device")])
def test_bad_flags_on_the_command_line_exit_2_with_argparse_error(args, flag):
    line = one_error_line(swinkit_cli(*args))
    assert f"error: argument {flag}:" in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_names_the_argument_or_key(tmp_path):
    line = one_error_line(swinkit_cli("train", "--synthetic", "--device", "cuda", "--output", str(tmp_path / "r")))
    assert "argument --device: 'cuda': this machine has no CUDA device" in line
    with pytest.raises(SystemExit):
        main(["eval", "--weights", "w", "--data", "d", "--device", "cuda:0"])
    with pytest.raises(ConfigError, match=r"train\.device.*'cuda' but this machine has no CUDA device"):
        train(run_config(tmp_path, "train.device=cuda", "schedule.max_steps=1"))
    assert not (tmp_path / "run").exists()  # refused before the folder was touched


BAD_KEYS = [
    (["schedule.epochs=0", "schedule.max_steps=5"], "'schedule.epochs' must be >= 1, got 0"),
    (["optim.lr=0"], "'optim.lr' must be > 0"),
    (["optim.lr=-0.1"], "'optim.lr' must be > 0"),
    (["optim.lr=.inf"], "'optim.lr' must be > 0 and finite"),
    (["data.workers=-1"], "'data.workers' must be >= 0"),
    (["schedule.min_lr=-1e-6"], "'schedule.min_lr' must be >= 0"),
    (["schedule.warmup_epochs=-1"], "'schedule.warmup_epochs' must be >= 0"),
    (["optim.weight_decay=-0.05"], "'optim.weight_decay' must be >= 0"),
    (["optim.betas=[0.9, 1.5]"], r"'optim.betas\[1\]' must be in \[0, 1\)"),
    (["train.ema_decay=1.0"], "'train.ema_decay' must be in"),
    (["augment.mixup=-0.2"], "'augment.mixup' must be >= 0"),
    (["augment.hflip=2"], r"'augment.hflip' must be in \[0, 1\]"),
    (["augment.label_smoothing=1"], "'augment.label_smoothing' must be in"),
    (["augment.scale=[0.9, 0.1]"], "'augment.scale' must be two values"),
    (["model.drop_path_rate=-0.1"], "'model.drop_path_rate' must be in"),
    (["model.num_classes=0"], "'model.num_classes' must be >= 1"),
    (["data.synthetic_train_size=0"], "'data.synthetic_train_size' must be >= 1"),
]


@pytest.mark.parametrize("overrides,message", BAD_KEYS, ids=[case[0][0] for case in BAD_KEYS])
def test_config_values_that_would_train_nothing_or_fail_late_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.synthetic=true", *overrides])


def test_config_value_errors_on_the_command_line_are_one_line(tmp_path):
    line = one_error_line(swinkit_cli("train", "--synthetic", "--output", str(tmp_path / "r"), "schedule.epochs=0",
                                      "schedule.max_steps=5"))
    assert "config key 'schedule.epochs' must be >= 1, got 0" in line
    assert not (tmp_path / "r").exists()


def test_training_split_smaller_than_one_step_is_refused(tmp_path, capsys):
    assert main(["train", "--synthetic", "--model", NANO, "--workers", "0", "--output", str(tmp_path / "r"),
                 "--batch-size", "8", "data.synthetic_train_size=4"]) == 2
    assert "fewer than one optimizer step" in capsys.readouterr().err.strip()


# ------------------------------------------------------------------------------------- resuming
def test_resume_with_another_head_shape_names_the_checkpoint_and_the_tensor(trained_run):
    line = one_error_line(swinkit_cli("train", "--output", str(trained_run), "--resume", "model.num_classes=5",
                                      "schedule.max_steps=2"))
    assert f"'{trained_run / 'last.ckpt'}' does not fit this run's model" in line
    assert "'head.fc.weight' is [3, " in line and "but [5, " in line


def test_resume_from_a_checkpoint_with_missing_keys_names_them(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.yaml", "last.ckpt"):
        (run / name).write_bytes((trained_run / name).read_bytes())
    state = torch.load(run / "last.ckpt", weights_only=True)
    del state["model"]["head.fc.bias"]
    torch.save(state, run / "last.ckpt")
    assert main(["train", "--output", str(run), "--resume", f"output.dir={run}", "schedule.max_steps=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"swinkit train: error: '{run / 'last.ckpt'}' does not fit this run's model "
                          "(missing head.fc.bias)") and "\n" not in err

    del state["optimizer"]
    torch.save(state, run / "last.ckpt")
    assert main(["train", "--output", str(run), "--resume", f"output.dir={run}"]) == 2
    assert f"'{run / 'last.ckpt'}' is incomplete: it has no optimizer" in capsys.readouterr().err


# --------------------------------------------------------------------------------- files and disks
def test_a_full_disk_inside_torch_save_is_one_line_naming_the_checkpoint(tmp_path, monkeypatch, capsys):
    def full(obj, f, *args, **kwargs):
        f.write(b"PK partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    run = tmp_path / "run"
    assert main(["train", "--synthetic", "--model", NANO, "--workers", "0", "--batch-size", "4", "--output", str(run),
                 "--max-steps", "1", "data.synthetic_train_size=8", "data.synthetic_val_size=4",
                 "output.tensorboard=false", "output.curves=false"]) == 2
    err = capsys.readouterr().err
    assert err == f"swinkit train: error: '{run / 'last.ckpt'}': cannot write: No space left on device\n"
    assert not (run / "last.ckpt").exists() and not [name for name in os.listdir(run) if name.endswith(".tmp")]


def test_an_output_path_through_a_file_names_the_path(weights, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("a file, not a folder")
    assert main(["convert", str(weights), str(tmp_path / "file.txt" / "out.pth"), "--to", "timm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"'{tmp_path / 'file.txt'}" in err


def test_non_utf8_file_and_folder_names_print_as_escapes(weights, tmp_path):
    root = os.fsencode(tmp_path)
    for name in (b"\xffcat", b"dog"):
        os.makedirs(os.path.join(root, b"data", name))
        for i in range(2):
            pixels = np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.fsdecode(os.path.join(root, b"data", name, b"im\xfe%d.png" % i)))
    env = {**_env(), "PYTHONIOENCODING": "utf-8"}  # strict UTF-8 output, as in a UTF-8 desktop locale
    data = os.path.join(root, b"data")
    result = subprocess.run([sys.executable, b"-m", b"swinkit", b"eval", b"--weights", os.fsencode(weights),
                             b"--data", data, b"--workers", b"0"], env=env, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert b"\\udcffcat" in result.stdout and b"Traceback" not in result.stderr

    def run_strict(*args) -> tuple[int, bytes, bytes]:  # in-process, with the same strict UTF-8 streams
        streams = [io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict") for _ in range(2)]
        saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = streams
        try:
            code = main([os.fsdecode(arg) for arg in args])
        finally:
            sys.stdout, sys.stderr = saved
        for stream in streams:
            stream.flush()
        return code, streams[0].buffer.getvalue(), streams[1].buffer.getvalue()

    good, missing = os.path.join(data, b"dog", b"im\xfe0.png"), os.path.join(root, b"\xffmissing.png")
    code, out, err = run_strict(b"predict", b"--weights", os.fsencode(weights), good, missing)
    assert code == 1 and b"dog/im\\udcfe0.png" in out  # 1: some images failed
    assert err.count(b"\n") == 1 and b"\\udcffmissing.png" in err

    code, out, err = run_strict(b"eval", b"--weights", os.fsencode(weights), b"--data", os.path.join(root, b"\xffno"))
    assert code == 2 and err.count(b"\n") == 1 and b"\\udcffno" in err


# ----------------------------------------------------------------------------- the error policy
@pytest.mark.parametrize("error,status,expected", [
    (MemoryError(), 2, "swinkit info: error: out of memory; try a smaller --batch-size"),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 2,
     "swinkit info: error: out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB); try a smaller"),
    (OSError(errno.ENOSPC, "No space left on device", "/runs/x/last.ckpt"), 2,
     "swinkit info: error: '/runs/x/last.ckpt': No space left on device"),
    (ModuleNotFoundError("No module named 'onnx'", name="onnx"), 2,
     "swinkit info: error: this needs the 'onnx' package, which is not installed"),
    (ConfigError("config key 'a.b' is bad\nsecond line"), 2,
     "swinkit info: error: config key 'a.b' is bad; second line"),
    (KeyboardInterrupt(), 130, None),
])
def test_expected_failures_are_one_line_and_interrupts_quiet(error, status, expected, monkeypatch, capsys):
    def fails(name):
        raise error

    monkeypatch.setattr(swinkit.cli, "model_info", fails)
    assert main(["info", NANO]) == status
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1 if expected else err == ""


def test_a_bug_prints_its_traceback_and_asks_for_a_report(monkeypatch, capsys):
    def bug(name):
        return {}["missing"]

    monkeypatch.setattr(swinkit.cli, "model_info", bug)
    assert main(["info", NANO]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err
    assert err.strip().splitlines()[-1].startswith("swinkit info: internal error (KeyError): this is a bug in swinkit")


def test_sigterm_during_a_command_unwinds_and_leaves_no_temp_file(monkeypatch, tmp_path):
    target = tmp_path / "out.bin"

    def killed_while_writing(tmp):
        tmp.write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
        tmp.write_bytes(b"never")  # the handler raises before this line runs

    monkeypatch.setattr(swinkit.cli, "model_info", lambda name: atomic_write(target, killed_while_writing))
    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exited:
        main(["info", NANO])
    assert exited.value.code == 128 + signal.SIGTERM
    assert os.listdir(tmp_path) == [] and signal.getsignal(signal.SIGTERM) == handler
