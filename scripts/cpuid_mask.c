/* A CPU with fewer instruction sets than this one, for benchmarks: an LD_PRELOAD library (x86-64 Linux)
 * that makes every CPUID instruction of the process report an AVX2-only CPU (no AVX-512, no VNNI of
 * either encoding, no AVX512-BF16/FP16, no AMX) and /proc/cpuinfo list the same flags. Every library then
 * picks its AVX2 code itself: oneDNN, MKL, ATen (pytorch/cpuinfo), ONNX Runtime's MLAS, GCC's
 * -march=native. ONNX Runtime has no switch of its own; the ONEDNN_MAX_CPU_ISA-style variables limit
 * the others only.
 *
 * How: Linux's CPUID faulting (arch_prctl(ARCH_SET_CPUID, 0), CPUs with the `cpuid_fault` flag: Intel
 * since Ivy Bridge, and KVM guests) makes CPUID raise SIGSEGV in this thread and the threads it starts; the
 * handler runs the real CPUID with faulting briefly off, clears the masked bits and steps over the
 * instruction. SIGSEGV handlers installed later (Python's faulthandler, say) are kept aside and called for
 * every other fault (those installed through sigaction() or signal(); a raw rt_sigaction system call would
 * replace it). Faulting is reset by execve; child processes load this library again from
 * LD_PRELOAD. glibc chose its own string functions before any library runs: GLIBC_TUNABLES covers those.
 *
 * Build: gcc -O2 -shared -fPIC -o libcpuid_mask.so cpuid_mask.c -ldl   (scripts/emulate_cpu.sh does it)
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

/* CPUID bits of the instruction sets an AVX2-only CPU (Haswell .. Zen 3) lacks. */
static const unsigned LEAF7_EBX = BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31);
/* AVX512F DQ IFMA PF ER CD BW VL */
static const unsigned LEAF7_ECX = BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14);
/* AVX512_VBMI VBMI2 VNNI BITALG VPOPCNTDQ */
static const unsigned LEAF7_EDX = BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25);
/* AVX512_4VNNIW 4FMAPS VP2INTERSECT AMX_BF16 AVX512_FP16 AMX_TILE AMX_INT8 */
static const unsigned LEAF7_1_EAX = BIT(4) | BIT(5) | BIT(21) | BIT(23);
/* AVX_VNNI AVX512_BF16 AMX_FP16 AVX_IFMA */
static const unsigned LEAF7_1_EDX = BIT(4) | BIT(5) | BIT(10) | BIT(19);
/* AVX_VNNI_INT8 AVX_NE_CONVERT AVX_VNNI_INT16 AVX10 */
static const unsigned XSAVE_EAX = BIT(5) | BIT(6) | BIT(7) | BIT(17) | BIT(18);
/* opmask, ZMM_Hi256, Hi16_ZMM, AMX XTILECFG/XTILEDATA state components */

/* /proc/cpuinfo flags with these prefixes are dropped (the same instruction sets). */
static const char *const HIDDEN_FLAGS[] = {"avx512", "amx", "avx_vnni", "avx_ifma", "avx_ne_convert", "avx10", NULL};

static struct sigaction next_segv;  /* a SIGSEGV action installed after ours: every non-CPUID fault goes there */
static int masking;

static int (*real_sigaction)(int, const struct sigaction *, struct sigaction *);

static void mask(unsigned leaf, unsigned subleaf, unsigned *a, unsigned *b, unsigned *c, unsigned *d) {
    if (leaf == 7 && subleaf == 0) {
        *b &= ~LEAF7_EBX;
        *c &= ~LEAF7_ECX;
        *d &= ~LEAF7_EDX;
    } else if (leaf == 7 && subleaf == 1) {
        *a &= ~LEAF7_1_EAX;
        *d &= ~LEAF7_1_EDX;
    } else if (leaf == 0xd && subleaf == 0) {
        *a &= ~XSAVE_EAX;
    } else if (leaf == 0x1d || leaf == 0x1e || leaf == 0x24) { /* AMX tile and AVX10 leaves */
        *a = *b = *c = *d = 0;
    }
}

