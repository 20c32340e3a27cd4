// paged_attention: causal attention for a batch of sequences, reading K/V
// straight from the paged cache. Query token t belongs to sequence
// seq_ids[t] (row of block_tables) and attends to that sequence's keys at
// positions 0..q_positions[t]: one call covers batched decode (one token per
// sequence), chunked prefill (many tokens of one sequence) and any mix.
//
// Cache layout: k_cache/v_cache [num_blocks, Hkv, block_size, Dh] in float32
// or IEEE half (raw uint16 bits; half the bytes a decode step reads); key
// position p lives in block block_table[p / block_size], slot p % block_size,
// so within one block the slots of a kv head are contiguous rows of Dh floats.
// Query head h reads kv head h / (Hq / Hkv) (grouped-query attention).
//
// A work item is a token and the query heads of one kv head (or a single
// head, when there are too few items for the threads). Softmax is two-pass:
// all scores of the row are kept in a per-thread buffer, then max-subtracted
// and exponentiated (exact and stable; the buffer is only seq_len floats per
// head). Each head's arithmetic is the same whichever way items are cut.
// The per-ISA kernels work on a whole block of slots, so the indirect call
// is amortized over block_size keys.

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_features.h"
#include "ops.h"
#include "simd.h"  // before <immintrin.h>: holds the GCC 12 warning workaround

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace lingli {
namespace {

// KV element loads: float32 as is, IEEE half widened (the hardware
// conversion on aarch64, where __fp16 is native; software elsewhere, the
// plain reference).
inline float kv_load(const float* p) { return *p; }
inline float kv_load(const uint16_t* p) {
#if defined(__aarch64__)
    __fp16 h;
    __builtin_memcpy(&h, p, sizeof h);
    return static_cast<float>(h);
#else
    return half_to_float(*p);
#endif
}

// Each kernel takes the nh query heads that share one kv head together, so
// a SIMD path can load (and widen) each key or value row once for all of them.
template <typename KV>
struct AttnKernels {
    // s[j*ss + i] = scale * dot(q + j*Dh, k + i*Dh) for heads j < nh, keys i < n
    void (*scores)(const float* q, int64_t nh, const KV* k, int64_t n, int64_t Dh, float scale,
                   float* s, int64_t ss);
    // acc[j*Dh ..] += sum_i p[j*ps + i] * v[i*Dh ..] for heads j < nh
    void (*accum)(const float* p, int64_t ps, int64_t nh, const KV* v, int64_t n, int64_t Dh,
                  float* acc);
    // s[j] = exp(s[j] - max(s)) for j < n; returns their sum
    double (*exp_sum)(float* s, int64_t n);
};

// A single-head kernel applied to each of nh heads in turn.
template <typename KV, void (*One)(const float*, const KV*, int64_t, int64_t, float, float*)>
void scores_each(const float* q, int64_t nh, const KV* k, int64_t n, int64_t Dh, float scale,
                 float* s, int64_t ss) {
    for (int64_t j = 0; j < nh; ++j) One(q + j * Dh, k, n, Dh, scale, s + j * ss);
}
template <typename KV, void (*One)(const float*, const KV*, int64_t, int64_t, float*)>
void accum_each(const float* p, int64_t ps, int64_t nh, const KV* v, int64_t n, int64_t Dh,
                float* acc) {
    for (int64_t j = 0; j < nh; ++j) One(p + j * ps, v, n, Dh, acc + j * Dh);
}

// ---------------------------------------------------------------- plain ---

template <typename KV>
void scores_plain(const float* q, const KV* k, int64_t n, int64_t Dh, float scale, float* s) {
    for (int64_t j = 0; j < n; ++j) {
        const KV* kr = k + j * Dh;
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t d = 0;
        for (; d + 8 <= Dh; d += 8)
            for (int i = 0; i < 8; ++i) acc[i] += q[d + i] * kv_load(kr + d + i);
        float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (; d < Dh; ++d) sum += q[d] * kv_load(kr + d);
        s[j] = scale * sum;
    }
}

template <typename KV>
void accum_plain(const float* p, const KV* v, int64_t n, int64_t Dh, float* acc) {
    for (int64_t j = 0; j < n; ++j) {
        const float pj = p[j];
        const KV* vr = v + j * Dh;
        for (int64_t d = 0; d < Dh; ++d) acc[d] += pj * kv_load(vr + d);
    }
}

double exp_sum_plain(float* s, int64_t n) {
    float mx = s[0];
    for (int64_t p = 1; p < n; ++p) mx = std::max(mx, s[p]);
    double sum = 0.0;
    for (int64_t p = 0; p < n; ++p) {
        s[p] = std::exp(s[p] - mx);
        sum += s[p];
    }
    return sum;
}

template <typename KV>
const AttnKernels<KV> kPlain = {scores_each<KV, scores_plain<KV>>, accum_each<KV, accum_plain<KV>>,
                                exp_sum_plain};

#if defined(__x86_64__)
// ----------------------------------------------------------------- AVX2 ---

LINGLI_TARGET_AVX2 inline __m256 ld8(const float* p) { return _mm256_loadu_ps(p); }
LINGLI_TARGET_AVX2 inline __m256 ld8(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// Head dims are small (64-128): two accumulators are enough.
template <typename KV>
LINGLI_TARGET_AVX2 void scores_avx2(const float* q, const KV* k, int64_t n, int64_t Dh,
                                    float scale, float* s) {
    for (int64_t j = 0; j < n; ++j) {
        const KV* kr = k + j * Dh;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0;
        int64_t d = 0;
        for (; d + 16 <= Dh; d += 16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), ld8(kr + d), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), ld8(kr + d + 8), a1);
        }
        for (; d + 8 <= Dh; d += 8)
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), ld8(kr + d), a0);
        float sum = hsum256(_mm256_add_ps(a0, a1));
        for (; d < Dh; ++d) sum += q[d] * kv_load(kr + d);
        s[j] = scale * sum;
    }
}

