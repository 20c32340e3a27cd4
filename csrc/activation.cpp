// Elementwise activations and the row softmax.
//
// Plain C++ on purpose: these are a small share of decode time and the
// compiler vectorizes the simple loops; expf keeps results identical across
// ISA settings.

#include <algorithm>
#include <cmath>
#include <limits>

#include "cpu_features.h"
#include "ops.h"

namespace lingli {

void silu_mul(const float* gate, const float* up, float* out, int64_t M, int64_t F) {
    const int64_t n = M * F;
    const int nt = threads_for_bytes(n * 12);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t i = 0; i < n; ++i) {
        const float g = gate[i];
        // g / (1 + exp(-g)): for g -> -inf, exp overflows to inf and the
        // quotient is -0, the right limit; no nan appears.
        out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
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
