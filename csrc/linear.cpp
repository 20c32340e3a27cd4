// linear: y[M,N] = x[M,K] @ w[N,K]^T with float32 or float16 weights.
//
// Decode (M=1) is a matrix-vector product that reads every weight once, so it
// is memory-bound: each thread streams a contiguous range of weight rows and
// uses several independent accumulators so enough loads are in flight.
// For M>1, rows of x are processed four at a time against one weight row so a
// weight row is loaded once per block of four x rows; x is tiled so the tile
// stays in L2 while the weights stream past it.

#include <algorithm>
#include <vector>

#include "cpu_features.h"
#include "ops.h"
#include "parallel.h"
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

// The per-ISA building blocks; the row/thread loops below are shared.
struct LinearKernels {
    float (*dot_f32)(const float* x, const float* w, int64_t K);
    float (*dot_f16)(const float* x, const uint16_t* w, int64_t K);
    // out[i] = dot(x + i*K, w) for i = 0..3 (four consecutive rows of x).
    void (*dot4_f32)(const float* x, const float* w, int64_t K, float* out);
    void (*half_to_f32)(const uint16_t* src, float* dst, int64_t K);
};

// Elements to handle before `p` reaches an `align`-byte boundary (capped at
// K). numpy puts large arrays 16 bytes past a page boundary, so without this
// half of all 32-byte and 3 of 4 64-byte weight loads would straddle two cache
// lines, costing ~15-20% of bandwidth in the M=1 kernels.
inline int64_t head_to_align(const void* p, uintptr_t align, uintptr_t elem, int64_t K) {
    const uintptr_t a = reinterpret_cast<uintptr_t>(p);
    if (a % elem) return 0;  // cannot reach alignment in whole elements
    return std::min<int64_t>(K, static_cast<int64_t>(((align - a % align) % align) / elem));
}

// ---------------------------------------------------------------- plain ---

// Eight explicit partial sums: deterministic, accurate enough (error grows
// with sqrt(K/8)), and auto-vectorizable with baseline SSE2/NEON.
float dot_f32_plain(const float* x, const float* w, int64_t K) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
        for (int j = 0; j < 8; ++j) acc[j] += x[k + j] * w[k + j];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; k < K; ++k) s += x[k] * w[k];
    return s;
}

// A 256 KiB table is much faster than decoding every half bit by bit.
const float* half_table() {
    static const std::vector<float> table = [] {
        std::vector<float> t(65536);
        for (uint32_t i = 0; i < 65536; ++i) t[i] = half_to_float(static_cast<uint16_t>(i));
        return t;
    }();
    return table.data();
}

float dot_f16_plain(const float* x, const uint16_t* w, int64_t K) {
    const float* tab = half_table();
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t k = 0;
    for (; k + 8 <= K; k += 8)
        for (int j = 0; j < 8; ++j) acc[j] += x[k + j] * tab[w[k + j]];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; k < K; ++k) s += x[k] * tab[w[k]];
    return s;
}

void dot4_f32_plain(const float* x, const float* w, int64_t K, float* out) {
    for (int i = 0; i < 4; ++i) out[i] = dot_f32_plain(x + i * K, w, K);
}

void half_to_f32_plain(const uint16_t* src, float* dst, int64_t K) {
    const float* tab = half_table();
    for (int64_t k = 0; k < K; ++k) dst[k] = tab[src[k]];
}

const LinearKernels kPlain = {dot_f32_plain, dot_f16_plain, dot4_f32_plain, half_to_f32_plain};

#if defined(__x86_64__)
// ----------------------------------------------------------------- AVX2 ---

// Half weights are converted on the fly, so a core has fewer loads in flight
// than in the f32 kernel; in the AVX-512 f16 kernel an explicit prefetch 1 KiB
// ahead raised one-thread 4096x4096 throughput from ~29 to ~35 GB/s on the
// build machine (no gain measured for the AVX2 kernel, so it has none).
inline void prefetch_ahead(const uint16_t* p) {
    _mm_prefetch(reinterpret_cast<const char*>(p) + 1024, _MM_HINT_T0);
}

// Heads and tails convert single halves with F16C's _cvtsh_ss: the branchy
// software half_to_float made rows with a misaligned start ~25% slower.
LINGLI_TARGET_AVX2 inline __m256 load_half8(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Four accumulators hide the 4-cycle FMA latency; 32 floats = 2 cache lines
// per iteration.
LINGLI_TARGET_AVX2 float dot_f32_avx2(const float* x, const float* w, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const int64_t head = head_to_align(w, 32, 4, K);
    float s = 0.f;
    for (int64_t k = 0; k < head; ++k) s += x[k] * w[k];
    int64_t k = head;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), _mm256_loadu_ps(w + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), _mm256_loadu_ps(w + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), _mm256_loadu_ps(w + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), _mm256_loadu_ps(w + k), a0);
    s += hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; ++k) s += x[k] * w[k];
    return s;
}

