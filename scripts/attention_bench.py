"""swinkit's window-attention kernels against PyTorch's ops, per Swin-T stage (one block each).

    python scripts/attention_bench.py [--batch 8] [--rounds 15] [--dtype fp32|bf16]
    ATEN_CPU_CAPABILITY=avx2 SWINKIT_NATIVE_MARCH=x86-64-v3 python scripts/attention_bench.py  # AVX2-only paths

forward: `native.window_attention` vs `scaled_dot_product_attention` (q, k, v strided slices of one qkv
tensor, as in the model); backward: `native.window_attention_backward` vs the batched-matmul gradients the
lean policy runs where the kernel does not apply (`train.lean.kernels._matmul_gradients`). Medians of
`--rounds` calls, each engine alternating with the other; the largest difference to the reference is printed
beside each stage. Correctness is the tests' job (tests/test_native.py); this only times.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from swinkit import native
from swinkit.train.lean.kernels import _matmul_gradients

STAGES = ((64, 3), (16, 6), (4, 12), (1, 24))  # Swin-T at 224: (windows per image, heads); 49 tokens, head_dim 32


def _median_ms(calls: dict, rounds: int) -> dict:
    for call in calls.values():
        call()
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if not native.kernels_available():
        raise SystemExit("swinkit's kernels could not be built here (see the warning above)")
    torch.set_num_threads(args.threads)
    dtype = torch.float32 if args.dtype == "fp32" else torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    tokens, head_dim = 49, 32
    print(f"{args.batch} images, {args.dtype}, {args.threads} threads, torch CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, kernel flags {' '.join(native.FLAGS)}")
    totals: dict[str, float] = {}
    for windows, heads in STAGES:
        qkv = torch.randn(args.batch, windows, tokens, 3, heads, head_dim, generator=generator).to(dtype)
        q, k, v = (qkv[:, :, :, i].permute(0, 1, 3, 2, 4) for i in range(3))
        grad_out = torch.randn(args.batch, windows, tokens, heads, head_dim, generator=generator).to(dtype)
        grad_out = grad_out.permute(0, 1, 3, 2, 4)
        bias = torch.randn(windows, heads, tokens, tokens, generator=generator)
        q_scale = torch.ones(heads)
        with torch.no_grad():
            forward = _median_ms({
                "kernel": lambda: native.window_attention(q, k, v, bias),
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(dtype)[None], scale=1.0)},
                args.rounds)
            backward = _median_ms({
                "kernel": lambda: native.window_attention_backward(q, k, v, bias, grad_out, q_scale),
                "matmuls": lambda: _matmul_gradients(q, k, v, bias, grad_out, 1.0, False, None)}, args.rounds)
            gap = (native.window_attention(q, k, v, bias).float() - F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=bias[None], scale=1.0)).abs().max().item()
        for name, ms in (("forward kernel", forward["kernel"]), ("forward sdpa", forward["sdpa"]),
                         ("backward kernel", backward["kernel"]), ("backward matmuls", backward["matmuls"])):
            totals[name] = totals.get(name, 0.0) + ms
        print(f"[{args.batch}, {windows}, {heads}, {tokens}, {head_dim}]: forward kernel {forward['kernel']:.2f} ms, "
              f"SDPA {forward['sdpa']:.2f} ms (max difference {gap:.1e}); backward kernel {backward['kernel']:.2f} ms, "
              f"batched matmuls {backward['matmuls']:.2f} ms")
    print("sum over the stages: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in totals.items()))


if __name__ == "__main__":
    main()
