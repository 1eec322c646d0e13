"""bf16 / fp16 inference: the optimized path cast to half precision agrees with fp32 within stated
bounds (v1, v2), `--precision` of eval / predict / bench infer / export onnx, and clear errors."""
from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F

import swinkit
import swinkit.precision
from swinkit.cli import main
from swinkit.infer import evaluate, load_runner, predict
from swinkit.infer.optimize import optimize_for_inference
from swinkit.precision import PrecisionError
from test_eval_predict import CLASSES, IMAGES_PER_CLASS, dataset_root, model, one_thread, weights  # noqa: F401
from test_fast_export import _nontrivial, needs_ort

# Measured (256-4096 random images, perturbed nano models): bf16's largest logit error is 0.7-1.1% of
# the largest logit, its mean 0.2-0.3%, top-1 agreement 99.2-100%; fp16's largest error ~0.1%.
BF16_MAX, BF16_MEAN, FP16_MAX = 0.03, 0.006, 0.005


def _hot(name: str, seed: int = 0) -> swinkit.SwinTransformer:
    """`_nontrivial`, with v2's attention temperatures at 10..100 as in trained models (the scores then
    span +-100, where bf16 rounding is coarsest)."""
    model = _nontrivial(name, seed)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if "logit_scale" in key:
                param.copy_(torch.log(torch.empty_like(param).uniform_(10, 100)))
    return model


@pytest.mark.parametrize("name", ["swin_nano_patch2_window4_32", "swinv2_nano_patch2_window4_32"])
def test_bf16_and_fp16_optimized_agree_with_fp32(name):
    model = _hot(name)
    images = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = optimize_for_inference(model)(images)
        bf16_model = optimize_for_inference(model, dtype="bf16")
        bf16 = bf16_model(images)  # fp32 images are cast inside, logits come back fp32
        fp16 = optimize_for_inference(model, dtype=torch.float16)(images)
    assert next(bf16_model.parameters()).dtype == torch.bfloat16
    assert bf16.dtype == fp16.dtype == torch.float32
    scale = expected.abs().max()
    assert scale > 10  # logits large enough for the relative bounds to mean something
    error = (bf16 - expected).abs()
    assert 0 < error.max() <= BF16_MAX * scale  # > 0: it did run in bf16
    assert error.mean() <= BF16_MEAN * scale
    assert (bf16.argmax(1) == expected.argmax(1)).float().mean() >= 0.97
    assert 0 < (fp16 - expected).abs().max() <= FP16_MAX * scale


def test_layernorm_on_bf16_input_accumulates_in_fp32():
    """The reason the fast path needs no fp32 LayerNorm of its own: torch's kernel takes bf16 input and
    accumulates in fp32, within one bf16 rounding of fp32 LayerNorm. With a mean of 30 over 96 channels
    a bf16 accumulation would be off by whole units."""
    torch.manual_seed(0)
    x = (torch.randn(512, 96) * 5 + 30).bfloat16()
    weight, bias = (1 + 0.2 * torch.randn(96)).bfloat16(), (0.2 * torch.randn(96)).bfloat16()
    got = F.layer_norm(x, (96,), weight, bias).float()
    exact = F.layer_norm(x.float(), (96,), weight.float(), bias.float())
    assert ((got - exact).abs() <= exact.abs() * 2 ** -8 + 1e-6).all()  # one bf16 rounding


