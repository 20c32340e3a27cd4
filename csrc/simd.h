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

// Lane i of the result = the sum of a[i]'s 16 lanes, for eight vectors at
// once: two rounds of 128-bit shuffles and one in-lane round instead of eight
// separate reductions (the row sums of the batched qlinear kernel, and the
// scores of eight keys in paged attention).
LINGLI_TARGET_AVX512 inline __m256 hsum512x8(const __m512* a) {
    __m512 t[4], u[2];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k)  // [x0+x2, x1+x3, y0+y2, y1+y3] (128-bit lanes) of x, y = a[2k], a[2k+1]
        t[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * k], a[2 * k + 1], 0xEE));
#pragma GCC unroll 2
    for (int k = 0; k < 2; ++k)  // 4 lanes of each of rows 4k..4k+3
        u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * k], t[2 * k + 1], 0x88),
                             _mm512_shuffle_f32x4(t[2 * k], t[2 * k + 1], 0xDD));
    __m512 v = _mm512_add_ps(_mm512_shuffle_ps(u[0], u[1], 0x88), _mm512_shuffle_ps(u[0], u[1], 0xDD));
    v = _mm512_add_ps(v, _mm512_shuffle_ps(v, v, 0xB1));  // lane 4q: row q, 4q + 2: row 4 + q
    return _mm512_castps512_ps256(
        _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 2, 6, 10, 14, 0, 0, 0, 0, 0, 0, 0, 0), v));
}

// exp(x) for 16 lanes: x = n ln2 + r with |r| <= ln2/2 (ln2 split in two
// for exactness), e^r by its degree-6 Taylor polynomial (error < 2e-7
// relative, about 2 ulp), times 2^n by vscalefps, which also gives +inf and
// 0 at the ends. Inputs are clamped to [-104, 89] (e^-104 is below the
// smallest denormal, e^89 above FLT_MAX).
LINGLI_TARGET_AVX512 inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(89.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

}  // namespace lingli
#endif
