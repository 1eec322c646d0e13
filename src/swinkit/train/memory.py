"""Fit training into a memory budget: measure what each block keeps for backward, then pick the
cheapest recomputation plan that fits.

    peak ≈ fixed                          process baseline + grads + optimizer state (+ EMA)
         + constant                       batch-independent saved tensors (bias + mask tables)
         + max(batch * (outside + Σ_i saved[i, mode_i]),                   end of forward
               max_i batch * (outside + Σ_{j<=i} saved[j]) + transient[i])   backward of block i

where a block's transient is what its backward rebuilds plus gradient workspace: per image
for "none"/"selective", and for sliced "full" recomputation one slice's worth plus the block's
input and output gradients (`BlockProfile.transient`), so all-"full" plans grow by little more
than the saved block inputs per image.

`activation_profile` measures `saved` per block and mode by running forward passes at batch 1
and 2 under `torch.autograd.graph.saved_tensors_hooks` (each storage counted once, parameters
excluded), so it follows whatever the model really stores. `plan_for_budget` starts from no
recomputation and greedily switches blocks to "selective" (recompute the attention branch) or
"full" (recompute the block), always taking the move that saves the most bytes per extra FLOP,
until the estimate fits. Apply the result with `train.lean.install(model, plan.modes)`.

The safety terms (`BACKWARD_WORKSPACE`, `ALLOCATOR_SLACK`, `STEP_OVERHEAD`) were tuned against the
whole-process peak RSS of real training children (`bench/train_child.py`, AdamW, fp32, with
`returning_freed_memory`): over Swin-T at 224 (batch 4 and 16; none and full) and a 56 px micro
model (batch 8 to 256; none, selective, full) the estimate was 0.2% below to 6.3% above the
measured peak. Re-checked after sliced recomputation and the oneDNN matmuls (Swin-T, THP on):
none at batch 32 estimated ~10% above the measured 3.3 GB, all-full at 32 and 128 ~7% above
(1.7 and 2.8 GB measured), i.e. on the safe side.

Returning freed memory costs time (Swin-T batch 16 on a 2-core Xeon: 3.40 vs 4.57 img/s fp32), so a budget
that does not bind must not pay for it: `budget_binds` is the one rule, applied to the chosen plan —
if the estimate with glibc keeping freed memory (`GLIBC_SLACK` instead of `ALLOCATOR_SLACK`) still
fits, the plan says so (`Plan.return_freed_memory` False) and the trainer has glibc keep freed memory
for reuse (`allocator.keeping_freed_memory`: no fresh zeroed pages per step).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.swin import flops_per_image, macs
from ..precision import autocast as _autocast
from . import lean
from .lean.recompute import slice_images
from ..sysinfo import format_size, parse_size, process_rss

MODES = lean.MODES

# Backward of one block holds, besides what it recomputes, gradient buffers of about this many
# times the block's own saved bytes (grad of qkv, of fc1's output, recomputed probabilities).
BACKWARD_WORKSPACE = 0.8
# Resident peak over the live-tensor peak (allocator rounding, pages not yet handed back), with
# `returning_freed_memory` in effect; without it glibc's heaps hold 1.5-2x the live bytes.
ALLOCATOR_SLACK = 1.05
# The same with glibc keeping freed memory (its default): Swin-T at batch 16 (fp32 and bf16 autocast)
# held 1.9x its activation bytes after six steps and was still creeping up; 2.5 leaves room for that.
# With every size kept in the heap (`allocator.keeping_freed_memory`, what the trainer now runs) the
# resident peak settled below this estimate: 3.70 vs 3.93 GB at batch 16, 5.92 vs 6.62 GB at 32 (fp32).
GLIBC_SLACK = 2.5
# The first training step's one-off buffers: thread-pool scratch, kernel caches, autograd engine.
STEP_OVERHEAD = 48 * 2 ** 20


# ------------------------------------------------------------------------------------ measuring
class _SavedTensorCounter:
    """Counts the bytes autograd keeps for backward, each storage once, parameters and buffers
    excluded; attributes them to the block running when they were saved (None: outside blocks).

    Checkpointed blocks hide their saves behind torch.utils.checkpoint's own hooks and keep their
    inputs alive instead, so a recomputed block's (or branch's) input is counted explicitly."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module]):
        self.skip = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.owner: dict[int, tuple[int | None, int]] = {}
        self.current: int | None = None
        self.blocks = blocks

    def _record(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        if pointer and pointer not in self.skip and pointer not in self.owner:
            self.owner[pointer] = (self.current, storage.nbytes())

    def pack(self, tensor):
        self._record(tensor)
        return tensor

    def by_owner(self) -> tuple[list[int], int]:
        per_block = [0] * len(self.blocks)
        outside = 0
        for owner, nbytes in self.owner.values():
            if owner is None:
                outside += nbytes
            else:
                per_block[owner] += nbytes
        return per_block, outside

    def count(self, forward) -> tuple[list[int], int]:
        handles = []
        for index, block in enumerate(self.blocks):
            def enter(module, args, index=index):
                self.current = index
                if getattr(module, "recompute_mode", "none") != "none" and torch.is_tensor(args[0]):
                    self._record(args[0])  # held by the checkpoint for recomputation

            def leave(module, args, output):
                self.current = None
            handles += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor):
                output = forward()
            del output
        finally:
            for handle in handles:
                handle.remove()
        return self.by_owner()


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _input(model: nn.Module, batch: int, img_size, in_chans: int) -> torch.Tensor:
    height, width = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    return torch.randn(batch, in_chans, height, width, device=_model_device(model))


