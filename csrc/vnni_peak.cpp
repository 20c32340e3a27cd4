// vnni_peak: the int8 dot-product rate (vpdpbusd, 512-bit) the threads get
// together, the compute limit that the batched and prefill benchmarks are
// compared against, as read_bandwidth is the limit for decode.
//
// Each thread runs 12 independent vpdpbusd chains, enough to cover the
// instruction's latency on every pipe that executes it, so the rate is the
// pipes'. Measured rather than taken per core from a datasheet: threads on
// SMT siblings share one core's vector pipes (the build machine's two vCPUs
// do: 7.2 G vpdpbusd/s on one thread, the same in total on two), which a
// per-core constant times the thread count would double.

#include <algorithm>
#include <chrono>
#include <cstdint>

#include "cpu_features.h"
#include "ops.h"
#include "qlinear.h"  // cpu_has_avx512_vnni

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace lingli {
namespace {

#if defined(__x86_64__)
constexpr int kChains = 12;

// kChains * rounds vpdpbusd; returns a value that depends on all of them.
__attribute__((target("avx512f,avx512bw,avx512vnni"), noinline)) int64_t dp_rounds(int64_t rounds) {
    __m512i acc[kChains];
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_epi32(i);
    __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(-1);
    for (int64_t r = 0; r < rounds; ++r) {
#pragma GCC unroll 12
        for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
        __asm__ volatile("" : "+v"(a), "+v"(b));  // operands not known constant: no folding
    }
    int64_t s = 0;
    for (int i = 0; i < kChains; ++i) s += _mm512_reduce_add_epi32(acc[i]);
    return s;
}
#endif

}  // namespace

double vnni_peak(int threads) {
#if defined(__x86_64__)
    if (!cpu_has_avx512_vnni()) return 0.0;
    threads = std::max(1, threads);
    constexpr int64_t kRounds = 1 << 20;  // ~12.6 M instructions a thread, a few ms
    double best = 0.0;
    for (int rep = 0; rep < 5; ++rep) {
        int64_t sink = 0;
        const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(threads) reduction(+ : sink)
        sink += dp_rounds(kRounds);
        const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (sink == 42) return -1.0;  // never: keeps the work observable
        // 16 lanes x 4 multiply-adds = 64 MACs = 128 ops per instruction.
        best = std::max(best, 128.0 * kChains * kRounds * threads / t / 1e9);
    }
    return best;
#else
    (void)threads;
    return 0.0;
#endif
}

}  // namespace lingli
