"""Where XLA:CPU spends a swinkit-JAX train (or eval) step: a `jax.profiler` trace of a few steps,
its thunks summed by kind (`ynn_fusion.183` -> `ynn_fusion`: YNNPACK GEMM fusions; `copy_*`/
`transpose_*`: layout copies; the rest elementwise fusions), ms per step and share.

    python scripts/jax_profile.py [--model swin_tiny_patch4_window7_224] [--batch 16] [--eval]
                                  [--precision fp32|bf16-mixed] [--steps 2] [--trace-dir /tmp/jaxprof]

Set XLA_FLAGS before running to compare XLA options (e.g. --xla_cpu_use_onednn=true).
"""
from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

import swinkit.jax as sj
from swinkit.jax import steps

SKIP = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction")  # wrappers around the thunks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="swin_tiny_patch4_window7_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--eval", action="store_true", help="profile the eval step instead of the train step")
    parser.add_argument("--precision", default="fp32", choices=steps.PRECISIONS)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--trace-dir", default="/tmp/jaxprof")
    args = parser.parse_args()

    model = sj.create_model(args.model, drop_path_rate=0.0)
    steps.apply_precision(model, args.precision)
    height, width = model.config.img_size
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.random((args.batch, height, width, model.config.in_chans), dtype=np.float32))
    labels = jnp.asarray(rng.integers(0, model.config.num_classes, args.batch))
    if args.eval:
        state = steps.init_train_state(model, steps.build_optimizer(model, weight_decay=0.05))
        eval_step = steps.make_eval_step(model)
        valid = jnp.ones(args.batch, bool)

        def run():
            return eval_step(state.params, state.rest, images, labels, valid)
    else:
        tx = steps.build_optimizer(model, weight_decay=0.05)
        state = steps.init_train_state(model, tx)
        train_step = steps.make_train_step(model, tx, label_smoothing=0.1, clip_grad=5.0)

        def run():
            nonlocal state
            state, metrics = train_step(state, images, labels, 1e-3)
            return metrics

    start = time.perf_counter()
    jax.block_until_ready(run())
    print(f"compile + first step: {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    for _ in range(args.steps):
        out = run()
    jax.block_until_ready(out)
    seconds = (time.perf_counter() - start) / args.steps
    print(f"{'eval' if args.eval else 'train'} step: {seconds:.3f} s, {args.batch / seconds:.2f} img/s")

    shutil.rmtree(args.trace_dir, ignore_errors=True)
    with jax.profiler.trace(args.trace_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
            out = run()
        jax.block_until_ready(out)
    trace = sorted(glob.glob(f"{args.trace_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, calls = collections.Counter(), collections.Counter()
    for event in events:
        if event.get("ph") != "X" or event["name"].startswith(SKIP):
            continue
        kind = re.sub(r"\.\d+$", "", event["name"])
        total[kind] += event.get("dur", 0)
        calls[kind] += 1
    overall = sum(total.values())
    print(f"thunks: {overall / 1000 / args.steps:.0f} ms per step (wall {seconds * 1000:.0f} ms)")
    print(f"{'ms/step':>9} {'share':>6} {'calls':>6}  kind")
    for kind, micros in total.most_common(20):
        print(f"{micros / 1000 / args.steps:9.1f} {100 * micros / overall:5.1f}% {calls[kind] // args.steps:6d}  {kind}")


if __name__ == "__main__":
    main()
