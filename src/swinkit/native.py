"""swinkit's own CPU kernels (`csrc/`), compiled for this machine on first use.

Window attention so far, for windows of up to 64 tokens (7x7, 8x8), fp32 or bf16 in and out,
`torch.ops.swinkit.window_attention(q, k, v, bias)`. It keeps the scores of four query rows in
registers from q k^T through the softmax to p v, one (image, window, head) at a time, reading q, k
and v where they lie (strided slices of the qkv projection) and writing token-major output. Swin-T
at batch 8 on a 2-core AVX-512 Xeon: stage 1's attention 6 ms against 10-12 ms for
`scaled_dot_product_attention` (`models.attention.window_attention(fused=True)` uses it where it
applies, SDPA elsewhere). Its gradient, `torch.ops.swinkit.window_attention_backward(q, k, v, bias,
grad_out, q_scale)`, serves the lean training policy's attention (`train.lean.kernels`): the
probabilities rebuilt per window and head, the gradients of q, k and v written token-major, the bias's
summed per thread (Swin-T fp32 training step at batch 16: 3.25 s against 3.76 s with batched matmuls).
And `torch.ops.swinkit.byte_lookup(x, table)` (`csrc/byte_lookup.cpp`): `table[x]` over uint8 values, the
INT8 path's GELU between the MLP's linears where oneDNN's fused one is slow (`infer.int8`).

The source is compiled with the host compiler (`c++`, or `$CXX`) through
`torch.utils.cpp_extension` (ninja from the `ninja` wheel) with `-O3 -march=native -fopenmp`,
into `<cache>/native-<key>/`, where `<cache>` is `$SWINKIT_CACHE_DIR` or `~/.cache/swinkit` and the
key hashes the source, the torch version and the CPU model and flags: a different CPU builds its
own copy (an `-march=native` binary may not run elsewhere). The first build takes ~15-20 s; later
processes load it in well under a second. Where it cannot be built (no compiler, no ninja, another
platform) `kernels_available()` says False once with a warning that names the reason, and every
caller keeps PyTorch's own path. `SWINKIT_NATIVE=0` turns the kernels off; `SWINKIT_NATIVE_MARCH`
builds them for another target (e.g. `x86-64-v3`, AVX2 without AVX-512: 8-lane vectors, two query rows
per register block and AVX2 masked loads instead of the AVX-512 paths; tested to agree on this machine).
Built so on this Xeon, Swin-T's four stages at batch 8 (one block each, PyTorch's ops limited to AVX2 by
`ATEN_CPU_CAPABILITY=avx2`): 23.7 ms against 52.9 ms for `scaled_dot_product_attention` in one run,
22.7 vs 64.3 in another; the AVX2 build before, 16-lane vectors split in two, took 120 ms (GCC turned
their compares and selects into scalar code), and the AVX-512 build takes 12.6-13.4 ms.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from .files import cache_folder
from .precision import cpu_info

log = logging.getLogger("swinkit")

SOURCES = tuple(Path(__file__).parent / "csrc" / name for name in ("window_attention.cpp", "byte_lookup.cpp"))
ENV = "SWINKIT_NATIVE"
MARCH_ENV = "SWINKIT_NATIVE_MARCH"  # the -march the kernels are built for (default: native)
FLAGS = ("-O3", f"-march={os.environ.get(MARCH_ENV) or 'native'}", "-fopenmp")
MAX_WINDOW_TOKENS = 64  # the kernel's limits (N and head_dim)
MAX_HEAD_DIM = 64
DTYPES = (torch.float32, torch.bfloat16)  # of q, k, v and the output; the arithmetic is fp32 throughout


def build_key() -> str:
    """Hash of the sources, compiler flags, torch version and CPU (model and flags)."""
    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.read_bytes())
    name, flags = cpu_info()
    digest.update(json.dumps([FLAGS, torch.__version__, name, sorted(flags)]).encode())
    return digest.hexdigest()[:16]


def enabled() -> bool:
    """False when `SWINKIT_NATIVE` is 0/false/off/no."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


_status: str | None = None  # "loaded", or why the kernels are not available; None: not tried yet


