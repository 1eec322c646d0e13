"""Fast inference path, ONNX export, INT8 quantization and the inference benchmark: agreement only,
never timings."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

import swinkit
from swinkit.infer.fast import FastSwin
from swinkit.infer.optimize import optimize_for_inference

HAS_ORT = all(importlib.util.find_spec(name) for name in ("onnx", "onnxruntime", "onnxscript"))
needs_ort = pytest.mark.skipif(not HAS_ORT, reason="onnx / onnxruntime / onnxscript not installed")


def _nontrivial(name: str, seed: int = 0, **overrides) -> swinkit.SwinTransformer:
    """A model whose every parameter matters: v2 starts its residual norms at zero (blocks are
    identities), and a 0.02-std head gives logits too small for a 1e-4 check to mean much."""
    torch.manual_seed(seed)
    model = swinkit.create_model(name, **overrides).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if param.dim() == 1 and "norm" in key and key.endswith("weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif param.dim() == 1 or "logit_scale" in key:
                param.copy_(0.2 * torch.randn_like(param))
        model.head.fc.weight.mul_(50)
    return model


@pytest.mark.parametrize("name", ["swin_nano_patch2_window4_32", "swinv2_nano_patch2_window4_32",
                                  "swin_micro_patch4_window7_56"])
@pytest.mark.parametrize("batch,height,width", [(1, None, None), (3, 97, 64), (2, 40, 33), (1, 7, 9)])
def test_optimized_matches_eval_model(name, batch, height, width):
    model = _nontrivial(name)
    fast = optimize_for_inference(model)
    height = height or model.config.img_size[0]
    width = width or model.config.img_size[1]
    images = torch.randn(batch, model.config.in_chans, height, width)
    with torch.no_grad():
        expected = model(images)
        got = fast(images)
    assert expected.abs().max() > 1.0  # logits large enough that 1e-4 is a real bound
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_optimized_matches_without_onednn_and_in_graph_constants():
    """The plain-F.linear path (CUDA, export) and the export-time constants computed from shapes."""
    model = _nontrivial("swinv2_micro_window8_64")
    images = torch.randn(2, 3, 75, 50)
    with torch.no_grad():
        expected = model(images)
        plain = FastSwin(model, use_onednn=False)
        torch.testing.assert_close(plain(images), expected, atol=1e-4, rtol=0)
        plain.symbolic_sizes = True
        torch.testing.assert_close(plain(images), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("cosine", [False, True])
@pytest.mark.parametrize("windows_in_bias", [1, 4])
@pytest.mark.parametrize("kernel", ["swinkit", "sdpa"])
def test_fused_window_attention_equals_plain_matmuls(cosine, windows_in_bias, kernel, monkeypatch):
    """One call (swinkit's CPU kernel where it applies, else scaled_dot_product_attention) on strided
    head views of a fused projection: the plain definition's result, per-window bias and per-head
    temperature included, written token-major."""
    from swinkit import native
    from swinkit.models.attention import merge_heads, split_heads, window_attention
    if kernel == "sdpa":
        monkeypatch.setattr(native, "window_attention_applies", lambda *args: False)
    elif not native.kernels_available():
        pytest.skip("swinkit's kernels could not be built here")
    torch.manual_seed(0)
    batch, window, heads, dim = 3, 4, 2, 16
    qkv = torch.randn(batch, 4 * window * window, 3 * dim)
    q, k, v = (split_heads(t, window, heads) for t in qkv.chunk(3, dim=-1))  # [3, 4, 2, 16, 8] views
    bias = torch.randn(windows_in_bias, heads, window * window, window * window)
    bias[..., -3:] = -100.0  # masked keys, as a shift mask sets them
    temperature = torch.rand(heads, 1, 1) * 10 if cosine else 8 ** -0.5
    plain = window_attention(q, k, v, bias, temperature, cosine)
    fused = window_attention(q, k, v, bias, temperature, cosine, fused=True)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=0)
    merged = merge_heads(fused)
    assert merged.data_ptr() == fused.data_ptr()  # token-major already: merging the heads is a view
    torch.testing.assert_close(merged, merge_heads(plain), atol=1e-5, rtol=0)
    low = [t.bfloat16() for t in (q, k, v)]  # bf16 operands: no further from fp32 than the plain bf16 path
    reference = window_attention(*(t.float() for t in low), bias, temperature, cosine)
    error = {fused: (window_attention(*low, bias, temperature, cosine, fused=fused).float() - reference).abs().max()
             for fused in (False, True)}
    assert error[True] <= 1.25 * error[False] + 1e-3 and error[True] < 0.05, error


def test_fast_path_runs_fused_attention_and_tracers_see_plain_matmuls(monkeypatch):
    """One fused attention call per block (swinkit's kernel in fp32 on the CPU where it builds, else SDPA)."""
    import torch.nn.functional as F
    from swinkit import native
    calls = []
    original = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append("sdpa") or original(*a, **k))
    monkeypatch.setattr(native, "window_attention", lambda *a, _f=native.window_attention: calls.append("swinkit") or _f(*a))
    model = _nontrivial("swin_nano_patch2_window4_32")
    blocks = sum(len(stage.blocks) for stage in model.layers)
    images = torch.randn(2, 3, 32, 32)
    fast = optimize_for_inference(model)
    with torch.no_grad():
        expected = model(images)
        assert not calls  # the eval model is the plain reference
        torch.testing.assert_close(fast(images), expected, atol=1e-4, rtol=0)
        assert calls == ["swinkit" if native.kernels_available() else "sdpa"] * blocks
        calls.clear()
        traced = torch.jit.trace(fast, images, check_trace=False)
        assert not calls  # exporters see the plain batched matmuls
        torch.testing.assert_close(traced(images), expected, atol=1e-4, rtol=0)


def test_optimized_model_copies_and_moves_after_running(monkeypatch):
    """The weights oneDNN keeps reordered live beside the model, so a used fast model still deep-copies,
    changes dtype and runs (reordering again for the copy)."""
    import copy
    from swinkit import onednn
    monkeypatch.setenv(onednn.ENGINE_ENV, "onednn")
    model = _nontrivial("swin_tiny_patch4_window7_224")  # linears large enough for oneDNN (MIN_MACS)
    images = torch.randn(1, 3, 224, 224)
    fast = optimize_for_inference(model)
    with torch.no_grad():
        first = fast(images)
        assert any(weight is fast.model.layers[0].blocks[0].mlp.fc1.weight for weight in onednn._reordered.keys())
        torch.testing.assert_close(copy.deepcopy(fast)(images), first, atol=0, rtol=0)
        torch.testing.assert_close(fast.double().float()(images), first, atol=1e-5, rtol=0)


def test_swin_tiny_optimized_matches_eval_model():
    model = _nontrivial("swin_tiny_patch4_window7_224")
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(optimize_for_inference(model)(images), model(images), atol=1e-4, rtol=0)


def test_optimized_caches_constants_per_size_and_is_eval_only():
    model = _nontrivial("swin_nano_patch2_window4_32")
    fast = optimize_for_inference(model)
    with torch.no_grad():
        fast(torch.randn(1, 3, 32, 32))
        fast(torch.randn(4, 3, 32, 32))
        assert len(fast._plans) == 1  # batch size does not matter
        fast(torch.randn(1, 3, 48, 40))
        assert len(fast._plans) == 2
    assert not any(p.requires_grad for p in fast.parameters())
    with pytest.raises(RuntimeError, match="inference-only"):
        fast.train()
    # the source model is untouched and still trainable
    assert model.layers[0].blocks[0].attn.qkv.weight.requires_grad


# ------------------------------------------------------------------------------------------ ONNX
# Exporting traces every op twice (torch.export, then decompositions): two stages keep it quick
# and still cover shifted, padded and merged layouts.
TWO_STAGES = dict(depths=(2, 2), num_heads=(1, 2))

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A v1 nano checkpoint with class names and preprocessing, exported with dynamic batch/H/W."""
    from swinkit.infer.export import export_onnx
    folder = tmp_path_factory.mktemp("onnx")
    model = _nontrivial("swin_nano_patch2_window4_32", **TWO_STAGES)
    classes = [f"class_{i}" for i in range(model.num_classes)]
    preprocess = {"img_size": [32, 32], "in_chans": 3, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                  "crop_pct": 1.0, "interpolation": "bilinear"}
    weights = swinkit.save_weights(model, folder / "nano.safetensors", metadata={
        "swinkit_classes": json.dumps(classes), "swinkit_preprocess": json.dumps(preprocess)})
    path = export_onnx(weights, folder / "nano.onnx")
    return model, path, classes, folder


@needs_ort
def test_onnx_export_with_dynamic_shapes_matches_pytorch(exported):
    import onnx
    from swinkit.infer.onnx_runner import OnnxRunner
    model, path, classes, _ = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True]  # batch, C, H, W
    metadata = {p.key: p.value for p in proto.metadata_props}
    validation = json.loads(metadata["swinkit_validation"])
    assert {(r["batch"], r["height"]) for r in validation} >= {(1, 32), (3, 32)}
    assert len({(r["height"], r["width"]) for r in validation}) == 2
    runner = OnnxRunner(path)
    assert runner.classes == classes and runner.named_classes
    assert runner.preprocess.mean == (0.5, 0.5, 0.5) and runner.preprocess.crop_pct == 1.0
    for batch, height, width in [(2, 45, 23), (1, 64, 64), (5, 13, 90)]:
        images = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            expected = model(images)
        torch.testing.assert_close(runner(images), expected, atol=1e-4, rtol=0)


@needs_ort
def test_onnx_export_v2_from_model(tmp_path):
    from swinkit.infer.export import export_onnx
    from swinkit.infer.onnx_runner import OnnxRunner
    model = _nontrivial("swinv2_nano_patch2_window4_32", **TWO_STAGES)
    runner = OnnxRunner(export_onnx(model, tmp_path / "v2.onnx"))
    images = torch.randn(2, 3, 50, 37)
    with torch.no_grad():
        torch.testing.assert_close(runner(images), model(images), atol=1e-4, rtol=0)


@needs_ort
def test_export_rejects_unknown_dynamic_axis(tmp_path):
    from swinkit.infer.export import export_onnx
    with pytest.raises(ValueError, match="unknown dynamic axes"):
        export_onnx(_nontrivial("swin_nano_patch2_window4_32"), tmp_path / "x.onnx", dynamic=("batch", "depth"))
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ INT8
def _image_folder(root, classes=3, per_class=8, size=32, seed=0):
    """Smooth synthetic images, one colour trend per class."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            base = np.linspace(0, 255, size)[None, :, None] * (np.eye(3)[c] * 0.8 + 0.1)
            image = base + rng.normal(0, 25, (size, size, 3))
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


@needs_ort
def test_int8_agrees_with_fp32_on_calibrated_model(exported):
    import onnx
    from swinkit.infer.onnx_runner import OnnxRunner
    from swinkit.infer.quantize import compare_accuracy, quantize
    _, fp32, classes, folder = exported
    images = _image_folder(folder / "calib")
    int8 = quantize(fp32, images, folder / "nano.int8.onnx", images=16)
    proto = onnx.load(str(int8))
    ops = {node.op_type for node in proto.graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    metadata = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(metadata["swinkit_classes"]) == classes  # metadata survives quantization
    assert json.loads(metadata["swinkit_quantization"])["calibration"]["images"] == 16
    assert OnnxRunner(int8).preprocess.crop_pct == 1.0
    table = compare_accuracy(fp32, int8, images)
    assert table["images"] == 24
    assert table["top1_agreement"] >= 85.0, table
    assert table["logits_cosine"] >= 0.99 and 0 < table["logits_mean_abs_diff"] <= table["logits_max_abs_diff"]
    same = compare_accuracy(fp32, fp32, images, images=8)
    assert same["logits_max_abs_diff"] == 0 and same["logits_cosine"] == pytest.approx(1.0)


@needs_ort
@pytest.mark.parametrize("cpu", ["vnni", "avx2"])
def test_int8_scheme_sets_which_ops_onnx_runtime_runs_in_int8(exported, cpu):
    """The graph ONNX Runtime runs after its QDQ fusions, the same for both kinds: both attention matmuls
    in INT8 (q @ k^T MatMulIntegerToFloat, attn @ v QLinearMatMul, no float MatMul left) and the linears
    hand float on (the only DequantizeLinear left feeds the float head). avx2: 7-bit weights (u8 x s8
    kernels without VNNI saturate on 8-bit ones), vnni: 8-bit."""
    import collections

    import onnx
    import onnxruntime as ort
    from swinkit.infer.onnx_runner import session_options
    from swinkit.infer.quantize import INT8_SCHEMES, compare_accuracy, quantize
    model, fp32, _, folder = exported
    blocks = sum(model.config.depths)
    images = _image_folder(folder / f"calib_{cpu}", seed=1)
    int8 = quantize(fp32, images, folder / f"nano.{cpu}.onnx", images=16, cpu=cpu)
    options = session_options()
    options.optimized_model_filepath = str(folder / f"nano.{cpu}.optimized.onnx")
    ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
    ops = collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)
    assert ops["MatMulIntegerToFloat"] == blocks and ops["QGemm"] == 6 * blocks + 1  # + patch merging
    assert ops["QLinearMatMul"] == blocks and ops["MatMul"] == 0 and ops["DequantizeLinear"] == 1, ops
    from onnx import numpy_helper
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(int8)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    assert len(weights) >= 6 * blocks
    largest = max(int(abs(w.astype(int)).max()) for w in weights)  # ORT's 7-bit range is [-64, 64]: 2 x 255 x 64 fits int16
    assert largest == 127 if cpu == "vnni" else 32 < largest <= 64
    recorded = json.loads({p.key: p.value for p in onnx.load(str(int8)).metadata_props}["swinkit_quantization"])
    assert recorded["cpu"] == cpu and {k: recorded[k] for k in INT8_SCHEMES[cpu]} == INT8_SCHEMES[cpu]
    table = compare_accuracy(fp32, int8, images)
    assert table["top1_agreement"] >= 85.0 and table["logits_cosine"] >= 0.99, table


@needs_ort
def test_int8_unknown_cpu_kind_is_refused_before_anything_is_written(exported, tmp_path):
    from swinkit.infer.quantize import quantize
    _, fp32, _, _ = exported
    with pytest.raises(ValueError, match="unknown INT8 cpu kind 'arm'; choose from vnni, avx2"):
        quantize(fp32, tmp_path, tmp_path / "out" / "x.onnx", cpu="arm")
    assert not (tmp_path / "out").exists()


@needs_ort
def test_onnx_sessions_flush_denormals():
    """Softmax under the -100 shift mask returns denormal weights; x86 float math on them is slow."""
    from swinkit.infer.onnx_runner import session_options
    assert session_options(2).get_session_config_entry("session.set_denormal_as_zero") == "1"


@needs_ort
def test_onnx_sessions_stop_spinning_after_each_run(monkeypatch):
    """ORT's threads would otherwise keep spinning after a run returns, slowing down whatever the process does
    next (in `bench infer`, the engine timed after an ORT one: measured 1.5x at batch 1). Every session
    swinkit makes, the int8 peak's MatMulInteger included, gets the option."""
    import onnxruntime
    from swinkit.bench import machine
    from swinkit.infer.onnx_runner import session_options
    assert session_options(2).get_session_config_entry("session.force_spinning_stop") == "1"
    made = []
    real = onnxruntime.InferenceSession

    def recording(model, options=None, **kwargs):
        made.append(options)
        return real(model, options, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", recording)
    session = machine._onnxruntime_int8(8, 4, torch.ones(8, 4, dtype=torch.int8))
    assert session is not None and made[0].get_session_config_entry("session.force_spinning_stop") == "1"
    out = session.run(None, {"x": np.full((3, 8), 2, dtype=np.uint8)})[0]
    assert (out == 16).all()


# ----------------------------------------------------------------------------------------- bench
def test_bench_infer_smoke_rows():
    """Every row carries its GFLOP/s and % of the fp32 peak measured at its batch size in the same run."""
    from swinkit.bench import bench_infer, format_table
    result = bench_infer("swin_nano_patch2_window4_32", batch_sizes=(1, 2), compare=[],
                         swinkit=("eager", "optimized"), rounds=1, warmup=0)
    assert {(row["batch"], row["engine"]) for row in result["rows"]} == {
        (b, e) for b in (1, 2) for e in ("swinkit eager", "swinkit optimized")}
    peaks = result["header"]["gemm_peaks"]
    assert set(peaks) == {1, 2}
    for row in result["rows"]:
        assert {"batch", "engine", "ms", "img_s", "speedup", "baseline", "gflops", "pct_peak"} <= set(row)
        assert row["ms"] > 0 and row["baseline"] == "swinkit eager"
        fp32 = peaks[row["batch"]]["peak_gflops"]["fp32"]
        assert row["dtype"] == "fp32" and row["peak_gflops"] == fp32 > 0
        # the row's GFLOP/s and % are rounded separately: equal to the rounding of a small value
        assert row["pct_peak"] == pytest.approx(100 * row["gflops"] / fp32, rel=0.02, abs=0.1)
        assert row["gemm_peaks_gflops"]["bf16"] > 0 and row["gemm_peaks_gflops"]["int8"] > 0
    assert {"cpu", "threads", "model", "img_size"} <= set(result["header"])
    table = format_table(result)
    assert "swinkit optimized" in table and "GEMM peak GFLOP/s at batch 2" in table and "% fp32" in table
    assert "best ms" in table and all(0 < row["min_ms"] <= row["ms"] for row in result["rows"])


def test_bench_infer_cli_json(capsys):
    from swinkit.cli import main
    code = main(["bench", "infer", "--model", "swin_nano_patch2_window4_32", "--batch-sizes", "1",
                 "--compare", "timm", "--swinkit", "eager,optimized", "--rounds", "1", "--warmup", "0",
                 "--no-peak", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    engines = {row["engine"] for row in result["rows"]} | {item["engine"] for item in result["skipped"]}
    assert {"swinkit eager", "swinkit optimized", "timm eager", "timm jit.trace"} <= engines


# ------------------------------------------------------------------------------------ one shift rule
@needs_ort
def test_model_fast_path_onnx_and_official_masks_follow_one_shift_rule(tmp_path, monkeypatch):
    """A 7x14 stage with window 7 shifts its odd blocks by (0, 3): only along the axis larger than
    the window. The eval model, the fast model, the ONNX export and the official layout's
    `attn_mask` buffers all say so, at the build size and at a 200x333 input."""
    from swinkit.infer.export import export_onnx
    from swinkit.infer.onnx_runner import OnnxRunner
    from swinkit.models import SwinConfig, swin
    from swinkit.models.attention import window_attention_mask
    from swinkit.weights.layouts import from_native
    config = SwinConfig(version=1, img_size=(28, 56), window_size=7, embed_dim=16, depths=(2, 2),
                        num_heads=(1, 2), num_classes=5, drop_path_rate=0.0)
    assert config.stage_resolutions() == [(7, 14), (4, 7)] and config.stage_windows() == [7, 4]
    assert config.stage_shifts() == [(0, 3), (0, 2)]
    torch.manual_seed(0)
    model = swinkit.SwinTransformer(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn_like(param))

    # the eval model
    shifts = []
    original = swin.to_windows
    monkeypatch.setattr(swin, "to_windows", lambda x, window, shift: shifts.append(shift) or original(x, window, shift))
    images = torch.randn(2, 3, 28, 56)
    with torch.no_grad():
        expected = model(images)
    assert shifts == [(0, 0), (0, 3), (0, 0), (0, 2)]
    monkeypatch.setattr(swin, "to_windows", original)

    # the official layout's buffers
    official = from_native(model.state_dict(), "official", config)
    assert "layers.0.blocks.0.attn_mask" not in official
    torch.testing.assert_close(official["layers.0.blocks.1.attn_mask"], window_attention_mask(7, 14, 7, (0, 3)))
    torch.testing.assert_close(official["layers.1.blocks.1.attn_mask"], window_attention_mask(4, 8, 4, (0, 2)))

    # the fast model and the ONNX export, which would differ from a model shifting both axes or none
    runner = OnnxRunner(export_onnx(model, tmp_path / "shift.onnx"))
    fast = optimize_for_inference(model)
    for batch, height, width in [(2, 28, 56), (1, 200, 333)]:
        x = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            reference = model(x)
            torch.testing.assert_close(fast(x), reference, atol=1e-4, rtol=0)
        torch.testing.assert_close(runner(x), reference, atol=1e-4, rtol=0)
    monkeypatch.setattr(swin, "shift_size", lambda size, window: window // 2)
    with torch.no_grad():
        assert (model(images) - expected).abs().max() > 1e-2  # the shift rule matters at this size
