"""The matmuls of a linear layer on oneDNN, for large CPU problems; used by the training policy
(`train.lean`) and the fast inference path (`infer.fast`). The model itself uses `nn.Linear`.

A Swin step is ~75% matmuls: per linear layer the forward `x W^T`, the input gradient `g W`
and the weight gradient `g^T x`. PyTorch runs fp32 `mm` on CPU through MKL's sgemm; oneDNN is
up to twice as fast for these tall-skinny shapes on some CPUs (`scripts/gemm_bench.py` measures
it). PyTorch does not route `mm` to oneDNN, so this module calls it directly:

- forward and input gradient: oneDNN's inner product (`mkldnn._linear_pointwise`, the forward
  optionally with GELU fused);
- weight gradient: the weight gradient of a 1x1 convolution over the rows viewed as a
  channels-last image, which oneDNN computes from `g` and `x` as they lie in memory.

Accumulation is fp32, like MKL; only the summation order differs. `uses_onednn` is the one rule
deciding when these run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .models.layers import tracing

MIN_MACS = 1 << 24  # below this, call overhead outweighs the faster kernel
# dtypes oneDNN runs per operation: bf16 forwards are oneDNN's (AMX/AVX512-BF16 kernels); the
# bf16 weight gradient through the convolution trick measured slower than `mm`, so it stays fp32.
DTYPES = {"forward": (torch.float32, torch.bfloat16), "grad_input": (torch.float32,),
          "grad_weight": (torch.float32,)}


def uses_onednn(op: str, macs: int, *tensors: torch.Tensor) -> bool:
    """THE rule: oneDNN runs `op` ("forward", "grad_input", "grad_weight") when the problem is large,
    every tensor is on the CPU in a dtype oneDNN runs for that op, oneDNN is available, and no
    tracer/exporter is running (they must see plain ops)."""
    dtypes = DTYPES[op]
    if torch.jit.is_tracing():  # sizes are tensors there; the tracer must see plain ops
        return False
    return (macs >= MIN_MACS  # first: small problems (most calls of a tiny model) stop here
            and all(t.device.type == "cpu" and t.dtype in dtypes for t in tensors)
            and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and (tensors[0].dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())
            and not tracing())


def inner_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False
                  ) -> torch.Tensor:
    """oneDNN's inner product `x @ weight.T + bias` (GELU fused when `gelu`), whatever the size; x: `[..., K]`
    contiguous, weight: `[N, K]`. `linear` decides when to call it; the benchmarks' peak times it directly."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], "none" if gelu else "")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False
           ) -> torch.Tensor:
    """`x @ weight.T + bias` (GELU applied when `gelu`), no autograd of its own. x: `[..., K]`, weight: `[N, K]`."""
    out_features, in_features = weight.shape
    if not uses_onednn("forward", x.numel() // in_features * in_features * out_features, x, weight):
        out = F.linear(x, weight, bias)
        return F.gelu(out) if gelu else out
    return inner_product(x.contiguous(), weight, bias, gelu)


def grad_input(grad_out: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`grad_out @ weight`: the gradient of `linear` w.r.t. its input."""
    out_features, in_features = weight.shape
    rows = grad_out.numel() // out_features
    if not uses_onednn("grad_input", rows * in_features * out_features, grad_out, weight):
        return grad_out.matmul(weight)
    out = inner_product(grad_out.reshape(rows, out_features).contiguous(), weight.t().contiguous())
    return out.view(*grad_out.shape[:-1], in_features)


def grad_weight(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`grad_out^T @ x` summed over all leading dims: the gradient of `linear` w.r.t. its weight."""
    out_features, in_features = grad_out.shape[-1], x.shape[-1]
    rows = x.numel() // in_features
    grad_2d = grad_out.reshape(rows, out_features)
    x_2d = x.reshape(rows, in_features)
    if not uses_onednn("grad_weight", rows * in_features * out_features, grad_out, x):
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


def linear_autograd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear` with all three matmuls on oneDNN where `uses_onednn` allows (its own autograd while
    autograd records, plain `linear` otherwise). Under autocast or a tracer: `F.linear`."""
    if torch.is_autocast_enabled(x.device.type) or tracing():
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        # 2-D inside the Function: its output must not be a view (in-place ops may follow it)
        out = _Linear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
        return out.view(*x.shape[:-1], weight.shape[0])
    return linear(x, weight, bias)


class OneDNNLinear:
    """Mixin for an `nn.Linear`: computed by `linear_autograd` (installed by `swinkit.policy.specialise`;
    parameters and state-dict keys stay those of the `nn.Linear`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_autograd(x, self.weight, self.bias)