def _own_rng(model: nn.Module):
    """Profiling draws inputs and drop-path masks: keep the caller's random streams untouched."""
    device = _model_device(model)
    return torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])


def saved_bytes_per_image(model: nn.Module, img_size: int | tuple[int, int], in_chans: int = 3,
                          precision: str = "fp32") -> int:
    """Bytes a training forward keeps for backward per image (storage-deduplicated, parameters and
    buffers excluded): the batch-2 count minus the batch-1 count. Works on any model (timm's too)."""
    was_training = model.training
    model.train()
    totals = []
    try:
        with _own_rng(model):
            for batch in (1, 2):
                counter = _SavedTensorCounter(model, [])
                x = _input(model, batch, img_size, in_chans)
                with _autocast(precision, x.device):
                    per_block, outside = counter.count(lambda: model(x))
                totals.append(outside)
    finally:
        model.train(was_training)
    return totals[1] - totals[0]


@dataclass
class BlockProfile:
    """One block's memory and compute, per image unless said otherwise."""

    index: int
    stage: int
    saved: dict[str, int]              # mode -> saved-for-backward bytes per image
    constant: dict[str, int]           # mode -> batch-independent saved bytes (bias + mask)
    attention_flops: int               # forward FLOPs of the attention branch (norm, qkv, attention, proj)
    mlp_flops: int                     # forward FLOPs of the MLP branch
    slice_images: int = 0              # images per slice of "full" recomputation (0: whole batch at once)

    def transient(self, mode: str, batch: int = 1) -> int:
        """Bytes backward materialises at once for this block at `batch` images, besides what the
        blocks before it keep: what it recomputes (its "none" bytes less what it kept) plus gradient
        workspace, per image; for sliced "full" recomputation that is one slice's worth, plus the
        block's output and input gradients for the whole batch."""
        rebuilt = self.saved["none"] - self.saved[mode] + int(BACKWARD_WORKSPACE * self.saved["none"])
        if mode == "full" and self.slice_images:
            return min(batch, self.slice_images) * rebuilt + batch * 2 * self.saved["full"]
        return batch * rebuilt

    def extra_flops(self, mode: str) -> int:
        """Forward FLOPs per image that backward repeats in this mode."""
        return {"none": 0, "selective": self.attention_flops,
                "full": self.attention_flops + self.mlp_flops}[mode]


