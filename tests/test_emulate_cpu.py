"""scripts/emulate_cpu.sh: a command sees an AVX2-only CPU (CPUID and /proc/cpuinfo), and nothing else changes."""
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "emulate_cpu.sh"


def _flags() -> set[str]:
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.machine() != "x86_64" or not {"cpuid_fault", "avx2"} <= _flags()
    or shutil.which("cc") is None, reason="needs Linux x86-64 with AVX2, CPUID faulting and a C compiler")

# Prints CPUID leaf 7 (subleaf 0: EBX ECX EDX, subleaf 1: EAX EDX) from the main thread and from a thread it
# starts, then what GCC's own CPU detection says about AVX-512F.
PROBE = r"""
#include <cpuid.h>
#include <pthread.h>
#include <stdio.h>
static void show(const char *who) {
    unsigned a, b, c, d, a1, b1, c1, d1;
    __cpuid_count(7, 0, a, b, c, d);
    __cpuid_count(7, 1, a1, b1, c1, d1);
    printf("%s %u %u %u %u %u\n", who, b, c, d, a1, d1);
}
static void *thread(void *unused) { (void)unused; show("thread"); return 0; }
int main(void) {
    pthread_t t;
    show("main");
    pthread_create(&t, 0, thread, 0);
    pthread_join(t, 0);
    __builtin_cpu_init();
    printf("gcc_avx512f %d\n", __builtin_cpu_supports("avx512f") != 0);
    return 0;
}
"""
# bits the script must clear (leaf 7.0 EBX/ECX/EDX, leaf 7.1 EAX/EDX): AVX-512 (F DQ IFMA PF ER CD BW VL,
# VBMI VBMI2 VNNI BITALG VPOPCNTDQ, 4VNNIW 4FMAPS VP2INTERSECT FP16), AMX, AVX-VNNI, AVX512-BF16, AVX10
MASKED = (0xDC230000, 0x00005842, 0x03C0010C, 0x00A00030, 0x00080430)


def _run(*command, emulate=True):
    prefix = ["bash", str(SCRIPT), "avx2"] if emulate else []
    return subprocess.run(prefix + [str(c) for c in command], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cpuid")
    (folder / "probe.c").write_text(PROBE)
    subprocess.run(["cc", "-O1", "-pthread", "-o", str(folder / "probe"), str(folder / "probe.c")], check=True)
    return folder / "probe"


def _leaves(output: str) -> dict[str, tuple[int, ...]]:
    rows = (line.split() for line in output.splitlines())
    return {row[0]: tuple(int(v) for v in row[1:]) for row in rows}


def test_cpuid_reports_the_avx2_cpu_in_every_thread_and_changes_nothing_else(probe):
    real, emulated = _run(probe, emulate=False), _run(probe)
    assert emulated.returncode == 0, emulated.stderr
    real_leaves, seen = _leaves(real.stdout), _leaves(emulated.stdout)
    assert seen["thread"] == seen["main"]
    for register, (before, after, masked) in enumerate(zip(real_leaves["main"], seen["main"], MASKED)):
        assert after == before & ~masked, f"register {register}: {before:#x} -> {after:#x}"
    assert seen["main"][0] & (1 << 16) == 0 and seen["main"][0] & (1 << 5)  # no AVX512F; AVX2 kept
    assert seen["gcc_avx512f"] == (0,)


def test_proc_cpuinfo_and_the_libraries_see_no_avx512():
    code = ("import torch, pathlib; from swinkit.precision import cpu_flags; "
            "text = pathlib.Path('/proc/cpuinfo').read_text(); "
            "print(torch.backends.cpu.get_cpu_capability(), 'avx512' in text, 'avx2' in cpu_flags(), "
            "bool(cpu_flags() & {'avx512_vnni', 'avx_vnni', 'avx512_bf16', 'amx_tile'}))")
    result = _run(sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["AVX2", "False", "True", "False"]


def test_other_segfaults_still_reach_python_faulthandler():
    """The library keeps its SIGSEGV handler and passes every other fault to the one installed after it."""
    code = "import faulthandler, ctypes; faulthandler.enable(); ctypes.string_at(0)"
    result = _run(sys.executable, "-c", code)
    assert result.returncode == -11 and "Fatal Python error: Segmentation fault" in result.stderr


SIGNAL_PROBE = r"""
#include <cpuid.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>
static void crashed(int sig) { (void)sig; static const char m[] = "own handler\n"; write(1, m, sizeof m - 1); _exit(3); }
int main(void) {
    unsigned a, b, c, d;
    signal(SIGSEGV, crashed);  /* as GCC's cc1plus does, which then runs CPUID inside GMP */
    __cpuid_count(7, 0, a, b, c, d);
    printf("cpuid ok %u\n", (b >> 16) & 1);
    fflush(stdout);
    *(volatile int *)0 = 1;
    return 0;
}
"""


def test_a_handler_installed_with_signal_gets_other_faults_and_cpuid_still_works(tmp_path):
    (tmp_path / "probe.c").write_text(SIGNAL_PROBE)
    subprocess.run(["cc", "-O1", "-o", str(tmp_path / "probe"), str(tmp_path / "probe.c")], check=True)
    result = _run(tmp_path / "probe")
    assert result.returncode == 3 and result.stdout == "cpuid ok 0\nown handler\n", result


def test_bad_arguments_get_one_clear_error():
    for args, message in ((["avx3", "true"], "unknown CPU kind 'avx3'"), (["avx2"], "usage:")):
        result = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and message in result.stderr
