"""oneDNN matmuls of training: the same values as float64 references, and a model trained through
them has plain autograd's gradients."""
from __future__ import annotations

import pytest
import torch

from swinkit import files
from swinkit import onednn as gemm
from swinkit.train import lean

from test_lean import loss_and_grads, perturbed

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")

# rows x in x out: above onednn.MIN_MACS (rows not a multiple of anything convenient)
SHAPE = (4099, 96, 288)


@pytest.fixture
def choices(tmp_path, monkeypatch):
    """Measured engine choices kept in a fresh folder, none remembered in memory."""
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(gemm.ENGINE_ENV, raising=False)
    monkeypatch.setattr(gemm, "_tables", {})
    return tmp_path


def test_large_problems_take_the_onednn_path_where_it_is_chosen(monkeypatch):
    rows, inner, outer = SHAPE
    x = torch.randn(rows, inner)
    monkeypatch.setenv(gemm.ENGINE_ENV, "onednn")
    assert gemm.uses_onednn("forward", rows, inner, outer, x)
    assert gemm.uses_onednn("grad_weight", rows, inner, outer, x)
    assert not gemm.uses_onednn("forward", 8, inner, outer, x)
    assert not gemm.uses_onednn("forward", rows, inner, outer, x.double())
    assert not gemm.uses_onednn("grad_weight", rows, inner, outer, x.bfloat16())
    monkeypatch.setenv(gemm.ENGINE_ENV, "torch")
    assert not gemm.uses_onednn("forward", rows, inner, outer, x)
    monkeypatch.setenv(gemm.ENGINE_ENV, "mkl")
    with pytest.raises(ValueError, match="SWINKIT_GEMM_ENGINE='mkl': choose one of measure, onednn, torch"):
        gemm.uses_onednn("forward", rows, inner, outer, x)


def test_engine_choice_is_measured_once_and_kept_per_machine(choices, monkeypatch):
    """The first use of a shape times both libraries; the choice is written to the machine's file and
    a later process (here: an emptied memory) reads it instead of measuring again."""
    rows, inner, outer = SHAPE
    calls = []
    measure = gemm.measure_engine
    monkeypatch.setattr(gemm, "measure_engine", lambda *a, **k: calls.append(a) or measure(*a, **k))
    first = gemm.engine("grad_input", rows, inner, outer, torch.float32)
    assert first in ("torch", "onednn") and calls == [("grad_input", 4096, inner, outer, torch.float32, False)]
    assert gemm.engine("grad_input", rows + 7, inner, outer, torch.float32) == first and len(calls) == 1  # same bucket
    path = gemm.choices_path()
    assert path.parent == choices
    import json
    saved = json.loads(path.read_text())["choices"]
    assert saved == {f"grad_input float32 4096x{inner}x{outer}": first}
    monkeypatch.setattr(gemm, "_tables", {})
    path.write_text(json.dumps({"choices": {f"grad_input float32 4096x{inner}x{outer}": "torch"}}))
    assert gemm.engine("grad_input", rows, inner, outer, torch.float32) == "torch" and len(calls) == 1
    gemm.engine("forward", rows, inner, outer, torch.float32, gelu=True)  # a new shape: measured, merged
    assert len(calls) == 2 and len(json.loads(path.read_text())["choices"]) == 2
    assert gemm.engine("forward", 1 << 20, inner, outer, torch.float32) and calls[-1][1] == gemm.MEASURE_ROWS


def test_frozen_forward_is_onednn_without_measuring(choices, monkeypatch):
    """Inference's frozen forward runs oneDNN on its reordered weight wherever oneDNN runs (`FIXED`):
    nothing is timed or written; `SWINKIT_GEMM_ENGINE=torch` still overrides; training ops are measured,
    by their median times."""
    rows, inner, outer = SHAPE
    calls = []
    monkeypatch.setattr(gemm, "measure_engine", lambda *a, **k: calls.append(a) or "torch")
    x = torch.randn(rows, inner)
    assert gemm.engine("forward_frozen", rows, inner, outer, torch.float32) == "onednn"
    assert gemm.uses_onednn("forward_frozen", rows, inner, outer, x)
    assert calls == [] and not gemm.choices_path().exists()
    assert gemm.engine("forward", rows, inner, outer, torch.float32) == "torch" and len(calls) == 1
    monkeypatch.setenv(gemm.ENGINE_ENV, "torch")
    assert not gemm.uses_onednn("forward_frozen", rows, inner, outer, x)


