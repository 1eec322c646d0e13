"""How far the fast path's fp32 inference is from the machine's GEMM peak, and why: per round, in one
process, alternating,

    model      one call of `optimize_for_inference(model)` at --batch
    its GEMMs  the wall time of the linear layers inside that call (each `infer.fast._dense` call timed)
    isolated   the same GEMMs (shapes and counts from `bench.machine.linear_shapes`) run alone, back to back
               on hot operands through oneDNN with reordered weights, as the fast path runs them

then the bench's peak (`machine.measure_peaks`, sampled before and after the rounds, best per shape) and
the time the model would need for a given fraction of it (`--target`, 0.8 = issue 13's fp32 target):

    python scripts/gemm_gap.py --model swin_tiny_patch4_window7_224 --batch 8 --rounds 8

A model time above the budget while "its GEMMs" alone already exceed it means no work outside the
GEMMs can close the gap; "isolated" against "at peak" shows how much of it is the GEMM library's own
spread between its median and its best-of-samples rate on this machine.

`--mkl-packed` also times each isolated GEMM through MKL's packed sgemm (`torch.ops.mkl._mkl_linear`, the
weight packed once for the call's row count by `_mkl_reorder_linear_weight`), an engine the peak does not
include, alternating with oneDNN shape by shape, and prints both engines' and the per-shape better one's
median totals: what a third engine in the fast path could save on the GEMMs.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import swinkit
from swinkit import onednn
from swinkit.bench import machine
from swinkit.infer import fast as fast_module
from swinkit.models.swin import flops_per_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="swin_tiny_patch4_window7_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target", type=float, default=0.8, help="fraction of the fp32 GEMM peak to budget for")
    parser.add_argument("--mkl-packed", action="store_true", help="also time the isolated GEMMs in MKL's packed sgemm")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = swinkit.create_model(args.model).eval()
    size = model.config.img_size
    images = torch.randn(args.batch, model.config.in_chans, *((size, size) if isinstance(size, int) else size))
    fast = swinkit.optimize_for_inference(model)
    shapes = machine.linear_shapes(model, args.batch)
    peaks = machine.measure_peaks(shapes, ("fp32",))
    alone = []  # per shape: {engine: one call}, count
    for shape in shapes:
        x = torch.rand(shape.rows, shape.in_features).sub_(0.5)
        plain = torch.rand(shape.out_features, shape.in_features).sub_(0.5)
        weight = onednn.reorder_weight(plain)
        engines = {"oneDNN": lambda x=x, weight=weight: onednn.inner_product(x, weight)}
        if args.mkl_packed:
            packed = torch.ops.mkl._mkl_reorder_linear_weight(plain, shape.rows)
            engines["MKL packed"] = lambda x=x, packed=packed, plain=plain, rows=shape.rows: torch.ops.mkl._mkl_linear(
                x, packed, plain, None, rows)
        alone.append((engines, shape.count))
    engine_rows = []  # per round: {engine: [seconds per shape, times its count]}

    dense, inside = fast_module._dense, []

    def timed_dense(*call_args, **kwargs):
        start = time.perf_counter()
        out = dense(*call_args, **kwargs)
        inside.append(time.perf_counter() - start)
        return out

    rows = []
    with torch.inference_mode():
        fast(images)
        for _ in range(args.rounds):
            inside.clear()
            fast_module._dense = timed_dense
            try:
                start = time.perf_counter()
                fast(images)
                model_s = time.perf_counter() - start
            finally:
                fast_module._dense = dense
            per_engine = {name: [] for name in alone[0][0]}
            for engines, count in alone:
                for name in (list(engines) if len(rows) % 2 else list(engines)[::-1]):
                    engines[name]()
                    start = time.perf_counter()
                    engines[name]()
                    engines[name]()
                    per_engine[name].append((time.perf_counter() - start) / 2 * count)
            rows.append((model_s, sum(inside), sum(per_engine["oneDNN"])))
            engine_rows.append(per_engine)
    peaks = machine.measure_peaks(shapes, ("fp32",), previous=peaks)
    peak = peaks["peak_gflops"]["fp32"]
    at_peak = sum(row["gflop"] / max(row["fp32"].values()) for row in peaks["shapes"])
    flop = flops_per_image(model) * args.batch
    budget = flop / (args.target * peak * 1e9)
    print(f"{args.model} batch {args.batch} fp32, {args.threads} threads; fp32 GEMM peak {peak:.0f} GFLOP/s "
          f"(bench's rule); the model's linears at that peak: {at_peak * 1000:.1f} ms; "
          f"{args.target:.0%} of the peak = {budget * 1000:.1f} ms per call")
    print(f"{'round':>5} {'model ms':>9} {'its GEMMs':>10} {'rest':>7} {'isolated':>9} {'in/iso':>7} {'% peak':>7}")
    for index, (model_s, gemm_s, isolated) in enumerate(rows):
        print(f"{index:>5} {model_s * 1e3:9.1f} {gemm_s * 1e3:10.1f} {(model_s - gemm_s) * 1e3:7.1f} "
              f"{isolated * 1e3:9.1f} {gemm_s / isolated:7.2f} {100 * flop / model_s / (peak * 1e9):6.1f}%")
    medians = [statistics.median(column) for column in zip(*rows)]
    print(f"{'median':>5} {medians[0] * 1e3:9.1f} {medians[1] * 1e3:10.1f} {(medians[0] - medians[1]) * 1e3:7.1f} "
          f"{medians[2] * 1e3:9.1f} {medians[1] / medians[2]:7.2f} {100 * flop / medians[0] / (peak * 1e9):6.1f}%")
    print(f"rounds whose GEMMs alone exceed the {args.target:.0%} budget: "
          f"{sum(gemm_s > budget for _, gemm_s, _ in rows)} of {len(rows)}")
    if args.mkl_packed:
        shape_medians = {name: [statistics.median(r[name][i] for r in engine_rows) for i in range(len(shapes))]
                         for name in engine_rows[0]}
        totals = {name: sum(times) for name, times in shape_medians.items()}
        totals["better per shape"] = sum(map(min, zip(*shape_medians.values())))
        print("isolated GEMMs, median per shape, summed: " + ", ".join(
            f"{name} {seconds * 1e3:.1f} ms" for name, seconds in totals.items()))


if __name__ == "__main__":
    main()
