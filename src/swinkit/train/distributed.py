"""Everything that knows about more than one process: process-group setup (gloo on CPU, NCCL
on CUDA), small collectives, DDP / FSDP wrapping and full state dicts, and the torchrun relaunch.
Every helper is a no-op (or the single-process answer) when the run has one process."""
from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .config import ConfigError


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device (--device) is 'cuda' but this machine has no CUDA device")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(device_preference: str = "auto") -> DistEnv:
    """Read torchrun's environment; with WORLD_SIZE > 1 join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_preference, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistEnv(rank, world_size, local_rank, device)


def teardown(wait_for_peers: bool = False) -> None:
    """Leave the process group. `wait_for_peers` (a run that ended normally): every rank first waits at a
    barrier, so none closes its connections while a peer still uses them; a failing rank does not wait.
    Then the garbage is collected before the group is destroyed: a finished trainer's DDP wrapper (usually
    in a reference cycle) holds the group, whose gloo worker threads must be joined now, while the
    interpreter is whole, not during its shutdown (a rank once aborted there: "terminate called without
    an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], env: DistEnv) -> list[float]:
    """Sum a few numbers over all ranks (float64, on the training device)."""
    if not env.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_reduce_max(value: int, env: DistEnv) -> int:
    """The largest of one integer over all ranks (e.g. a stop request: every rank stops at the same step)."""
    if not env.distributed:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=env.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def all_gather_objects(obj, env: DistEnv) -> list:
    if not env.distributed:
        return [obj]
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


# ------------------------------------------------------------------------------ DDP and FSDP
def shard(model: nn.Module) -> None:
    """FSDP2, in place: each block is its own shard unit, the rest of the model one more."""
    from torch.distributed.fsdp import fully_shard
    for block in model.blocks():
        fully_shard(block)
    fully_shard(model)


def replicate(module: nn.Module, env: DistEnv) -> DistributedDataParallel:
    """DDP: gradients are averaged over ranks during backward."""
    return DistributedDataParallel(module, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                   forward_sync_buffers=False)


def no_sync(model: nn.Module, accumulating: bool):
    """While accumulating micro-batches, DDP keeps gradients local (the last backward reduces them)."""
    if accumulating and isinstance(model, DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor (FSDP) gathered whole; any other tensor as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _full_on_cpu():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def model_state(module: nn.Module, sharded: bool) -> dict:
    """The whole state dict on the CPU (sharded: gathered, on rank 0 only)."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        return get_model_state_dict(module, options=_full_on_cpu())
    return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> dict:
    if sharded:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        return get_optimizer_state_dict(model, optimizer, options=_full_on_cpu())
    return optimizer.state_dict()


def load_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict,
               sharded: bool) -> None:
    """Load whole state dicts (as `model_state` / `optimizer_state` return them) into each rank's shards."""
    if sharded:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        set_model_state_dict(model, model_state, options=_full_on_cpu())
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=_full_on_cpu())
    else:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)


# ------------------------------------------------------------------------------ torchrun
def launched_by_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def relaunch_with_torchrun(nproc: int, train_args: list[str]) -> int:
    """Run `swinkit train TRAIN_ARGS` as `nproc` processes under torchrun; returns its exit code.

    SIGTERM sent to this process is passed on to torchrun, which passes it to every rank: they stop
    together at a step boundary, after saving. SIGINT is left to the terminal, which sends Ctrl-C to
    torchrun and the ranks itself (passing it on too would make it arrive twice)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "swinkit", "train", *train_args]
    child = subprocess.Popen(command)
    forwarded = []

    def forward(signum, frame) -> None:
        forwarded.append(signum)
        child.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
                    signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN)}
    try:
        code = child.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if forwarded and code != 0:  # torchrun ends with status 1 (and its own traceback) when signalled
        return 128 + forwarded[0]
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N