def test_measured_choice_takes_the_shorter_median(monkeypatch):
    """One fast call of a library (a shared machine's quiet moment) does not decide: the medians of
    `REPEATS` alternating rounds do (torch takes 2.0 s but once 0.1 s; oneDNN always 1.0 s)."""
    idle = {"torch": lambda *a: None, "onednn": lambda *a: None}
    monkeypatch.setattr(gemm, "_OPS", {**gemm._OPS, "grad_input": idle})
    order = []
    def seconds(call):
        order.append("torch" if len(order) % 2 == 0 else "onednn")
        if order[-1] == "torch":
            return 0.1 if len(order) == 5 else 2.0
        return 1.0
    monkeypatch.setattr(gemm, "_seconds", seconds)
    assert gemm.measure_engine("grad_input", 64, 8, 8, torch.float32) == "onednn"
    assert len(order) == 2 * (gemm.REPEATS + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_weight_is_reordered_once_and_follows_edits(dtype, monkeypatch):
    """Inference linears (`frozen=True`) hand oneDNN the weight reordered once, kept beside the weight:
    the same results as `F.linear`, the same reordered tensor on the next call, a fresh one after an
    in-place edit; the module's own weight stays a plain tensor (copies, moves, saves)."""
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("no bf16 oneDNN kernels on this CPU")
    monkeypatch.setenv(gemm.ENGINE_ENV, "onednn")
    rows, inner, outer = SHAPE
    torch.manual_seed(0)
    x, weight, bias = torch.randn(rows, inner, dtype=dtype), torch.randn(outer, inner, dtype=dtype), torch.randn(outer, dtype=dtype)
    tolerance = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    expected = torch.nn.functional.linear(x.double(), weight.double(), bias.double()).to(dtype)
    torch.testing.assert_close(gemm.linear(x, weight, bias, frozen=True), expected, **tolerance)
    reordered = gemm._reordered[weight][1]
    assert reordered.is_mkldnn and not weight.is_mkldnn
    torch.testing.assert_close(gemm.linear(x, weight, bias, gelu=True, frozen=True),
                               torch.nn.functional.gelu(expected.double()).to(dtype), **tolerance)
    assert gemm._reordered[weight][1] is reordered  # kept, not reordered again
    with torch.no_grad():
        weight.mul_(-2)
    torch.testing.assert_close(gemm.linear(x, weight, bias, frozen=True),
                               torch.nn.functional.linear(x.double(), weight.double(), bias.double()).to(dtype),
                               **tolerance)
    assert gemm._reordered[weight][1] is not reordered
    with torch.inference_mode():  # inference tensors carry no version: still computed right
        weight_inf = weight.clone()
        torch.testing.assert_close(gemm.linear(x, weight_inf, bias, frozen=True),
                                   gemm.linear(x, weight, bias, frozen=True), atol=0, rtol=0)


def test_unreadable_choices_are_measured_again(choices, caplog):
    path = gemm.choices_path()
    path.write_text("{not json")
    rows, inner, outer = SHAPE
    assert gemm.engine("forward", rows, inner, outer, torch.float32) in ("torch", "onednn")
    assert "unreadable" in caplog.text and path.name in caplog.text
    import json
    assert len(json.loads(path.read_text())["choices"]) == 1


@pytest.mark.parametrize("engine", ["onednn", "torch"])
def test_linear_and_its_gradients_match_float64(engine, monkeypatch):
    monkeypatch.setenv(gemm.ENGINE_ENV, engine)
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


def test_linear_autograd_matches_f_linear(monkeypatch):
    monkeypatch.setenv(gemm.ENGINE_ENV, "onednn")
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
    monkeypatch.setenv(gemm.ENGINE_ENV, "onednn")
    lean.install(model)
    _, grads_fast = loss_and_grads(model, x)
    for name, grad in grads_plain.items():
        assert torch.allclose(grads_fast[name], grad, rtol=1e-4, atol=1e-6), name