def kernels_available() -> bool:
    """Whether swinkit's kernels are loaded in this process (building them on the first call)."""
    global _status
    if not enabled():
        return False
    if _status is None:
        _status = _load()
    return _status == "loaded"


def _load() -> str:
    """Build (once per machine) and load the kernels: "loaded", else why not (warned)."""
    try:
        if os.name != "posix":
            raise RuntimeError(f"kernels are built on Linux/macOS only, not {os.name}")
        if shutil.which("ninja") is None:  # the `ninja` wheel puts its binary next to its module
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        quiet = logging.getLogger("torch.utils.cpp_extension")
        level = quiet.level
        quiet.setLevel(logging.ERROR)  # its import warns about a missing CUDA runtime on CPU-only machines
        try:
            from torch.utils import cpp_extension
        finally:
            quiet.setLevel(level)
        key = build_key()
        name, folder = f"swinkit_native_{key}", cache_folder() / f"native-{key}"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / f"{name}.so").exists():
            log.info("swinkit: compiling its CPU kernels for this machine (once, ~20 s) in %s", folder)
        cpp_extension.load(name=name, sources=[str(s) for s in SOURCES],
                           extra_cflags=list(FLAGS), extra_ldflags=["-fopenmp"], build_directory=str(folder),
                           is_python_module=False, verbose=False)
        torch.library.register_fake("swinkit::window_attention")(_window_attention_shape)
        torch.library.register_fake("swinkit::byte_lookup")(lambda x, table: torch.empty_like(x))
        return "loaded"
    except Exception as error:  # no compiler, no ninja, a build error: PyTorch's own ops still work
        reason = f"{type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
        warnings.warn(f"swinkit: its CPU kernels could not be built ({reason}); using PyTorch's ops instead "
                      f"(set {ENV}=0 to skip the attempt)", RuntimeWarning, stacklevel=3)
        return reason


def _window_attention_shape(q, k, v, bias):
    """The op's output without computing it (meta/fake tensors: torch.compile, export tools)."""
    batch, windows, heads, tokens, head_dim = q.shape
    return q.new_empty(batch, windows, tokens, heads, head_dim).permute(0, 1, 3, 2, 4)


def window_attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor) -> bool:
    """Whether `window_attention` takes these inputs (`[B, W, H, N, D]` q, k, v): float32 or bfloat16 on the
    CPU, N and D up to 64, no autograd through any of them (the kernel has no backward: a learned bias
    would silently get no gradient); the kernels enabled and built."""
    tensors = (q, k, v, attn_bias)
    return (all(t.device.type == "cpu" for t in tensors) and q.dtype in DTYPES
            and q.shape[-2] <= MAX_WINDOW_TOKENS and q.shape[-1] <= MAX_HEAD_DIM
            and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors)) and kernels_available())


def window_attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor,
                              grad_out: torch.Tensor, q_scale: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The gradients of `window_attention(q, k, v, attn_bias)` for `grad_out` (`[B, W, H, N, D]`, q's dtype),
    the probabilities recomputed per window and head in fp32: (grad q times `q_scale` per head `[H]`, grad k,
    grad v: `[B, W, H, N, D]` views of token-major memory, so `merge_heads` is a view; grad attn_bias: fp32 of
    attn_bias's shape, summed over the images). The lean training policy's attention backward, where
    `window_attention_applies`."""
    return tuple(torch.ops.swinkit.window_attention_backward(q, k, v, attn_bias, grad_out, q_scale))


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T + attn_bias) v per window and head: q, k, v `[B, W, H, N, D]` of one dtype in `DTYPES`
    (D contiguous, other strides free), attn_bias `[W or 1, H, N, N]` (cast to q's dtype); scores and
    probabilities in fp32, a bf16 output rounded once. Returns `[B, W, H, N, D]`, a view of token-major
    memory `[B, W, N, H, D]`. Only where `window_attention_applies`."""
    return torch.ops.swinkit.window_attention(q, k, v, attn_bias)


def byte_lookup(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """`table[x]` for a uint8 CPU tensor `x` (any shape) and 256 uint8 `table` entries, in one pass (AVX2
    gathers where the kernels were built for AVX2): a function of uint8-quantized values into uint8
    again. Only where `kernels_available()`."""
    return torch.ops.swinkit.byte_lookup(x, table)