template <typename KV>
LINGLI_TARGET_AVX2 void accum_avx2(const float* p, const KV* v, int64_t n, int64_t Dh,
                                   float* acc) {
    for (int64_t j = 0; j < n; ++j) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        const KV* vr = v + j * Dh;
        int64_t d = 0;
        for (; d + 8 <= Dh; d += 8)
            _mm256_storeu_ps(acc + d, _mm256_fmadd_ps(pj, ld8(vr + d), _mm256_loadu_ps(acc + d)));
        for (; d < Dh; ++d) acc[d] += p[j] * kv_load(vr + d);
    }
}

template <typename KV>
const AttnKernels<KV> kAvx2 = {scores_each<KV, scores_avx2<KV>>, accum_each<KV, accum_avx2<KV>>,
                               exp_sum_plain};

// -------------------------------------------------------------- AVX-512 ---

LINGLI_TARGET_AVX512 inline __m512 ld16(const float* p) { return _mm512_loadu_ps(p); }
LINGLI_TARGET_AVX512 inline __m512 ld16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
LINGLI_TARGET_AVX512 inline __m512 ld16(__mmask16 m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
// (A head dim off the multiple of 16: the tail goes through a buffer, as the
// masked 16-bit load needs AVX512BW, which the AVX-512 path does not ask for.)
LINGLI_TARGET_AVX512 inline __m512 ld16(__mmask16 m, const uint16_t* p) {
    alignas(32) uint16_t t[16] = {};
    for (int i = 0; i < 16; ++i)
        if (m >> i & 1) t[i] = p[i];
    return _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(t)));
}
LINGLI_TARGET_AVX512 inline __mmask16 lanes(int64_t left) {
    return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1u);
}

// One head, one key at a time (any Dh; the tails of the grouped kernel).
template <typename KV>
LINGLI_TARGET_AVX512 float score1_avx512(const float* q, const KV* kr, int64_t Dh) {
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    int64_t d = 0;
    for (; d + 32 <= Dh; d += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), ld16(kr + d), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q + d + 16), ld16(kr + d + 16), a1);
    }
    for (; d < Dh; d += 16) {
        const __mmask16 m = lanes(Dh - d);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), ld16(m, kr + d), a0);
    }
    return hsum512(_mm512_add_ps(a0, a1));
}

