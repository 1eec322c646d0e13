"""One backend's run of `swinkit bench jax`, in its own process (no thread pool, allocator or
compilation cache shared with another backend):

    python -m swinkit.bench.jax_child --backend swinkit-jax|swinkit-torch|timm --weights FILE --data DIR
                                      --batch B --epochs E --steps-per-epoch S --recipe JSON [--probe N]

`--weights` is the native file every backend starts from; `--data` the folder `bench/jax.py` wrote
(train_x.npy [N, C, H, W] float32, train_y.npy [N] int, val_x.npy, val_y.npy). Each epoch trains
`S` steps on batches of a seeded permutation (the same for every backend), then validates the whole
val set (a short last batch is padded for JAX, whose step has one shape); both phases are timed
separately, JAX's after `block_until_ready` on every step. The first JAX step and val batch compile
their function ahead of time (`jit(...).lower(...).compile()`, timed as compile_train_s /
compile_val_s) inside the first epoch's timer, so first_epoch_s includes compilation.

Recipe (the PyTorch trainer's step, `train/trainer.py`): cross-entropy with label smoothing,
`clip_grad_norm_`, AdamW with `train.optim`'s weight-decay exemptions, lr from
`WarmupCosineSchedule` per step; fp32. swinkit-torch trains with the lean policy `swinkit train`
installs (`lean.install(model, "none")`) and validates with `optimize_for_inference`; timm trains
and validates its plain model (`inference_mode` for validation); swinkit-jax runs `jax.steps`.

Prints one JSON line: per-epoch train/val seconds, train loss, val top-1 and loss, compile times,
the thread settings it ran under, and with `--probe N` the logits of the first N val images before
training (the parent checks that every backend starts from the same weights).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BACKENDS = ("swinkit-jax", "swinkit-torch", "timm")
UNAVAILABLE_EXIT = 76  # the backend cannot run here (package missing); stdout says why


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m swinkit.bench.jax_child", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=BACKENDS, required=True)
    parser.add_argument("--model", required=True, help="registry name (the weights file's config overrides it)")
    parser.add_argument("--weights", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--steps-per-epoch", type=int, required=True)
    parser.add_argument("--recipe", required=True, help="JSON: lr, warmup_lr, min_lr, warmup_steps, weight_decay, "
                                                        "betas, eps, clip_grad, label_smoothing")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--probe", type=int, default=0, help="report the logits of this many val images first")
    return parser.parse_args(argv)


def limit_threads(threads: int | None) -> dict:
    """Pin this process to `threads` CPUs (XLA sizes its pools from the CPUs it may use) and set torch's
    intra-op threads; OMP/MKL_NUM_THREADS and XLA_FLAGS come from the parent's environment. Returns
    what is in force, for the table."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    if threads and cpus and len(cpus) > threads:
        os.sched_setaffinity(0, cpus[:threads])
        cpus = cpus[:threads]
    if threads:
        torch.set_num_threads(threads)
    return {"torch_threads": torch.get_num_threads(), "cpus": cpus,
            **{name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS")}}


def load_data(folder: str | Path) -> dict[str, np.ndarray]:
    folder = Path(folder)
    return {name: np.load(folder / f"{name}.npy") for name in ("train_x", "train_y", "val_x", "val_y")}


def lr_schedule(recipe: dict, total_steps: int):
    """step -> lr, from the trainer's `WarmupCosineSchedule` (the schedule has one definition)."""
    from ..train.optim import WarmupCosineSchedule
    holder = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)  # the schedule sets lrs on an optimizer
    schedule = WarmupCosineSchedule(holder, recipe["lr"], recipe["warmup_lr"], recipe["min_lr"],
                                    recipe["warmup_steps"], total_steps)
    return schedule.lr_at


def epoch_batches(count: int, batch: int, steps: int, seed: int, epoch: int) -> list[np.ndarray]:
    """The index batches of one epoch: `steps` batches of a permutation seeded by (seed, epoch)."""
    order = np.random.default_rng([seed, epoch]).permutation(count)
    return [order[step * batch:(step + 1) * batch] for step in range(steps)]


# ------------------------------------------------------------------------------------------- PyTorch
def torch_models(args):
    """(model, validator) for a torch backend, from the native weights file: the model to train and
    `validator()`, called after each epoch's training, returning `images [B, C, H, W] -> logits`."""
    import swinkit
    from ..infer.optimize import optimize_for_inference
    from ..train import lean
    model = swinkit.create_model(args.model, pretrained=args.weights)
    if args.backend == "swinkit-torch":
        def validator():
            lean.uninstall(model)  # the fast path is built from the plain definition; then the policy goes back
            fast = optimize_for_inference(model)
            lean.install(model, "none")
            return fast
        return model, validator
    if importlib.util.find_spec("timm") is None:
        print(json.dumps({"ok": False, "unavailable": "timm is not installed"}), flush=True)
        sys.exit(UNAVAILABLE_EXIT)
    from ..weights.layouts import from_native
    from .peers import timm_model
    peer = timm_model(model.config)  # the architecture of the file's config, with its drop-path rate
    peer.load_state_dict(from_native(model.state_dict(), "timm", model.config), strict=True)
    return peer, peer.eval


def run_torch(args, data, recipe, lr_at) -> dict:
    from ..train.optim import build_optimizer
    model, validator = torch_models(args)
    result = {}
    if args.probe:
        with torch.inference_mode():
            result["initial_logits"] = model.eval()(torch.from_numpy(data["val_x"][:args.probe])).tolist()
    if args.backend == "swinkit-torch":
        from ..train import lean
        lean.install(model, "none")  # the policy `swinkit train` installs
    model.train()
    optimizer = build_optimizer(model, lr=lr_at(0), weight_decay=recipe["weight_decay"], betas=recipe["betas"],
                                eps=recipe["eps"])
    clip = recipe["clip_grad"] or math.inf
    train_x, train_y = torch.from_numpy(data["train_x"]), torch.from_numpy(data["train_y"]).long()
    val_x, val_y = torch.from_numpy(data["val_x"]), torch.from_numpy(data["val_y"]).long()
    epochs, step = [], 0
    for epoch in range(args.epochs):
        losses = []
        start = time.perf_counter()
        for indices in epoch_batches(len(train_y), args.batch, args.steps_per_epoch, args.seed, epoch):
            index = torch.from_numpy(indices)
            images, labels = train_x.index_select(0, index), train_y.index_select(0, index)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step) * group.get("lr_scale", 1.0)
            loss = F.cross_entropy(model(images), labels, label_smoothing=recipe["label_smoothing"])
            loss.backward()
            if torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), clip)):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        evaluator = validator()
        correct, loss_sum = 0, 0.0
        with torch.inference_mode():
            for first in range(0, len(val_y), args.batch):
                logits = evaluator(val_x[first:first + args.batch])
                labels = val_y[first:first + args.batch]
                correct += int((logits.argmax(dim=1) == labels).sum())
                loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        val_s = time.perf_counter() - start
        model.train()
        epochs.append(_epoch(train_s, val_s, losses, correct, loss_sum, len(val_y)))
    return {**result, "epochs": epochs, "compile_train_s": None, "compile_val_s": None}


