"""Benchmarks: `bench_infer` (swinkit's inference engines against timm, torchvision, Hugging Face
and ONNX Runtime on timm's export), with tables and plots."""
from .infer import bench_infer, format_table, gemm_peak, plot

__all__ = ["bench_infer", "format_table", "gemm_peak", "plot"]