// F16C converts 8 halves per instruction, so half weights cost half the
// memory traffic of f32 for nearly the same instruction count.
LINGLI_TARGET_AVX2 float dot_f16_avx2(const float* x, const uint16_t* w, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const int64_t head = head_to_align(w, 16, 2, K);
    float s = 0.f;
    for (int64_t k = 0; k < head; ++k) s += x[k] * _cvtsh_ss(w[k]);
    int64_t k = head;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load_half8(w + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 8), load_half8(w + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 16), load_half8(w + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k + 24), load_half8(w + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), load_half8(w + k), a0);
    s += hsum256(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; ++k) s += x[k] * _cvtsh_ss(w[k]);
    return s;
}

// One weight load feeds four x rows; two k-steps per iteration give eight
// independent FMA chains.
LINGLI_TARGET_AVX2 void dot4_f32_avx2(const float* x, const float* w, int64_t K, float* out) {
    const float *x0 = x, *x1 = x + K, *x2 = x + 2 * K, *x3 = x + 3 * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m256 wa = _mm256_loadu_ps(w + k), wb = _mm256_loadu_ps(w + k + 8);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), wa, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k), wa, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + k), wa, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + k), wa, a3);
        b0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k + 8), wb, b0);
        b1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k + 8), wb, b1);
        b2 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + k + 8), wb, b2);
        b3 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + k + 8), wb, b3);
    }
    for (; k + 8 <= K; k += 8) {
        const __m256 wa = _mm256_loadu_ps(w + k);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), wa, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x1 + k), wa, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x2 + k), wa, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x3 + k), wa, a3);
    }
    float s0 = hsum256(_mm256_add_ps(a0, b0)), s1 = hsum256(_mm256_add_ps(a1, b1));
    float s2 = hsum256(_mm256_add_ps(a2, b2)), s3 = hsum256(_mm256_add_ps(a3, b3));
    for (; k < K; ++k) {
        s0 += x0[k] * w[k];
        s1 += x1[k] * w[k];
        s2 += x2[k] * w[k];
        s3 += x3[k] * w[k];
    }
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
    out[3] = s3;
}

LINGLI_TARGET_AVX2 void half_to_f32_avx2(const uint16_t* src, float* dst, int64_t K) {
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) _mm256_storeu_ps(dst + k, load_half8(src + k));
    for (; k < K; ++k) dst[k] = _cvtsh_ss(src[k]);
}

const LinearKernels kAvx2 = {dot_f32_avx2, dot_f16_avx2, dot4_f32_avx2, half_to_f32_avx2};

// -------------------------------------------------------------- AVX-512 ---

LINGLI_TARGET_AVX512 inline __m512 load_half16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

LINGLI_TARGET_AVX512 inline __mmask16 tail_mask(int64_t n) {
    return static_cast<__mmask16>((1u << n) - 1u);
}

// 64 floats (4 cache lines) per iteration; the tail uses masked loads, which
// never touch memory past the end of the row.
LINGLI_TARGET_AVX512 float dot_f32_avx512(const float* x, const float* w, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = head_to_align(w, 64, 4, K);
    if (k > 0) {
        const __mmask16 m = tail_mask(k);
        a2 = _mm512_maskz_mul_ps(m, _mm512_maskz_loadu_ps(m, x), _mm512_maskz_loadu_ps(m, w));
    }
    for (; k + 64 <= K; k += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), _mm512_loadu_ps(w + k + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), _mm512_loadu_ps(w + k + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), _mm512_loadu_ps(w + k + 48), a3);
    }
    for (; k + 16 <= K; k += 16)
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), _mm512_loadu_ps(w + k), a0);
    if (k < K) {
        const __mmask16 m = tail_mask(K - k);
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + k), _mm512_maskz_loadu_ps(m, w + k), a1);
    }
    return hsum512(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

LINGLI_TARGET_AVX512 float dot_f16_avx512(const float* x, const uint16_t* w, int64_t K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    const int64_t head = head_to_align(w, 32, 2, K);
    float s = 0.f;
    for (int64_t k = 0; k < head; ++k) s += x[k] * _cvtsh_ss(w[k]);
    int64_t k = head;
    for (; k + 64 <= K; k += 64) {
        prefetch_ahead(w + k);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), load_half16(w + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 16), load_half16(w + k + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 32), load_half16(w + k + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k + 48), load_half16(w + k + 48), a3);
    }
    for (; k + 16 <= K; k += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + k), load_half16(w + k), a0);
    s += hsum512(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    // Masked 16-bit loads need AVX-512BW; a scalar tail of < 16 is cheap.
    for (; k < K; ++k) s += x[k] * _cvtsh_ss(w[k]);
    return s;
}

