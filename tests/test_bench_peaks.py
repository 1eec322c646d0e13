"""The machine peak every `swinkit bench` table states: the model's own linear GEMM shapes, measured per
dtype (fp32, bf16, int8) and weighted by FLOPs; and the rows' fraction of it. Correctness only."""
from __future__ import annotations

import pytest
from torch import nn

import swinkit
from swinkit.bench import machine
from swinkit.bench.machine import GemmShape, linear_shapes, measure_peaks

pytestmark = pytest.mark.usefixtures("one_thread")

NANO = "swin_nano_patch2_window4_32"


def _linear_layers(model) -> list[tuple[int, int]]:
    return sorted((m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear))


def test_shapes_are_the_models_linear_layers():
    """Every nn.Linear once per forward (qkv too, which attention calls through F.linear), rows per batch."""
    model = swinkit.create_model(NANO, num_classes=10).train()
    shapes = linear_shapes(model, batch=3)
    assert model.training  # its mode is restored
    called = sorted((s.in_features, s.out_features) for s in shapes for _ in range(s.count))
    assert called == _linear_layers(model)
    by_layer = {s.layer: s for s in shapes}
    assert by_layer["head.fc"].rows == 3
    height, width = model.config.stage_resolutions(model.config.img_size)[0]
    qkv = next(s for s in shapes if s.layer == "layers.*.blocks.*.attn.qkv" and s.in_features == 32)
    assert qkv.rows == 3 * height * width and qkv.count == 2 and qkv.out_features == 96
    assert all(s.rows % 3 == 0 for s in shapes)


def test_v2_position_bias_mlp_is_left_out():
    """v2's CPB MLP does not grow with the batch (`models.swin.macs` leaves it out too)."""
    model = swinkit.create_model("swinv2_nano_patch2_window4_32", num_classes=10)
    layers = {s.layer for s in linear_shapes(model, batch=2)}
    assert not any("cpb_mlp" in layer for layer in layers)
    assert any(layer.endswith("attn.qkv") for layer in layers) and "head.fc" in layers


def test_peaks_on_tiny_shapes_are_positive_per_dtype():
    shapes = [GemmShape(64, 32, 48, count=2, layer="a"), GemmShape(16, 64, 32, layer="b")]
    peaks = measure_peaks(shapes, repeats=1)
    assert set(peaks["peak_gflops"]) == {"fp32", "bf16", "int8"}
    for dtype, value in peaks["peak_gflops"].items():
        assert value is not None and value > 0, (dtype, peaks["unavailable"])
        assert sum(peaks["engines"][dtype].values()) == pytest.approx(1.0, abs=0.01)
        best = [max(row[dtype].values()) for row in peaks["shapes"]]
        assert min(best) - 0.15 <= value <= max(best) + 0.15  # (all rounded to 0.1 GFLOP/s)
    assert {"torch.mm", "onednn", "onednn reordered"} <= set(peaks["shapes"][0]["fp32"])
    assert "torch._int_mm" in peaks["shapes"][0]["int8"]
    line = machine.format_peaks(peaks, " at batch 1")
    assert "fp32" in line and "bf16" in line and "int8" in line and "2 linear shapes" in line


def test_peak_weights_each_shape_by_its_flops(monkeypatch):
    """Each shape at its fastest engine's rate; the peak is all FLOPs over the time they take."""
    rates = {GemmShape(10, 10, 10).flops: {"slow": 1.0, "fast": 2.0}, GemmShape(10, 10, 30).flops: {"slow": 3.0}}

    def engines(dtype, shape, operands):
        flops = 2 * shape.rows * shape.in_features * shape.out_features
        return {name: (lambda seconds=flops / (rate * 1e9): seconds) for name, rate in rates[flops].items()}
    monkeypatch.setattr(machine, "_engines", engines)
    monkeypatch.setattr(machine, "_best_seconds", lambda call, repeats, budget: call())
    shapes = [GemmShape(10, 10, 10, count=3), GemmShape(10, 10, 30)]
    peaks = measure_peaks(shapes, ["fp32"])
    total = 3 * 2000 + 6000
    assert peaks["peak_gflops"]["fp32"] == pytest.approx(total / (3 * 2000 / 2.0 + 6000 / 3.0), abs=0.05)
    assert peaks["engines"]["fp32"] == {"fast": 0.5, "slow": 0.5}


