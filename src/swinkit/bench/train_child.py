"""One training measurement in its own process, so its peak memory is its own:

    python -m swinkit.bench.train_child --model NAME --batch B [--steps N] [--setting none|amp|recompute|...]
                                        [--plan MODES] [--budget BYTES] [--impl swinkit|timm]
                                        [--allocator return|keep|glibc]

Runs `warmup + steps` real training steps (AdamW, cross-entropy, synthetic data) and prints one
JSON line: peak bytes (CPU: the process's resident high-water mark, VmHWM; CUDA: the allocator's
`max_memory_allocated`), baseline bytes after building the model, median s/step and img/s.

A watchdog thread reads the process's resident size every few milliseconds; when it passes
`--budget` the child prints `{"over_budget": true, ...}` and exits with `OVER_BUDGET_EXIT`, so a
candidate batch that does not fit never drives the machine into a real out-of-memory.
On CUDA the allocator is capped at the budget instead and its OutOfMemoryError means the same.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..precision import amp_dtype, denormals_flushed, flush_denormals
from ..sysinfo import peak_rss, process_rss
from ..train import lean
from ..train.optim import build_optimizer
from ..allocator import enable_huge_pages, keeping_freed_memory, returning_freed_memory

OVER_BUDGET_EXIT = 75
SETTINGS = ("none", "amp", "recompute", "recompute+amp")
# `--allocator`: freed memory to the OS, kept for reuse, glibc's defaults
ALLOCATORS = {"return": returning_freed_memory, "keep": keeping_freed_memory, "glibc": nullcontext}


def build_model(name: str, impl: str = "swinkit", img_size: int | None = None, num_classes: int | None = None):
    """swinkit's model, or timm's with the same architecture (timm's registry name where it has one)."""
    import swinkit
    config = swinkit.get_config(name)
    if img_size is not None:
        config = config.replace(img_size=img_size)
    if num_classes is not None:
        config = config.replace(num_classes=num_classes)
    if impl == "swinkit":
        return swinkit.SwinTransformer(config, name=name)
    if impl != "timm":
        raise ValueError(f"impl must be 'swinkit' or 'timm', got {impl!r}")
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    kwargs = dict(img_size=config.img_size, patch_size=config.patch_size, in_chans=config.in_chans,
                  num_classes=config.num_classes, embed_dim=config.embed_dim, depths=config.depths,
                  num_heads=config.num_heads, window_size=config.window_size, mlp_ratio=config.mlp_ratio,
                  qkv_bias=config.qkv_bias, drop_path_rate=config.drop_path_rate)
    if config.version == 2:
        return SwinTransformerV2(pretrained_window_sizes=config.pretrained_window_sizes, **kwargs)
    return SwinTransformer(**kwargs)


class Watchdog(threading.Thread):
    """Exits the process with OVER_BUDGET_EXIT as soon as its resident size passes `budget` bytes."""

    def __init__(self, budget: int, baseline: int, interval: float = 0.004):
        super().__init__(daemon=True)
        self.budget, self.baseline, self.interval = budget, baseline, interval

    def run(self):
        while True:
            rss = process_rss()
            if rss > self.budget:
                over_budget(max(rss, peak_rss()), self.budget, self.baseline)
            time.sleep(self.interval)


def over_budget(peak: int, budget: int, baseline: int) -> None:
    print(json.dumps({"ok": False, "over_budget": True, "peak_bytes": peak, "budget_bytes": budget,
                      "baseline_bytes": baseline}), flush=True)
    os._exit(OVER_BUDGET_EXIT)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m swinkit.bench.train_child", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=2, help="timed steps (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--setting", choices=SETTINGS, default="none")
    parser.add_argument("--plan", default=None, help="comma-separated recompute mode per block, or one mode")
    parser.add_argument("--budget", type=int, default=None, help="bytes; exit %d when passed" % OVER_BUDGET_EXIT)
    parser.add_argument("--impl", choices=("swinkit", "timm"), default="swinkit")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--num-classes", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--allocator", choices=tuple(ALLOCATORS), default="return",
                        help="return: freed memory back to the OS (what the trainer does under a --memory-budget "
                             "that binds); keep: glibc keeps it for reuse (what the trainer does otherwise); "
                             "glibc: glibc's defaults (what timm's own training gets)")
    parser.add_argument("--denormals", choices=("flush", "default"), default=None,
                        help="flush: denormals as zero (what `swinkit train` does on CPU); default: the process's "
                             "default (what timm's own training gets). Default: flush for swinkit, default for timm")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    enable_huge_pages()  # as `swinkit train` does: before the first tensor
    with ALLOCATORS[args.allocator]():
        return _run(args)


def _run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu" and (args.denormals or ("flush" if args.impl == "swinkit" else "default")) == "flush":
        flush_denormals()  # as the trainer does (`precision.ensure_denormals_flushed`)
    torch.manual_seed(args.seed)
    model = build_model(args.model, args.impl, args.img_size, args.num_classes).to(device).train()
    amp = "amp" in args.setting
    if args.impl == "swinkit":  # the policy `swinkit train` installs
        modes = (args.plan or "none").split(",")
        lean.install(model, modes[0] if len(modes) == 1 else modes)
    elif "recompute" in args.setting:
        model.set_grad_checkpointing(True)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else process_rss()
    if args.budget:
        if device.type == "cuda":
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(args.budget / total, 1.0), device)
        else:
            Watchdog(args.budget, baseline).start()

    if args.impl == "swinkit":  # the optimizer `swinkit train` builds (fused AdamW where PyTorch runs it)
        optimizer = build_optimizer(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.999), eps=1e-8)
    else:  # timm's training script builds torch's AdamW with its defaults
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    height = width = args.img_size or model_img_size(model)
    images = torch.randn(args.batch, 3, height, width, device=device)
    labels = torch.randint(0, getattr(model, "num_classes", 1000), (args.batch,), device=device)
    autocast = torch.autocast(device.type, dtype=amp_dtype(device), enabled=amp)
    times, peaks, loss = [], [], None
    try:
        for step in range(args.warmup + args.steps):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
            peaks.append(torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss())
    except torch.cuda.OutOfMemoryError:
        over_budget(torch.cuda.max_memory_allocated(device), args.budget or 0, baseline)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss()
    if args.budget and peak > args.budget:
        over_budget(peak, args.budget, baseline)  # a spike between two watchdog reads
    s_per_step = statistics.median(times) if times else float("nan")
    print(json.dumps({"ok": True, "batch": args.batch, "setting": args.setting, "impl": args.impl,
                      "peak_bytes": peak, "baseline_bytes": baseline, "peak_after_step": peaks, "s_per_step": s_per_step,
                      "img_per_s": args.batch / s_per_step if times else float("nan"),
                      "loss": None if loss is None else float(loss.detach()), "lean": args.impl == "swinkit",
                      "threads": torch.get_num_threads(),
                      "denormals": "flush" if denormals_flushed() else "default",
                      "plan": lean.plan_of(model) if args.impl == "swinkit" else None}), flush=True)
    return 0


def model_img_size(model) -> int:
    size = getattr(getattr(model, "config", None), "img_size", None) or model.patch_embed.img_size
    return size[0] if isinstance(size, (tuple, list)) else int(size)


if __name__ == "__main__":
    sys.exit(main())
