#include "cpu_features.h"

#include <atomic>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__aarch64__) && defined(__linux__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)  // <asm/hwcap.h>; spelled out for old headers
#endif
#elif defined(__aarch64__) && defined(__APPLE__)
#include <sys/sysctl.h>
#endif

namespace lingli {

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::Plain: return "plain";
        case Isa::Neon: return "neon";
        case Isa::Avx2: return "avx2";
        case Isa::Avx512: return "avx512";
    }
    return "plain";
}

bool isa_from_name(const std::string& name, Isa* out) {
    static const Isa all[] = {Isa::Plain, Isa::Neon, Isa::Avx2, Isa::Avx512};
    for (Isa isa : all) {
        if (name == isa_name(isa)) {
            *out = isa;
            return true;
        }
    }
    return false;
}

bool cpu_has(Isa isa) {
    switch (isa) {
        case Isa::Plain:
            return true;
        case Isa::Neon:
#if defined(__aarch64__)
            return true;  // Advanced SIMD is mandatory on AArch64.
#else
            return false;
#endif
        case Isa::Avx2:
#if defined(__x86_64__)
            // The AVX2 path also uses FMA, and F16C for half weights.
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                   __builtin_cpu_supports("f16c");
#else
            return false;
#endif
        case Isa::Avx512:
#if defined(__x86_64__)
            // AVX-512F alone gives 16-wide FMA and half->float conversion; the
            // kernels also use AVX2 code for tails, so require that too.
            return __builtin_cpu_supports("avx512f") && cpu_has(Isa::Avx2);
#else
            return false;
#endif
    }
    return false;
}

bool cpu_has_dotprod() {
#if defined(__aarch64__) && defined(__linux__)
    static const bool has = (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
    return has;
#elif defined(__aarch64__) && defined(__APPLE__)
    int v = 0;
    size_t len = sizeof(v);
    return sysctlbyname("hw.optional.arm.FEAT_DotProd", &v, &len, nullptr, 0) == 0 && v != 0;
#else
    return false;
#endif
}

std::vector<Isa> available_isas() {
    std::vector<Isa> out;
    for (Isa isa : {Isa::Plain, Isa::Neon, Isa::Avx2, Isa::Avx512})
        if (cpu_has(isa)) out.push_back(isa);
    return out;
}

Isa best_isa() { return available_isas().back(); }

static std::atomic<int> g_isa{-1};
static std::atomic<int> g_threads{0};

Isa current_isa() {
    int v = g_isa.load(std::memory_order_relaxed);
    if (v < 0) {
        Isa best = best_isa();
        g_isa.store(static_cast<int>(best));
        return best;
    }
    return static_cast<Isa>(v);
}

void set_isa(Isa isa) { g_isa.store(static_cast<int>(isa)); }

int num_threads() {
    int n = g_threads.load(std::memory_order_relaxed);
    if (n <= 0) {
#ifdef _OPENMP
        n = omp_get_max_threads();
#else
        n = 1;
#endif
        g_threads.store(n);
    }
    return n;
}

void set_num_threads(int n) { g_threads.store(n < 1 ? 1 : n); }

int threads_for_bytes(int64_t bytes) {
    // Below ~64 KiB a kernel finishes in a few microseconds on one core.
    if (bytes < (int64_t(64) << 10)) return 1;
    return num_threads();
}

}  // namespace lingli
