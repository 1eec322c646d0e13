"""Benchmarks, each against its peers in the same run and printed as a table:

    infer.py        `swinkit bench infer`: swinkit's inference engines (eager, optimized, ONNX Runtime,
                    INT8) against timm, torchvision, Hugging Face and ONNX Runtime on timm's export
    train.py        `swinkit bench train`: per setting (fp32, amp, recomputation) the largest batch that
                    trains within a memory budget and its speed, each run in `train_child.py`
    jax.py          `swinkit bench jax`: swinkit-JAX against swinkit-PyTorch and timm, trained and validated
                    from the same weights on the same data, each backend run in `jax_child.py`
    peers.py        the peer models;  machine.py  what the run was measured on, and its GEMM peaks
"""
from .infer import bench_infer, format_table, plot
from .machine import linear_shapes, measure_peaks

__all__ = ["bench_infer", "format_table", "linear_shapes", "measure_peaks", "plot"]
