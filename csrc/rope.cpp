// rope: rotary position embedding, in place on x[T, H, Dh].
//
// Two layouts exist in the wild, differing only in which dims form a pair:
//   rotate-half (Hugging Face):  (i, i + R/2)
//   interleaved (Meta, GPT-J):   (2i, 2i + 1)
// Both rotate the pair by angle theta[pos, i]:
//   x1' = x1*c - x2*s,  x2' = x2*c + x1*s.
// Dims >= R (partial rotary, e.g. Phi/NeoX) are left untouched.

#include "cpu_features.h"
#include "ops.h"
#include "simd.h"  // before <immintrin.h>: holds the GCC 12 warning workaround

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace lingli {

#if defined(__x86_64__)
// The rotate-half layout 16 pairs at a time (a mul each, then the sub or add:
// no fused multiply-add, so every lane rounds as the plain loop does). Batched
// decode rotates q and k of every sequence each layer: SmolLM2's 16 streams
// spent ~9 us a layer in the plain loop (baseline x86-64 code, SSE2 only).
LINGLI_TARGET_AVX512 __attribute__((optimize("fp-contract=off"))) static int64_t rope_half_avx512(
    float* lo, float* hi, const float* c, const float* s, int64_t half_rot) {
    int64_t i = 0;
    for (; i + 16 <= half_rot; i += 16) {
        const __m512 x1 = _mm512_loadu_ps(lo + i), x2 = _mm512_loadu_ps(hi + i);
        const __m512 cc = _mm512_loadu_ps(c + i), ss = _mm512_loadu_ps(s + i);
        _mm512_storeu_ps(lo + i, _mm512_sub_ps(_mm512_mul_ps(x1, cc), _mm512_mul_ps(x2, ss)));
        _mm512_storeu_ps(hi + i, _mm512_add_ps(_mm512_mul_ps(x2, cc), _mm512_mul_ps(x1, ss)));
    }
    return i;
}
#endif

void rope_head(float* v, const float* c, const float* s, int64_t half_rot, bool interleaved) {
    if (interleaved) {
        for (int64_t i = 0; i < half_rot; ++i) {
            const float x1 = v[2 * i], x2 = v[2 * i + 1];
            v[2 * i] = x1 * c[i] - x2 * s[i];
            v[2 * i + 1] = x2 * c[i] + x1 * s[i];
        }
    } else {
        float* lo = v;
        float* hi = v + half_rot;
        int64_t i = 0;
#if defined(__x86_64__)
        if (current_isa() == Isa::Avx512) i = rope_half_avx512(lo, hi, c, s, half_rot);
#endif
        for (; i < half_rot; ++i) {
            const float x1 = lo[i], x2 = hi[i];
            lo[i] = x1 * c[i] - x2 * s[i];
            hi[i] = x2 * c[i] + x1 * s[i];
        }
    }
}

void rope(float* x, const int32_t* positions, const float* cos, const float* sin, int64_t T,
          int64_t H, int64_t Dh, int64_t half_rot, bool interleaved) {
    const int nt = threads_for_bytes(T * H * Dh * 8);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (int64_t t = 0; t < T; ++t) {
        const float* c = cos + static_cast<int64_t>(positions[t]) * half_rot;
        const float* s = sin + static_cast<int64_t>(positions[t]) * half_rot;
        for (int64_t h = 0; h < H; ++h) rope_head(x + (t * H + h) * Dh, c, s, half_rot, interleaved);
    }
}

}  // namespace lingli