static void on_segv(int signal, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *regs = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)regs[REG_RIP];
    if (info->si_code == SI_KERNEL && ip[0] == 0x0f && ip[1] == 0xa2) { /* CPUID */
        unsigned leaf = (unsigned)regs[REG_RAX], subleaf = (unsigned)regs[REG_RCX], a, b, c, d;
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
        __cpuid_count(leaf, subleaf, a, b, c, d);
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
        mask(leaf, subleaf, &a, &b, &c, &d);
        regs[REG_RAX] = a;
        regs[REG_RBX] = b;
        regs[REG_RCX] = c;
        regs[REG_RDX] = d;
        regs[REG_RIP] += 2;
        return;
    }
    if (next_segv.sa_flags & SA_SIGINFO) {
        if (next_segv.sa_sigaction != NULL) {
            next_segv.sa_sigaction(signal, info, context);
            return;
        }
    } else if (next_segv.sa_handler != SIG_DFL && next_segv.sa_handler != SIG_IGN) {
        next_segv.sa_handler(signal);
        return;
    }
    /* no handler of its own: the default action, on the faulting instruction run again */
    struct sigaction fallback;
    memset(&fallback, 0, sizeof fallback);
    fallback.sa_handler = SIG_DFL;
    real_sigaction(SIGSEGV, &fallback, NULL);
}

/* Keeps our SIGSEGV handler in place; what others install is called by it. */
int sigaction(int signal, const struct sigaction *action, struct sigaction *old) {
    if (real_sigaction == NULL)
        real_sigaction = dlsym(RTLD_NEXT, "sigaction");
    if (signal != SIGSEGV || !masking)
        return real_sigaction(signal, action, old);
    if (old != NULL)
        *old = next_segv;
    if (action != NULL)
        next_segv = *action;
    return 0;
}

/* glibc's signal() does not go through sigaction's PLT entry (GCC's cc1plus installs its SIGSEGV handler
 * with it, and GMP inside it runs CPUID): the same for it. */
sighandler_t signal(int signal, sighandler_t handler) {
    struct sigaction action, old;
    memset(&action, 0, sizeof action);
    action.sa_handler = handler;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    if (sigaction(signal, &action, &old) != 0)
        return SIG_ERR;
    return old.sa_handler; /* the same storage as sa_sigaction */
}

/* ---- /proc/cpuinfo with the same flags hidden ---- */

static int hidden(const char *word, size_t length) {
    for (const char *const *prefix = HIDDEN_FLAGS; *prefix != NULL; ++prefix) {
        size_t n = strlen(*prefix);
        if (length >= n && strncmp(word, *prefix, n) == 0)
            return 1;
    }
    return 0;
}

/* An in-memory copy of /proc/cpuinfo without the hidden flags, or -1 (the caller opens the real file). */
static int filtered_cpuinfo(int (*open_real)(const char *, int, ...)) {
    int source = open_real("/proc/cpuinfo", O_RDONLY | O_CLOEXEC);
    if (source < 0)
        return -1;
    size_t size = 0, capacity = 1 << 16;
    char *text = malloc(capacity);
    ssize_t got;
    while (text != NULL && (got = read(source, text + size, capacity - size)) > 0) {
        size += (size_t)got;
        if (size == capacity) {
            char *larger = realloc(text, capacity *= 2);
            if (larger == NULL)
                free(text);
            text = larger;
        }
    }
    close(source);
    if (text == NULL)
        return -1;
    /* filtered in place: dropping words only ever moves text towards the front */
    size_t kept = 0;
    int in_flags = 0;
    for (size_t i = 0; i < size;) {
        if (i == 0 || text[i - 1] == '\n')
            in_flags = i + 5 <= size && strncmp(text + i, "flags", 5) == 0;
        if (in_flags && text[i] == ' ' && i + 1 < size && text[i + 1] != ':') {
            size_t end = i + 1;
            while (end < size && text[end] != ' ' && text[end] != '\n')
                ++end;
            if (!hidden(text + i + 1, end - i - 1)) {
                memmove(text + kept, text + i, end - i);
                kept += end - i;
            }
            i = end;
            continue;
        }
        text[kept++] = text[i++];
    }
    int out = memfd_create("cpuinfo", MFD_CLOEXEC);
    if (out >= 0 && (write(out, text, kept) != (ssize_t)kept || lseek(out, 0, SEEK_SET) != 0)) {
        close(out);
        out = -1;
    }
    free(text);
    return out;
}

