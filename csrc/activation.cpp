// Elementwise activations and the row softmax.
//
// The plain loops call std::exp, which the compiler cannot vectorize without
// -ffast-math; with batched decode SiLU over [sequences, F] is no longer a
// small share, so AVX-512 has a path with a vectorized exp (simd.h exp512,
// within 2 ulp of std::exp). The softmax is only used by tests and keeps expf.

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu_features.h"
#include "ops.h"
#include "simd.h"

namespace lingli {

#if defined(__x86_64__)
LINGLI_TARGET_AVX512 static void silu_mul_avx512(const float* gate, const float* up, float* out,
                                                 int64_t i0, int64_t i1) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t i = i0; i < i1; i += 16) {
        const __mmask16 m = i1 - i >= 16 ? static_cast<__mmask16>(0xffff)
                                         : static_cast<__mmask16>((1u << (i1 - i)) - 1u);
        const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        const __m512 y = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)),
                                       _mm512_maskz_loadu_ps(m, up + i));
        _mm512_mask_storeu_ps(out + i, m, y);
    }
}
#endif

static void silu_mul_span(const float* gate, const float* up, float* out, int64_t i0, int64_t i1) {
#if defined(__x86_64__)
    if (current_isa() == Isa::Avx512) return silu_mul_avx512(gate, up, out, i0, i1);
#endif
    for (int64_t i = i0; i < i1; ++i) {
        const float g = gate[i];
        // g / (1 + exp(-g)): for g -> -inf, exp overflows to inf and the
        // quotient is -0, the right limit; no nan appears.
        out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
}

void silu_mul(const float* gate, int64_t ldg, const float* up, int64_t ldu, float* out, int64_t M,
              int64_t F) {
    const int nt = threads_for_bytes(M * F * 12);
    if (ldg == F && ldu == F) {  // one flat range, split in whole vectors
        const int64_t n = M * F, chunk = (n + 16 * nt - 1) / (16 * nt) * 16;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
        for (int64_t c = 0; c < nt; ++c)
            if (c * chunk < n) silu_mul_span(gate, up, out, c * chunk, std::min(n, (c + 1) * chunk));
        return;
    }
    // Row-strided inputs (the gate and up halves of the fused [M, 2F] product):
    // threads take whole rows.
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t m = 0; m < M; ++m) silu_mul_span(gate + m * ldg, up + m * ldu, out + m * F, 0, F);
}

// Subtracting the row max makes every exponent <= 0, so exp never overflows;
// the sum is accumulated in double.
void softmax(float* x, int64_t M, int64_t N) {
    const int nt = threads_for_bytes(M * N * 8);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t m = 0; m < M; ++m) {
        float* r = x + m * N;
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < N; ++j) mx = std::max(mx, r[j]);
        double sum = 0.0;
        for (int64_t j = 0; j < N; ++j) {
            r[j] = std::exp(r[j] - mx);
            sum += r[j];
        }
        const float inv = static_cast<float>(1.0 / sum);
        for (int64_t j = 0; j < N; ++j) r[j] *= inv;
    }
}

}  // namespace lingli
