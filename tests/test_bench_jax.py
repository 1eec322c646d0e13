"""`swinkit bench jax`: swinkit-JAX, swinkit-PyTorch and timm trained and validated in one run from the
same weights on the same data; rows with the issue's keys, a table, a PNG of per-epoch times."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("timm")

from swinkit.bench import jax as bench_jax_module  # noqa: E402
from swinkit.bench.jax import bench_jax, folder_data, format_table, plot  # noqa: E402
from swinkit.cli import main as swinkit_main  # noqa: E402

MODEL = "swin_nano_patch2_window4_32"
ONE_STAGE = dict(depths=(2,), num_heads=(1,))  # a plain and a shifted block: every part, compiled quickly
BACKENDS = {"swinkit-jax", "swinkit-torch", "timm"}
REQUIRED = ("backend", "batch_size", "train_img_per_s", "val_img_per_s", "first_epoch_s", "top1")
PEAK = {"fp32": 80.0, "bf16": 160.0, "int8": 240.0}  # stands in for `measure_peaks` (seconds of GEMMs)


def fake_peaks(shapes):
    return {"peak_gflops": dict(PEAK), "engines": {dtype: {"torch.mm": 1.0} for dtype in PEAK}, "unavailable": {},
            "shapes": [{"layer": s.layer} for s in shapes]}


@pytest.fixture(scope="module")
def report():
    """One real run: 2 epochs x 2 steps at batch 4 for every backend (the children compile and train);
    one thread each, so a busy test machine slows it less."""
    patch = pytest.MonkeyPatch()
    patch.setattr(bench_jax_module, "measure_peaks", fake_peaks)
    try:
        yield bench_jax(MODEL, batch_sizes=[4], epochs=2, steps_per_epoch=2, compare=["timm"], threads=1,
                        **ONE_STAGE)
    finally:
        patch.undo()


def test_every_backend_trains_and_validates_with_the_issue_keys(report):
    rows = report["rows"]
    assert {row["backend"] for row in rows} == BACKENDS and not report["skipped"]
    for row in rows:
        assert all(key in row for key in REQUIRED), row
        assert row["batch_size"] == 4 and row["train_images_per_epoch"] == 8 and row["val_images"] == 8
        for key in ("train_img_per_s", "train_img_per_s_after_first", "val_img_per_s", "val_img_per_s_after_first",
                    "first_epoch_s", "train_gflops", "val_gflops", "train_pct_peak", "val_pct_peak", "val_loss"):
            assert row[key] > 0, (row["backend"], key, row[key])
        assert 0 <= row["top1"] <= 100
        assert len(row["epoch_train_s"]) == len(row["epoch_val_s"]) == 2 and min(row["epoch_train_s"]) > 0
        assert (row["compile_s"] is not None) == (row["backend"] == "swinkit-jax")
    by_backend = {row["backend"]: row for row in rows}
    jax_row = by_backend["swinkit-jax"]
    assert jax_row["compile_s"] > 0 and jax_row["first_epoch_s"] > jax_row["compile_s"]
    assert by_backend["timm"]["train_vs_timm"] == 1.0 and by_backend["swinkit-torch"]["val_vs_torch"] == 1.0
    assert jax_row["train_vs_timm"] > 0 and jax_row["val_vs_torch"] > 0
    expected = 100 * jax_row["val_gflops"] / PEAK["fp32"]  # every backend trains in fp32
    assert jax_row["val_pct_peak"] == pytest.approx(expected, rel=1e-2)
    assert jax_row["dtype"] == "fp32" and jax_row["peak_gflops"] == PEAK["fp32"]
    from swinkit import create_model
    from swinkit.models.swin import flops_per_image
    step_flops = flops_per_image(create_model(MODEL, num_classes=10, **ONE_STAGE), training=True)
    assert jax_row["train_gflops"] == pytest.approx(jax_row["train_img_per_s_after_first"] * step_flops / 1e9, rel=1e-3)
    assert report["header"]["gemm_peaks"][4]["peak_gflops"] == PEAK


def test_the_backends_start_from_the_same_weights(report):
    """Logits of the same val images before training, against swinkit-torch's."""
    diffs = {row["backend"]: row["initial_logits_max_diff"] for row in report["rows"]}
    assert diffs["swinkit-torch"] == 0.0
    assert diffs["swinkit-jax"] < 1e-4 and diffs["timm"] < 1e-4, diffs


def test_table_and_plot(report, tmp_path):
    table = format_table(report)
    for backend in BACKENDS:
        assert f"| {backend}" in table
    assert "XLA_FLAGS" in table and "GEMM peak GFLOP/s at batch 4" in table and "initial weights" in table
    assert "fp32 80 (torch.mm)" in table and "train GFLOP/s" in table
    png = plot(report, tmp_path / "epochs.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_prints_rows_as_json_and_writes_the_plot(report, tmp_path, capsys, monkeypatch):
    seen = {}

    def fake(model, **kwargs):
        seen.update(kwargs, model=model)
        return report
    monkeypatch.setattr(bench_jax_module, "bench_jax", fake)
    png = tmp_path / "plot.png"
    assert swinkit_main(["bench", "jax", "--model", MODEL, "--synthetic", "--batch-sizes", "4,8", "--epochs", "2",
                         "--steps-per-epoch", "2", "--compare", "timm", "--json", "--plot", str(png), "--quiet"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["backend"] for row in rows} == BACKENDS and all(key in rows[0] for key in REQUIRED)
    assert seen["batch_sizes"] == [4, 8] and seen["data"] is None and seen["compare"] == ["timm"]
    assert seen["threads"] == 2 and png.exists()


def test_unknown_peer_is_refused_before_any_work():
    with pytest.raises(ValueError, match="timm only"):
        bench_jax(MODEL, batch_sizes=[4], compare=["torchvision"])


def test_image_folder_data_is_a_fixed_decoded_subset(tmp_path):
    for split in ("train", "val"):
        for name in ("cat", "dog"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                pixels = np.full((40, 48, 3), 60 * i + (100 if name == "dog" else 0), np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / name / f"{i}.png")
    arrays, classes = folder_data(tmp_path, (32, 32), 3, train_images=4, val_images=6, seed=1)
    assert classes == ["cat", "dog"]
    assert arrays["train_x"].shape == (4, 3, 32, 32) and arrays["val_x"].shape == (6, 3, 32, 32)
    assert arrays["train_x"].dtype == np.float32 and set(arrays["val_y"].tolist()) == {0, 1}
    again, _ = folder_data(tmp_path, (32, 32), 3, train_images=4, val_images=6, seed=1)
    np.testing.assert_array_equal(again["train_x"], arrays["train_x"])
