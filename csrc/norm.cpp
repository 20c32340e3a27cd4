// rms_norm: y = x / sqrt(mean(x^2) + eps) * weight, one row at a time.
//
// The sum of squares is accumulated in double: activations of large models
// can reach 1e3-1e4, and a float sum over thousands of squares loses digits.
// Every path sums in the same order (16 partial sums over the row, combined
// by one fixed tree; each square is exact in double, so a fused multiply-add
// rounds like a multiply and an add) and scales as (x * inv) * weight, so
// they agree bit for bit. The extension is built for baseline x86-64, where
// the plain loops get SSE2 only: 16 rows of 5632 took ~23 us; AVX-512 has
// its own path.

#include <cmath>

#include "cpu_features.h"
#include "ops.h"
#include "simd.h"

namespace lingli {
namespace {

constexpr int kParts = 16;

double combine(const double (&p)[kParts]) {
    double s[8];
    for (int j = 0; j < 8; ++j) s[j] = p[j] + p[j + 8];
    return ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
}

double sum_squares_plain(const float* x, int64_t D, int64_t& done) {
    double part[kParts] = {};
    int64_t d = 0;
    for (; d + kParts <= D; d += kParts)
        for (int j = 0; j < kParts; ++j) part[j] += static_cast<double>(x[d + j]) * x[d + j];
    done = d;
    return combine(part);
}

void scale_plain(const float* x, const float* w, float* y, int64_t d0, int64_t D, float inv) {
    for (int64_t d = d0; d < D; ++d) y[d] = x[d] * inv * w[d];
}

#if defined(__x86_64__)
LINGLI_TARGET_AVX512 double sum_squares_avx512(const float* x, int64_t D, int64_t& done) {
    __m512d a = _mm512_setzero_pd(), b = _mm512_setzero_pd();  // parts 0-7, 8-15
    int64_t d = 0;
    for (; d + kParts <= D; d += kParts) {
        const __m512d lo = _mm512_cvtps_pd(_mm256_loadu_ps(x + d));
        const __m512d hi = _mm512_cvtps_pd(_mm256_loadu_ps(x + d + 8));
        a = _mm512_fmadd_pd(lo, lo, a);
        b = _mm512_fmadd_pd(hi, hi, b);
    }
    double part[kParts];
    _mm512_storeu_pd(part, a);
    _mm512_storeu_pd(part + 8, b);
    done = d;
    return combine(part);
}

LINGLI_TARGET_AVX512 int64_t scale_avx512(const float* x, const float* w, float* y, int64_t D, float inv) {
    const __m512 v = _mm512_set1_ps(inv);
    int64_t d = 0;
    for (; d + 16 <= D; d += 16)
        _mm512_storeu_ps(y + d, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + d), v), _mm512_loadu_ps(w + d)));
    return d;
}
#endif

void norm_row(const float* x, const float* w, float* y, int64_t D, float eps, bool avx512) {
    int64_t d = 0;
    double ss;
#if defined(__x86_64__)
    if (avx512) ss = sum_squares_avx512(x, D, d);
    else
#endif
        ss = sum_squares_plain(x, D, d);
    for (; d < D; ++d) ss += static_cast<double>(x[d]) * x[d];
    const double mean = D > 0 ? ss / static_cast<double>(D) : 0.0;
    const float inv = static_cast<float>(1.0 / std::sqrt(mean + static_cast<double>(eps)));
    int64_t s = 0;
#if defined(__x86_64__)
    if (avx512) s = scale_avx512(x, w, y, D, inv);
#endif
    scale_plain(x, w, y, s, D, inv);
}

}  // namespace

void rms_norm(const float* x, const float* weight, float* y, int64_t M, int64_t D, float eps) {
    const int nt = threads_for_bytes(M * D * 8);
    const bool avx512 = current_isa() == Isa::Avx512;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t m = 0; m < M; ++m) norm_row(x + m * D, weight, y + m * D, D, eps, avx512);
}

}  // namespace lingli
