"""The lean training policy (`train.lean.install`): the same loss and gradients as autograd of the plain
definition, with fewer saved bytes."""
from __future__ import annotations

import pytest
import torch

from swinkit.models import SwinConfig, SwinTransformer
from swinkit.train import lean
from swinkit.train.memory import saved_bytes_per_image

CONFIG = SwinConfig(img_size=64, window_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                    num_classes=7, drop_path_rate=0.0)


def perturbed(version: int, dtype=torch.float64) -> SwinTransformer:
    torch.manual_seed(0)
    model = SwinTransformer(CONFIG.replace(version=version)).to(dtype)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def loss_and_grads(model, x):
    model.zero_grad()
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("size", [(64, 64), (64, 70)])  # 64x70 pads and masks
def test_lean_gradients_equal_plain_autograd(version, size):
    model = perturbed(version)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    lean.uninstall(model)
    loss_plain, grads_plain = loss_and_grads(model, x)
    lean.install(model)
    loss_lean, grads_lean = loss_and_grads(model, x)
    assert torch.equal(loss_plain, loss_lean)
    for name, grad in grads_plain.items():
        assert torch.allclose(grads_lean[name], grad, rtol=1e-9, atol=1e-12), name


@pytest.mark.parametrize("version", [1, 2])
def test_lean_gradients_fp32(version):
    model = perturbed(version, torch.float32)
    x = torch.randn(2, 3, 64, 64)
    lean.uninstall(model)
    _, grads_plain = loss_and_grads(model, x)
    lean.install(model)
    _, grads_lean = loss_and_grads(model, x)
    for name, grad in grads_plain.items():
        assert torch.allclose(grads_lean[name], grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("version", [1, 2])
def test_lean_training_saves_less(version):
    model = perturbed(version, torch.float32).train()
    lean.uninstall(model)
    plain = saved_bytes_per_image(model, 64)
    lean.install(model)
    assert saved_bytes_per_image(model, 64) < 0.75 * plain


@pytest.mark.parametrize("version", [1, 2])
def test_lean_kernels_follow_autocast(version):
    """Under bf16 autocast the lean kernels train like plain autocast (same dtypes, close gradients)."""
    model = perturbed(version, torch.float32).train()
    x = torch.randn(2, 3, 64, 70)
    results = {}
    for use in (False, True):
        lean.install(model) if use else lean.uninstall(model)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().logsumexp(-1).mean()
        loss.backward()
        results[use] = (loss.detach(), [p.grad.clone() for p in model.parameters()])
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert torch.allclose(results[True][0], results[False][0], rtol=2e-2)
    plain = torch.cat([g.flatten() for g in results[False][1]])
    installed = torch.cat([g.flatten() for g in results[True][1]])
    assert torch.nn.functional.cosine_similarity(plain, installed, dim=0) > 0.99


@pytest.mark.parametrize("version", [1, 2])
def test_lean_policy_leaves_eval_outputs_and_state_dict_alone(version):
    model = perturbed(version, torch.float32).eval()
    x = torch.randn(2, 3, 64, 70)
    keys = list(model.state_dict())
    with torch.no_grad():
        plain = model(x)
        lean.install(model, "full")
        assert list(model.state_dict()) == keys
        torch.testing.assert_close(model(x), plain, atol=1e-5, rtol=0)
    lean.uninstall(model)
    assert type(model.layers[0].blocks[0]) is type(SwinTransformer(CONFIG).layers[0].blocks[0])


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("size", [(64, 64), (64, 70)])  # 64x70 pads and masks
def test_lean_attention_backward_kernel_equals_matmuls(version, size, monkeypatch):
    """fp32 on the CPU the lean attention's backward runs swinkit's kernel (probabilities rebuilt per
    window and head); its gradients equal those of the batched-matmul backward it replaces, for v1's
    scaled dot product and v2's cosine attention (the temperature's gradient included)."""
    from swinkit import native
    from swinkit.train.lean import kernels
    if not native.kernels_available():
        pytest.skip("swinkit's kernels could not be built here")
    model = perturbed(version, torch.float32)
    lean.install(model)
    x = torch.randn(2, 3, *size)
    calls = []
    real = kernels._kernel_gradients
    monkeypatch.setattr(kernels, "_kernel_gradients", lambda *args: calls.append(1) or real(*args))
    _, with_kernel = loss_and_grads(model, x)
    assert len(calls) == sum(CONFIG.depths)  # every block's attention
    monkeypatch.setattr(native, "window_attention_applies", lambda *args: False)
    _, with_matmuls = loss_and_grads(model, x)
    assert len(calls) == sum(CONFIG.depths)
    for name, grad in with_matmuls.items():
        assert torch.allclose(with_kernel[name], grad, rtol=1e-4, atol=1e-6), name
