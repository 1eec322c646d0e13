"""oneDNN matmuls of training: the same values as float64 references, and a model trained through
them has plain autograd's gradients."""
from __future__ import annotations

import pytest
import torch

from swinkit import onednn as gemm
from swinkit.train import lean

from test_lean import loss_and_grads, perturbed

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")

# rows x in x out: above onednn.MIN_MACS (rows not a multiple of anything convenient)
SHAPE = (4099, 96, 288)


def test_large_problems_take_the_onednn_path():
    rows, inner, outer = SHAPE
    x = torch.randn(rows, inner)
    assert gemm.uses_onednn("forward", rows * inner * outer, x)
    assert gemm.uses_onednn("grad_weight", rows * inner * outer, x)
    assert not gemm.uses_onednn("forward", 8 * inner * outer, x)
    assert not gemm.uses_onednn("forward", rows * inner * outer, x.double())
    assert not gemm.uses_onednn("grad_weight", rows * inner * outer, x.bfloat16())


def test_linear_and_its_gradients_match_float64():
    torch.manual_seed(0)
    rows, inner, outer = SHAPE
    x = torch.randn(rows // 11 + 1, 11, inner)[:rows // 11 + 1]  # 3-D input, rows = 4103
    weight, bias = torch.randn(outer, inner) * 0.1, torch.randn(outer)
    grad = torch.randn(*x.shape[:-1], outer)
    ref_out = torch.nn.functional.linear(x.double(), weight.double(), bias.double())
    ref_gx = grad.double().matmul(weight.double())
    ref_gw = grad.double().reshape(-1, outer).t().mm(x.double().reshape(-1, inner))
    out = gemm.linear(x, weight, bias)
    gx, gw = gemm.grad_input(grad, weight), gemm.grad_weight(grad, x)
    assert out.shape == ref_out.shape and gx.shape == x.shape and gw.shape == weight.shape
    for got, ref in ((out, ref_out), (gx, ref_gx), (gw, ref_gw)):
        assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_linear_autograd_matches_f_linear():
    torch.manual_seed(1)
    rows, inner, outer = SHAPE
    x = torch.randn(rows, inner, requires_grad=True)
    weight = (torch.randn(outer, inner) * 0.1).requires_grad_()
    bias = torch.randn(outer, requires_grad=True)
    grad = torch.randn(rows, outer)
    ours = torch.autograd.grad(gemm.linear_autograd(x, weight, bias), (x, weight, bias), grad)
    plain = torch.autograd.grad(torch.nn.functional.linear(x, weight, bias), (x, weight, bias), grad)
    for got, ref in zip(ours, plain):
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    with torch.no_grad():  # no autograd: the plain oneDNN product
        assert torch.allclose(gemm.linear_autograd(x, weight, bias), torch.nn.functional.linear(x, weight, bias),
                              rtol=1e-4, atol=1e-4)

    class Layer(torch.nn.Linear):
        def forward(self, t):
            return gemm.linear_autograd(t, self.weight, self.bias)

    with pytest.warns(FutureWarning):  # jit.trace is deprecated, but it is what the legacy exporter runs
        graph = str(torch.jit.trace(Layer(inner, outer), x.detach()).graph)
    assert "aten::linear" in graph and "mkldnn" not in graph  # exporters see F.linear


@pytest.mark.parametrize("version", [1, 2])
def test_model_gradients_through_onednn_equal_plain_autograd(version, monkeypatch):
    """Every matmul of the tiny model takes the oneDNN path (threshold lowered to 0)."""
    model = perturbed(version, torch.float32)
    x = torch.randn(2, 3, 64, 64)
    lean.uninstall(model)
    _, grads_plain = loss_and_grads(model, x)
    monkeypatch.setattr(gemm, "MIN_MACS", 0)
    lean.install(model)
    _, grads_fast = loss_and_grads(model, x)
    for name, grad in grads_plain.items():
        assert torch.allclose(grads_fast[name], grad, rtol=1e-4, atol=1e-6), name