@dataclass
class Profile:
    """Activation memory of a model at one input size, measured (see `activation_profile`)."""

    img_size: tuple[int, int]
    precision: str
    blocks: list[BlockProfile]
    outside: int                        # saved bytes per image outside blocks (embed, merging, norm, head)
    outside_constant: int
    train_flops: int                    # FLOPs per image of one plain training step (3x forward)

    def activation_bytes(self, modes: list[str]) -> int:
        """Saved bytes per image under this plan."""
        return self.outside + sum(block.saved[mode] for block, mode in zip(self.blocks, modes))

    def constant_bytes(self, modes: list[str]) -> int:
        return self.outside_constant + sum(block.constant[mode] for block, mode in zip(self.blocks, modes))

    def peak_bytes(self, modes: list[str], batch: int = 1) -> int:
        """Peak live activation bytes of one training step at `batch` images under this plan.

        Backward frees each block's saved tensors once it has run, so when block i runs backward
        only blocks 0..i still hold theirs: the peak is the larger of everything saved (end of
        forward) and, over blocks, what blocks 0..i keep plus block i's transient bytes."""
        peak = batch * self.activation_bytes(modes)
        held = self.outside
        for block, mode in zip(self.blocks, modes):
            held += block.saved[mode]
            peak = max(peak, batch * held + block.transient(mode, batch))
        return peak

    def extra_flops(self, modes: list[str]) -> int:
        return sum(block.extra_flops(mode) for block, mode in zip(self.blocks, modes))


def _block_flops(model, img_size) -> list[tuple[int, int]]:
    """(attention-branch, MLP-branch) forward FLOPs per image for every block (`models.swin.macs`)."""
    return [(2 * attention, 2 * mlp) for attention, mlp in macs(model.config, img_size)["blocks"]]


def _slice_images(model, img_size) -> list[int]:
    """Images per slice of each block's "full" recomputation (0 where dropout makes it recompute the
    whole batch at once, see `train/lean/recompute.py`)."""
    result = []
    for stage, (height, width), dim in zip(model.layers, model.config.stage_resolutions(img_size),
                                           model.config.stage_dims()):
        for block in stage.blocks:
            result.append(0 if block.has_dropout() else slice_images(height * width, dim))
    return result


def activation_profile(model, img_size: int | tuple[int, int] | None = None, in_chans: int | None = None,
                       precision: str = "fp32") -> Profile:
    """Measure saved-for-backward bytes per image of every block in every recompute mode.

    Six training-mode forward passes (batch 1 and 2, three modes), no backward, under the lean
    training policy (`train.lean`, installed for the duration if the model does not have it); the
    model's own plan, train/eval state and the global random streams are left as they were.
    """
    config = model.config
    img_size = config.img_size if img_size is None else img_size
    img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    in_chans = config.in_chans if in_chans is None else in_chans
    blocks = model.blocks()
    installed, previous_plan, was_training = lean.is_installed(model), lean.plan_of(model), model.training
    counts: dict[tuple[str, int], tuple[list[int], int]] = {}
    model.train()
    try:
        with _own_rng(model):
            for mode in MODES:
                lean.install(model, mode)
                for batch in (1, 2):
                    x = _input(model, batch, img_size, in_chans)
                    with _autocast(precision, x.device):
                        counts[mode, batch] = _SavedTensorCounter(model, blocks).count(lambda: model(x))
    finally:
        if installed:
            lean.set_plan(model, previous_plan)
        else:
            lean.uninstall(model)
        model.train(was_training)

    flops = _block_flops(model, img_size)
    stage_of = [i for i, stage in enumerate(model.layers) for _ in stage.blocks]
    slices = _slice_images(model, img_size)
    profiles = []
    for index in range(len(blocks)):
        saved, constant = {}, {}
        for mode in MODES:
            one, two = counts[mode, 1][0][index], counts[mode, 2][0][index]
            saved[mode], constant[mode] = two - one, max(2 * one - two, 0)
        profiles.append(BlockProfile(index, stage_of[index], saved, constant, *flops[index], slices[index]))
    outside_one, outside_two = counts["none", 1][1], counts["none", 2][1]
    return Profile(img_size=img_size, precision=precision, blocks=profiles, outside=outside_two - outside_one,
                   outside_constant=max(2 * outside_one - outside_two, 0),
                   train_flops=flops_per_image(model, img_size, training=True))


