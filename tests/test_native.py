"""swinkit's own CPU kernel (`swinkit.native`): window attention against the plain definition, where
it applies, and what happens where it cannot be built. Agreement only, never timings."""
from __future__ import annotations

import pytest
import torch

from swinkit import native
from swinkit.models.attention import merge_heads, split_heads, window_attention



@pytest.fixture
def kernels():
    """Built (once per test session, in its cache folder) and loaded, or the test is skipped."""
    if not native.kernels_available():
        pytest.skip("swinkit's kernels could not be built here")


def _qkv(batch, windows, heads, tokens, head_dim, seed=0):
    """q, k, v as the model hands them over: strided head views of one fused projection."""
    generator = torch.Generator().manual_seed(seed)
    dim = heads * head_dim
    qkv = torch.randn(batch, windows * tokens, 3 * dim, generator=generator) * 1.5
    side = int(tokens ** 0.5)
    if side * side == tokens:
        return tuple(split_heads(t, side, heads) for t in qkv.chunk(3, dim=-1))
    return tuple(t.view(batch, windows, tokens, heads, head_dim).transpose(2, 3) for t in qkv.chunk(3, dim=-1))


def _bias(windows, heads, tokens, seed=1):
    generator = torch.Generator().manual_seed(seed)
    bias = torch.randn(windows, heads, tokens, tokens, generator=generator)
    bias[..., : max(1, tokens // 5)] += -100.0  # a shift mask's keys
    bias[..., -1] = -10000.0 if tokens > 1 else 0.0  # a padded key
    return bias


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("tokens,head_dim", [(49, 32), (64, 32), (16, 8), (1, 4), (17, 24), (33, 64), (49, 40)])
@pytest.mark.parametrize("per_window", [False, True])
def test_kernel_equals_plain_definition(tokens, head_dim, per_window):
    """Every register-block shape: 1-4 vectors of keys, 1-4 of head_dim, partial ones, rows not a
    multiple of the block, shared and per-window bias, masked keys."""
    batch, windows, heads = 2, 3, 2
    q, k, v = _qkv(batch, windows, heads, tokens, head_dim)
    bias = _bias(windows if per_window else 1, heads, tokens)
    assert native.window_attention_applies(q, k, v, bias)
    got = native.window_attention(q, k, v, bias)
    expected = window_attention(q, k, v, bias, 1.0, cosine=False)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-5)
    merged = merge_heads(got)
    assert merged.data_ptr() == got.data_ptr()  # token-major: merging the heads is a view
    torch.testing.assert_close(merged, merge_heads(expected), atol=2e-5, rtol=1e-5)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("tokens,head_dim", [(49, 32), (16, 8), (17, 24)])
def test_kernel_in_bf16_is_fp32_arithmetic_rounded_once(tokens, head_dim):
    """bf16 in and out: the fp32 result on the same bf16 inputs, rounded to bf16 once (within one bf16
    step of it), and no further from it than the plain definition run in bf16."""
    q, k, v = (t.bfloat16() for t in _qkv(2, 3, 2, tokens, head_dim))
    bias = _bias(3, 2, tokens).bfloat16()
    got = native.window_attention(q, k, v, bias)
    assert got.dtype == torch.bfloat16
    exact = window_attention(q.float(), k.float(), v.float(), bias.float(), 1.0, cosine=False)
    step = exact.abs().clamp(min=2 ** -126) * 2 ** -8  # one bf16 rounding of the output
    assert ((got.float() - exact).abs() <= step).all()
    plain = window_attention(q, k, v, bias, 1.0, cosine=False).float()
    assert (got.float() - exact).abs().max() <= (plain - exact).abs().max()


@pytest.mark.usefixtures("kernels")
def test_kernel_takes_any_strides_and_contiguous_inputs():
    q, k, v = _qkv(1, 4, 3, 49, 32)
    bias = _bias(4, 3, 49)
    expected = window_attention(q, k, v, bias, 1.0, cosine=False)
    contiguous = [t.contiguous() for t in (q, k, v)]
    torch.testing.assert_close(native.window_attention(*contiguous, bias), expected, atol=2e-5, rtol=1e-5)
    # bias in another dtype / not contiguous: converted, not misread
    odd_bias = bias.double().transpose(-1, -2).contiguous().transpose(-1, -2)
    torch.testing.assert_close(native.window_attention(q, k, v, odd_bias), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("cosine", [False, True])
def test_fused_window_attention_uses_the_kernel(monkeypatch, cosine):
    """`window_attention(fused=True)` in fp32 on the CPU runs the kernel (v2: on normalised q, k with the
    temperature on q) and agrees with the plain matmuls; SDPA is not called."""
    import torch.nn.functional as F
    calls = []
    monkeypatch.setattr(native, "window_attention", lambda *a, _f=native.window_attention: calls.append(1) or _f(*a))
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: pytest.fail("SDPA called"))
    q, k, v = _qkv(2, 4, 3, 49, 32)
    bias = _bias(4, 3, 49)
    temperature = torch.rand(3, 1, 1) * 10 if cosine else 32 ** -0.5
    plain = window_attention(q, k, v, bias, temperature, cosine)
    fused = window_attention(q, k, v, bias, temperature, cosine, fused=True)
    assert calls == [1]
    torch.testing.assert_close(fused, plain, atol=2e-5, rtol=1e-5)


def _autograd_gradients(q, k, v, bias, grad_out, q_scale):
    """The gradients of the plain definition (fp32 autograd): q's times q_scale per head."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v, bias)]
    window_attention(*leaves, 1.0, cosine=False).backward(grad_out.float())
    grad_q, grad_k, grad_v, grad_bias = (t.grad for t in leaves)
    return grad_q * q_scale.view(1, 1, -1, 1, 1), grad_k, grad_v, grad_bias


@pytest.mark.usefixtures("kernels")
@pytest.mark.parametrize("tokens,head_dim", [(49, 32), (64, 32), (16, 8), (1, 4), (17, 24), (33, 64), (49, 40)])
@pytest.mark.parametrize("per_window", [False, True])
def test_backward_kernel_equals_autograd(tokens, head_dim, per_window):
    """The training backward (`native.window_attention_backward`) against autograd of the plain definition:
    every block shape, masked and padded keys, shared bias (its gradient summed over windows and images)
    and per-window bias; the gradients of q, k and v are token-major views, so merging heads copies nothing."""
    batch, windows, heads = 3, 2, 2
    q, k, v = _qkv(batch, windows, heads, tokens, head_dim)
    grad_out = _qkv(batch, windows, heads, tokens, head_dim, seed=5)[0]
    bias = _bias(windows if per_window else 1, heads, tokens)
    q_scale = torch.tensor([0.5, 2.0])
    got = native.window_attention_backward(q, k, v, bias, grad_out, q_scale)
    expected = _autograd_gradients(q, k, v, bias, grad_out, q_scale)
    for name, a, b in zip(("q", "k", "v", "bias"), got, expected):
        assert a.shape == b.shape, name
        # fp32 rounding of sums of up to 64 terms, relative to the gradient's size (|grad q| reaches ~100 here)
        torch.testing.assert_close(a, b, atol=2e-6 * float(b.abs().max()), rtol=1e-4, msg=name)
    for grad in got[:3]:
        assert merge_heads(grad).data_ptr() == grad.data_ptr()


@pytest.mark.usefixtures("kernels")
def test_backward_kernel_in_bf16_and_bad_input():
    """bf16 q, k, v, grad_out: fp32 arithmetic, gradients rounded once (the bias gradient stays fp32);
    mismatched shapes are refused with the op's name."""
    q, k, v = (t.bfloat16() for t in _qkv(2, 2, 2, 49, 32))
    grad_out = _qkv(2, 2, 2, 49, 32, seed=5)[0].bfloat16()
    bias, q_scale = _bias(2, 2, 49), torch.ones(2)
    got = native.window_attention_backward(q, k, v, bias, grad_out, q_scale)
    expected = _autograd_gradients(q, k, v, bias, grad_out, q_scale)
    assert [t.dtype for t in got] == [torch.bfloat16] * 3 + [torch.float32]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a.float(), b.to(a.dtype).float(), atol=0.02, rtol=0.02)
    with pytest.raises(RuntimeError, match="window_attention_backward: q, k, v, grad_out must be"):
        native.window_attention_backward(q, k, v, bias, grad_out[:, :1], q_scale)


