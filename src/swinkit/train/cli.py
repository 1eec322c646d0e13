"""`swinkit train`: flags and `key=value` overrides -> `TrainConfig` -> `train()` (or torchrun)."""
from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

from ..cli_types import device_or_auto, non_negative_int, positive_float, positive_int, rate
from ..precision import PRECISIONS
from .config import PRETRAIN_METHODS, load_config, save_config

# flag dest -> dotted config key
_FLAG_KEYS = {
    "output": "output.dir", "data": "data.path", "synthetic": "data.synthetic", "model": "model.name",
    "pretrained": "model.pretrained", "epochs": "schedule.epochs", "max_steps": "schedule.max_steps",
    "batch_size": "train.batch_size", "lr": "optim.lr", "seed": "train.seed", "precision": "train.precision",
    "grad_checkpointing": "model.grad_checkpointing", "memory_budget": "model.memory_budget",
    "drop_path": "model.drop_path_rate",
    "save_every": "train.save_every", "workers": "data.workers", "resume": "train.resume",
    "compile": "train.compile", "nproc": "train.nproc", "device": "train.device",
    "layer_decay": "optim.layer_decay", "method": "pretrain.method",
}


def config_from_args(args: argparse.Namespace):
    """Defaults <- --config file (or, resuming without one, OUTPUT/config.yaml) <- flags <- key=value."""
    values = {key: getattr(args, dest, None) for dest, key in _FLAG_KEYS.items()
              if getattr(args, dest, None) is not None and getattr(args, dest, None) is not False}
    if args.no_augment:
        values["augment.enabled"] = False
    path = args.config
    if path is None and args.resume and args.output and (Path(args.output) / "config.yaml").is_file():
        path = Path(args.output) / "config.yaml"
    return load_config(path, [*args.set_overrides, *args.overrides], values)


def _cmd_train(args) -> int:
    from . import distributed
    from ..allocator import enable_huge_pages
    from .trainer import train

    enable_huge_pages()  # a process setting of training's own, made before the first tensor exists

    config = config_from_args(args)
    with_jax = getattr(args, "backend", "torch") == "jax"  # one process; several local devices share the batch
    if config.train.nproc > 1 and not with_jax and not distributed.launched_by_torchrun():
        out = Path(config.output.dir)
        launch = save_config(config, out / ".launch_config.yaml")
        return distributed.relaunch_with_torchrun(config.train.nproc, ["--config", str(launch)])
    if with_jax:
        from ..jax.trainer import train as train_with_jax
        result = train_with_jax(config)
    else:
        result = train(config)
    if result["interrupted"]:  # the trainer said so and saved; the shell's status for "ended by signal N"
        return 128 + signal.Signals[result["interrupted"]].value
    if os.environ.get("RANK", "0") == "0":
        best = result["best_top1"]
        tail = f", best val top-1 {best:.2f}%" if best is not None and best >= 0 else ""
        print(f"trained {result['steps']} steps{tail}; outputs in {result['output']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train or fine-tune a Swin model (YAML recipe + overrides)",
                              description="Train a Swin model. Flags override the --config file; trailing "
                                          "key=value pairs (e.g. optim.lr=1e-3 model.arch.embed_dim=64) "
                                          "override any config key. SIGTERM or Ctrl-C stops at the next step "
                                          "after saving a checkpoint (exit status 128 + the signal's number: "
                                          "143, 130); --resume continues from it.")
    _run_arguments(p)
    p.add_argument("--layer-decay", type=positive_float, metavar="DECAY",
                   help="fine-tuning: each block's lr x DECAY^(depth from the top), the head at the full rate "
                        "(official SimMIM fine-tuning: 0.9 for Swin-B)")
    p.add_argument("--backend", choices=("torch", "jax"), default="torch",
                   help="torch (default), or jax: the same run (files, logs, resume) with the Flax model, "
                        "jit-compiled steps, the batch sharded over local devices (needs swinkit[jax])")
    p.set_defaults(func=_cmd_train)

    q = subparsers.add_parser("pretrain", help="self-supervised pre-training without labels (SimMIM)",
                              description="Pre-train a Swin encoder on images without labels (labels in the "
                                          "folder, if any, are ignored). The run folder holds "
                                          "encoder.safetensors for `swinkit train --pretrained`, and "
                                          "reconstructions/epoch_NNN.png. Same flags and overrides as train.")
    q.add_argument("--method", required=True, choices=PRETRAIN_METHODS,
                   help="simmim: masked-image modeling (pretrain.mask_patch_size, pretrain.mask_ratio)")
    _run_arguments(q)
    q.set_defaults(func=_cmd_train)


def _run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags `train` and `pretrain` share."""
    p.add_argument("--config", help="YAML recipe (see configs/)")
    p.add_argument("--output", help="run folder (config.yaml, metrics.jsonl, last.ckpt, *.safetensors, ...)")
    p.add_argument("--data", help="dataset root holding train/ and val/ image folders")
    p.add_argument("--synthetic", action="store_true", help="random images and labels, no files")
    p.add_argument("--model", help="registry model name")
    p.add_argument("--pretrained", help="initial weights (any checkpoint layout)")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--max-steps", type=positive_int, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=positive_int, help="images per process per micro-step")
    p.add_argument("--lr", type=positive_float,
                   help="base lr (per optim.lr_reference_batch images when optim.scale_lr)")
    p.add_argument("--seed", type=non_negative_int)
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--device", type=device_or_auto, choices=("auto", "cpu", "cuda"))
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute blocks in backward (less memory)")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help="fit training in SIZE (e.g. 6GB) with the cheapest recomputation; logs the plan")
    p.add_argument("--drop-path", type=rate, help="stochastic depth rate, in [0, 1)")
    p.add_argument("--no-augment", action="store_true", help="no random augmentation, mixup or cutmix")
    p.add_argument("--save-every", type=non_negative_int,
                   help="checkpoint every N optimizer steps (and at every epoch end; 0: there only)")
    p.add_argument("--workers", type=non_negative_int, help="data loading processes (0: in the main process)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --output from its last.ckpt (previous.ckpt when that is unreadable)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--nproc", type=positive_int, help="processes (relaunches itself under torchrun)")
    p.add_argument("--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override that may stand anywhere (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides after the flags, e.g. optim.lr=1e-3 model.arch.embed_dim=64")