# ------------------------------------------------------------------------------------ planning
_OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1, "lamb": 2, "none": 0}


def fixed_bytes(model: nn.Module, optimizer: str = "adamw", ema: bool = False,
                baseline_bytes: int | None = None) -> int:
    """Memory that does not grow with the batch: process baseline + gradients + optimizer state
    (+ an EMA copy) + the first step's one-off buffers (`STEP_OVERHEAD`). The optimizer step's own
    temporaries are not added: activations are freed by then, so they never set the peak.

    The baseline is measured in the calling process: its resident set now (CPU) or the CUDA
    allocator's current bytes, so call this after importing torch and building the model, before
    training. It already holds the parameters. Pass `baseline_bytes` to use another figure.
    """
    if optimizer not in _OPTIMIZER_STATES:
        raise ValueError(f"optimizer {optimizer!r} is not one of {sorted(_OPTIMIZER_STATES)}")
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if baseline_bytes is None:
        device = _model_device(model)
        baseline_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else process_rss()
    states = _OPTIMIZER_STATES[optimizer] * trainable
    return int(baseline_bytes + trainable + states + STEP_OVERHEAD + (params if ema else 0))


@dataclass
class Plan:
    modes: list[str]
    expected_peak_bytes: int
    summary: str
    batch_size: int = 0
    budget_bytes: int = 0
    extra_flops_fraction: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    return_freed_memory: bool = True   # `budget_binds`: train inside `allocator.returning_freed_memory`


def expected_peak(profile: Profile, fixed: int, batch_size: int, modes: list[str],
                  slack: float = ALLOCATOR_SLACK) -> int:
    """Estimated peak bytes of training `batch_size` images per step with this plan; `slack` is the
    resident/live ratio of activation memory (`ALLOCATOR_SLACK` with freed memory returned to the OS,
    `GLIBC_SLACK` with glibc keeping it)."""
    activations = profile.constant_bytes(modes) + profile.peak_bytes(modes, batch_size)
    return int(fixed + slack * activations)


def budget_binds(profile: Profile, fixed: int, batch_size: int, modes: list[str], budget: int) -> bool:
    """THE rule for the allocator under a memory budget: freed memory goes back to the OS (which costs
    page faults and zeroing on every large allocation) only when this plan's expected peak with glibc
    keeping freed memory does not fit the budget."""
    return expected_peak(profile, fixed, batch_size, modes, GLIBC_SLACK) > budget


def _moves(block: BlockProfile, mode: str):
    """(new mode, bytes saved per image, extra FLOPs per image) for the upgrades open to a block."""
    targets = {"none": ("selective", "full"), "selective": ("full",), "full": ()}[mode]
    for target in targets:
        saved = block.saved[mode] - block.saved[target]
        cost = block.extra_flops(target) - block.extra_flops(mode)
        if saved > 0:
            yield target, saved, max(cost, 1)


