"""Memory-lean training kernels: autograd functions that keep for backward only what backward needs.

Plain autograd stores every intermediate an op might need. Two places in a Swin
block are wasteful, and these functions fix them by recomputing cheap work in
backward instead of storing it (results are the same; gradients agree to fp32
rounding):

- the MLP branch: plain autograd stores LayerNorm's output, fc1's output and
  GELU's output. `mlp_branch` stores the branch input and fc1's output only,
  and recomputes the LayerNorm (v1) and the GELU in backward (v2, whose norm
  follows the MLP, also keeps fc2's output for the norm's backward);
- window attention: plain autograd keeps the attention probabilities
  `[B, num_windows, heads, N, N]` (and copies of q, k, v). `window_attention`
  keeps only the fused qkv projection and recomputes the probabilities (and v2's
  cosine normalisation) in backward: on the CPU in swinkit's kernel
  (`native.window_attention_backward`, no N x N tensor at all), else by batched matmuls.

Each is the hand-written gradient of a branch of the one model definition (`models/`) and is
tested equal to autograd of that definition; `train.lean` installs them on a model.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import native
from ... import onednn as gemm
from ...models.attention import LOG_MAX_TEMPERATURE, attention_probs, merge_heads, scaled_query_key, split_heads

aten = torch.ops.aten


class _MlpBranch(torch.autograd.Function):
    """v1: `fc2(gelu(fc1(norm(x))))`; v2: `norm(fc2(gelu(fc1(x))))`. `[..., C]` -> `[..., C]`."""

    # Matmuls run in the dtype of w1/w2 and LayerNorm in the dtype of its parameters: under
    # autocast the caller passes half-precision weights and fp32 norms, as autocast itself would.
    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, w1, b1, w2, b2, eps: float, pre_norm: bool, skip_output: bool):
        channels = x.shape[-1]
        if pre_norm:
            normed, mean, rstd = aten.native_layer_norm(x.to(norm_weight.dtype), [channels], norm_weight,
                                                        norm_bias, eps)
            hidden = gemm.linear(normed.to(w1.dtype), w1, b1)
            if skip_output:  # backward needs fc2's input, not its output
                out = hidden.new_empty(*hidden.shape[:-1], w2.shape[0])
            else:
                out = gemm.linear(F.gelu(hidden), w2, b2)
            ctx.save_for_backward(x, mean, rstd, hidden, norm_weight, norm_bias, w1, w2)
        else:
            hidden = gemm.linear(x.to(w1.dtype), w1, b1)
            projected = gemm.linear(F.gelu(hidden), w2, b2)
            out, mean, rstd = aten.native_layer_norm(projected.to(norm_weight.dtype), [channels], norm_weight,
                                                     norm_bias, eps)
            ctx.save_for_backward(x, mean, rstd, hidden, norm_weight, norm_bias, w1, w2, projected)
        ctx.eps, ctx.pre_norm = eps, pre_norm
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, rstd, hidden, norm_weight, norm_bias, w1, w2, *rest = ctx.saved_tensors
        channels = x.shape[-1]
        mask = [True, True, True]
        if ctx.pre_norm:
            grad_projected = grad_out
            normed = aten.native_layer_norm(x.to(norm_weight.dtype), [channels], norm_weight, norm_bias,
                                            ctx.eps)[0].to(w1.dtype)
        else:
            grad_projected, grad_norm_w, grad_norm_b = aten.native_layer_norm_backward(
                grad_out.to(norm_weight.dtype), rest[0].to(norm_weight.dtype), [channels], mean, rstd,
                norm_weight, norm_bias, mask)
            normed = x.to(w1.dtype)
        grad_act, grad_w2, grad_b2 = gemm.linear_grads(grad_projected.to(w2.dtype), F.gelu(hidden), w2)
        grad_hidden = aten.gelu_backward(grad_act, hidden)
        grad_normed, grad_w1, grad_b1 = gemm.linear_grads(grad_hidden, normed, w1)
        if ctx.pre_norm:
            grad_x, grad_norm_w, grad_norm_b = aten.native_layer_norm_backward(
                grad_normed.to(norm_weight.dtype), x.to(norm_weight.dtype), [channels], mean, rstd,
                norm_weight, norm_bias, mask)
        else:
            grad_x = grad_normed
        return (grad_x.to(x.dtype), grad_norm_w, grad_norm_b, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None)


class _NormLinear(torch.autograd.Function):
    """`linear(layer_norm(x), weight)` (v1 patch merging) storing only `x` and the norm's statistics;
    the normalised tensor is rebuilt in backward. `[..., K]` -> `[..., N]`."""

    @staticmethod
    def forward(ctx, x, norm_weight, norm_bias, weight, eps: float):
        channels = x.shape[-1]
        normed, mean, rstd = aten.native_layer_norm(x.to(norm_weight.dtype), [channels], norm_weight, norm_bias, eps)
        ctx.save_for_backward(x, mean, rstd, norm_weight, norm_bias, weight)
        ctx.eps = eps
        return gemm.linear(normed.to(weight.dtype), weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, mean, rstd, norm_weight, norm_bias, weight = ctx.saved_tensors
        channels = x.shape[-1]
        inputs = x.to(norm_weight.dtype)
        normed = aten.native_layer_norm(inputs, [channels], norm_weight, norm_bias, ctx.eps)[0]
        grad_out = grad_out.to(weight.dtype)
        grad_normed = gemm.grad_input(grad_out, weight)
        grad_weight = gemm.grad_weight(grad_out, normed.to(weight.dtype))
        grad_x, grad_norm_w, grad_norm_b = aten.native_layer_norm_backward(
            grad_normed.to(norm_weight.dtype), inputs, [channels], mean, rstd, norm_weight, norm_bias,
            [True, True, True])
        return grad_x.to(x.dtype), grad_norm_w, grad_norm_b, grad_weight, None


def norm_linear(x: torch.Tensor, norm: torch.nn.LayerNorm, weight: torch.Tensor) -> torch.Tensor:
    """`F.linear(norm(x), weight)` storing only `x` for backward (plus per-token statistics)."""
    dtype = _autocast_dtype(x.device.type)
    if dtype is None:
        return _NormLinear.apply(x, norm.weight, norm.bias, weight, norm.eps)
    with torch.autocast(x.device.type, enabled=False):
        return _NormLinear.apply(x, norm.weight, norm.bias, weight.to(dtype), norm.eps)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def mlp_branch(x: torch.Tensor, norm: torch.nn.LayerNorm, mlp, pre_norm: bool, skip_output: bool = False
               ) -> torch.Tensor:
    """The MLP residual branch of a block, storing only its input and fc1's output for backward.

    Under autocast the matmul weights are cast (differentiably) to the autocast dtype and
    LayerNorm stays in fp32, the same split autocast applies to the plain modules.
    `skip_output` (v1 only, for a recomputation whose output values are never read): the
    branch's value is left unset and fc2's forward matmul skipped; the gradients are unchanged.
    """
    weights = (mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    skip_output = skip_output and pre_norm
    device_type = x.device.type
    dtype = _autocast_dtype(device_type)
    if dtype is None:
        return _MlpBranch.apply(x, norm.weight, norm.bias, *weights, norm.eps, pre_norm, skip_output)
    with torch.autocast(device_type, enabled=False):
        return _MlpBranch.apply(x, norm.weight, norm.bias, *(w.to(dtype) for w in weights), norm.eps, pre_norm,
                                skip_output)


class _WindowAttention(torch.autograd.Function):
    """`models.attention.window_attention` on q, k, v in window layout (slices of one projection),
    storing only them: the probabilities (and v2's normalised q, k) are recomputed in backward."""

    @staticmethod
    def forward(ctx, q, k, v, attn_bias, logit_scale, scale: float, window: int, num_heads: int, keep_probs: bool):
        temperature = scale if logit_scale is None else logit_scale.clamp(max=LOG_MAX_TEMPERATURE).exp()
        heads_q, heads_k, heads_v = (split_heads(t, window, num_heads) for t in (q, k, v))
        probs = attention_probs(heads_q, heads_k, attn_bias, temperature, logit_scale is not None)
        out = torch.matmul(probs, heads_v)
        # swinkit's kernel (backward) rebuilds the probabilities in registers: nothing to keep for it
        keep_probs = keep_probs and not native.window_attention_applies(heads_q, heads_k, heads_v, attn_bias)
        ctx.save_for_backward(q, k, v, attn_bias, logit_scale, probs if keep_probs else None)
        ctx.scale, ctx.window, ctx.num_heads = scale, window, num_heads
        return merge_heads(out)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, attn_bias, logit_scale, probs = ctx.saved_tensors
        cosine = logit_scale is not None
        temperature = logit_scale.clamp(max=LOG_MAX_TEMPERATURE).exp() if cosine else ctx.scale
        q, k, v = (split_heads(t, ctx.window, ctx.num_heads) for t in (q, k, v))
        grad_o = split_heads(grad_out.to(q.dtype), ctx.window, ctx.num_heads)
        if native.window_attention_applies(q, k, v, attn_bias):  # swinkit's CPU kernel: probabilities recomputed
            grad_q, grad_k, grad_v, grad_bias = _kernel_gradients(q, k, v, attn_bias, grad_o, temperature, cosine)
        else:
            grad_q, grad_k, grad_v, grad_bias = _matmul_gradients(q, k, v, attn_bias, grad_o, temperature, cosine,
                                                                  probs)
        grad_logit_scale = None
        if cosine:  # grad_q, grad_k are the gradients of q / |q| (times the temperature) and k / |k|
            q_norm = q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            k_norm = k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            q_unit, k_unit = q / q_norm, k / k_norm
            grad_temperature = (grad_q * q_unit).to(temperature.dtype).sum(dim=(0, 1, 3, 4))
            grad_temperature = grad_temperature.view_as(temperature) / temperature
            grad_logit_scale = grad_temperature * temperature * (logit_scale <= LOG_MAX_TEMPERATURE)
            grad_q = (grad_q - q_unit * (grad_q * q_unit).sum(-1, keepdim=True)) / q_norm
            grad_k = (grad_k - k_unit * (grad_k * k_unit).sum(-1, keepdim=True)) / k_norm
        if attn_bias.shape[0] == 1 and grad_bias.shape[0] != 1:
            grad_bias = grad_bias.sum(0, keepdim=True)
        return (merge_heads(grad_q), merge_heads(grad_k), merge_heads(grad_v), grad_bias.to(attn_bias.dtype),
                grad_logit_scale, None, None, None, None)


def _matmul_gradients(q, k, v, attn_bias, grad_o, temperature, cosine: bool, probs):
    """(grad q, grad k, grad v, grad bias) by batched matmuls, the probabilities recomputed unless given;
    v2 (cosine): the gradients with respect to q / |q| and k / |k| (the normalisation's own gradient is
    the caller's)."""
    if probs is None:
        probs = attention_probs(q, k, attn_bias, temperature, cosine)  # [B, nW, heads, N, N]
    grad_v = torch.matmul(probs.transpose(-2, -1), grad_o)
    grad_probs = torch.matmul(grad_o, v.transpose(-2, -1))
    softmax_dtype = torch.promote_types(q.dtype, torch.float32)
    grad_scores = aten._softmax_backward_data(grad_probs.to(softmax_dtype), probs.to(softmax_dtype), -1,
                                              softmax_dtype)
    grad_bias = grad_scores.sum(0)  # [nW, heads, N, N]
    grad_scores = grad_scores.to(q.dtype)
    scaled_q, scaled_k = scaled_query_key(q, k, temperature, cosine)
    grad_q = torch.matmul(grad_scores, scaled_k) * (temperature.to(q.dtype) if cosine else temperature)
    grad_k = torch.matmul(grad_scores.transpose(-2, -1), scaled_q)
    return grad_q, grad_k, grad_v, grad_bias


def _kernel_gradients(q, k, v, attn_bias, grad_o, temperature, cosine: bool):
    """`_matmul_gradients` by swinkit's CPU kernel (`native.window_attention_backward`): per window and head,
    the probabilities rebuilt in registers, nothing of size N x N stored."""
    scaled_q, scaled_k = scaled_query_key(q, k, temperature, cosine)
    heads = q.shape[2]
    q_scale = temperature.reshape(heads) if cosine else torch.full((heads,), float(temperature))
    return native.window_attention_backward(scaled_q, scaled_k, v, attn_bias, grad_o, q_scale)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor,
                     logit_scale: torch.Tensor | None, scale: float, window: int, num_heads: int,
                     keep_probs: bool = False) -> torch.Tensor:
    """Training-time window attention storing only q, k and v for backward (as slices of one
    projection they share one storage).

    q, k, v: `[B, num_windows * N, C]`; attn_bias: `[num_windows or 1, heads, N, N]`;
    logit_scale: v2's `[heads, 1, 1]` (cosine attention) or None (v1: dot product times `scale`).
    Returns `[B, num_windows * N, C]`. Under autocast it runs in q's dtype with an fp32 softmax.
    `keep_probs` also stores the probabilities (`[B, num_windows, heads, N, N]`) instead of
    recomputing them in backward: for callers that bound the batch (recomputation's slices).
    """
    args = (q, k, v, attn_bias, logit_scale, scale, window, num_heads, keep_probs)
    if _autocast_dtype(q.device.type) is None:
        return _WindowAttention.apply(*args)
    with torch.autocast(q.device.type, enabled=False):
        return _WindowAttention.apply(*args)