LINGLI_TARGET_AVX512 void dot4_f32_avx512(const float* x, const float* w, int64_t K, float* out) {
    const float *x0 = x, *x1 = x + K, *x2 = x + 2 * K, *x3 = x + 3 * K;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    __m512 b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m512 wa = _mm512_loadu_ps(w + k), wb = _mm512_loadu_ps(w + k + 16);
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + k), wa, a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x1 + k), wa, a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(x2 + k), wa, a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(x3 + k), wa, a3);
        b0 = _mm512_fmadd_ps(_mm512_loadu_ps(x0 + k + 16), wb, b0);
        b1 = _mm512_fmadd_ps(_mm512_loadu_ps(x1 + k + 16), wb, b1);
        b2 = _mm512_fmadd_ps(_mm512_loadu_ps(x2 + k + 16), wb, b2);
        b3 = _mm512_fmadd_ps(_mm512_loadu_ps(x3 + k + 16), wb, b3);
    }
    for (; k < K; k += 16) {
        const __mmask16 m = K - k >= 16 ? static_cast<__mmask16>(0xffff) : tail_mask(K - k);
        const __m512 wa = _mm512_maskz_loadu_ps(m, w + k);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x0 + k), wa, a0);
        a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x1 + k), wa, a1);
        a2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x2 + k), wa, a2);
        a3 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x3 + k), wa, a3);
    }
    out[0] = hsum512(_mm512_add_ps(a0, b0));
    out[1] = hsum512(_mm512_add_ps(a1, b1));
    out[2] = hsum512(_mm512_add_ps(a2, b2));
    out[3] = hsum512(_mm512_add_ps(a3, b3));
}

LINGLI_TARGET_AVX512 void half_to_f32_avx512(const uint16_t* src, float* dst, int64_t K) {
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) _mm512_storeu_ps(dst + k, load_half16(src + k));
    for (; k < K; ++k) dst[k] = _cvtsh_ss(src[k]);
}

const LinearKernels kAvx512 = {dot_f32_avx512, dot_f16_avx512, dot4_f32_avx512,
                               half_to_f32_avx512};
#endif  // __x86_64__

#if defined(__aarch64__)
// ----------------------------------------------------------------- NEON ---

inline float32x4_t load_half4(const uint16_t* p) {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)));
}

float dot_f32_neon(const float* x, const float* w, int64_t K) {
    float32x4_t a0 = vdupq_n_f32(0.f), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        a0 = vfmaq_f32(a0, vld1q_f32(x + k), vld1q_f32(w + k));
        a1 = vfmaq_f32(a1, vld1q_f32(x + k + 4), vld1q_f32(w + k + 4));
        a2 = vfmaq_f32(a2, vld1q_f32(x + k + 8), vld1q_f32(w + k + 8));
        a3 = vfmaq_f32(a3, vld1q_f32(x + k + 12), vld1q_f32(w + k + 12));
    }
    for (; k + 4 <= K; k += 4) a0 = vfmaq_f32(a0, vld1q_f32(x + k), vld1q_f32(w + k));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
    for (; k < K; ++k) s += x[k] * w[k];
    return s;
}

// Half->float conversion (FCVTL) is part of base AArch64 Advanced SIMD.
float dot_f16_neon(const float* x, const uint16_t* w, int64_t K) {
    float32x4_t a0 = vdupq_n_f32(0.f), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        a0 = vfmaq_f32(a0, vld1q_f32(x + k), load_half4(w + k));
        a1 = vfmaq_f32(a1, vld1q_f32(x + k + 4), load_half4(w + k + 4));
        a2 = vfmaq_f32(a2, vld1q_f32(x + k + 8), load_half4(w + k + 8));
        a3 = vfmaq_f32(a3, vld1q_f32(x + k + 12), load_half4(w + k + 12));
    }
    for (; k + 4 <= K; k += 4) a0 = vfmaq_f32(a0, vld1q_f32(x + k), load_half4(w + k));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
    for (; k < K; ++k) s += x[k] * half_to_float(w[k]);
    return s;
}

