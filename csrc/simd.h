// Small SIMD helpers shared by the kernel files (x86 only; each carries the
// same target attribute as its callers so it inlines into them).
#pragma once

#include "cpu_features.h"

#if defined(__x86_64__)
// GCC 12's AVX-512 intrinsics start from _mm*_undefined_*() and then warn
// "(may be) used uninitialized" once inlined (GCC bug 105593, fixed in 13).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>

namespace lingli {

LINGLI_TARGET_AVX2 inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// Horizontal sum, 512 -> 256 -> scalar.
LINGLI_TARGET_AVX512 inline float hsum512(__m512 v) {
    const __m256 hi = _mm256_castpd_ps(_mm512_maskz_extractf64x4_pd(0xff, _mm512_castps_pd(v), 1));
    return hsum256(_mm256_add_ps(_mm512_castps512_ps256(v), hi));
}

}  // namespace lingli
#endif