def test_peak_sampled_twice_keeps_each_engines_better_rate(monkeypatch):
    """`previous`: every engine keeps its faster rate per shape over both samples (a drifting machine),
    the peak is recomputed from those; a sample of other shapes is refused."""
    sample = {"rates": {"slow": 1.0, "fast": 2.0}}

    def engines(dtype, shape, operands):
        flops = 2 * shape.rows * shape.in_features * shape.out_features
        return {name: (lambda seconds=flops / (rate * 1e9): seconds) for name, rate in sample["rates"].items()}
    monkeypatch.setattr(machine, "_engines", engines)
    monkeypatch.setattr(machine, "_best_seconds", lambda call, repeats, budget: call())
    shapes = [GemmShape(10, 10, 10)]
    first = measure_peaks(shapes, ["fp32"])
    sample["rates"] = {"slow": 3.0, "fast": 1.5}  # the machine changed speed; "slow" is now the faster engine
    both = measure_peaks(shapes, ["fp32"], previous=first)
    assert both["shapes"][0]["fp32"] == {"slow": 3.0, "fast": 2.0}
    assert both["peak_gflops"]["fp32"] == pytest.approx(3.0) and both["engines"]["fp32"] == {"slow": 1.0}
    sample["rates"] = {"slow": 0.5, "fast": 0.5}  # a slow moment cannot lower what was seen
    assert measure_peaks(shapes, ["fp32"], previous=both)["peak_gflops"]["fp32"] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="other shapes"):
        measure_peaks([GemmShape(10, 10, 20)], ["fp32"], previous=both)


def test_bad_dtype_is_refused():
    with pytest.raises(ValueError, match="dtypes"):
        measure_peaks([GemmShape(4, 4, 4)], ["fp16"])


def test_row_fields_against_the_peak_of_the_rows_dtype():
    peaks = {"peak_gflops": {"fp32": 100.0, "bf16": 400.0, "int8": None}}
    assert machine.peak_fields(50.0, "fp32", peaks)["pct_peak"] == 50.0
    bf16 = machine.peak_fields(50.0, machine.row_dtype(amp=True), peaks)
    assert bf16["dtype"] == "bf16" and bf16["pct_peak"] == 12.5 and bf16["peak_gflops"] == 400.0
    assert machine.peak_fields(50.0, machine.row_dtype(int8=True), peaks)["pct_peak"] is None
    assert machine.peak_fields(50.0, "fp32", None)["pct_peak"] is None


def test_limited_instruction_sets_are_stated_in_both_tables(monkeypatch):
    """A run with the libraries limited to fewer instruction sets (an AVX2-only CPU measured on an AVX-512
    one) says so in its header, and that ONNX Runtime cannot be limited; an unlimited run says nothing."""
    from swinkit.bench import format_table as format_infer
    from swinkit.bench.train import format_table as format_train
    for name in machine.ISA_LIMITS:
        monkeypatch.delenv(name, raising=False)
    assert machine.isa_limits() == {} and machine.format_isa_limits({}) == ""
    monkeypatch.setenv("SWINKIT_NATIVE_MARCH", "x86-64-v3")  # read at import only: safe to set in a test
    assert machine.isa_limits() == {"SWINKIT_NATIVE_MARCH": "x86-64-v3"}
    header = {"model": "m", "img_size": [32, 32], "gflops_per_image": 0.1, "cpu": "CPU", "threads": 2,
              "torch": "2", "rounds": 1, "warmup": 0, "load_average": 0.0, "cpu_capability": "AVX2",
              "isa_limits": machine.isa_limits()}
    table = format_infer({"header": header, "rows": [], "skipped": []})
    assert "CPU: CPU (AVX2)" in table
    assert "instruction sets limited: SWINKIT_NATIVE_MARCH=x86-64-v3 (ONNX Runtime cannot be limited" in table
    assert "instruction sets limited" not in format_infer({"header": {**header, "isa_limits": {}}, "rows": [],
                                                           "skipped": []})
    info = machine.machine_info()
    assert info["isa_limits"] == {"SWINKIT_NATIVE_MARCH": "x86-64-v3"}
    report = {"model": "m", "img_size": 32, "budget_bytes": 1 << 30, "steps": 1, "rows": [], "saved_bytes_per_image": {"swinkit": 1000},
              "machine": {**info, "load_average_end": 0.0}}
    assert "instruction sets limited: SWINKIT_NATIVE_MARCH=x86-64-v3" in format_train(report)
    monkeypatch.setenv("SWINKIT_EMULATED_CPU", "avx2")  # as scripts/emulate_cpu.sh sets it
    emulated = machine.format_isa_limits(machine.isa_limits())
    assert "SWINKIT_EMULATED_CPU=avx2" in emulated and "ONNX Runtime included" in emulated
    assert "cannot be limited" not in emulated