@pytest.mark.usefixtures("kernels")
def test_kernel_applies_only_where_it_can():
    q, k, v = _qkv(1, 2, 2, 49, 32)
    bias = _bias(2, 2, 49)
    assert native.window_attention_applies(q, k, v, bias)
    assert native.window_attention_applies(q.bfloat16(), k, v, bias)
    assert not native.window_attention_applies(q.half(), k, v, bias)  # fp32 and bf16 only
    big = _qkv(1, 1, 1, 144, 32)[0]  # 12x12 windows: SDPA
    assert not native.window_attention_applies(big, big, big, _bias(1, 1, 144))
    wide = _qkv(1, 1, 1, 49, 80)[0]
    assert not native.window_attention_applies(wide, wide, wide, bias)
    leaf = q.detach().clone().requires_grad_()
    assert not native.window_attention_applies(leaf, k, v, bias)  # autograd: the kernel has no backward
    with torch.no_grad():
        assert native.window_attention_applies(leaf, k, v, bias)
    learned = bias.clone().requires_grad_()  # a learned position bias would get no gradient
    assert not native.window_attention_applies(q, k, v, learned)
    assert not native.window_attention_applies(q, k, v.clone().requires_grad_(), bias)


@pytest.mark.usefixtures("kernels")
def test_kernel_rejects_bad_input_with_its_name():
    q, k, v = _qkv(1, 2, 2, 49, 32)
    bias = _bias(2, 2, 49)
    with pytest.raises(RuntimeError, match="swinkit.window_attention: float32 or bfloat16"):
        native.window_attention(q.double(), k.double(), v.double(), bias)
    with pytest.raises(RuntimeError, match="of one dtype"):
        native.window_attention(q, k.bfloat16(), v, bias)
    with pytest.raises(RuntimeError, match="swinkit.window_attention: bias must be"):
        native.window_attention(q, k, v, bias[:, :, :48])
    with pytest.raises(RuntimeError, match="swinkit.window_attention: windows of 1..64 tokens"):
        big = _qkv(1, 1, 1, 81, 32)
        native.window_attention(*big, _bias(1, 1, 81))