# ----------------------------------------------------------------------------------------------- JAX
def run_jax(args, data, recipe, lr_at) -> dict:
    import jax
    import jax.numpy as jnp

    import swinkit
    from ..jax import api as jax_api
    from ..jax import steps
    model = jax_api.from_torch(swinkit.create_model(args.model, pretrained=args.weights), seed=args.seed)
    result = {"jax": jax.__version__, "jax_devices": [str(d) for d in jax.devices()]}
    train_x = np.ascontiguousarray(data["train_x"].transpose(0, 2, 3, 1))  # NHWC, once, before any timing
    val_x = np.ascontiguousarray(data["val_x"].transpose(0, 2, 3, 1))
    train_y, val_y = data["train_y"].astype(np.int32), data["val_y"].astype(np.int32)
    if args.probe:
        result["initial_logits"] = np.asarray(jax_api.predict(model, jnp.asarray(val_x[:args.probe]))).tolist()
    tx = steps.build_optimizer(model, weight_decay=recipe["weight_decay"], betas=tuple(recipe["betas"]),
                               eps=recipe["eps"])
    state = steps.init_train_state(model, tx)
    train_step = steps.make_train_step(model, tx, label_smoothing=recipe["label_smoothing"],
                                       clip_grad=recipe["clip_grad"])
    eval_step = steps.make_eval_step(model)
    compiled_train = compiled_eval = None
    compile_train_s = compile_val_s = 0.0
    epochs, step = [], 0
    for epoch in range(args.epochs):
        losses = []
        start = time.perf_counter()
        for indices in epoch_batches(len(train_y), args.batch, args.steps_per_epoch, args.seed, epoch):
            images, labels = jnp.asarray(train_x[indices]), jnp.asarray(train_y[indices])
            lr = np.float32(lr_at(step))
            if compiled_train is None:
                begin = time.perf_counter()
                compiled_train = train_step.lower(state, images, labels, lr).compile()
                compile_train_s = time.perf_counter() - begin
            state, metrics = compiled_train(state, images, labels, lr)
            jax.block_until_ready((state, metrics))
            losses.append(float(metrics["loss"]))
            step += 1
        train_s = time.perf_counter() - start
        start = time.perf_counter()
        totals = {"correct_top1": 0.0, "loss_sum": 0.0}
        for first in range(0, len(val_y), args.batch):
            images, labels = val_x[first:first + args.batch], val_y[first:first + args.batch]
            valid = np.ones(args.batch, np.bool_)
            if len(labels) < args.batch:  # pad the short last batch: one compiled shape
                pad = args.batch - len(labels)
                valid[len(labels):] = False
                images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
                labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
            batch = (state.params, state.rest, jnp.asarray(images), jnp.asarray(labels), jnp.asarray(valid))
            if compiled_eval is None:
                begin = time.perf_counter()
                compiled_eval = eval_step.lower(*batch).compile()
                compile_val_s = time.perf_counter() - begin
            counts = jax.block_until_ready(compiled_eval(*batch))
            for key in totals:
                totals[key] += float(counts[key])
        val_s = time.perf_counter() - start
        epochs.append(_epoch(train_s, val_s, losses, int(totals["correct_top1"]), totals["loss_sum"], len(val_y)))
    return {**result, "epochs": epochs, "compile_train_s": compile_train_s, "compile_val_s": compile_val_s}


