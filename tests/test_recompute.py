"""Sliced block recomputation (train/lean/recompute.py): the same loss and gradients as storing
everything, slice by slice, under drop path and autocast; a recomputed block keeps only its input;
the allocator policy around the slice loops hands memory back."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from swinkit.models import SwinConfig, SwinTransformer
from swinkit.train import lean
from swinkit.train.lean import recompute
from swinkit.train import memory

CONFIG = SwinConfig(img_size=64, window_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                    num_classes=7, drop_path_rate=0.3)


def perturbed(version: int, dtype=torch.float32) -> SwinTransformer:
    torch.manual_seed(0)
    model = SwinTransformer(CONFIG.replace(version=version)).to(dtype).train()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model


def loss_and_grads(model, x, autocast=False):
    torch.manual_seed(7)  # the same drop-path draws in every run
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(x).float().logsumexp(-1).mean()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("version", [1, 2])
def test_sliced_recompute_equals_plain_fp32(version, monkeypatch):
    """One image per slice (the first stage's 16x16x16 input is 4096 elements), odd batch, padded size."""
    monkeypatch.setattr(recompute, "SLICE_ELEMENTS", 16 * 16 * 16)
    model = perturbed(version)
    x = torch.randn(3, 3, 64, 70)
    loss_plain, grads_plain = loss_and_grads(model, x)
    lean.install(model, "full")
    loss_full, grads_full = loss_and_grads(model, x)
    assert torch.equal(loss_plain, loss_full)
    for name, grad in grads_plain.items():
        assert grads_full[name] is not None, name
        assert torch.allclose(grads_full[name], grad, rtol=0, atol=1e-6), name


def test_sliced_recompute_equals_plain_float64(monkeypatch):
    monkeypatch.setattr(recompute, "SLICE_ELEMENTS", 2 * 16 * 16 * 16)  # two images per slice
    model = perturbed(1, torch.float64)
    x = torch.randn(5, 3, 64, 64, dtype=torch.float64)
    _, grads_plain = loss_and_grads(model, x)
    lean.install(model, "full")
    _, grads_full = loss_and_grads(model, x)
    for name, grad in grads_plain.items():
        assert torch.allclose(grads_full[name], grad, rtol=1e-12, atol=1e-14), name


@pytest.mark.parametrize("version", [1, 2])
def test_sliced_recompute_restores_autocast(version, monkeypatch):
    """Backward runs outside autocast: the recomputation must re-enter the forward's bf16 autocast."""
    monkeypatch.setattr(recompute, "SLICE_ELEMENTS", 16 * 16 * 16)
    model = perturbed(version)
    x = torch.randn(2, 3, 64, 64)
    lean.install(model, "none")  # the same kernels, storing everything
    _, grads_plain = loss_and_grads(model, x, autocast=True)
    lean.set_plan(model, "full")
    states = []
    for block in model.blocks():
        original = block.forward_stored

        def spy(*args, original=original):
            if torch.is_grad_enabled():  # the recomputation in backward (forward runs without grad)
                states.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                               recompute.recomputing()))
            return original(*args)
        monkeypatch.setattr(block, "forward_stored", spy)
    _, grads_full = loss_and_grads(model, x, autocast=True)
    assert len(states) == 2 * 2 + 6  # first stage: two one-image slices per block; later stages: one
    assert set(states) == {(True, torch.bfloat16, True)}  # (and the kernels' shortcuts are on)
    assert not recompute.recomputing()
    for key, grad in grads_plain.items():  # bf16 rounding apart, the same gradients
        assert grads_full[key].dtype == torch.float32
        assert torch.allclose(grads_full[key], grad, rtol=0.05, atol=0.05 * grad.abs().max().item() + 1e-6), key


def test_a_recomputed_block_keeps_only_its_input():
    model = perturbed(1)
    profile = memory.activation_profile(model)
    resolutions = model.config.stage_resolutions((64, 64))
    dims = model.config.stage_dims()
    for block, module in zip(profile.blocks, model.blocks()):
        (height, width), dim = resolutions[block.stage], dims[block.stage]
        input_bytes = height * width * dim * 4
        drop_path_masks = 2 * 4 if module.drop_path1.rate > 0 else 0  # one fp32 per image and branch
        assert block.saved["full"] == input_bytes + drop_path_masks, block
        assert block.slice_images == recompute.slice_images(height * width, dim)


def test_dropout_falls_back_to_whole_batch_checkpointing():
    torch.manual_seed(0)
    model = SwinTransformer(CONFIG.replace(drop_rate=0.1)).train()
    lean.install(model, "full")
    x = torch.randn(2, 3, 64, 64)
    torch.manual_seed(3)
    model(x).sum().backward()  # torch.utils.checkpoint replays the dropout masks
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert all(b.slice_images == 0 for b in memory.activation_profile(model).blocks)


def test_slice_loops_hand_freed_memory_back():
    """Under returning_freed_memory, memory freed inside reuse_freed_memory() goes back on leaving it."""
    code = textwrap.dedent("""
        import torch
        from swinkit import allocator
        from swinkit.sysinfo import process_rss
        assert allocator._glibc() is not None
        with allocator.returning_freed_memory():
            assert allocator.free_memory_returned()
            before = process_rss()
            with allocator.reuse_freed_memory():
                for _ in range(4):
                    chunk = torch.ones(8 << 20)  # 32 MB: below the loop's threshold, served from the heap
                    del chunk
                inside = process_rss()
            after = process_rss()
        assert not allocator.free_memory_returned()
        print(inside - before > 24 << 20, after - before < 8 << 20)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    if done.returncode and "AssertionError" in done.stderr:
        pytest.skip("not glibc")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"]