// H heads (H <= 3) against keys eight at a time, Dh a multiple of 16 (every
// LLaMA-family model): each key row is loaded and widened once for the H
// heads, and the eight dot products of a head share one reduction (hsum512x8;
// at Dh = 64 per-key horizontal sums had cost as much as the products).
template <int H, typename KV>
LINGLI_TARGET_AVX512 void scores_heads_avx512(const float* q, const KV* k, int64_t n, int64_t Dh,
                                              float scale, float* s, int64_t ss) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m512 a[H][8];
        for (int h = 0; h < H; ++h)
            for (int r = 0; r < 8; ++r) a[h][r] = _mm512_setzero_ps();
        for (int64_t d = 0; d < Dh; d += 16) {
            __m512 qd[H];
            for (int h = 0; h < H; ++h) qd[h] = _mm512_loadu_ps(q + h * Dh + d);
            for (int r = 0; r < 8; ++r) {
                const __m512 kv = ld16(k + (i + r) * Dh + d);
                for (int h = 0; h < H; ++h) a[h][r] = _mm512_fmadd_ps(qd[h], kv, a[h][r]);
            }
        }
        for (int h = 0; h < H; ++h)
            _mm256_storeu_ps(s + h * ss + i, _mm256_mul_ps(hsum512x8(a[h]), _mm256_set1_ps(scale)));
    }
    for (; i < n; ++i)
        for (int h = 0; h < H; ++h) s[h * ss + i] = scale * score1_avx512(q + h * Dh, k + i * Dh, Dh);
}

template <typename KV>
LINGLI_TARGET_AVX512 void scores_avx512(const float* q, int64_t nh, const KV* k, int64_t n, int64_t Dh,
                                        float scale, float* s, int64_t ss) {
    if (Dh % 16 != 0) {
        for (int64_t j = 0; j < nh; ++j)
            for (int64_t i = 0; i < n; ++i) s[j * ss + i] = scale * score1_avx512(q + j * Dh, k + i * Dh, Dh);
        return;
    }
    for (int64_t j = 0; j < nh; j += 3) {
        switch (std::min<int64_t>(3, nh - j)) {
            case 3: scores_heads_avx512<3>(q + j * Dh, k, n, Dh, scale, s + j * ss, ss); break;
            case 2: scores_heads_avx512<2>(q + j * Dh, k, n, Dh, scale, s + j * ss, ss); break;
            default: scores_heads_avx512<1>(q + j * Dh, k, n, Dh, scale, s + j * ss, ss); break;
        }
    }
}

// Head dims up to 128 that are multiples of 16 (all LLaMA-family models) keep
// the output rows of H heads in H * V registers for the whole block of keys;
// each value row is loaded and widened once for the H heads.
template <int H, int V, typename KV>
LINGLI_TARGET_AVX512 void accum_heads_regs(const float* p, int64_t ps, const KV* v, int64_t n, float* acc) {
    __m512 a[H][V];
    for (int h = 0; h < H; ++h)
        for (int c = 0; c < V; ++c) a[h][c] = _mm512_loadu_ps(acc + h * 16 * V + 16 * c);
    for (int64_t j = 0; j < n; ++j) {
        __m512 vv[V];
        for (int c = 0; c < V; ++c) vv[c] = ld16(v + j * 16 * V + 16 * c);
        for (int h = 0; h < H; ++h) {
            const __m512 pj = _mm512_set1_ps(p[h * ps + j]);
            for (int c = 0; c < V; ++c) a[h][c] = _mm512_fmadd_ps(pj, vv[c], a[h][c]);
        }
    }
    for (int h = 0; h < H; ++h)
        for (int c = 0; c < V; ++c) _mm512_storeu_ps(acc + h * 16 * V + 16 * c, a[h][c]);
}

