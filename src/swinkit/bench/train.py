"""`swinkit bench train`: MegEngine's training table — for each setting, the largest batch that
trains within a memory budget, its s/step and img/s, and the ratios to plain fp32 training.

Everything in the table is measured: every candidate batch runs real training steps in a child
process (`bench/train_child.py`) whose own peak memory decides whether it fits. The search
doubles the batch until a candidate passes the budget, then bisects; the largest batch that fit
is then timed over `--steps` steps; the timing runs of all settings follow one another after
all searches, so they see the same machine load. Settings:

    none            fp32, no recomputation
    amp             bf16 autocast on CPU (fp16/bf16 on CUDA)
    recompute       fp32, `train.memory.plan_for_budget` for each candidate batch
                    (every block recomputed where no cheaper plan is expected to fit)
    recompute+amp   both

The table also gives saved-activation bytes per image (`saved_tensors_hooks` count) for
swinkit and, with `--compare timm`, for timm's model of the same architecture, whose plain fp32
training gets a row of its own.

Each swinkit child treats the allocator as `swinkit train` would at its batch: freed memory goes
back to the OS where the budget binds (`train.memory.budget_binds` on the planner's estimate) and
is kept for reuse otherwise (`allocator.keeping_freed_memory`); timm's children run with glibc's
defaults, as timm does. swinkit's children flush denormals to zero
as `swinkit train` does (`precision.flush_denormals`); timm's run in the process's default float mode
(`--compare timm`) or flushed too (`--compare timm-ftz`), so both effects can be told apart. After the children, the machine's GEMM
peaks are measured on the model's linear shapes at each row's batch (`machine.measure_peaks`) and
every row states its training GFLOP/s (`models.swin.flops_per_image`) and % of the peak of its
dtype (fp32 rows of fp32's, amp rows of bf16's).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import torch

from .. import cli_types
from ..cli_types import positive_int, rate
from ..models.swin import flops_per_image
from ..train import memory
from ..sysinfo import format_size, parse_size
from .machine import (format_isa_limits, format_peaks, linear_shapes, load_average, machine_info, measure_peaks,
                      peak_fields, row_dtype)
from .train_child import OVER_BUDGET_EXIT, SETTINGS, build_model

ROW_KEYS = ("setting", "impl", "max_batch", "s_per_step", "img_per_s", "batch_ratio", "throughput_pct",
            "peak_bytes", "saved_bytes_per_image", "plan", "capped", "returns_freed_memory", "allocator", "dtype",
            "gflops", "peak_gflops", "pct_peak")


@dataclass
class Probe:
    """One child run: did `batch` fit, and what it measured (the child's JSON line)."""

    batch: int
    fits: bool
    result: dict


# peers of `--compare` -> the denormal mode their children run in (swinkit's flush, `precision.flush_denormals`)
PEERS = {"timm": "default", "timm-ftz": "flush"}


class ChildError(RuntimeError):
    """A training child failed for a reason other than the budget."""


def run_child(model: str, batch: int, *, setting: str = "none", budget: int | None = None, steps: int = 1,
              warmup: int = 1, plan: list[str] | None = None, impl: str = "swinkit", img_size: int | None = None,
              device: str = "cpu", threads: int | None = None, timeout: float | None = None,
              allocator: str = "return", denormals: str | None = None) -> Probe:
    """Train `batch` images per step in a fresh process and read back its measurements (`allocator`: the
    child's `--allocator`, "return" / "keep" / "glibc"; `denormals` "flush" or "default", None: the child's
    default for `impl`)."""
    command = [sys.executable, "-m", "swinkit.bench.train_child", "--model", model, "--batch", str(batch),
               "--steps", str(steps), "--warmup", str(warmup), "--setting", setting, "--impl", impl,
               "--device", device]
    command += ["--allocator", allocator]
    if denormals:
        command += ["--denormals", denormals]
    if budget:
        command += ["--budget", str(int(budget))]
    if plan:
        command += ["--plan", ",".join(plan)]
    if img_size:
        command += ["--img-size", str(img_size)]
    if threads:
        command += ["--threads", str(threads)]
    env = dict(os.environ)
    source_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    result = json.loads(lines[-1]) if lines else {}
    if done.returncode == OVER_BUDGET_EXIT:
        return Probe(batch, False, result)
    if done.returncode != 0 or not result.get("ok"):
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        raise ChildError(f"training child for {model} batch {batch} ({setting}) exited with {done.returncode}: "
                         + " | ".join(tail))
    return Probe(batch, True, result)


def search_max_batch(probe, max_batch: int, tolerance: float = 0.0) -> tuple[Probe | None, list[Probe]]:
    """Largest batch for which `probe(batch).fits`: double from 1 until one does not fit (or
    `max_batch` is reached), then bisect until the bracket is within `tolerance` of the batch
    (0: exact). Returns (the largest fitting probe or None, every probe in order)."""
    history: list[Probe] = []
    best, over = None, None
    batch = 1
    while True:
        result = probe(batch)
        history.append(result)
        if not result.fits:
            over = batch
            break
        best = result
        if batch >= max_batch:
            return best, history
        batch = min(batch * 2, max_batch)
    if best is None:
        return None, history
    low, high = best.batch, over
    while high - low > max(1, int(tolerance * low)):
        middle = (low + high) // 2
        result = probe(middle)
        history.append(result)
        if result.fits:
            best, low = result, middle
        else:
            high = middle
    return best, history


class _Planner:
    """Recompute plans per candidate batch, from one activation profile per precision and the
    fixed memory of a training child (its measured baseline, from the first probe that reports it)."""

    def __init__(self, model, budget: int, img_size: int, measure_baseline):
        self.model, self.budget, self.img_size = model, budget, img_size
        self.measure_baseline = measure_baseline
        self.baseline: int | None = None
        self.profiles: dict[str, memory.Profile] = {}

    def saw(self, result: dict) -> None:
        if self.baseline is None and result.get("baseline_bytes"):
            self.baseline = result["baseline_bytes"]

    def profile(self, amp: bool) -> memory.Profile:
        key = "bf16-mixed" if amp else "fp32"
        if key not in self.profiles:
            self.profiles[key] = memory.activation_profile(self.model, self.img_size, precision=key)
        return self.profiles[key]

    def fixed(self) -> int:
        if self.baseline is None:
            self.baseline = self.measure_baseline()
        return memory.fixed_bytes(self.model, baseline_bytes=self.baseline)

    def plan(self, batch: int, amp: bool) -> list[str]:
        try:
            return memory.plan_for_budget(self.model, batch, self.budget, profile=self.profile(amp),
                                          fixed=self.fixed()).modes
        except ValueError:
            return ["full"] * len(self.model.blocks())

    def binds(self, batch: int, amp: bool, modes: list[str] | None) -> bool:
        """Whether `swinkit train` would return freed memory to the OS at this batch and plan."""
        modes = modes or ["none"] * len(self.model.blocks())
        return memory.budget_binds(self.profile(amp), self.fixed(), batch, modes, self.budget)


def bench_train(model_name: str, budget: int | str, settings=("none", "amp", "recompute", "recompute+amp"), *,
                compare: tuple[str, ...] = (), steps: int = 2, warmup: int = 3, img_size: int | None = None,
                max_batch: int = 4096,
                batch: int | None = None, tolerance: float = 0.0, device: str = "cpu", threads: int | None = None,
                child_timeout: float | None = None, measure_peak: bool = True, log=None) -> dict:
    """Measure every setting; returns {"rows": [...], "machine": {...}, "saved_bytes_per_image": {...},
    "gemm_peaks": {batch: `machine.measure_peaks`}, ...}.

    `batch` skips the search and measures that batch only (its row says whether it fit). Each timing run
    trains `warmup` untimed steps first: where freed memory is kept, glibc's heap grows over the first steps
    (each fresh page zeroed once), so one warm-up step understates the steady state. The GEMM peaks
    (CPU only; `measure_peak`) are measured after the children, at every batch a row trained.
    """
    budget = parse_size(budget)
    settings = list(settings)
    for setting in settings:
        if setting not in SETTINGS:
            raise ValueError(f"setting {setting!r} is not one of {', '.join(SETTINGS)}")
    for peer in compare:
        if peer not in PEERS:
            raise ValueError(f"--compare {peer!r}: choose from {', '.join(PEERS)}")
    log = log or (lambda message: None)
    model = build_model(model_name, img_size=img_size)
    img_size = img_size or model.config.img_size[0]
    child = dict(img_size=img_size, device=device, threads=threads, timeout=child_timeout)

    planner = _Planner(model, budget, img_size,
                       lambda: run_child(model_name, 1, steps=0, warmup=0, **child).result["baseline_bytes"])
    saved = {"swinkit": planner.profile(False).activation_bytes(["none"] * len(model.blocks()))}
    if compare:
        saved["timm"] = memory.saved_bytes_per_image(build_model(model_name, "timm", img_size), img_size)

    jobs = [(setting, "swinkit", None) for setting in settings] + [("none", "timm", PEERS[peer]) for peer in compare]
    found = {}
    for setting, impl, denormals in jobs:  # first every search, then every timing run back to back (same load)
        amp, recompute = "amp" in setting, "recompute" in setting and impl == "swinkit"

        def probe(candidate, steps_=1, warmup_=1, setting=setting, impl=impl, amp=amp, recompute=recompute,
                  denormals=denormals):
            plan = planner.plan(candidate, amp) if recompute else None
            returning = impl == "swinkit" and (device != "cpu" or planner.binds(candidate, amp, plan))
            allocator = "glibc" if impl != "swinkit" else "return" if returning else "keep"
            result = run_child(model_name, candidate, setting=setting, budget=budget, steps=steps_, warmup=warmup_,
                               plan=plan, impl=impl, allocator=allocator, denormals=denormals, **child)
            result.result["returns_freed_memory"] = returning
            result.result["allocator"] = allocator
            if impl == "swinkit":
                planner.saw(result.result)
            log(f"  {impl} {setting:<13} batch {candidate:>5}: "
                + (f"peak {format_size(result.result['peak_bytes'])}" if result.fits else "over budget")
                + {"return": "", "keep": ", freed memory kept", "glibc": ", glibc's defaults"}[allocator])
            return result

        if batch is not None:
            best = probe(batch, steps, warmup)
            found[setting, impl, denormals] = (best if best.fits else None, probe)
        else:
            found[setting, impl, denormals] = (search_max_batch(probe, max_batch, tolerance)[0], probe)
    rows = []
    for (setting, impl, denormals), (best, probe) in found.items():
        if best is not None and batch is None and steps > 1:
            timed = probe(best.batch, steps, warmup)
            best = timed if timed.fits else best  # a timing run that crept over keeps the search result
        amp = "amp" in setting
        label = setting if impl == "swinkit" else f"timm {setting}{' ftz' if denormals == 'flush' else ''}"
        row = {"setting": label, "impl": impl, "denormals": best.result.get("denormals") if best else None,
               "max_batch": best.batch if best else 0,
               "s_per_step": best.result["s_per_step"] if best else None,
               "img_per_s": best.result["img_per_s"] if best else None,
               "peak_bytes": best.result["peak_bytes"] if best else None,
               "plan": _plan_summary(best.result.get("plan")) if best else None,
               "capped": bool(best and batch is None and best.batch >= max_batch),
               "lean": best.result.get("lean") if best else None,
               "returns_freed_memory": best.result["returns_freed_memory"] if best else None,
               "allocator": best.result["allocator"] if best else None}
        if impl == "swinkit" and best:
            modes = best.result.get("plan") or ["none"] * len(model.blocks())
            row["saved_bytes_per_image"] = planner.profile(amp).activation_bytes(modes)
        else:
            row["saved_bytes_per_image"] = saved.get(impl) if not amp else None
        rows.append(row)

    reference = next((r for r in rows if r["setting"] == "none" and r["max_batch"]), None)
    for row in rows:
        row["batch_ratio"] = row["max_batch"] / reference["max_batch"] if reference else None
        row["throughput_pct"] = (100 * row["img_per_s"] / reference["img_per_s"]
                                 if reference and row["img_per_s"] else None)
    report = {"model": model_name, "img_size": img_size, "budget_bytes": budget, "steps": steps, "warmup": warmup,
              "fixed_batch": batch,
              "machine": machine_info(device), "saved_bytes_per_image": saved, "rows": rows, "gemm_peaks": {}}
    if measure_peak and device == "cpu":  # the children are done: the machine is as quiet as for them
        threads_before = torch.get_num_threads()
        torch.set_num_threads(threads or threads_before)
        try:
            for trained in sorted({row["max_batch"] for row in rows if row["max_batch"]}):
                log(f"  measuring the GEMM peaks at batch {trained} ...")
                report["gemm_peaks"][trained] = measure_peaks(linear_shapes(model, trained, img_size))
        finally:
            torch.set_num_threads(threads_before)
    train_flops = flops_per_image(model, img_size, training=True)
    for row in rows:
        achieved = row["img_per_s"] * train_flops / 1e9 if row["img_per_s"] else None
        row.update(peak_fields(achieved, row_dtype(amp="amp" in row["setting"]),
                               report["gemm_peaks"].get(row["max_batch"])))
    report["machine"]["load_average_end"] = load_average()
    return report


def _plan_summary(modes: list[str] | None) -> str | None:
    if not modes:
        return None
    counts = {mode: modes.count(mode) for mode in memory.MODES if modes.count(mode)}
    if list(counts) == ["none"]:
        return "none"
    return ", ".join(f"{mode} {count}" for mode, count in counts.items() if mode != "none") + f" of {len(modes)}"


def _fmt(value, pattern: str, missing: str = "-") -> str:
    return missing if value is None else pattern.format(value)


def format_table(report: dict) -> str:
    machine = report["machine"]
    units = ", ".join(machine["bf16_units"]) or "none"
    lines = [
        f"swinkit bench train: {report['model']} at {report['img_size']}px, memory budget "
        f"{format_size(report['budget_bytes'])}, AdamW + cross-entropy on synthetic data, "
        f"{report['steps']} timed step(s) after {report.get('warmup', 1)} warm-up step(s)"
        + (f"; fixed batch {report['fixed_batch']} (no search)" if report.get("fixed_batch") else ""),
        f"{machine.get('gpu') or machine['cpu']} ({machine['cpu_capability']}, bf16 instructions: {units}), "
        f"{machine['threads']} threads, torch {machine['torch']}, load average {machine['load_average']} -> "
        f"{machine['load_average_end']}",
    ]
    if machine.get("isa_limits"):
        lines.append(format_isa_limits(machine["isa_limits"]))
    peaks = report.get("gemm_peaks") or {}
    for batch, measured in peaks.items():
        lines.append(format_peaks(measured, f" at batch {batch}"))
    lines += [
        "",
        f"| {'setting':<14} | {'max batch':>9} | {'s/step':>7} | {'img/s':>6} | {'batch x':>7} | "
        f"{'throughput':>10} | {'GFLOP/s':>7} | {'% peak':>11} | {'peak':>8} | {'freed mem':>9} | {'saved/img':>9} | "
        "recompute plan",
        "|" + "|".join("-" * (width + 2) for width in (14, 9, 7, 6, 7, 10, 7, 11, 8, 9, 9, 14)),
    ]
    for row in report["rows"]:
        batch = f"{row['max_batch']}{'+' if row['capped'] else ''}" if row["max_batch"] else "none fit"
        saved = row.get("saved_bytes_per_image")
        freed = {"return": "to the OS", "keep": "kept", "glibc": "glibc"}.get(row.get("allocator"), "-")
        pct = "-" if row.get("pct_peak") is None else f"{row['pct_peak']:.0f}% {row['dtype']}"
        lines.append(
            f"| {row['setting']:<14} | {batch:>9} | {_fmt(row['s_per_step'], '{:.2f}'):>7} | "
            f"{_fmt(row['img_per_s'], '{:.2f}'):>6} | {_fmt(row['batch_ratio'], '{:.2f}x'):>7} | "
            f"{_fmt(row['throughput_pct'], '{:.0f}%'):>10} | {_fmt(row.get('gflops'), '{:.1f}'):>7} | {pct:>11} | "
            f"{_fmt(row['peak_bytes'], '{}', '-') if row['peak_bytes'] is None else format_size(row['peak_bytes']):>8} | "
            f"{freed:>9} | {'-' if saved is None else format_size(saved):>9} | {row['plan'] or '-'}")
    lines.append("")
    saved = report["saved_bytes_per_image"]
    line = f"saved activations per image (fp32, saved_tensors_hooks): swinkit {format_size(saved['swinkit'])}"
    if "timm" in saved:
        line += f", timm {format_size(saved['timm'])} (swinkit/timm = {saved['swinkit'] / saved['timm']:.2f})"
    lines.append(line)
    if any(r["capped"] for r in report["rows"]):
        lines.append("+ the search stopped at --max-batch; the budget holds more")
    if any(row.get("allocator") == "keep" for row in report["rows"]):
        lines.append("freed mem 'kept': the budget does not bind at that batch (train.memory.budget_binds), so "
                     "glibc keeps freed memory for reuse (allocator.keeping_freed_memory), as `swinkit train` "
                     "then does")
    if any(row.get("allocator") == "glibc" for row in report["rows"]):
        lines.append("freed mem 'glibc': glibc's defaults, as timm's own training runs")
    by_setting = {r["setting"]: r for r in report["rows"]}
    amp_row = by_setting.get("amp")
    gemm = (peaks.get(amp_row["max_batch"]) or {}).get("peak_gflops", {}) if amp_row else {}
    if gemm.get("bf16") and gemm.get("fp32"):
        note = (f"bf16 autocast on this CPU: the model's GEMMs run at {gemm['bf16']:.0f} GFLOP/s in bf16 vs "
                f"{gemm['fp32']:.0f} in fp32 ({gemm['bf16'] / gemm['fp32']:.2f}x)")
        if not report["machine"]["bf16_units"]:
            note += "; without BF16 instructions bf16 is converted to fp32 for every matmul"
        none_row = by_setting.get("none")
        if none_row and amp_row["s_per_step"] and none_row["s_per_step"]:
            per_image = (amp_row["s_per_step"] / amp_row["max_batch"]) / (none_row["s_per_step"] / none_row["max_batch"])
            note += f"; amp training takes {per_image:.2f}x the time per image of fp32"
        lines.append(note)
    return "\n".join(lines)


def _cmd_train(args) -> int:
    settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    log = (lambda message: print(message, file=sys.stderr, flush=True)) if not args.quiet else None
    report = bench_train(args.model, args.memory_budget, settings, compare=tuple(args.compare or ()),
                         steps=args.steps, warmup=args.warmup, img_size=args.img_size, max_batch=args.max_batch,
                         batch=args.batch,
                         tolerance=args.tolerance, device=args.device, threads=args.threads,
                         measure_peak=not args.no_peak, log=log)
    if args.json:
        print(json.dumps(report["rows"], indent=2))
    else:
        print(format_table(report))
    return 0


def register_train(bench_subparsers) -> None:
    """Add `train` to the `swinkit bench` subcommands."""
    parser = bench_subparsers.add_parser(
        "train", help="max batch and img/s within a memory budget per setting (MegEngine's table)",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model name, e.g. swin_tiny_patch4_window7_224")
    parser.add_argument("--memory-budget", required=True, help="e.g. 6GB, 2.5G, 512MiB")
    parser.add_argument("--settings", default="none,amp,recompute,recompute+amp",
                        help="comma-separated: " + ", ".join(SETTINGS))
    parser.add_argument("--compare", action="append", choices=tuple(PEERS),
                        help="also measure timm's model of the same architecture: timm (as timm runs: the process's "
                             "default float mode), timm-ftz (with denormals flushed, as swinkit trains)")
    parser.add_argument("--steps", type=positive_int, default=2, help="timed steps at the final batch (default 2)")
    parser.add_argument("--warmup", type=positive_int, default=3,
                        help="untimed steps before them (default 3: a kept heap grows over the first steps)")
    parser.add_argument("--img-size", type=positive_int, default=None)
    parser.add_argument("--max-batch", type=positive_int, default=4096, help="stop the search here")
    parser.add_argument("--batch", type=positive_int, default=None, help="measure this batch only (no search)")
    parser.add_argument("--tolerance", type=rate, default=0.0,
                        help="stop bisecting when the bracket is within this fraction of the batch (default exact)")
    parser.add_argument("--device", type=cli_types.device, default="cpu")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads in each child")
    parser.add_argument("--no-peak", action="store_true", help="skip measuring the GEMM peaks")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=_cmd_train)
