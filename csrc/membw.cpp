// read_bandwidth: a STREAM-like read probe, the "machine's measured limit"
// that the linear benchmarks are compared against.
//
// Each thread first-touches the same slice it later sums, so on multi-socket
// machines pages land on the reading thread's node. The sum uses
// the current ISA with several accumulators so the loads, not the adds, are
// the bottleneck.

#include <algorithm>
#include <chrono>
#include <cstdlib>

#include "cpu_features.h"
#include "ops.h"
#include "simd.h"  // before <immintrin.h>: holds the GCC 12 warning workaround

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace lingli {
namespace {

float sum_plain(const float* p, int64_t n) {
    float acc[16] = {};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; ++j) acc[j] += p[i + j];
    float s = 0.f;
    for (float a : acc) s += a;
    for (; i < n; ++i) s += p[i];
    return s;
}

#if defined(__x86_64__)
LINGLI_TARGET_AVX2 float sum_avx2(const float* p, int64_t n) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps(p + i));
        a1 = _mm256_add_ps(a1, _mm256_loadu_ps(p + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_loadu_ps(p + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_loadu_ps(p + i + 24));
    }
    alignas(32) float t[8];
    _mm256_store_ps(t, _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    float s = 0.f;
    for (float v : t) s += v;
    for (; i < n; ++i) s += p[i];
    return s;
}

LINGLI_TARGET_AVX512 float sum_avx512(const float* p, int64_t n) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
        a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
        a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32));
        a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
    }
    float s = hsum512(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; i < n; ++i) s += p[i];
    return s;
}
#endif

#if defined(__aarch64__)
float sum_neon(const float* p, int64_t n) {
    float32x4_t a0 = vdupq_n_f32(0.f), a1 = a0, a2 = a0, a3 = a0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = vaddq_f32(a0, vld1q_f32(p + i));
        a1 = vaddq_f32(a1, vld1q_f32(p + i + 4));
        a2 = vaddq_f32(a2, vld1q_f32(p + i + 8));
        a3 = vaddq_f32(a3, vld1q_f32(p + i + 12));
    }
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
    for (; i < n; ++i) s += p[i];
    return s;
}
#endif

using SumFn = float (*)(const float*, int64_t);

SumFn sum_for(Isa isa) {
    switch (isa) {
#if defined(__x86_64__)
        case Isa::Avx2: return sum_avx2;
        case Isa::Avx512: return sum_avx512;
#endif
#if defined(__aarch64__)
        case Isa::Neon: return sum_neon;
#endif
        default: return sum_plain;
    }
}

volatile float g_sink;  // keeps the sums observable so they are not elided

}  // namespace

double read_bandwidth(int64_t nbytes, int repeats) {
    const int64_t n = std::max<int64_t>(nbytes / 4 / 16 * 16, 16);
    float* buf = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(n) * 4));
    if (!buf) return 0.0;
    const SumFn sum = sum_for(current_isa());
    const int nt = num_threads();
    // Timed unit: a 64 MiB chunk, split among the threads. Chunks are read in
    // turn, so each is cold (the whole buffer is much larger than the LLC),
    // and short timings let best-of skip passes a noisy neighbour disturbed.
    // This mirrors how the linear benchmark streams cold weight matrices.
    const int64_t chunk = std::min<int64_t>(n, int64_t(16) << 20);

    for (int64_t c0 = 0; c0 < n; c0 += chunk) {
        const int64_t len = std::min(chunk, n - c0);
#pragma omp parallel num_threads(nt)
        {
#ifdef _OPENMP
            const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
#else
            const int64_t t = 0, T = 1;
#endif
            for (int64_t i = c0 + len * t / T; i < c0 + len * (t + 1) / T; ++i) buf[i] = 1.0f;
        }
    }

    double best = 0.0;
    for (int r = 0; r < std::max(repeats, 1); ++r) {
        for (int64_t c0 = 0; c0 < n; c0 += chunk) {
            const int64_t len = std::min(chunk, n - c0);
            float total = 0.f;
            const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(nt) reduction(+ : total)
            {
#ifdef _OPENMP
                const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
#else
                const int64_t t = 0, T = 1;
#endif
                const int64_t i0 = c0 + len * t / T, i1 = c0 + len * (t + 1) / T;
                total += sum(buf + i0, i1 - i0);
            }
            const auto t1 = std::chrono::steady_clock::now();
            g_sink = total;
            const double sec = std::chrono::duration<double>(t1 - t0).count();
            if (sec > 0) best = std::max(best, static_cast<double>(len) * 4.0 / sec / 1e9);
        }
    }
    std::free(buf);
    return best;
}

}  // namespace lingli