// Heads in groups of up to H (H * V + V registers stay under the 32).
template <int H, int V, typename KV>
LINGLI_TARGET_AVX512 void accum_groups(const float* p, int64_t ps, int64_t nh, const KV* v, int64_t n,
                                       float* acc) {
    for (int64_t j = 0; j < nh; j += H) {
        const float* pj = p + j * ps;
        float* aj = acc + j * 16 * V;
        switch (std::min<int64_t>(H, nh - j)) {
            case 3: accum_heads_regs<(H >= 3 ? 3 : 1), V>(pj, ps, v, n, aj); break;
            case 2: accum_heads_regs<(H >= 2 ? 2 : 1), V>(pj, ps, v, n, aj); break;
            default: accum_heads_regs<1, V>(pj, ps, v, n, aj); break;
        }
    }
}

template <typename KV>
LINGLI_TARGET_AVX512 void accum_avx512(const float* p, int64_t ps, int64_t nh, const KV* v, int64_t n,
                                       int64_t Dh, float* acc) {
    switch (Dh) {
        case 32: return accum_groups<3, 2>(p, ps, nh, v, n, acc);
        case 64: return accum_groups<3, 4>(p, ps, nh, v, n, acc);
        case 96: return accum_groups<3, 6>(p, ps, nh, v, n, acc);
        case 128: return accum_groups<2, 8>(p, ps, nh, v, n, acc);
        default: break;
    }
    for (int64_t h = 0; h < nh; ++h) {
        float* ah = acc + h * Dh;
        for (int64_t j = 0; j < n; ++j) {
            const __m512 pj = _mm512_set1_ps(p[h * ps + j]);
            const KV* vr = v + j * Dh;
            for (int64_t d = 0; d < Dh; d += 16) {
                const __mmask16 m = lanes(Dh - d);
                const __m512 a = _mm512_maskz_loadu_ps(m, ah + d);
                _mm512_mask_storeu_ps(ah + d, m, _mm512_fmadd_ps(pj, ld16(m, vr + d), a));
            }
        }
    }
}

// (The max in vectors: a scalar std::max chain is a serial dependency, which
// had cost a decode work item as much as its exponentials.)
LINGLI_TARGET_AVX512 double exp_sum_avx512(float* s, int64_t n) {
    __m512 vm = _mm512_set1_ps(s[0]);
    for (int64_t p = 0; p < n; p += 16)
        vm = _mm512_mask_max_ps(vm, lanes(n - p), vm, _mm512_maskz_loadu_ps(lanes(n - p), s + p));
    const __m512 vmx = _mm512_set1_ps(_mm512_reduce_max_ps(vm));
    __m512 sum = _mm512_setzero_ps();
    for (int64_t p = 0; p < n; p += 16) {
        const __mmask16 m = lanes(n - p);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + p), vmx));
        _mm512_mask_storeu_ps(s + p, m, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
    }
    return hsum512(sum);
}

template <typename KV>
const AttnKernels<KV> kAvx512 = {scores_avx512<KV>, accum_avx512<KV>, exp_sum_avx512};
#endif  // __x86_64__

// NEON uses the plain kernels: their fixed-width loops auto-vectorize to
// Advanced SIMD, and attention is a small share of decode time.
template <typename KV>
const AttnKernels<KV>& kernels_for(Isa isa) {
    switch (isa) {
#if defined(__x86_64__)
        case Isa::Avx2: return kAvx2<KV>;
        case Isa::Avx512: return kAvx512<KV>;
#endif
        default: return kPlain<KV>;
    }
}

}  // namespace

