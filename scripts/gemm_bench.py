"""GFLOP/s of the three matmuls of a linear layer in training, MKL (torch.mm) vs oneDNN as
`swinkit.onednn` calls it, at Swin-T's shapes for batch 16 (rows = tokens of the batch).

    python scripts/gemm_bench.py [--threads 2] [--batch 16]
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from swinkit import onednn as gemm


def seconds(fn, repeats: int = 5) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gemm.MIN_MACS = 0
    os.environ[gemm.ENGINE_ENV] = "onednn"  # the oneDNN column is oneDNN, whatever the measured choice
    print(f"{'rows':>6} {'C':>4} {'layer':>5} | GFLOP/s  forward mkl/onednn   dX mkl/onednn   dW mkl/onednn")
    for tokens, dim in ((3136, 96), (784, 192), (196, 384), (49, 768)):
        rows = args.batch * tokens
        for name, inner, outer in (("qkv", dim, 3 * dim), ("proj", dim, dim), ("fc1", dim, 4 * dim),
                                   ("fc2", 4 * dim, dim)):
            x, weight = torch.randn(rows, inner), torch.randn(outer, inner) * 0.02
            bias, grad = torch.randn(outer), torch.randn(rows, outer)
            flop = 2 * rows * inner * outer / 1e9
            pairs = ((lambda: torch.addmm(bias, x, weight.t()), lambda: gemm.linear(x, weight, bias)),
                     (lambda: grad.mm(weight), lambda: gemm.grad_input(grad, weight)),
                     (lambda: grad.t().mm(x), lambda: gemm.grad_weight(grad, x)))
            cells = [f"{flop / seconds(mkl):6.0f} / {flop / seconds(dnn):<6.0f}" for mkl, dnn in pairs]
            print(f"{rows:>6} {dim:>4} {name:>5} |        " + "   ".join(cells), flush=True)


if __name__ == "__main__":
    main()