/* An fd of the filtered copy when `path` is /proc/cpuinfo opened for reading, else -1. */
static int cpuinfo_copy(const char *path, int read_only) {
    static int (*real_open)(const char *, int, ...);
    if (!masking || !read_only || path == NULL || strcmp(path, "/proc/cpuinfo") != 0)
        return -1;
    if (real_open == NULL)
        real_open = dlsym(RTLD_NEXT, "open");
    return filtered_cpuinfo(real_open);
}

/* open(2)'s optional third argument */
#define MODE_ARGUMENT(flags, mode)                                                          \
    mode_t mode = 0;                                                                       \
    if ((flags) & (O_CREAT | O_TMPFILE)) {                                                 \
        va_list args;                                                                      \
        va_start(args, flags);                                                             \
        mode = va_arg(args, mode_t);                                                       \
        va_end(args);                                                                      \
    }

/* open, open64, openat, openat64: `params` ends in `int flags, ...`; `args` passes them on */
#define OPEN_WRAPPER(name, params, args)                                                    \
    int name params {                                                                      \
        static int (*real) params;                                                         \
        MODE_ARGUMENT(flags, mode)                                                         \
        int copy = cpuinfo_copy(path, (flags & O_ACCMODE) == O_RDONLY);                    \
        if (copy >= 0)                                                                     \
            return copy;                                                                   \
        if (real == NULL)                                                                  \
            real = dlsym(RTLD_NEXT, #name);                                                \
        return real args;                                                                  \
    }
OPEN_WRAPPER(open, (const char *path, int flags, ...), (path, flags, mode))
OPEN_WRAPPER(open64, (const char *path, int flags, ...), (path, flags, mode))
OPEN_WRAPPER(openat, (int dir, const char *path, int flags, ...), (dir, path, flags, mode))
OPEN_WRAPPER(openat64, (int dir, const char *path, int flags, ...), (dir, path, flags, mode))

#define FOPEN_WRAPPER(name)                                                                 \
    FILE *name(const char *path, const char *how) {                                        \
        static FILE *(*real)(const char *, const char *);                                  \
        int copy = cpuinfo_copy(path, how != NULL && how[0] == 'r' && strchr(how, '+') == NULL); \
        if (copy >= 0)                                                                     \
            return fdopen(copy, how);                                                      \
        if (real == NULL)                                                                  \
            real = dlsym(RTLD_NEXT, #name);                                                \
        return real(path, how);                                                            \
    }
FOPEN_WRAPPER(fopen)
FOPEN_WRAPPER(fopen64)

__attribute__((constructor)) static void start_masking(void) {
    real_sigaction = dlsym(RTLD_NEXT, "sigaction");
    struct sigaction ours;
    memset(&ours, 0, sizeof ours);
    ours.sa_sigaction = on_segv;
    ours.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&ours.sa_mask);
    if (real_sigaction(SIGSEGV, &ours, &next_segv) != 0 || syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0) != 0) {
        static const char message[] = "cpuid_mask: this kernel or CPU has no CPUID faulting; nothing is masked\n";
        real_sigaction(SIGSEGV, &next_segv, NULL);
        if (write(2, message, sizeof message - 1) < 0) {
        }
        return;
    }
    masking = 1;
}
