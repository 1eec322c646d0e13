"""Everything a run needs to continue exactly: RNG states, the EMA model, `last.ckpt` in and out.

`last.ckpt` is a `torch.save` dict of tensors and plain Python values only, read back with
`torch.load(weights_only=True)` (no code runs on load) and written atomically. A new one is read
back before it replaces the old, which becomes `previous.ckpt`: a `last.ckpt` that turns out
unreadable (a disk that lied, a copy cut short) still leaves a checkpoint to resume from.

    model, optimizer, scheduler, scaler, ema     state dicts (scaler / ema may be None)
    rng                                          one entry per rank: python, numpy, torch CPU, CUDA
    position                                     {epoch, micro_step (consumed in that epoch), global_step}
    best                                         {top1, epoch, step, weights}
    running                                      one entry per rank: the loss totals since the last log
                                                 and over the epoch (`trainer.RunningTotals`)
    world_size, global_batch, config
"""
from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.errors import name_some
from ..files import torch_save_atomic
from ..weights.io import CheckpointError

CHECKPOINT_VERSION = 2  # 2: `running` holds RunningTotals state dicts
LAST, PREVIOUS = "last.ckpt", "previous.ckpt"  # the newest training checkpoint in a run folder, and the one before
_REQUIRED_KEYS = ("model", "optimizer", "scheduler", "scaler", "ema", "rng", "position", "best", "running",
                  "global_batch")


def capture_rng() -> dict:
    """The RNG state of this process (python, numpy, torch CPU, every CUDA device)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class ModelEma:
    """Exponential moving average of a model's parameters: ema = decay * ema + (1 - decay) * param.

    `module` is a frozen copy to evaluate and save; buffers (constant tables) are not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.module.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - self.decay)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)


def save_train_state(state: dict, path: str | Path, previous: str | Path | None = None) -> Path:
    """Write `state` to `path` atomically; the file is read back (structure, not every byte) before it
    replaces the old `path`, which then becomes `previous` (when given)."""
    position = state["position"]

    def verify(tmp: Path) -> None:
        written = torch.load(tmp, map_location="cpu", weights_only=True, mmap=True)  # mmap: no tensor data read
        if written.get("position") != position:
            raise CheckpointError(f"'{path}' did not read back as written (position {written.get('position')} "
                                  f"instead of {position})")

    return torch_save_atomic({"version": CHECKPOINT_VERSION, **state}, path, verify=verify, keep_previous=previous)


def load_train_state(path: str | Path) -> dict:
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated file, foreign pickle, ...
        raise CheckpointError(f"'{path}' cannot be resumed from: {type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}") from error
    if not isinstance(state, dict) or "position" not in state:
        raise CheckpointError(f"'{path}' is not a swinkit training checkpoint")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"'{path}' is a version {state.get('version')} training checkpoint; this swinkit "
                              f"resumes version {CHECKPOINT_VERSION} only")
    missing = [key for key in _REQUIRED_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"'{path}' is incomplete: it has no {', '.join(missing)}")
    return state


def check_state_fits(model: nn.Module, state: dict, path: str | Path) -> None:
    """Raise `CheckpointError` naming `path` when the model state dict `state` does not fit `model`
    (missing or extra keys, other shapes: another architecture, head or image size)."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}  # whole shapes under FSDP
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [f"'{key}' is {list(state[key].shape)} there but {list(shape)} here" for key, shape in expected.items()
                if key in state and tuple(state[key].shape) != shape]
    problems = [f"missing {name_some(missing)}" if missing else "",
                f"unexpected {name_some(unexpected)}" if unexpected else "",
                name_some(reshaped, 3) if reshaped else ""]
    if any(problems):
        raise CheckpointError(f"'{path}' does not fit this run's model ({'; '.join(p for p in problems if p)}); "
                              "resume with the config it was trained with")
