"""Fitting a memory budget: size parsing, the activation profile, the recompute planner, and the
`swinkit bench train` child-process protocol. Correctness only, never timings."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import swinkit
from swinkit.bench import train as bench_train_module
from swinkit.bench.train import bench_train, format_table, run_child, search_max_batch, Probe
from swinkit.sysinfo import parse_size
from swinkit.train import lean, memory

TINY = "swin_nano_patch2_window4_32"


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return swinkit.create_model(TINY, num_classes=10)


@pytest.fixture(scope="module")
def profile(tiny):
    return memory.activation_profile(tiny)


@pytest.mark.parametrize("text, expected", [
    ("6GB", 6 * 10 ** 9), ("6 gb", 6 * 10 ** 9), ("2.5G", 2_500_000_000), ("512MiB", 512 * 2 ** 20),
    ("4Gi", 4 * 2 ** 30), ("100", 100), (1024, 1024), ("1e3MB", 10 ** 9)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "six GB", "6XB", "-1GB", 0, "0MB", True])
def test_parse_size_names_the_bad_value(bad):
    with pytest.raises(ValueError, match="memory size"):
        parse_size(bad)


def test_profile_is_monotone_per_block(profile, tiny):
    assert len(profile.blocks) == len(tiny.blocks())
    for block in profile.blocks:
        assert 0 < block.saved["full"] < block.saved["selective"] < block.saved["none"], block
        assert 0 < block.attention_flops and 0 < block.mlp_flops
        assert block.extra_flops("none") < block.extra_flops("selective") < block.extra_flops("full")
    assert profile.outside > 0


def test_profile_restores_the_model(tiny):
    plan = ["full"] + ["none"] * (len(tiny.blocks()) - 1)
    lean.install(tiny, plan)
    tiny.eval()
    try:
        memory.activation_profile(tiny)
        assert lean.plan_of(tiny) == plan and not tiny.training
    finally:
        lean.uninstall(tiny)
        tiny.train()
    memory.activation_profile(tiny)
    assert not lean.is_installed(tiny)  # installed for the measurement only


def test_saved_bytes_per_image_matches_profile(tiny, profile):
    """The profile measures the model as training runs it: under the lean policy."""
    lean.install(tiny)
    try:
        assert memory.saved_bytes_per_image(tiny, 32) == profile.activation_bytes(["none"] * len(profile.blocks))
    finally:
        lean.uninstall(tiny)
    assert memory.saved_bytes_per_image(tiny, 32) > profile.activation_bytes(["none"] * len(profile.blocks))


def test_saved_bytes_per_image_works_on_timm():
    pytest.importorskip("timm")
    from swinkit.bench.train_child import build_model
    timm_model = build_model(TINY, impl="timm")
    assert memory.saved_bytes_per_image(timm_model, 32) > 0


def test_fixed_bytes_counts_grads_and_adamw_state(tiny):
    params = sum(p.numel() * 4 for p in tiny.parameters())
    base = memory.fixed_bytes(tiny, baseline_bytes=0)
    assert base >= 3 * params  # grads + exp_avg + exp_avg_sq
    assert memory.fixed_bytes(tiny, ema=True, baseline_bytes=0) == base + params
    assert memory.fixed_bytes(tiny) > base  # the measured process baseline is added
    with pytest.raises(ValueError, match="optimizer"):
        memory.fixed_bytes(tiny, optimizer="adagrad")


def test_planner_picks_no_recompute_for_a_generous_budget(tiny, profile):
    plan = memory.plan_for_budget(tiny, 8, "100GB", profile=profile, fixed=10 ** 9)
    assert plan.modes == ["none"] * len(tiny.blocks())
    assert plan.expected_peak_bytes <= 100 * 10 ** 9
    assert "no recomputation" in plan.summary and "memory budget 100.0 GB" in plan.summary


def test_planner_recomputes_to_fit_a_tight_budget(tiny, profile):
    blocks = len(profile.blocks)
    batch, fixed = 64, 10 ** 8
    plain = memory.expected_peak(profile, fixed, batch, ["none"] * blocks)
    everything = memory.expected_peak(profile, fixed, batch, ["full"] * blocks)
    budget = (plain + everything) // 2
    plan = memory.plan_for_budget(tiny, batch, budget, profile=profile, fixed=fixed)
    assert plan.modes != ["none"] * blocks and plan.modes != ["full"] * blocks
    assert plan.expected_peak_bytes <= budget
    assert plan.expected_peak_bytes == memory.expected_peak(profile, fixed, batch, plan.modes)
    assert "expected peak" in plan.summary
    # the plan is the cheapest the greedy search finds: giving back any recomputation breaks the budget
    for index, mode in enumerate(plan.modes):
        if mode != "none":
            cheaper = plan.modes[:index] + ["none"] + plan.modes[index + 1:]
            assert memory.expected_peak(profile, fixed, batch, cheaper) > budget


def test_planner_raises_with_the_batch_that_fits(tiny, profile):
    blocks = len(profile.blocks)
    fixed = 10 ** 8
    budget = memory.expected_peak(profile, fixed, 10, ["full"] * blocks)
    with pytest.raises(ValueError, match=r"batch 1000 does not fit .* batch 10 would fit"):
        memory.plan_for_budget(tiny, 1000, budget, profile=profile, fixed=fixed)
    with pytest.raises(ValueError, match="too small for any batch"):
        memory.plan_for_budget(tiny, 1, fixed // 2, profile=profile, fixed=fixed)


def _loss_and_grads(model, images, labels):
    torch.manual_seed(123)  # drop path draws the same masks in both runs
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_planned_recompute_gives_the_same_loss_and_gradients(profile):
    torch.manual_seed(0)
    model = swinkit.create_model(TINY, num_classes=10, drop_path_rate=0.2).train()
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    blocks = len(profile.blocks)
    fixed = 10 ** 8
    budget = (memory.expected_peak(profile, fixed, 4, ["none"] * blocks)
              + memory.expected_peak(profile, fixed, 4, ["full"] * blocks)) // 2
    plan = memory.plan_for_budget(model, 4, budget, profile=profile, fixed=fixed)
    assert set(plan.modes) - {"none"}
    loss_plain, grads_plain = _loss_and_grads(model, images, labels)
    for modes in (plan.modes, "selective", "full"):
        lean.install(model, modes)
        loss, grads = _loss_and_grads(model, images, labels)
        assert abs(loss.item() - loss_plain.item()) <= 1e-6
        for name, grad in grads_plain.items():
            assert torch.allclose(grads[name], grad, rtol=0, atol=1e-6), (modes, name)


def test_search_doubles_then_bisects():
    limit = 37
    seen = []

    def probe(batch):
        seen.append(batch)
        return Probe(batch, batch <= limit, {"batch": batch})

    best, history = search_max_batch(probe, max_batch=4096)
    assert best.batch == limit
    assert seen[:7] == [1, 2, 4, 8, 16, 32, 64]
    best, _ = search_max_batch(probe, max_batch=20)
    assert best.batch == 20  # capped
    best, _ = search_max_batch(lambda b: Probe(b, False, {}), max_batch=8)
    assert best is None


def test_child_reports_one_json_line():
    fit = run_child(TINY, 2, steps=1, warmup=0, img_size=32, threads=1)
    assert fit.fits
    for key in ("peak_bytes", "baseline_bytes", "s_per_step", "img_per_s", "plan"):
        assert key in fit.result
    assert fit.result["peak_bytes"] >= fit.result["baseline_bytes"] > 0
    assert fit.result["denormals"] == "flush"  # as `swinkit train` runs


@pytest.mark.parametrize("denormals, expected", [(None, "default"), ("flush", "flush")])
def test_timm_child_runs_in_the_float_mode_asked(denormals, expected):
    pytest.importorskip("timm")
    fit = run_child(TINY, 1, steps=0, warmup=0, img_size=32, threads=1, impl="timm", denormals=denormals)
    assert fit.result["denormals"] == expected


def test_bench_train_refuses_an_unknown_peer():
    with pytest.raises(ValueError, match="--compare 'hf': choose from timm, timm-ftz"):
        bench_train(TINY, "24GB", ["none"], compare=("hf",), steps=1, max_batch=1, threads=1)


def _recording_children(monkeypatch):
    probes = []
    real = bench_train_module.run_child

    def recording(*args, **kwargs):
        probes.append(real(*args, **kwargs))
        return probes[-1]

    monkeypatch.setattr(bench_train_module, "run_child", recording)
    return probes


def test_bench_train_smoke(monkeypatch):
    probes = _recording_children(monkeypatch)
    report = bench_train(TINY, "24GB", ["none", "recompute"], steps=1, max_batch=1, threads=1)
    rows = report["rows"]
    assert [row["setting"] for row in rows] == ["none", "recompute"]
    fp32_peak = report["gemm_peaks"][1]["peak_gflops"]["fp32"]
    for row in rows:
        for key in ("setting", "max_batch", "s_per_step", "img_per_s", "batch_ratio", "throughput_pct"):
            assert key in row
        assert row["max_batch"] == 1 and row["capped"] and row["img_per_s"] > 0
        assert row["returns_freed_memory"] is False  # 24 GB does not bind: as `swinkit train`, glibc keeps it
        assert row["allocator"] == "keep"
        assert row["dtype"] == "fp32" and row["peak_gflops"] == fp32_peak > 0 and row["gflops"] > 0
        assert row["pct_peak"] == pytest.approx(100 * row["gflops"] / fp32_peak, abs=0.1)
    assert rows[0]["batch_ratio"] == 1.0
    table = format_table(report)
    assert "max batch" in table and "GEMM peak GFLOP/s at batch 1" in table and "% fp32" in table
    assert "kept" in table
    # one baseline child (no steps) for the allocator decisions and the plan, then one child per setting
    assert [p.batch for p in probes] == [1, 1, 1] and probes[0].result["s_per_step"] != probes[0].result["s_per_step"]
    assert report["saved_bytes_per_image"]["swinkit"] > 0


def test_bench_train_handles_the_over_budget_exit(monkeypatch):
    probes = _recording_children(monkeypatch)
    report = bench_train(TINY, "1MB", ["none"], steps=1, max_batch=2, threads=1, measure_peak=False)
    assert len(probes) == 2 and probes[0].fits  # the baseline child, then batch 1
    assert not probes[1].fits and probes[1].result["over_budget"] and probes[1].result["returns_freed_memory"]
    assert probes[1].result["allocator"] == "return"
    row = report["rows"][0]
    assert row["max_batch"] == 0 and row["img_per_s"] is None
    assert "none fit" in format_table(report)


def test_profiling_leaves_the_random_stream_alone(tiny):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    memory.activation_profile(tiny)
    memory.saved_bytes_per_image(tiny, 32)
    assert torch.equal(torch.rand(3), expected)


def test_a_budget_far_above_the_estimate_leaves_the_allocator_alone(tiny, profile):
    fixed = memory.fixed_bytes(tiny, baseline_bytes=100 * 2 ** 20)
    plan = memory.plan_for_budget(tiny, 4, "24GB", profile=profile, fixed=fixed)
    assert plan.modes == ["none"] * len(tiny.blocks()) and not plan.return_freed_memory
    assert "allocator is left alone" in plan.summary


def test_a_tight_budget_returns_freed_memory(tiny, profile):
    """Fits with freed memory returned (the estimate's slack), not with glibc keeping it: binds."""
    fixed = memory.fixed_bytes(tiny, baseline_bytes=100 * 2 ** 20)
    none = ["none"] * len(tiny.blocks())
    lean_peak = memory.expected_peak(profile, fixed, 64, none)
    glibc_peak = memory.expected_peak(profile, fixed, 64, none, memory.GLIBC_SLACK)
    assert lean_peak < glibc_peak
    plan = memory.plan_for_budget(tiny, 64, lean_peak + 1, profile=profile, fixed=fixed)
    assert plan.modes == none and plan.return_freed_memory
    assert "returned to the OS" in plan.summary
    assert memory.budget_binds(profile, fixed, 64, none, glibc_peak - 1)
    assert not memory.budget_binds(profile, fixed, 64, none, glibc_peak)
    full = memory.expected_peak(profile, fixed, 64, ["full"] * len(none))
    recompute = memory.plan_for_budget(tiny, 64, full + 1, profile=profile, fixed=fixed)
    assert recompute.modes != none and recompute.return_freed_memory


def test_trainer_returns_freed_memory_only_where_the_budget_binds(tmp_path, monkeypatch):
    """`swinkit train --memory-budget`: a far budget (or none) trains with glibc keeping freed memory for
    reuse, a binding one returns it to the OS (the decision is logged)."""
    from contextlib import nullcontext
    from swinkit.cli import main
    from swinkit.train import trainer
    entered, kept = [], []
    monkeypatch.setattr(trainer, "returning_freed_memory", lambda: entered.append(True) or nullcontext())
    monkeypatch.setattr(trainer, "keeping_freed_memory", lambda: kept.append(True) or nullcontext())
    plans = []
    real_apply = memory.apply_memory_budget
    monkeypatch.setattr(memory, "apply_memory_budget", lambda *a, **k: plans.append(real_apply(*a, **k)) or plans[-1])
    common = ["train", "--synthetic", "--model", TINY, "--batch-size", "4", "--max-steps", "1", "--workers", "0",
              "--set", "data.val_split=null"]
    assert main([*common, "--output", str(tmp_path / "far"), "--memory-budget", "64GB"]) == 0
    assert not plans[-1].return_freed_memory and entered == [] and kept == [True]
    assert main([*common, "--output", str(tmp_path / "none")]) == 0  # no budget: kept too
    assert entered == [] and kept == [True, True]
    monkeypatch.setattr(memory, "GLIBC_SLACK", 1e6)  # glibc's caching would now overflow any budget: it binds
    assert main([*common, "--output", str(tmp_path / "binds"), "--memory-budget", "64GB"]) == 0
    assert plans[-1].return_freed_memory and entered == [True] and kept == [True, True]


def test_apply_memory_budget_sets_the_plan_and_logs_it():
    model = swinkit.create_model(TINY, num_classes=10)
    lean.install(model, "full")
    messages = []
    plan = memory.apply_memory_budget(model, 4, "24GB", log=messages.append)
    assert lean.plan_of(model) == plan.modes == ["none"] * len(model.blocks())
    assert messages == [plan.summary]
    with pytest.raises(ValueError, match="too small for any batch"):
        memory.apply_memory_budget(model, 4, "1MB")


def test_bench_train_timing_runs_warm_up_as_asked(monkeypatch):
    """A fixed batch's timing child trains `warmup` untimed steps before its timed ones (a kept heap grows
    over the first steps); the table says how many."""
    calls = []
    real = bench_train_module.run_child
    monkeypatch.setattr(bench_train_module, "run_child", lambda *a, **k: calls.append(k) or real(*a, **k))
    report = bench_train(TINY, "24GB", ["none"], steps=2, warmup=2, batch=1, threads=1, measure_peak=False)
    timing = [k for k in calls if k.get("steps") == 2]
    assert len(timing) == 1 and timing[0]["warmup"] == 2
    assert report["warmup"] == 2 and "2 timed step(s) after 2 warm-up step(s)" in format_table(report)