def test_no_units_warning_only_where_the_cpu_lacks_them(monkeypatch, caplog):
    model = _nontrivial("swin_nano_patch2_window4_32")
    monkeypatch.setattr(swinkit.precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    with caplog.at_level(logging.WARNING, logger="swinkit"):
        optimize_for_inference(model, dtype="bf16")
    assert "bf16 on a CPU without BF16 instructions" in caplog.text and "slower than fp32" in caplog.text
    caplog.clear()
    monkeypatch.setattr(swinkit.precision, "cpu_flags", lambda: frozenset({"avx512_bf16", "avx512_fp16"}))
    monkeypatch.setattr(swinkit.precision, "cpu_bf16_speedup", lambda: 2.0)
    with caplog.at_level(logging.WARNING, logger="swinkit"):
        optimize_for_inference(model, dtype="bf16")
        optimize_for_inference(model, dtype="fp16")
        optimize_for_inference(model)
    assert caplog.text == ""
    # the units are there but the bf16 GEMMs measured slower than fp32 (AVX512-BF16 without AMX)
    monkeypatch.setattr(swinkit.precision, "cpu_bf16_speedup", lambda: 0.61)
    with caplog.at_level(logging.WARNING, logger="swinkit"):
        optimize_for_inference(model, dtype="bf16")
    assert "its bf16 GEMMs measured 0.61x the speed of fp32 here" in caplog.text


def test_bf16_speedup_is_measured_here():
    """The measured bf16/fp32 GEMM rate is a positive ratio (None only without oneDNN bf16 kernels); `auto`
    and the warnings read it, so a wrong one would mislead every bf16 decision."""
    speedup = swinkit.precision.cpu_bf16_speedup()
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert speedup is None
    else:
        assert 0.05 < speedup < 50


def test_bad_precision_is_a_clear_error(weights, dataset_root, tmp_path, capsys):
    with pytest.raises(PrecisionError, match="'fp8' is not one inference runs; choose from fp32, bf16, fp16"):
        optimize_for_inference(_nontrivial("swin_nano_patch2_window4_32"), dtype="fp8")
    with pytest.raises(PrecisionError, match="int8"):
        evaluate(weights, dataset_root, workers=0, device="cpu", precision="int8")
    for argv in (["eval", "--weights", str(weights), "--data", str(dataset_root), "--precision", "fp8"],
                 ["predict", "--weights", str(weights), "x.png", "--precision", "bfloat16"],
                 ["bench", "infer", "--model", "swin_nano_patch2_window4_32", "--precision", "fp32,int4"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        assert "argument --precision: expected one of fp32, bf16, fp16" in capsys.readouterr().err
    onnx_file = tmp_path / "model.onnx"
    onnx_file.write_bytes(b"not read: the precision is refused first")
    assert main(["eval", "--weights", str(onnx_file), "--data", str(dataset_root), "--precision", "bf16"]) == 2
    err = capsys.readouterr().err
    assert "model.onnx' is an ONNX graph: it runs in the precision it was exported in" in err


def test_fp16_overflow_is_named_not_returned_as_nan(weights):
    runner = load_runner(weights, device="cpu", precision="fp16")
    with torch.no_grad():
        runner.model.model.head.fc.weight.mul_(1e6)  # logits far beyond fp16's 65504
    with pytest.raises(PrecisionError, match="overflowed in fp16.*use --precision bf16"):
        runner(torch.randn(2, 1, 32, 32))


# ------------------------------------------------------------------------------------- eval / predict
def test_eval_cli_bf16_is_the_bf16_model_end_to_end(model, weights, dataset_root, capsys):
    args = ["eval", "--weights", str(weights), "--data", str(dataset_root), "--workers", "0", "--json"]
    assert main(args + ["--precision", "bf16"]) == 0
    bf16 = json.loads(capsys.readouterr().out)
    assert main(args) == 0
    fp32 = json.loads(capsys.readouterr().out)
    assert bf16["precision"] == "bf16" and fp32["precision"] == "fp32"
    assert bf16["images"] == fp32["images"] == 3 * IMAGES_PER_CLASS
    # the same numbers as the bf16 model computed directly, and not the fp32 ones
    runner = load_runner(weights, device="cpu", precision="bf16")
    assert runner.precision == "bf16" and next(runner.model.parameters()).dtype == torch.bfloat16
    assert bf16 == {**bf16, **evaluate(runner, dataset_root, workers=0), "seconds": bf16["seconds"]}
    assert bf16["loss"] != fp32["loss"] and bf16["loss"] == pytest.approx(fp32["loss"], rel=0.05)
    assert main(args[:-1] + ["--precision", "bf16"]) == 0
    assert f"({'bf16'})" in capsys.readouterr().out.splitlines()[0]  # "weights  ... (bf16)"


def test_predict_cli_bf16_probabilities_close_to_fp32(weights, dataset_root, capsys):
    paths = [str(path) for path in sorted((dataset_root / "val" / "cat").iterdir())[:3]]
    assert main(["predict", "--weights", str(weights), *paths, "--topk", "3", "--json", "--precision", "bf16"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["precision"] == "bf16"
    fp32 = predict(weights, paths, topk=3, device="cpu")
    for got, expected in zip(result["results"], fp32):
        probs = {p["index"]: p["prob"] for p in expected["predictions"]}
        assert len(got["predictions"]) == 3 and got["predictions"][0]["class"] in CLASSES
        for prediction in got["predictions"]:
            assert prediction["prob"] == pytest.approx(probs[prediction["index"]], abs=0.02)


# ------------------------------------------------------------------------------------------- bench
def test_bench_infer_precision_rows_and_ratio(capsys):
    from swinkit.bench import format_table
    assert main(["bench", "infer", "--model", "swin_nano_patch2_window4_32", "--batch-sizes", "2",
                 "--compare", "none", "--swinkit", "eager,optimized", "--precision", "fp32,bf16",
                 "--rounds", "1", "--warmup", "0", "--no-peak", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [row["engine"] for row in result["rows"]] == ["swinkit eager", "swinkit optimized",
                                                         "swinkit optimized bf16"]
    assert [row["dtype"] for row in result["rows"]] == ["fp32", "fp32", "bf16"]
    assert result["header"]["precisions"] == ["fp32", "bf16"]
    speed = {row["engine"]: row["img_s"] for row in result["rows"]}
    assert result["ratios"] == [{"batch": 2, "engine": "swinkit optimized bf16", "against": "swinkit optimized",
                                 "label": "swinkit optimized bf16 vs fp32", "ratio": pytest.approx(
                                     speed["swinkit optimized bf16"] / speed["swinkit optimized"], abs=0.006)}]
    table = format_table(result)
    assert "swinkit optimized bf16 vs fp32: " in table and "speedup vs swinkit eager" in table


def test_bench_infer_notes_missing_bf16_units(monkeypatch):
    from swinkit.bench import bench_infer, format_table
    monkeypatch.setattr(swinkit.precision, "cpu_flags", lambda: frozenset({"avx2"}))
    result = bench_infer("swin_nano_patch2_window4_32", batch_sizes=(1,), compare=[], swinkit=("optimized",),
                         rounds=1, warmup=0, measure_peak=False, precisions=("bf16",))
    assert [row["engine"] for row in result["rows"]] == ["swinkit optimized bf16"]
    assert "note: bf16 on a CPU without BF16 instructions" in format_table(result)


# -------------------------------------------------------------------------------------------- ONNX
@needs_ort
def test_fp16_onnx_export_runs_on_cpu_with_fp32_io_and_a_warning(tmp_path, caplog):
    import onnx
    from swinkit.infer.export import export_onnx
    from swinkit.infer.onnx_runner import OnnxRunner
    model = _nontrivial("swinv2_nano_patch2_window4_32")
    with caplog.at_level(logging.WARNING, logger="swinkit"):
        path = export_onnx(model, tmp_path / "fp16.onnx", precision="fp16", dynamic="batch")
    assert "fp16 ONNX: ONNX Runtime's CPU provider" in caplog.text and "GPU providers" in caplog.text
    proto = onnx.load(str(path))
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = [t for t in proto.graph.initializer if t.name.endswith(".weight") and len(t.dims) == 2]
    assert len(weights) > 10 and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    runner = OnnxRunner(path)
    assert runner.precision == "fp16"
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model(images)
    logits = runner(images)
    assert logits.dtype == torch.float32
    assert 0 < (logits - expected).abs().max() <= FP16_MAX * expected.abs().max()
    with pytest.raises(PrecisionError, match="fp16 ONNX file; INT8 calibration starts from the fp32 export"):
        from swinkit.infer.quantize import quantize
        quantize(path, tmp_path / "no-calibration-needed", tmp_path / "int8.onnx")


@needs_ort
def test_bf16_onnx_export_is_refused_unvalidated_and_named_when_cpu_cannot_run_it(tmp_path, capsys):
    import onnx
    import onnxruntime
    from swinkit.infer.export import ExportError, export_onnx
    from swinkit.infer.onnx_runner import OnnxRunner
    from swinkit.weights.io import CheckpointError
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu validates bf16 exports on CUDA")
    model = _nontrivial("swin_nano_patch2_window4_32")
    with pytest.raises(ExportError, match="no bf16 kernels.*--no-validate"):
        export_onnx(model, tmp_path / "bf16.onnx", precision="bf16")
    assert not list(tmp_path.iterdir())  # refused before writing anything
    path = export_onnx(model, tmp_path / "bf16.onnx", precision="bf16", validate=False, dynamic="batch")
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert max(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")) >= 22
    assert {p.key: p.value for p in proto.metadata_props}["swinkit_precision"] == "bf16"
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    with pytest.raises(CheckpointError, match="a bf16 export: ONNX Runtime's CPU provider has no bf16 kernels"):
        OnnxRunner(path)
