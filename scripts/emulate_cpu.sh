#!/usr/bin/env bash
# Runs a command as on an AVX2-only x86 CPU (Haswell .. AMD Zen 3: no AVX-512, no VNNI, no AVX512-BF16, no
# AMX), for benchmarks of those code paths on a newer CPU:
#
#   bash scripts/emulate_cpu.sh avx2 swinkit bench infer --swinkit optimized,onnxruntime,int8 ...
#
# Every CPUID of the command (and of its child processes) reports the AVX2-only CPU and /proc/cpuinfo lists
# its flags (scripts/cpuid_mask.c, an LD_PRELOAD library built here once into the swinkit cache), so
# every library picks its AVX2 code by itself: oneDNN, MKL, ATen, ONNX Runtime (which has no switch of its
# own), GCC's -march=native for swinkit's kernel. Needs Linux on x86-64 with CPUID faulting (the
# `cpuid_fault` flag) and a C compiler. The cores stay what they are: caches, clocks and the number of
# vector units are the real CPU's, so this measures the instruction sets, not an older machine.
set -euo pipefail

usage() { echo "usage: bash scripts/emulate_cpu.sh avx2 COMMAND [ARGS...]" >&2; exit 2; }
[ $# -ge 2 ] || usage
kind="$1"; shift
[ "$kind" = avx2 ] || { echo "emulate_cpu.sh: unknown CPU kind '$kind' (known: avx2)" >&2; exit 2; }
[ "$(uname -s)/$(uname -m)" = Linux/x86_64 ] || { echo "emulate_cpu.sh: needs Linux on x86-64" >&2; exit 2; }
grep -qw cpuid_fault /proc/cpuinfo || {
    echo "emulate_cpu.sh: this CPU or VM has no CPUID faulting (no cpuid_fault flag in /proc/cpuinfo)" >&2; exit 2; }

here="$(cd "$(dirname "$0")" && pwd)"
cache="${SWINKIT_CACHE_DIR:-$HOME/.cache/swinkit}"
lib="$cache/cpuid-mask-$(sha256sum "$here/cpuid_mask.c" | cut -c1-16).so"
if [ ! -f "$lib" ]; then
    mkdir -p "$cache"
    "${CC:-cc}" -O2 -shared -fPIC -o "$lib.$$" "$here/cpuid_mask.c" -ldl
    mv "$lib.$$" "$lib"
fi

export LD_PRELOAD="$lib${LD_PRELOAD:+:$LD_PRELOAD}"
# glibc picked its string functions before any library ran; this has it pick the AVX2 ones
export GLIBC_TUNABLES="glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD${GLIBC_TUNABLES:+:$GLIBC_TUNABLES}"
export SWINKIT_EMULATED_CPU="$kind"  # stated in the benchmarks' headers
exec "$@"