def plan_for_budget(model, batch_size: int, budget_bytes: int | str, img_size=None, *, in_chans: int | None = None,
                    precision: str = "fp32", optimizer: str = "adamw", ema: bool = False,
                    profile: Profile | None = None, fixed: int | None = None) -> Plan:
    """The cheapest recomputation (in extra FLOPs) under which training `batch_size` images per step
    is expected to stay within `budget_bytes`. Raises ValueError (naming the batch that would fit)
    when even recomputing every block does not fit. Does not change the model."""
    budget = parse_size(budget_bytes)
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    # The baseline first: profiling's forward passes leave freed pages in the resident set.
    fixed = fixed_bytes(model, optimizer, ema) if fixed is None else fixed
    profile = profile or activation_profile(model, img_size, in_chans, precision)
    blocks = profile.blocks
    modes = ["none"] * len(blocks)

    def fits(plan):
        return expected_peak(profile, fixed, batch_size, plan) <= budget

    while not fits(modes):
        candidates = [(saved / cost, index, target) for index, block in enumerate(blocks)
                      for target, saved, cost in _moves(block, modes[index])]
        if not candidates:
            break
        _, index, target = max(candidates)
        modes[index] = target
    if not fits(modes):
        raise ValueError(_no_fit_message(profile, fixed, batch_size, budget))
    # Greedy moves can overshoot: give back recomputation, costliest first, while the plan still fits.
    for index in sorted(range(len(blocks)), key=lambda i: -blocks[i].extra_flops(modes[i])):
        for cheaper in MODES[:MODES.index(modes[index])]:
            trial = modes[:index] + [cheaper] + modes[index + 1:]
            if fits(trial):
                modes = trial
                break
    peak = expected_peak(profile, fixed, batch_size, modes)
    extra = profile.extra_flops(modes) / profile.train_flops
    counts = {mode: modes.count(mode) for mode in MODES}
    if counts["none"] == len(modes):
        choice = "no recomputation"
    else:
        choice = ", ".join(f"{mode} on {counts[mode]} block{'s' * (counts[mode] != 1)}"
                           for mode in ("selective", "full") if counts[mode])
        choice += f" of {len(modes)} (+{100 * extra:.0f}% FLOPs)"
    binds = budget_binds(profile, fixed, batch_size, modes, budget)
    cached = expected_peak(profile, fixed, batch_size, modes, GLIBC_SLACK)
    summary = (f"memory budget {format_size(budget)}: {choice}; expected peak {format_size(peak)} "
               f"at batch {batch_size}; "
               + (f"freed memory is returned to the OS (with glibc keeping it, about {format_size(cached)}: "
                  "over the budget)" if binds else
                  f"the allocator is left alone (with glibc keeping freed memory about {format_size(cached)}: "
                  "within the budget)"))
    return Plan(modes=modes, expected_peak_bytes=peak, summary=summary, batch_size=batch_size,
                budget_bytes=budget, extra_flops_fraction=extra, counts=counts, return_freed_memory=binds)


def max_batch_for_budget(profile: Profile, fixed: int, budget: int, modes: list[str]) -> int:
    """Largest batch the estimate fits within `budget` under a fixed plan (0 if none)."""
    per_image = ALLOCATOR_SLACK * max(profile.peak_bytes(modes, 2) - profile.peak_bytes(modes, 1), 1)
    room = budget - fixed - ALLOCATOR_SLACK * profile.constant_bytes(modes)
    batch = max(int(room // per_image), 0)
    while expected_peak(profile, fixed, batch + 1, modes) <= budget:  # settle the rounding
        batch += 1
    while batch > 0 and expected_peak(profile, fixed, batch, modes) > budget:
        batch -= 1
    return batch


def _no_fit_message(profile: Profile, fixed: int, batch_size: int, budget: int) -> str:
    everything = ["full"] * len(profile.blocks)
    fitting = max_batch_for_budget(profile, fixed, budget, everything)
    need = expected_peak(profile, fixed, batch_size, everything)
    if fitting == 0:
        return (f"memory budget {format_size(budget)} is too small for any batch: the model, gradients and "
                f"optimizer state alone take about {format_size(fixed)}")
    return (f"batch {batch_size} does not fit in memory budget {format_size(budget)} even recomputing every "
            f"block (expected peak {format_size(need)}); batch {fitting} would fit")


def apply_memory_budget(model, batch_size: int, budget: int | str, *, img_size=None, in_chans: int | None = None,
                        precision: str = "fp32", optimizer: str = "adamw", ema: bool = False, log=None) -> Plan:
    """`--memory-budget` for a trainer: plan for `batch_size` images per process and step (the
    micro-batch under gradient accumulation) and install it with `train.lean.install`.

    Call it after building the model and moving it to its device, before creating the optimizer
    (the plan counts the optimizer state the trainer is about to allocate) and before DDP/compile
    wrapping. The estimate was tuned with freed memory returned to the OS: on CPU, train inside
    `allocator.returning_freed_memory()` where `plan.return_freed_memory` (the budget binds;
    the logged summary says which). Raises ValueError (with the batch that would fit) when nothing fits."""
    plan = plan_for_budget(model, batch_size, budget, img_size, in_chans=in_chans, precision=precision,
                           optimizer=optimizer, ema=ema)
    lean.install(model, plan.modes)
    if log is not None:
        log(plan.summary)
    return plan
