"""Denormals flushed to zero on every CPU thread torch computes on (`precision.flush_denormals`), and the
places that turn it on: the optimized inference path, the trainer, the benchmarks' per-engine modes."""
from __future__ import annotations

import pytest
import torch

import swinkit
from swinkit import precision

DENORMAL = 1e-39  # below float32's smallest normal (1.18e-38)


@pytest.fixture
def restore_mode():
    threads = torch.get_num_threads()
    before = precision._denormals_flushed
    yield
    precision.flush_denormals(bool(before))
    precision._denormals_flushed = before
    torch.set_num_threads(threads)


def survivors(threads: int) -> int:
    """How many of 4M denormal inputs a parallel multiply keeps nonzero (each thread takes a slice)."""
    torch.set_num_threads(threads)
    x = torch.full((1 << 22,), DENORMAL)
    return int(torch.count_nonzero(x * 1.0))


@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="CPU without DAZ")
def test_flush_reaches_every_thread_of_the_pool(restore_mode):
    precision.flush_denormals(False)
    assert survivors(2) == 1 << 22  # default mode: denormals are computed
    everywhere = precision.flush_denormals(True)
    assert precision.denormals_flushed()
    if not everywhere:
        pytest.skip("no OpenMP runtime found: only the calling thread is set")
    assert survivors(2) == 0  # both threads' slices: DAZ on the pool's worker too
    precision.flush_denormals(False)
    assert survivors(2) == 1 << 22 and not precision.denormals_flushed()


def test_ensure_turns_it_on_once_and_respects_an_explicit_off(restore_mode, monkeypatch):
    calls = []
    monkeypatch.setattr(precision, "_denormals_flushed", None)
    real = precision.flush_denormals
    monkeypatch.setattr(precision, "flush_denormals", lambda enable=True: calls.append(enable) or real(enable))
    precision.ensure_denormals_flushed()
    precision.ensure_denormals_flushed()
    assert calls == [True]
    real(False)
    precision.ensure_denormals_flushed()
    assert calls == [True]  # the caller's choice stands


def test_optimized_path_flushes_and_agrees_with_the_model(restore_mode, monkeypatch):
    """The shifted blocks' masked softmax weights (~1e-44) become 0: logits agree far inside 1e-5."""
    monkeypatch.setattr(precision, "_denormals_flushed", None)
    precision.flush_denormals(False)
    monkeypatch.setattr(precision, "_denormals_flushed", None)
    torch.manual_seed(0)
    model = swinkit.create_model("swin_nano_patch2_window4_32").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference = model(images)
        fast = swinkit.optimize_for_inference(model)(images)
    assert precision.denormals_flushed()
    assert torch.allclose(fast, reference, atol=1e-5, rtol=1e-5)


def test_bench_engines_run_in_their_own_mode():
    from swinkit.bench.infer import denormal_mode
    assert denormal_mode("swinkit optimized") == denormal_mode("swinkit int8") == "flush"
    assert denormal_mode("swinkit eager") == denormal_mode("timm jit.trace") == denormal_mode("hf") == "default"
    assert denormal_mode("timm jit.trace ftz") == "flush"