template <typename KV>
void paged_attention(const float* q, const KV* k_cache, const KV* v_cache,
                     const int32_t* block_tables, int64_t table_stride, const int32_t* seq_ids,
                     const int32_t* q_positions, float* out,
                     int64_t T, int64_t Hq, int64_t Hkv, int64_t Dh, int64_t block_size,
                     float scale) {
    const AttnKernels<KV>& kern = kernels_for<KV>(current_isa());
    const int64_t group = Hq / Hkv;
    int64_t max_len = 0;
    for (int64_t t = 0; t < T; ++t) max_len = std::max<int64_t>(max_len, int64_t(q_positions[t]) + 1);
    int nt = threads_for_bytes(T * Hq * max_len * Dh * 8);
    // A work item is a token and hg query heads of one kv head (hg divides the
    // group): each block of K and V is then read and widened once for its hg
    // heads (while it is in L1) instead of once per head. hg is the whole group
    // when that gives every thread an item; else the groups are cut into as few
    // pieces as give nt items (one sequence of a model with one kv head). Every
    // head its own item whenever items were fewer than 4 per thread, as before,
    // made one TinyLlama-shape token (32 heads, 4 kv heads) slower on 2 threads
    // than on 1: 215 against 197 us at 2000 keys.
    int64_t hg = group;
    if (T * Hkv < nt) {
        const int64_t pieces = (nt + T * Hkv - 1) / (T * Hkv);
        for (hg = (group + pieces - 1) / pieces; group % hg != 0;) --hg;
    }
    const int64_t per_tok = Hq / hg, items = T * per_tok;
    if (nt > items) nt = static_cast<int>(items);

#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        std::vector<float> s(static_cast<size_t>(hg * max_len));
        std::vector<float> acc(static_cast<size_t>(hg * Dh));
        std::vector<double> sum(static_cast<size_t>(hg));
        // Rows have different lengths (causal), so hand out items dynamically.
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; ++it) {
            const int64_t t = it / per_tok, h0 = it % per_tok * hg, g = h0 / group;
            const int64_t len = int64_t(q_positions[t]) + 1;
            const int32_t* block_table = block_tables + (seq_ids ? seq_ids[t] : 0) * table_stride;
            const float* qv = q + (t * Hq + h0) * Dh;
            float* o = out + (t * Hq + h0) * Dh;

            // The blocks lie scattered over the pool, each a short run that the
            // hardware prefetchers barely start on: ask for every K and V row of
            // the item up front so the misses overlap (V is read after the softmax).
            for (int64_t p0 = 0; p0 < len; p0 += block_size) {
                const int64_t off = (block_table[p0 / block_size] * Hkv + g) * block_size * Dh;
                const int64_t bytes = std::min(block_size, len - p0) * Dh * int64_t(sizeof(KV));
                const char* kb = reinterpret_cast<const char*>(k_cache + off);
                const char* vb = reinterpret_cast<const char*>(v_cache + off);
                for (int64_t b = 0; b < bytes; b += 64) {
                    __builtin_prefetch(kb + b, 0, 3);
                    __builtin_prefetch(vb + b, 0, 2);
                }
            }
            for (int64_t p0 = 0; p0 < len; p0 += block_size) {
                const KV* kb = k_cache + (block_table[p0 / block_size] * Hkv + g) * block_size * Dh;
                const int64_t n = std::min(block_size, len - p0);
                kern.scores(qv, hg, kb, n, Dh, scale, s.data() + p0, len);
            }
            for (int64_t j = 0; j < hg; ++j) sum[j] = kern.exp_sum(s.data() + j * len, len);
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int64_t p0 = 0; p0 < len; p0 += block_size) {
                const KV* vb = v_cache + (block_table[p0 / block_size] * Hkv + g) * block_size * Dh;
                const int64_t n = std::min(block_size, len - p0);
                kern.accum(s.data() + p0, len, hg, vb, n, Dh, acc.data());
            }
            for (int64_t j = 0; j < hg; ++j) {
                const float inv = static_cast<float>(1.0 / sum[j]);
                for (int64_t d = 0; d < Dh; ++d) o[j * Dh + d] = acc[j * Dh + d] * inv;
            }
        }
    }
}

namespace {

// One row of keys or values into the cache: float32 as is, half rounded.
void store_row(const float* src, float* dst, int64_t n) { std::copy(src, src + n, dst); }

#if defined(__x86_64__)
LINGLI_TARGET_AVX2 void store_row_f16c(const float* src, uint16_t* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) dst[i] = float_to_half(src[i]);
}
#endif

void store_row(const float* src, uint16_t* dst, int64_t n) {
#if defined(__x86_64__)
    if (current_isa() != Isa::Plain) return store_row_f16c(src, dst, n);
#endif
    for (int64_t i = 0; i < n; ++i) dst[i] = float_to_half(src[i]);
}

}  // namespace

