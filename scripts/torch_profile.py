"""Where the time of swinkit's PyTorch paths goes: torch.profiler over a few calls, ops summed by kind.

    python scripts/torch_profile.py infer --model swin_tiny_patch4_window7_224 --batch 8 [--precision bf16]
    python scripts/torch_profile.py infer --batch 8 --precision int8 --calib data/fashion-mnist/train
    python scripts/torch_profile.py train --model swin_tiny_patch4_window7_224 --batch 16 [--precision bf16] [--lean]

infer: the optimized path (`optimize_for_inference`); train: forward + backward + AdamW step of the
model (plain autograd, or the lean policy with --lean). Prints the share of self CPU time per kind
(GEMMs, attention batched matmuls, fused attention, softmax, LayerNorm, GELU, copies/gathers,
elementwise, other), the GEMM kind's GFLOP/s (the model's FLOPs counted per image), and the top ops.
"""
from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

import swinkit
from swinkit import allocator
from swinkit.models.swin import flops_per_image
from swinkit.precision import autocast_dtype, flush_denormals, inference_dtype

KINDS = (  # first match wins: (kind, substrings of the op name)
    ("linear GEMM", ("addmm", "aten::mm", "_linear_pointwise", "mkldnn_linear", "convolution_backward", "linear")),
    ("int8 quantize", ("quantize_per_tensor",)),
    ("attention bmm", ("bmm", "matmul", "baddbmm")),
    ("fused attention", ("scaled_dot_product", "flash_attention", "swinkit::window_attention")),
    ("softmax", ("softmax",)),
    ("layer norm", ("layer_norm",)),
    ("gelu", ("gelu",)),
    ("copies/gathers", ("index_select", "copy_", "contiguous", "clone", "cat", "roll", "constant_pad", "gather",
                        "index", "masked_fill", "to_copy", "_to_copy", "permute", "transpose", "view", "reshape",
                        "as_strided", "unsqueeze", "expand", "chunk", "split", "slice", "select", "empty")),
    ("elementwise", ("add", "mul", "sub", "div", "where", "clamp", "exp", "sum", "mean", "fill", "zero", "sqrt",
                     "rsqrt", "pow", "lerp", "addcdiv", "addcmul", "foreach", "norm", "neg")),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, parts in KINDS if any(p in lowered for p in parts)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=("infer", "train"))
    parser.add_argument("--model", default="swin_tiny_patch4_window7_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--precision", default="fp32", help="infer: fp32|bf16|fp16|int8; train: fp32|bf16-mixed")
    parser.add_argument("--calib", help="infer int8: image folder to calibrate on (64 images)")
    parser.add_argument("--lean", action="store_true", help="train with the lean policy (swinkit.train.lean)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--denormals", choices=("flush", "default"), default="flush",
                        help="flush: denormals as zero, as swinkit's optimized path and trainer run (default)")
    parser.add_argument("--allocator", choices=("keep", "glibc"), default="keep",
                        help="train: keep freed memory for reuse on transparent huge pages, as `swinkit train` runs "
                             "where no memory budget binds (default), or glibc's defaults (every large activation "
                             "page-faulted in afresh: elementwise ops and copies then read 2-4x slower)")
    args = parser.parse_args()
    if args.mode == "train" and args.allocator == "keep":
        allocator.enable_huge_pages()  # before the first tensor, as the trainer does
        allocator.keep_freed_memory()  # the optimized inference path turns this on by itself
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = swinkit.create_model(args.model)
    size = model.config.img_size
    images = torch.randn(args.batch, model.config.in_chans, *((size, size) if isinstance(size, int) else size))
    flop = flops_per_image(model, training=args.mode == "train")
    if args.mode == "infer":
        if args.precision == "int8":
            if not args.calib:
                parser.error("--precision int8 needs --calib DIR")
            from swinkit.infer.quantize import calibration_images
            from swinkit.metadata import Preprocess
            fast = swinkit.optimize_for_inference(model, dtype="int8", calibration=calibration_images(
                Preprocess.from_metadata({}, model.config), args.calib, 64))
        else:
            fast = swinkit.optimize_for_inference(model, dtype=inference_dtype(args.precision))

        def call():
            with torch.inference_mode():
                fast(images)
    else:
        if args.lean:
            from swinkit.train import lean
            lean.install(model)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        labels = torch.randint(0, model.num_classes, (args.batch,))
        dtype = autocast_dtype(args.precision)

        def call():
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = torch.nn.functional.cross_entropy(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    flush_denormals(args.denormals == "flush")  # after building: the fast path would turn it on by itself
    call()  # warm-up (plans, oneDNN primitives, measured GEMM engine choices)
    start = time.perf_counter()
    for _ in range(args.calls):
        call()
    seconds = (time.perf_counter() - start) / args.calls
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.calls):
            call()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    by_kind: dict[str, float] = defaultdict(float)
    for event in events:
        by_kind[kind_of(event.key)] += event.self_cpu_time_total
    print(f"{args.mode} {args.model} batch {args.batch} {args.precision}{' lean' if args.lean else ''}, "
          f"denormals {args.denormals}{', glibc defaults' if args.mode == 'train' and args.allocator == 'glibc' else ''}, "
          f"{args.threads} threads: {seconds * 1000:.1f} ms/call unprofiled, {args.batch / seconds:.2f} img/s, "
          f"{flop * args.batch / seconds / 1e9:.1f} GFLOP/s overall")
    gemm_seconds = by_kind.get("linear GEMM", 0) / 1e6 / args.calls
    for kind, micros in sorted(by_kind.items(), key=lambda item: -item[1]):
        print(f"  {kind:<16} {100 * micros / total:5.1f}%  {micros / 1e3 / args.calls:8.1f} ms/call")
    if gemm_seconds:
        print(f"  linear GEMMs alone would run the model's FLOPs at {flop * args.batch / gemm_seconds / 1e9:.1f} GFLOP/s"
              " (upper bound: attention bmm FLOPs are counted too)")
    print("top ops (self CPU):")
    for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:args.top]:
        print(f"  {event.key:<44} {100 * event.self_cpu_time_total / total:5.1f}%  calls {event.count // args.calls}")


if __name__ == "__main__":
    main()
