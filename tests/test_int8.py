"""PyTorch-native INT8 (`infer.int8`): the kernel call computes what the quantized operands say, the
policy quantizes the right layers and agrees with fp32 within stated bounds (v1, v2), the
commands that run it, and clear errors."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F

from swinkit.cli import main
from swinkit.infer import evaluate, load_runner
from swinkit.infer.fast import FastLinear, FastSwin
from swinkit import native
from swinkit.infer.int8 import (Int8Linear, activation_qparams, available, gelu_by_table, gelu_lookup_table, is_int8,
                                quantize_linears, quantize_uint8)
from swinkit.infer.optimize import optimize_for_inference
from swinkit.policy import specialise
from swinkit.precision import PrecisionError
from test_eval_predict import IMAGES_PER_CLASS, dataset_root, model, one_thread, weights  # noqa: F401
from test_fast_export import _nontrivial

pytestmark = pytest.mark.skipif(not available(), reason="this PyTorch build has no oneDNN int8 linear")


def _dequantized(q: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return (q.double() - zero_point) * scale


def test_activation_qparams_cover_the_range_and_zero():
    scale, zero = activation_qparams(-1.0, 3.0)
    assert scale == pytest.approx(4.0 / 255) and zero == round(1.0 / scale)
    assert activation_qparams(0.5, 2.0) == (pytest.approx(2.0 / 255), 0)    # 0 is always representable
    assert activation_qparams(-2.0, -0.5) == (pytest.approx(2.0 / 255), 255)
    assert activation_qparams(0.0, 0.0) == (1.0, 0)                         # a layer that only saw zeros


@pytest.mark.parametrize("strided", [False, True])
def test_quantize_uint8_is_the_rounding_formula(strided):
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * 3
    if strided:
        x = x.t()  # a transposed view: values in logical order either way
    scale, zero = 0.02, 100
    got = quantize_uint8(x, scale, zero)
    expected = (torch.round(x / scale) + zero).clamp(0, 255).to(torch.uint8)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    assert torch.equal(got, expected)
    assert {0, 255} <= set(got.unique().tolist())  # both ends clamp in this range


def _int8_layer(inputs: int, outputs: int, input_range, reduce_range=False, seed=0) -> torch.nn.Linear:
    torch.manual_seed(seed)
    layer = torch.nn.Linear(inputs, outputs).requires_grad_(False)
    specialise(layer, FastLinear).use_onednn = True
    specialise(layer, Int8Linear).quantize(input_range, reduce_range)
    return layer


@pytest.mark.parametrize("reduce_range", [False, True])
def test_int8_linear_computes_the_quantized_operands_product(reduce_range):
    """The oneDNN call: (dequantized uint8 input) @ (dequantized int8 weight)^T + bias, in float64
    up to fp32 rounding; the weight grid has 127 (or 63, reduce_range) steps per side."""
    x = torch.randn(37, 24, generator=torch.Generator().manual_seed(1)) * 2
    layer = _int8_layer(24, 40, (float(x.min()), float(x.max())), reduce_range)
    levels = 63 if reduce_range else 127
    scale, zero = layer.input_qparams
    weight_scale = layer.weight.detach().abs().amax(1) / levels
    assert torch.allclose(layer.weight_scale, weight_scale)
    q_weight = torch.round(layer.weight.detach() / weight_scale[:, None]).clamp(-levels, levels)
    x_q = _dequantized(quantize_uint8(x, scale, zero), scale, zero)
    expected = x_q @ (q_weight.double() * weight_scale.double()[:, None]).t() + layer.bias.double()
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (37, 40)
    assert torch.allclose(got.double(), expected, rtol=1e-5, atol=1e-5)
    # and it is an approximation of the float layer, not the float layer itself
    exact = F.linear(x, layer.weight, layer.bias)
    assert 0 < (got - exact).abs().max() < 0.05 * exact.abs().max()


def test_int8_linear_gelu_to_uint8_is_the_requantized_gelu():
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(2))
    input_range = (float(x.min()), float(x.max()))
    layer, plain = _int8_layer(16, 32, input_range), _int8_layer(16, 32, input_range)  # same seed: same weights
    product = plain(x)
    float_out = layer(x, gelu=True)  # GELU fused, fp32 out
    assert torch.allclose(float_out, F.gelu(product), atol=1e-5)  # post-op "gelu"/"none" is the erf GELU
    out_scale, out_zero = activation_qparams(float(float_out.min()), float(float_out.max()))
    layer.output_qparams = (out_scale, out_zero)
    q = layer(x, gelu=True)
    assert q.dtype == torch.uint8 and q.shape == (50, 32)
    reference = quantize_uint8(F.gelu(product), out_scale, out_zero)
    assert (q.int() - reference.int()).abs().max() <= 1  # one step: fp32 rounding at .5


@pytest.mark.parametrize("pre_qparams,out_qparams", [((0.05, 80), (0.03, 6)), ((0.012, 255), (0.002, 100))])
def test_gelu_lookup_table_is_the_quantized_gelu_of_each_code(pre_qparams, out_qparams):
    import math
    table = gelu_lookup_table(pre_qparams, out_qparams)
    assert table.dtype == torch.uint8 and table.shape == (256,)
    for code in range(256):
        z = (code - pre_qparams[1]) * pre_qparams[0]
        gelu = 0.5 * z * (1 + math.erf(z / math.sqrt(2)))
        expected = min(max(round(gelu / out_qparams[0]) + out_qparams[1], 0), 255)  # round half to even
        assert int(table[code]) == expected, code


@pytest.mark.skipif(not native.kernels_available(), reason="swinkit's kernels are not built here")
def test_byte_lookup_kernel_is_indexing_by_each_byte():
    table = torch.randint(0, 256, (256,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for size in (1, 31, 32, 33, 1000, 70001):  # tails of the 32-byte vector loop and of the threads' chunks
        x = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))
        assert torch.equal(native.byte_lookup(x, table), table[x.long()])
    x = torch.arange(256, dtype=torch.uint8).repeat(40).view(64, 160)[:, ::3]  # every byte value, strided
    out = native.byte_lookup(x, table)
    assert out.shape == x.shape and torch.equal(out, table[x.long()])
    with pytest.raises(RuntimeError, match="x must be a uint8"):
        native.byte_lookup(x.float(), table)
    with pytest.raises(RuntimeError, match="table must be 256 uint8"):
        native.byte_lookup(x, table[:255])


@pytest.mark.skipif(not native.kernels_available(), reason="swinkit's kernels are not built here")
def test_int8_gelu_by_table_agrees_with_the_fused_gelu():
    """fc1 writing its pre-activation as uint8 and GELU by table into fc2's uint8 input (the rule where
    oneDNN lacks VNNI) against GELU fused in oneDNN: the same logits up to the extra rounding step."""
    model = _nontrivial("swin_nano_patch2_window4_32")
    calibration = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    images = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    fused = quantize_linears(FastSwin(model), calibration, table_gelu=False)
    table = quantize_linears(FastSwin(model), calibration, table_gelu=True)
    fc1s = [m for key, m in table.model.named_modules() if key.endswith(".fc1")]
    assert fc1s and all(m.gelu_table is not None and m.pre_activation_qparams[0] > 0 for m in fc1s)
    assert all(m.gelu_table is None for key, m in fused.model.named_modules() if key.endswith(".fc1"))
    assert all(torch.equal(m.gelu_table, gelu_lookup_table(m.pre_activation_qparams, m.output_qparams)) for m in fc1s)
    with torch.inference_mode():
        reference, a, b = optimize_for_inference(model)(images), fused(images), table(images)
    scale = reference.abs().max()
    assert not torch.equal(a, b)  # another computation ...
    assert (b - reference).abs().mean() <= 1.5 * (a - reference).abs().mean() + 1e-3 * scale  # ... as close to fp32
    assert (b - a).abs().max() <= 0.05 * scale
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.95


def test_default_gelu_follows_the_rule_and_vnni_keeps_it_fused():
    """quantize_linears without `table_gelu` puts tables on every fc1 exactly where `gelu_by_table()`
    says; where oneDNN's int8 kernels do not saturate (VNNI) the GELU stays fused (the AVX2 side is
    `test_without_vnni_weights_get_7_bits_and_nothing_saturates`)."""
    from swinkit.infer.int8 import int16_saturation
    calibration = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
    fast = quantize_linears(FastSwin(_nontrivial("swin_nano_patch2_window4_32")), calibration)
    tables = [m.gelu_table is not None for key, m in fast.model.named_modules() if key.endswith(".fc1")]
    assert tables and all(t == gelu_by_table() for t in tables)
    if not int16_saturation():
        assert not any(tables)


@pytest.mark.parametrize("name", ["swin_nano_patch2_window4_32", "swinv2_nano_patch2_window4_32"])
def test_int8_fast_path_quantizes_the_block_linears_and_agrees_with_fp32(name):
    model = _nontrivial(name)
    calibration = [torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(s)) for s in range(4)]
    images = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    fast = optimize_for_inference(model, dtype="int8", calibration=calibration)
    assert isinstance(fast, FastSwin) and is_int8(fast)
    linears = {key: module for key, module in fast.model.named_modules() if isinstance(module, FastLinear)}
    int8 = {key for key, module in linears.items() if isinstance(module, Int8Linear)}
    # every qkv / proj / fc1 / fc2 / patch-merging reduction; not the head, not v2's CPB MLP (folded at freeze)
    expected = {key for key in linears if key.rsplit(".", 1)[-1] in ("qkv", "proj", "fc1", "fc2", "reduction")}
    assert int8 == expected and len(expected) > 10
    assert not any("cpb_mlp" in key or key.startswith("head") for key in int8)
    for key, module in fast.model.named_modules():
        if key.endswith(".mlp"):
            assert module.fc1.output_qparams == module.fc2.input_qparams  # fc1 hands fc2 uint8
    with torch.inference_mode():
        expected_logits = optimize_for_inference(model)(images)
        got = fast(images)
    assert got.dtype == torch.float32
    scale = expected_logits.abs().max()
    error = (got - expected_logits).abs()
    # measured on these models: max error ~2-4% of the largest logit, mean ~0.5%, agreement >= 95%
    assert 0 < error.max() <= 0.08 * scale
    assert error.mean() <= 0.015 * scale
    assert (got.argmax(1) == expected_logits.argmax(1)).float().mean() >= 0.9
    assert not is_int8(optimize_for_inference(model))


def test_int8_errors_are_clear():
    model = _nontrivial("swin_nano_patch2_window4_32")
    with pytest.raises(PrecisionError, match="needs calibration images"):
        optimize_for_inference(model, dtype="int8")
    with pytest.raises(PrecisionError, match="compile=True is for fp32"):
        optimize_for_inference(model, dtype="int8", calibration=[torch.randn(1, 3, 32, 32)], compile=True)
    fast = FastSwin(model)
    with pytest.raises(ValueError, match="at least one image"):
        quantize_linears(fast, [])
    # a failed calibration leaves the fast path as it was (float, no observers left behind)
    assert not is_int8(fast) and all(type(m).__name__.startswith("FastLinear")
                                     for m in fast.model.modules() if isinstance(m, FastLinear))
    quantized = quantize_linears(FastSwin(model), [torch.randn(2, 3, 32, 32)])
    with pytest.raises(PrecisionError, match="INT8 linears run on CPU"):
        next(m for m in quantized.modules() if isinstance(m, Int8Linear)).dense(
            torch.zeros(2, 2, 16, device="meta"), None)


# ------------------------------------------------------------------------------------ runner / CLI
def test_eval_int8_is_the_int8_model_end_to_end(weights, dataset_root, capsys):
    calib = dataset_root / "train"
    args = ["eval", "--weights", str(weights), "--data", str(dataset_root), "--workers", "0", "--json"]
    assert main(args + ["--precision", "int8", "--calib", str(calib), "--calib-images", "2"]) == 0
    int8 = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert int8["precision"] == "int8" and int8["images"] == fp32["images"] == 3 * IMAGES_PER_CLASS
    runner = load_runner(weights, device="cpu", precision="int8", calib=calib, calib_images=2)
    assert runner.precision == "int8" and is_int8(runner.model)
    assert int8 == {**int8, **evaluate(runner, dataset_root, workers=0), "seconds": int8["seconds"]}
    assert int8["loss"] != fp32["loss"] and int8["loss"] == pytest.approx(fp32["loss"], rel=0.1)


def test_int8_flags_are_checked(weights, dataset_root, capsys):
    base = ["eval", "--weights", str(weights), "--data", str(dataset_root), "--workers", "0"]
    assert main(base + ["--precision", "int8"]) == 2
    assert "--precision int8 needs calibration images: pass --calib DIR" in capsys.readouterr().err
    assert main(base + ["--calib", str(dataset_root / "train")]) == 2
    assert "--calib is for --precision int8" in capsys.readouterr().err
    assert main(base + ["--precision", "int8", "--calib", str(dataset_root / "missing")]) == 2
    assert "missing" in capsys.readouterr().err  # the calibration folder is named
    with pytest.raises(SystemExit) as exit_:
        main(["export", "onnx", "--weights", str(weights), "--out", "x.onnx", "--precision", "int8"])
    assert exit_.value.code == 2
    assert "expected one of fp32, bf16, fp16, got 'int8'" in capsys.readouterr().err
    with pytest.raises(PrecisionError, match="runs on CPU"):
        load_runner(weights, device="cuda", precision="int8", calib=dataset_root / "train")
    assert main(base + ["--backend", "jax", "--precision", "int8", "--calib", str(dataset_root / "train")]) == 2
    assert "--backend jax runs fp32 or bf16; int8 (and --calib) is for the torch backend" in capsys.readouterr().err


def test_quantize_torch_engine_prints_the_ptq_table(weights, dataset_root, capsys):
    assert main(["quantize", "--engine", "torch", "--weights", str(weights), "--calib", str(dataset_root / "train"),
                 "--images", "3", "--eval", str(dataset_root / "val"), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = json.loads(lines[-1])
    assert table["images"] == 3 * IMAGES_PER_CLASS and 0 <= table["top1_agreement"] <= 100
    assert table["logits_max_abs_diff"] > 0 and table["logits_cosine"] > 0.9
    assert main(["quantize", "--engine", "torch", "--weights", str(weights), "--calib", str(dataset_root / "train"),
                 "--out", "x.onnx"]) == 2
    assert "--out: not for --engine torch" in capsys.readouterr().err
    assert main(["quantize", "--weights", str(weights), "--calib", str(dataset_root / "train")]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_bench_infer_int8_row_and_ratios(dataset_root, capsys):
    argv = ["bench", "infer", "--model", "swin_nano_patch2_window4_32", "--batch-sizes", "2", "--compare", "none",
            "--swinkit", "optimized", "--precision", "fp32,int8", "--rounds", "1", "--warmup", "0", "--no-peak",
            "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["engine"] for row in result["rows"]] == ["swinkit optimized"]
    assert result["skipped"] == [{"engine": "swinkit optimized int8", "reason": "needs calibration images: pass --calib DIR"}]
    # the test model takes 3 channels; the grey images are converted by the preprocessing
    assert main(argv + ["--calib", str(dataset_root / "train"), "--calib-images", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["engine"]: row for row in result["rows"]}
    assert list(rows) == ["swinkit optimized", "swinkit optimized int8"]
    assert rows["swinkit optimized int8"]["dtype"] == "int8"
    assert [item["label"] for item in result["ratios"]] == ["swinkit optimized int8 vs fp32"]


def test_without_vnni_weights_get_7_bits_and_nothing_saturates():
    """oneDNN limited to AVX2 (as on a CPU without VNNI): the probe finds u8 x s8 saturating, the policy
    quantizes weights to 7 bits, and the products are exact again (8-bit weights would be off by ~27%);
    the MLP's GELU runs by table there (where swinkit's kernels are built)."""
    import subprocess
    import sys
    import textwrap
    code = textwrap.dedent("""
        import torch
        from swinkit.infer.fast import FastSwin
        from swinkit import native
        from swinkit.infer.int8 import Int8Linear, gelu_by_table, int16_saturation, quantize_linears
        from test_fast_export import _nontrivial
        torch.set_num_threads(1)
        model = _nontrivial("swin_nano_patch2_window4_32")
        calibration = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))]
        fast = quantize_linears(FastSwin(model), calibration)
        layers = [m for m in fast.modules() if isinstance(m, Int8Linear)]
        seven_bits = all(torch.allclose(m.weight_scale, m.weight.abs().amax(1) / 63) for m in layers)
        with torch.inference_mode():
            images = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
            expected, got = FastSwin(model)(images), fast(images)
        print(int16_saturation(), seven_bits, float((got - expected).abs().max() / expected.abs().max()) < 0.08,
              gelu_by_table() == native.kernels_available(),
              all(m.gelu_table is not None for m in layers if m.output_qparams is not None))
    """)
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": os.pathsep.join(
        [os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"] * 5