// Scatter the new keys/values of a batch into their cache slots: token t goes
// to block block_tables[seq_ids[t]][pos / block_size], slot pos % block_size.
template <typename KV>
void paged_write(KV* k_cache, KV* v_cache, const int32_t* block_tables, int64_t table_stride,
                 const int32_t* seq_ids, const int32_t* positions, const float* k, const float* v,
                 int64_t T, int64_t Hkv, int64_t Dh, int64_t block_size) {
    for (int64_t t = 0; t < T; ++t) {
        const int64_t pos = positions[t];
        const int64_t blk = block_tables[int64_t(seq_ids[t]) * table_stride + pos / block_size];
        const int64_t slot = pos % block_size;
        for (int64_t h = 0; h < Hkv; ++h) {
            const int64_t dst = ((blk * Hkv + h) * block_size + slot) * Dh;
            const int64_t src = (t * Hkv + h) * Dh;
            store_row(k + src, k_cache + dst, Dh);
            store_row(v + src, v_cache + dst, Dh);
        }
    }
}

// q rotated out, k rotated and v stored (ops.h). One token at a time: the
// work is a few heads' rows, less than a thread team's start-up.
template <typename KV>
void rope_write(const float* qkv, int64_t ld, float* q_out, KV* k_cache, KV* v_cache,
                const int32_t* block_tables, int64_t table_stride, const int32_t* seq_ids,
                const int32_t* positions, const float* cos, const float* sin, int64_t half_rot,
                bool interleaved, int64_t T, int64_t Hq, int64_t Hkv, int64_t Dh, int64_t block_size) {
    std::vector<float> k(static_cast<size_t>(Dh));
    for (int64_t t = 0; t < T; ++t) {
        const float* row = qkv + t * ld;
        const int64_t pos = positions[t];
        const float* c = cos + pos * half_rot;
        const float* s = sin + pos * half_rot;
        for (int64_t h = 0; h < Hq; ++h) {
            float* q = q_out + (t * Hq + h) * Dh;
            std::copy(row + h * Dh, row + (h + 1) * Dh, q);
            rope_head(q, c, s, half_rot, interleaved);
        }
        const int64_t blk = block_tables[int64_t(seq_ids[t]) * table_stride + pos / block_size];
        const int64_t slot = pos % block_size;
        for (int64_t h = 0; h < Hkv; ++h) {
            const int64_t dst = ((blk * Hkv + h) * block_size + slot) * Dh;
            const float* kr = row + (Hq + h) * Dh;
            std::copy(kr, kr + Dh, k.data());
            rope_head(k.data(), c, s, half_rot, interleaved);
            store_row(k.data(), k_cache + dst, Dh);
            store_row(row + (Hq + Hkv + h) * Dh, v_cache + dst, Dh);
        }
    }
}

// The two element types of the cache (ops.h).
template void paged_attention<float>(const float*, const float*, const float*, const int32_t*, int64_t,
                                     const int32_t*, const int32_t*, float*, int64_t, int64_t, int64_t,
                                     int64_t, int64_t, float);
template void paged_attention<uint16_t>(const float*, const uint16_t*, const uint16_t*, const int32_t*,
                                        int64_t, const int32_t*, const int32_t*, float*, int64_t, int64_t,
                                        int64_t, int64_t, int64_t, float);
template void paged_write<float>(float*, float*, const int32_t*, int64_t, const int32_t*, const int32_t*,
                                 const float*, const float*, int64_t, int64_t, int64_t, int64_t);
template void paged_write<uint16_t>(uint16_t*, uint16_t*, const int32_t*, int64_t, const int32_t*,
                                    const int32_t*, const float*, const float*, int64_t, int64_t, int64_t,
                                    int64_t);
template void rope_write<float>(const float*, int64_t, float*, float*, float*, const int32_t*, int64_t,
                                const int32_t*, const int32_t*, const float*, const float*, int64_t, bool,
                                int64_t, int64_t, int64_t, int64_t, int64_t);
template void rope_write<uint16_t>(const float*, int64_t, float*, uint16_t*, uint16_t*, const int32_t*,
                                   int64_t, const int32_t*, const int32_t*, const float*, const float*,
                                   int64_t, bool, int64_t, int64_t, int64_t, int64_t, int64_t);

}  // namespace lingli