def _epoch(train_s: float, val_s: float, losses: list[float], correct: int, loss_sum: float, images: int) -> dict:
    return {"train_s": train_s, "val_s": val_s, "train_loss": float(np.mean(losses)) if losses else None,
            "top1": 100.0 * correct / images if images else 0.0, "val_loss": loss_sum / images if images else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    threads = limit_threads(args.threads)
    if args.backend != "swinkit-jax":
        from ..allocator import enable_huge_pages
        enable_huge_pages()  # as `swinkit train` does: before the first large tensor
    torch.manual_seed(args.seed)
    recipe = json.loads(args.recipe)
    data = load_data(args.data)
    needed = args.batch * args.steps_per_epoch
    if needed > len(data["train_y"]):
        raise SystemExit(f"{args.steps_per_epoch} steps of batch {args.batch} need {needed} training images; "
                         f"{args.data} has {len(data['train_y'])}")
    lr_at = lr_schedule(recipe, args.epochs * args.steps_per_epoch)
    run = run_jax if args.backend == "swinkit-jax" else run_torch
    result = run(args, data, recipe, lr_at)
    print(json.dumps({"ok": True, "backend": args.backend, "batch_size": args.batch,
                      "train_images_per_epoch": needed, "val_images": int(len(data["val_y"])),
                      "threads": threads, "torch": torch.__version__, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