def test_switched_off_or_unbuildable_kernels_leave_pytorchs_path(monkeypatch, tmp_path):
    """`SWINKIT_NATIVE=0`: no kernel, the fused attention runs SDPA. A source that does not compile: one
    warning naming the failure, no kernel, same results."""
    q, k, v = _qkv(1, 2, 2, 16, 8)
    bias = _bias(2, 2, 16)
    expected = window_attention(q, k, v, bias, 1.0, cosine=False)
    monkeypatch.setenv(native.ENV, "0")
    assert not native.kernels_available() and not native.window_attention_applies(q, k, v, bias)
    torch.testing.assert_close(window_attention(q, k, v, bias, 1.0, False, fused=True), expected, atol=2e-5, rtol=0)
    monkeypatch.delenv(native.ENV)
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCES", (broken,))
    monkeypatch.setattr(native, "_status", None)  # not tried yet in this process (restored afterwards)
    monkeypatch.setenv("SWINKIT_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="could not be built"):
        assert not native.kernels_available()
    assert not native.kernels_available()  # decided once per process
    torch.testing.assert_close(window_attention(q, k, v, bias, 1.0, False, fused=True), expected, atol=2e-5, rtol=0)


def test_build_key_follows_source_and_machine(monkeypatch, tmp_path):
    """A changed source or another CPU gets its own build (an -march=native binary may not run elsewhere)."""
    key = native.build_key()
    assert native.build_key() == key
    monkeypatch.setattr(native, "cpu_info", lambda: ("Another CPU", frozenset({"avx2"})))
    other_cpu = native.build_key()
    assert other_cpu != key
    changed = tmp_path / "changed.cpp"
    changed.write_text("// another kernel\n")
    monkeypatch.setattr(native, "SOURCES", (changed,))
    assert native.build_key() not in (key, other_cpu)


@pytest.mark.slow
@pytest.mark.skipif("avx2" not in __import__("swinkit.precision").precision.cpu_flags(), reason="needs an AVX2 CPU")
def test_kernel_built_for_avx2_only_agrees():
    """The AVX2 code path (no AVX-512: 8-lane vectors, two query rows per block, the 8 x 8 AVX2 key transpose,
    AVX2 masked tails): built with -march=x86-64-v3 in a process of its own and held to the same tests."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, **{native.MARCH_ENV: "x86-64-v3"})
    selected = "kernel_equals or bf16_is_fp32 or any_strides or uses_the_kernel or backward_kernel"
    done = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "-q", "-p", "no:cacheprovider",
                           __file__, "-k", selected], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "passed" in done.stdout and "skipped" not in done.stdout
    flags = subprocess.run([sys.executable, "-c", "from swinkit import native; print(native.FLAGS)"],
                           capture_output=True, text=True, env=env, timeout=300).stdout
    assert "-march=x86-64-v3" in flags  # what that process built with (the build key includes the flags)