void dot4_f32_neon(const float* x, const float* w, int64_t K, float* out) {
    const float *x0 = x, *x1 = x + K, *x2 = x + 2 * K, *x3 = x + 3 * K;
    float32x4_t a0 = vdupq_n_f32(0.f), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {
        const float32x4_t wv = vld1q_f32(w + k);
        a0 = vfmaq_f32(a0, vld1q_f32(x0 + k), wv);
        a1 = vfmaq_f32(a1, vld1q_f32(x1 + k), wv);
        a2 = vfmaq_f32(a2, vld1q_f32(x2 + k), wv);
        a3 = vfmaq_f32(a3, vld1q_f32(x3 + k), wv);
    }
    float s0 = vaddvq_f32(a0), s1 = vaddvq_f32(a1), s2 = vaddvq_f32(a2), s3 = vaddvq_f32(a3);
    for (; k < K; ++k) {
        s0 += x0[k] * w[k];
        s1 += x1[k] * w[k];
        s2 += x2[k] * w[k];
        s3 += x3[k] * w[k];
    }
    out[0] = s0;
    out[1] = s1;
    out[2] = s2;
    out[3] = s3;
}

void half_to_f32_neon(const uint16_t* src, float* dst, int64_t K) {
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) vst1q_f32(dst + k, load_half4(src + k));
    for (; k < K; ++k) dst[k] = half_to_float(src[k]);
}

const LinearKernels kNeon = {dot_f32_neon, dot_f16_neon, dot4_f32_neon, half_to_f32_neon};
#endif  // __aarch64__

const LinearKernels& kernels_for(Isa isa) {
    switch (isa) {
#if defined(__x86_64__)
        case Isa::Avx2: return kAvx2;
        case Isa::Avx512: return kAvx512;
#endif
#if defined(__aarch64__)
        case Isa::Neon: return kNeon;
#endif
        default: return kPlain;
    }
}

// Rows of x per tile for M>1: about 256 KiB of x, so it stays in L2 while
// this thread's weight rows stream past once per tile.
int64_t m_tile(int64_t K) {
    int64_t rows = (int64_t(256) << 10) / (4 * std::max<int64_t>(K, 1));
    return std::max<int64_t>(4, rows / 4 * 4);
}

// Weight rows [n0, n1) against all of x; `row(n, buf)` returns weight row n
// as float32 (converting into buf if needed).
template <class RowFn>
void rows_multi(const LinearKernels& kern, const float* x, float* y, int64_t M, int64_t N,
                int64_t K, int64_t n0, int64_t n1, RowFn row) {
    std::vector<float> buf;
    const int64_t tile = m_tile(K);
    for (int64_t m0 = 0; m0 < M; m0 += tile) {
        const int64_t m1 = std::min(M, m0 + tile);
        for (int64_t n = n0; n < n1; ++n) {
            const float* wr = row(n, buf);
            int64_t m = m0;
            for (; m + 4 <= m1; m += 4) {
                float r[4];
                kern.dot4_f32(x + m * K, wr, K, r);
                for (int i = 0; i < 4; ++i) y[(m + i) * N + n] = r[i];
            }
            for (; m < m1; ++m) y[m * N + n] = kern.dot_f32(x + m * K, wr, K);
        }
    }
}

// Threads split the N output columns (= weight rows) into chunks of
// contiguous rows, each thread streaming its own share of the weight matrix
// first (parallel_chunks: balanced at run time).
template <class Fn>
void split_rows(int64_t N, int64_t weight_bytes, Fn fn) {
    const int nt = threads_for_bytes(weight_bytes);
    parallel_chunks(N, nt, std::max<int64_t>(16, N / (8 * int64_t(nt))), fn);
}

}  // namespace

void linear_f32(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K) {
    const LinearKernels& kern = kernels_for(current_isa());
    split_rows(N, N * K * 4, [&](int64_t n0, int64_t n1) {
        if (M == 1) {
            for (int64_t n = n0; n < n1; ++n) y[n] = kern.dot_f32(x, w + n * K, K);
            return;
        }
        rows_multi(kern, x, y, M, N, K, n0, n1,
                   [&](int64_t n, std::vector<float>&) { return w + n * K; });
    });
}

void linear_f16(const float* x, const uint16_t* w, float* y, int64_t M, int64_t N, int64_t K) {
    const LinearKernels& kern = kernels_for(current_isa());
    split_rows(N, N * K * 2, [&](int64_t n0, int64_t n1) {
        if (M == 1) {
            for (int64_t n = n0; n < n1; ++n) y[n] = kern.dot_f16(x, w + n * K, K);
            return;
        }
        // For several x rows, convert each weight row once per x tile and
        // reuse the f32 kernels. The row starts on a 64-byte boundary: the
        // kernels' summation order follows the row's alignment (head_to_align),
        // so a heap-placed row would make the floats depend on malloc.
        rows_multi(kern, x, y, M, N, K, n0, n1, [&](int64_t n, std::vector<float>& buf) {
            buf.resize(static_cast<size_t>(K) + 16);
            float* row = buf.data() + head_to_align(buf.data(), 64, 4, 16);
            kern.half_to_f32(w + n * K, row, K);
            return static_cast<const float*>(row);
        });
    });
}

}  // namespace lingli
