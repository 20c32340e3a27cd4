// rms_norm: y = x / sqrt(mean(x^2) + eps) * weight, one row at a time.
//
// The sum of squares is accumulated in double: activations of large models
// can reach 1e3-1e4, and a float sum over thousands of squares loses digits.
// The scaling loop is plain C++ that the compiler vectorizes.

#include <cmath>

#include "cpu_features.h"
#include "ops.h"

namespace lingli {

void rms_norm(const float* x, const float* weight, float* y, int64_t M, int64_t D, float eps) {
    const int nt = threads_for_bytes(M * D * 8);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t m = 0; m < M; ++m) {
        const float* xr = x + m * D;
        float* yr = y + m * D;
        // Eight partial sums in a fixed order: independent chains the compiler
        // vectorizes (one serial chain of double adds cost ~9 us for 16 rows
        // of 576, more than the row's whole product on this path).
        double part[8] = {};
        int64_t d8 = 0;
        for (; d8 + 8 <= D; d8 += 8)
            for (int j = 0; j < 8; ++j) part[j] += static_cast<double>(xr[d8 + j]) * xr[d8 + j];
        double ss = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
        for (int64_t d = d8; d < D; ++d) ss += static_cast<double>(xr[d]) * xr[d];
        const double mean = D > 0 ? ss / static_cast<double>(D) : 0.0;
        const float inv = static_cast<float>(1.0 / std::sqrt(mean + static_cast<double>(eps)));
        for (int64_t d = 0; d < D; ++d) yr[d] = xr[d] * inv * weight[d];
    }
}

}  // namespace lingli
