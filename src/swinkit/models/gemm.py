"""The three matmuls of a linear layer in training, routed to oneDNN for large fp32 CPU problems.

A training step of Swin is ~75% matmuls: per linear layer the forward `x W^T`, the input
gradient `g W` and the weight gradient `g^T x`. PyTorch runs fp32 `mm` on CPU through
MKL's sgemm; oneDNN is about twice as fast for these tall-skinny shapes (measured with
`scripts/gemm_bench.py`). PyTorch does not route fp32 `mm` to oneDNN, so this module calls
it directly:

- forward and input gradient: oneDNN's inner product (`mkldnn._linear_pointwise`);
- weight gradient: the weight gradient of a 1x1 convolution over the rows viewed as a
  channels-last image, which oneDNN computes from `g` and `x` as they lie in memory
  (a transpose copy of them would cost as much as the matmul).

Both are fp32 with fp32 accumulation, like MKL; only the summation order differs.
Small problems (under `MIN_MACS` multiply-adds), other devices and dtypes, and builds
without oneDNN use the plain ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_MACS = 1 << 24  # below this, call overhead outweighs the faster kernel


def _onednn(rows: int, inner: int, outer: int, *tensors: torch.Tensor) -> bool:
    return (rows * inner * outer >= MIN_MACS
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T + bias` (no autograd of its own). x: `[..., K]`, weight: `[N, K]`."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features
    if not _onednn(rows, in_features, out_features, x, weight):
        return F.linear(x, weight, bias)
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, in_features).contiguous(), weight.contiguous(),
                                             bias, "none", [], "")
    return out.view(*x.shape[:-1], out_features)


def grad_input(grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`grad_out @ weight`: the gradient of `linear` w.r.t. its input."""
    out_features, in_features = weight.shape
    rows = grad_out.numel() // out_features
    if not _onednn(rows, in_features, out_features, grad_out, weight):
        return grad_out.matmul(weight)
    out = torch.ops.mkldnn._linear_pointwise(grad_out.reshape(rows, out_features).contiguous(),
                                             weight.t().contiguous(), None, "none", [], "")
    return out.view(*grad_out.shape[:-1], in_features)


def grad_weight(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`grad_out^T @ x` summed over all leading dims: the gradient of `linear` w.r.t. its weight."""
    out_features, in_features = grad_out.shape[-1], x.shape[-1]
    rows = x.numel() // in_features
    grad_2d = grad_out.reshape(rows, out_features)
    x_2d = x.reshape(rows, in_features)
    if not _onednn(rows, in_features, out_features, grad_out, x):
        return grad_2d.t().mm(x_2d)
    # Rows as the height of a 1 x rows x 1 channels-last image: `x` holds C=K channels, the
    # output gradient C=N; the 1x1 kernel's gradient [N, K, 1, 1] is exactly grad^T x.
    image = x_2d.contiguous().view(1, rows, 1, in_features).permute(0, 3, 1, 2)
    grad_image = grad_2d.contiguous().view(1, rows, 1, out_features).permute(0, 3, 1, 2)
    kernel = x.new_empty(out_features, in_features, 1, 1).to(memory_format=torch.channels_last)
    _, grad_kernel, _ = torch.ops.aten.convolution_backward(
        grad_image, image, kernel, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False])
    return grad_kernel.view(out_features, in_features)


def linear_grads(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor):
    """Gradients of `x @ weight.T + bias` w.r.t. x, weight and bias."""
    grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
    return grad_input(grad_out, weight), grad_weight(grad_out, x), grad_bias


def tracing() -> bool:
    """A tracer, compiler or exporter is running the model (it must see plain ops)."""
    exporting = getattr(torch.compiler, "is_exporting", lambda: False)
    return (torch.jit.is_tracing() or torch.compiler.is_compiling() or exporting()
            or torch.onnx.is_in_onnx_export())


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_input(grad_out, weight) if ctx.needs_input_grad[0] else None
        grad_w = grad_weight(grad_out, x) if ctx.needs_input_grad[1] else None
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` computed by the oneDNN matmuls above where they apply: with its own autograd
    while autograd records, plain `linear` otherwise. Tracing, export and autocast get `F.linear`."""
    out_features, in_features = weight.shape
    if tracing() or torch.is_autocast_enabled(x.device.type) \
            or not _onednn(x.numel() // in_features, in_features, out_features, x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _Linear.apply(x, weight, bias)
    return linear(x, weight, bias)
