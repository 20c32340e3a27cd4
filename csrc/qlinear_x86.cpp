// x86 quantized matrix products: AVX2 (maddubs) and AVX-512 VNNI (vpdpbusd).
//
// Both compute, per 32-input block b, the exact integer dot of the int8
// activation codes with the weight codes, then y += d_b * (s * dot + m * sum_b)
// in float (qlinear.h). The min term is summed per group up front:
// sum_b d_b m_g sum_b = sum_g m_g C_g with C_g = sum_{b in g} d_b sum_b, an
// activation-only vector, so it costs one short dot per output. int4/int3
// groups carry either f16 s and m or byte codes under a row scale (chosen
// per matrix; qlinear.h: group parameters): AVX-512 converts or decodes them
// 16 groups at a time (group_params16_f16 / group_params16), AVX2 per group
// (group_scale, group_min); int8's f16 scales are converted.
//
// AVX-512 VNNI (the kernels are in qlinear_x86_vnni.inc) has three kernels,
// by the number of activation rows m (qlinear.h: vnni_tile_min_rows):
//
// Decode (m = 1, run_decode). The unit of work is an "octet" of 8 blocks
// (256 inputs). Every format is unpacked with shifts, masks and 64-bit
// permutes into the same planar order: four registers j = 0..3 whose qword
// k holds codes 8j..8j+7 of block k. The activations are rearranged once per
// call to match, so one vpdpbusd accumulator per octet holds each block's dot
// in 2 int32 lanes, converted and scaled once per octet:
//   int3: the 64 low-plane bytes of 8 blocks: (L >> 2j) & 3 is plane j (one
//         GF(2) affine map with GFNI); the high plane's bits are placed at
//         bit 2 of each byte by vpmultishiftqb (AVX512_VBMI) and or-ed in,
//         else it gives one 64-bit mask per plane (byte transpose), added as +4.
//   int4: two 64-byte loads; their even/odd qwords, low and high nibbles.
//   int8: codes made unsigned (w ^ 0x80 = w + 128) and transposed; each
//         accumulator lane starts at -128 times the sum of the activation
//         codes it meets, so every lane holds its exact partial dot.
// The float step per octet is cvt, * d (per lane, precomputed) and an FMA
// with the weight scales (the octet's scales, spread by one permute). It
// streams one weight row at a time with no masks on full octets, 16 group
// parameters decoded at a time and software prefetch kPrefetchBytes ahead:
// memory-bound, ~90-100% of the read bandwidth.
//
// Batched decode (a few rows: a continuous-batching engine's decode step,
// run_few, "batched decode" below). Decode's cost per row would be mostly
// its float steps and unpacking, so here the unit is a "hexad" of 16 blocks
// with one lane per block (8 vpdpbusd per float step) and each unpacked
// weight hexad serves 8 activation rows, 2 weight rows sharing each x load:
// the weights are read from memory once per call, and an extra row costs
// ~0.4-0.5 cycles per 32 inputs per weight row on Zen 5 (its vector pipes'
// bound for this mix is 0.34: 8 vpdpbusd + 3 float ops per 16 blocks, 2 per
// cycle). Up to 8 rows per pass; K is cut
// into chunks whose activations stay in L1, the weight rows into L2-sized
// blocks, the next block prefetched under the current one's work.
//
// Prefill and batched decode past a few rows ("VNNI prefill" below):
// activation rows in the int32 lanes, 16 per tile; int4 codes are split from
// their packed bytes in registers, int3 decoded to int8 per row block.
//
// The activation buffers are 64-byte aligned; weights need not be (numpy and
// mmap views often are not), so each weight vector is loaded once and
// split-line loads stay few.
//
// AVX2: one block at a time in natural order (int4: nibble split, int3:
// broadcast + variable shift, high bits by byte shuffle + compare), maddubs
// (int8: |w| with w's sign moved onto x, so pair sums stay below 2^15), then
// madd with ones, convert, one FMA per block and activation row.

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "qlinear.h"
#include "simd.h"  // before <immintrin.h>: holds the GCC 12 warning workaround

#if defined(__x86_64__)
#include <immintrin.h>

#define LINGLI_TARGET_VNNI \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
// The int3 kernel has a faster unpack with GFNI (vgf2p8affineqb) and
// AVX512_VBMI (vpmultishiftqb), both on Ice Lake, Zen 4 and later; this set
// is only entered when the CPU has them.
#define LINGLI_TARGET_VNNI_EXT \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi,gfni,avx2,fma,f16c")))

namespace lingli {

// LINGLI_NO_BITALG=1 forces the int3 path for VNNI CPUs without GFNI and
// AVX512_VBMI (tests; the name is from when the fast path used BITALG).
static bool cpu_has_vnni_ext() {
    static const bool ok = cpu_has_avx512_vnni() && __builtin_cpu_supports("avx512vbmi") &&
                           __builtin_cpu_supports("gfni") &&
                           !std::getenv("LINGLI_NO_BITALG");
    return ok;
}

bool cpu_has_avx512_vnni() {
    static const bool ok =
        __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx2") &&
        __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    return ok;
}

namespace {

// Weight rows per cache block for prefill: about this many weight bytes stay
// in L2 while every tile of activation rows passes over them.
constexpr int64_t kRowBlockBytes = 256 << 10;

int64_t rows_per_block(const QMatrix& w, int64_t m) {
    if (m <= 4) return INT64_MAX;  // one pass over the weights anyway
    return std::max<int64_t>(1, kRowBlockBytes / std::max<int64_t>(1, row_bytes(w)));
}

// C_g = sum_{b in g} d_b * sum_b for one activation row, zero-padded to `ngp`.
void min_coeffs(const QActs& a, int64_t i, int group_size, float* c, int64_t ngp) {
    const int64_t nb = a.kp / QBLOCK, ng = a.kp / group_size, bpg = group_size / QBLOCK;
    const float* d = a.d + i * nb;
    const int32_t* s = a.sums + i * nb;
    for (int64_t g = 0; g < ng; ++g) {
        float t = 0.f;
        for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) t += d[b] * static_cast<float>(s[b]);
        c[g] = t;
    }
    for (int64_t g = ng; g < ngp; ++g) c[g] = 0.f;
}

// =============================================================== AVX2 ===

struct Avx2Prep {
    int64_t ngp = 0;
    std::vector<float> c;  // [m][ngp]
    std::vector<float> mg;  // [ngp]: the current weight row's group mins (int4/int3), zero-padded
};

LINGLI_TARGET_AVX2 inline __m256i unpack_block_avx2(const QMatrix& w, const uint8_t* q,
                                                    const uint8_t* qh, int64_t b) {
    if (w.bits == 4) {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + b * 16));
        const __m256i both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
        return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
    }
    // int3: low plane broadcast to 4 qwords, qword j shifted by 2j.
    int64_t lo;
    std::memcpy(&lo, q + b * 8, 8);
    __m256i v = _mm256_srlv_epi64(_mm256_set1_epi64x(lo), _mm256_setr_epi64x(0, 2, 4, 6));
    v = _mm256_and_si256(v, _mm256_set1_epi8(3));
    int32_t hi;
    std::memcpy(&hi, qh + b * 4, 4);
    const __m256i spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(hi),
        _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                         2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
    return _mm256_or_si256(v, _mm256_and_si256(set, _mm256_set1_epi8(4)));
}

template <int R>
LINGLI_TARGET_AVX2 void tile_avx2(const QMatrix& w, const QActs& a, Avx2Prep& p, int64_t i0,
                                  int64_t ra, int64_t rb, float* out, int64_t ldo) {
    const int64_t nb = w.kp / QBLOCK, ng = w.kp / w.group_size, bpg = w.group_size / QBLOCK;
    const int64_t qstride = code_stride(w);
    const bool mins = w.bits != 8;
    const __m256i ones = _mm256_set1_epi16(1);
    float* mg = p.mg.data();
    for (int64_t r = ra; r < rb; ++r) {
        const uint8_t* q = w.q + r * qstride;
        const uint8_t* qh = w.qh ? w.qh + r * (w.kp / 8) : nullptr;
        __m256 acc[R];
        for (int i = 0; i < R; ++i) acc[i] = _mm256_setzero_ps();
        for (int64_t g = 0; g < ng; ++g) {
            const float s = group_scale(w, r, g);  // either encoding (qlinear.h)
            if (mins) mg[g] = group_min(w, r, g, s);
            for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
                if (w.bits == 8) {
                    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * 32));
                    const __m256i aw = _mm256_abs_epi8(wv);
                    for (int i = 0; i < R; ++i) {
                        const __m256i xv = _mm256_loadu_si256(
                            reinterpret_cast<const __m256i*>(a.q + (i0 + i) * a.kp + b * 32));
                        const __m256i p16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv));
                        const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
                        acc[i] = _mm256_fmadd_ps(f, _mm256_set1_ps(a.d[(i0 + i) * nb + b] * s), acc[i]);
                    }
                } else {
                    const __m256i cv = unpack_block_avx2(w, q, qh, b);
                    for (int i = 0; i < R; ++i) {
                        const __m256i xv = _mm256_loadu_si256(
                            reinterpret_cast<const __m256i*>(a.q + (i0 + i) * a.kp + b * 32));
                        const __m256i p16 = _mm256_maddubs_epi16(cv, xv);
                        const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
                        acc[i] = _mm256_fmadd_ps(f, _mm256_set1_ps(a.d[(i0 + i) * nb + b] * s), acc[i]);
                    }
                }
            }
        }
        if (mins) {
            for (int64_t g = 0; g < ng; g += 8) {  // mg and c are zero-padded to a multiple of 16
                const __m256 mv = _mm256_loadu_ps(mg + g);
                for (int i = 0; i < R; ++i)
                    acc[i] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(p.c.data() + (i0 + i) * p.ngp + g), acc[i]);
            }
        }
        for (int i = 0; i < R; ++i) out[(i0 + i) * ldo + r] = hsum256(acc[i]);
    }
}

// ============================================================ AVX-512 ===

template <class T>
struct Aligned64 {
    using value_type = T;
    Aligned64() = default;
    template <class U>
    Aligned64(const Aligned64<U>&) {}
    T* allocate(size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64))); }
    void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
    template <class U>
    bool operator==(const Aligned64<U>&) const { return true; }
    template <class U>
    bool operator!=(const Aligned64<U>&) const { return false; }
};

// T[c]'s bits (qlinear.h) are kScaleSteps[c & 15] + (c << 19): c << 19 puts
// the octave c >> 4 at the exponent (bit 23) and the step c & 15 at bit 19,
// which the table (F[j] * 2^-15 as bits, less j << 19) cancels.
struct ScaleSteps {
    alignas(64) int32_t v[16];
    constexpr ScaleSteps() : v{} {
        for (int j = 0; j < 16; ++j)
            v[j] = static_cast<int32_t>(kScaleStepBits[j] - (15u << 23) - (static_cast<uint32_t>(j) << 19));
    }
};
constexpr ScaleSteps kScaleSteps{};

// s and m of 16 int4/int3 groups (lanes outside k: 0), bit for bit
// group_scale and group_min: from their codes sc, mc and the row scale *rs
// (codes encoding), or their f16 sf, mf (f16 encoding). rs null: as if
// R = 1 (the prefill tiles apply R per row at the end).
LINGLI_TARGET_VNNI __attribute__((always_inline)) inline void group_params16(const uint8_t* sc, const int8_t* mc,
                                                                              const float* rs, __mmask16 k,
                                                                              __m512& s, __m512& m) {
    const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, sc));
    const __m512i t = _mm512_add_epi32(_mm512_permutexvar_epi32(c, _mm512_load_si512(kScaleSteps.v)),
                                       _mm512_slli_epi32(c, 19));  // permutexvar reads c & 15
    s = _mm512_maskz_mul_ps(k, _mm512_set1_ps(rs ? *rs : 1.f), _mm512_castsi512_ps(t));
    const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, mc)));
    m = _mm512_mul_ps(_mm512_mul_ps(s, z), _mm512_set1_ps(0.125f));
}

LINGLI_TARGET_VNNI __attribute__((always_inline)) inline void group_params16_f16(const uint16_t* sf, const uint16_t* mf,
                                                                                  __mmask16 k, __m512& s, __m512& m) {
    s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, sf));
    m = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mf));
}

}  // namespace

// Activation rows rearranged once per call into the planar order the weight
// unpacking produces: per octet o (8 blocks), four 64-byte planes j = 0..3
// whose qword k holds codes 8j..8j+7 of block 8o+k.
struct VnniPrep {
    int64_t m = 0, nb = 0, no = 0, ngp = 0;
    // 64-byte aligned: every 512-bit load of them stays within one cache line.
    std::vector<int8_t, Aligned64<int8_t>> xq;     // [m][no][256] planar codes
    std::vector<float, Aligned64<float>> dl;       // [m][no][16]: d of lane l's block (8o + l/2)
    std::vector<int32_t, Aligned64<int32_t>> init;  // int8: [m][no][16]: -128 * (sum of the 16 codes lane l sees)
    std::vector<float, Aligned64<float>> c;        // int4/int3: [m][ngp] min coefficients
};

static void prepare_vnni(const QMatrix& w, const QActs& a, VnniPrep& p) {
    p.m = a.m;
    p.nb = a.kp / QBLOCK;
    p.no = (p.nb + 7) / 8;
    const int64_t ng = a.kp / w.group_size;
    p.ngp = (ng + 15) / 16 * 16;
    p.xq.assign(static_cast<size_t>(p.m * p.no * 256), 0);
    p.dl.assign(static_cast<size_t>(p.m * p.no * 16), 0.f);
    if (w.bits == 8) p.init.assign(static_cast<size_t>(p.m * p.no * 16), 0);
    else p.c.resize(static_cast<size_t>(p.m * p.ngp));
    for (int64_t i = 0; i < p.m; ++i) {
        for (int64_t b = 0; b < p.nb; ++b) {
            const int64_t o = b / 8, k = b % 8;
            const int8_t* src = a.q + i * a.kp + b * 32;
            int8_t* dst = p.xq.data() + (i * p.no + o) * 256 + k * 8;
            for (int j = 0; j < 4; ++j) std::memcpy(dst + j * 64, src + j * 8, 8);
            float* dl = p.dl.data() + (i * p.no + o) * 16 + k * 2;
            dl[0] = dl[1] = a.d[i * p.nb + b];
            if (w.bits == 8) {
                int32_t* in = p.init.data() + (i * p.no + o) * 16 + k * 2;
                for (int h = 0; h < 2; ++h) {
                    int32_t s = 0;
                    for (int j = 0; j < 4; ++j)
                        for (int e = 0; e < 4; ++e) s += src[8 * j + 4 * h + e];
                    in[h] = -128 * s;
                }
            }
        }
        if (w.bits != 8) min_coeffs(a, i, w.group_size, p.c.data() + i * p.ngp, p.ngp);
    }
}

VnniPrep* vnni_prep(const QMatrix& w, const QActs& a, int slot) {
    thread_local VnniPrep p[kMaxParts];  // one per part of a qlinear_parts call
    prepare_vnni(w, a, p[slot]);
    return &p[slot];
}

namespace {

// 16 x 8 dword transpose: z[t] holds rows 2t and 2t + 1 (8 dwords each);
// out[j] lane l = dword j of row l. Three rounds of two-source dword
// permutes (rows 4q..4q+3 per vector, then 8, then 16).
LINGLI_TARGET_VNNI __attribute__((always_inline)) inline void transpose16x8(const __m512i (&z)[8],
                                                                             __m512i (&out)[8]) {
    alignas(64) static constexpr struct Idx {
        int32_t i1[2][16], i2[2][16], i3[2][16];
        constexpr Idx() : i1{}, i2{}, i3{} {
            for (int h = 0; h < 2; ++h)
                for (int n = 0; n < 16; ++n) {
                    const int j1 = 4 * h + n / 4, r1 = n % 4;  // stage 1: lane j'*4 + r'
                    i1[h][n] = (r1 >> 1) * 16 + (r1 & 1) * 8 + j1;
                    const int j2 = 2 * h + n / 8, r2 = n % 8;  // stage 2 (e = h): lane jj*8 + r''
                    i2[h][n] = (r2 >> 2) * 16 + j2 * 4 + (r2 & 3);
                    i3[h][n] = (n >> 3) * 16 + h * 8 + (n & 7);  // stage 3 (jj = h): lane l
                }
        }
    } kIdx{};
    __m512i A[4][2], B[2][2][2];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q)
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h)
            A[q][h] = _mm512_permutex2var_epi32(z[2 * q], _mm512_load_si512(kIdx.i1[h]), z[2 * q + 1]);
#pragma GCC unroll 2
    for (int s2 = 0; s2 < 2; ++s2)
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h)
#pragma GCC unroll 2
            for (int e = 0; e < 2; ++e)
                B[s2][h][e] = _mm512_permutex2var_epi32(A[2 * s2][h], _mm512_load_si512(kIdx.i2[e]), A[2 * s2 + 1][h]);
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h)
#pragma GCC unroll 2
        for (int e = 0; e < 2; ++e)
#pragma GCC unroll 2
            for (int jj = 0; jj < 2; ++jj)
                out[4 * h + 2 * e + jj] = _mm512_permutex2var_epi32(B[0][h][e], _mm512_load_si512(kIdx.i3[jj]), B[1][h][e]);
}

}  // namespace

// ====================================================== batched decode ===
// A few activation rows (qlinear.h: VnniFew). The unit is a "hexad" of 16
// blocks (512 inputs) with one int32 lane per block: plane j (j = 0..7) of a
// hexad holds dword j (codes 4j..4j+3) of each of its 16 blocks, so one
// weight row against one activation row is 8 vpdpbusd into one accumulator
// whose lanes are the 16 block dots, then cvt, one multiply (d * s per lane)
// and one FMA (plus one FMA for the min term: lanes d_b * sum_b against the
// mins spread to blocks). The activation rows are rearranged once per call
// into records of 640 bytes per (hexad, row): the 8 planes, the lanes' d,
// then d_b * sum_b (int4/int3) or -128 * sum_b (int8, whose weights enter
// as w + 128). Records of one hexad are adjacent for all rows, so the x
// loads of a hexad walk consecutive cache lines.
//
// The kernels take the rows in passes of at most kFewRows (few_pass_row),
// in even numbers: a pass of an odd number of rows also reads the next row,
// for the last pass a spare row of zeros (mr = m + 1 records per hexad).
// A last 1..8 blocks ("tail", as in K = 576 = 18 blocks) would waste most
// of a hexad; their T blocks take L = 1, 2, 4 or 8 lanes (L >= T), and one
// record holds 16 / L rows of a pass (lane g * L + l: row g, block l).
constexpr int64_t kHexRec = 640;
constexpr int kFewRows = 8;

inline int64_t few_passes(int64_t m) { return (m + kFewRows - 1) / kFewRows; }
inline int64_t few_pass_row(int64_t m, int64_t k) { return m * k / few_passes(m); }  // first row of pass k

struct VnniFew {
    int64_t m = 0, mr = 0, nb = 0, nh = 0;
    int64_t tail = 0, tl = 0;            // tail blocks (0: none) and lanes per row
    std::vector<int64_t> toff;           // per pass: its first tail record
    std::vector<uint8_t, Aligned64<uint8_t>> buf;  // [nh][mr][640], then the tail records
    const uint8_t* hex(int64_t h, int64_t i) const { return buf.data() + (h * mr + i) * kHexRec; }
    const uint8_t* trec(int64_t t) const { return buf.data() + (nh * mr + t) * kHexRec; }
};

VnniFew* vnni_few(const QMatrix& w, const QActs& a) {
    thread_local VnniFew f;
    f.m = a.m;
    f.mr = a.m + 1;
    f.nb = a.kp / QBLOCK;
    const int64_t r = f.nb % 16;
    f.tail = r >= 1 && r <= 8 ? r : 0;
    f.tl = f.tail <= 1 ? 1 : f.tail <= 2 ? 2 : f.tail <= 4 ? 4 : 8;
    f.nh = (f.nb - f.tail + 15) / 16;
    const int64_t np = few_passes(f.m), g = 16 / f.tl;
    f.toff.assign(static_cast<size_t>(np + 1), 0);
    for (int64_t k = 0; k < np; ++k) {
        const int64_t rows = (few_pass_row(f.m, k + 1) - few_pass_row(f.m, k) + 1) / 2 * 2;
        f.toff[k + 1] = f.toff[k] + (f.tail ? (rows + g - 1) / g : 0);
    }
    f.buf.resize(static_cast<size_t>((f.nh * f.mr + f.toff[np]) * kHexRec));
    for (int64_t h = 0; h < f.nh; ++h) std::memset(const_cast<uint8_t*>(f.hex(h, f.m)), 0, kHexRec);
    (void)w;
    return &f;
}

LINGLI_TARGET_VNNI void vnni_few_fill(VnniFew* fp, const QMatrix& w, const QActs& a) {
    VnniFew& f = *fp;
    const int64_t nb = f.nb;
    const bool int8 = w.bits == 8;
    const __m512i zero = _mm512_setzero_si512();
    for (int64_t i = 0; i < f.m; ++i) {
        const int8_t* xr = a.q + i * a.kp;
        for (int64_t h = 0; h < f.nh; ++h) {
            const int64_t nbk = std::min<int64_t>(16, nb - 16 * h);
            uint8_t* rec = const_cast<uint8_t*>(f.hex(h, i));
            __m512i z[8], pl[8];
#pragma GCC unroll 8
            for (int t = 0; t < 8; ++t) {
                const int64_t n = nbk * 32 - t * 64;
                z[t] = n >= 64 ? _mm512_loadu_si512(xr + h * 512 + t * 64)
                               : _mm512_maskz_loadu_epi8(n <= 0 ? 0 : (~0ULL >> (64 - n)), xr + h * 512 + t * 64);
            }
            transpose16x8(z, pl);
#pragma GCC unroll 8
            for (int j = 0; j < 8; ++j) _mm512_store_si512(rec + j * 64, pl[j]);
            const __mmask16 bm = static_cast<__mmask16>(nbk >= 16 ? 0xffffu : (1u << nbk) - 1u);
            const __m512 d = _mm512_maskz_loadu_ps(bm, a.d + i * nb + h * 16);
            const __m512i sm = _mm512_maskz_loadu_epi32(bm, a.sums + i * nb + h * 16);
            _mm512_store_ps(reinterpret_cast<float*>(rec + 512), d);
            if (int8) _mm512_store_si512(rec + 576, _mm512_sub_epi32(zero, _mm512_slli_epi32(sm, 7)));
            else _mm512_store_ps(reinterpret_cast<float*>(rec + 576), _mm512_mul_ps(d, _mm512_cvtepi32_ps(sm)));
        }
    }
    if (!f.tail) return;
    const int64_t b0 = f.nh * 16, L = f.tl, G = 16 / L;
    for (int64_t k = 0; k + 1 < static_cast<int64_t>(f.toff.size()); ++k) {
        const int64_t i0 = few_pass_row(f.m, k), i1 = few_pass_row(f.m, k + 1);
        for (int64_t t = f.toff[k]; t < f.toff[k + 1]; ++t) {
            uint8_t* rec = const_cast<uint8_t*>(f.trec(t));
            std::memset(rec, 0, kHexRec);
            int32_t* pl = reinterpret_cast<int32_t*>(rec);
            float* dl = reinterpret_cast<float*>(rec + 512);
            float* el = reinterpret_cast<float*>(rec + 576);
            for (int64_t g = 0; g < G; ++g) {
                const int64_t i = i0 + (t - f.toff[k]) * G + g;
                if (i >= i1) break;
                for (int64_t l = 0; l < f.tail; ++l) {
                    const int64_t b = b0 + l, lane = g * L + l;
                    for (int j = 0; j < 8; ++j) std::memcpy(pl + j * 16 + lane, a.q + i * a.kp + b * 32 + j * 4, 4);
                    dl[lane] = a.d[i * nb + b];
                    if (int8) reinterpret_cast<int32_t*>(el)[lane] = -128 * a.sums[i * nb + b];
                    else el[lane] = a.d[i * nb + b] * static_cast<float>(a.sums[i * nb + b]);
                }
            }
        }
    }
}

// Decode prefetch distance in the weight code stream (~4 int4 rows of 4096).
constexpr int64_t kPrefetchBytes = 8192;
// Batched decode: x records per K chunk (to stay in L1 with the weight
// stream); weight bytes per row block when there are several chunks or
// passes.
constexpr int64_t kFewChunkBytes = 24 << 10;
constexpr int64_t kFewBlockBytes = 128 << 10;

// Byte ranges prefetched a slice at a time (into L2): the next row block's
// codes, high plane and group parameters while the current block is computed
// (batched decode and prefill tiles).
struct PrefetchRanges {
    static constexpr int kSlots = 6;
    const char* p[kSlots];
    int64_t n[kSlots];
    int k = 0, cnt = 0;
    void add(const void* ptr, int64_t bytes) {
        p[cnt] = static_cast<const char*>(ptr);
        n[cnt++] = bytes;
    }
    int64_t total() const {
        int64_t t = 0;
        for (int i = 0; i < cnt; ++i) t += n[i];
        return t;
    }
    void run(int64_t bytes) {
        for (; bytes > 0 && k < cnt; ) {
            const int64_t b = std::min(bytes, n[k]);
            for (int64_t t = 0; t < b; t += 64) _mm_prefetch(p[k] + t, _MM_HINT_T1);
            p[k] += b;
            n[k] -= b;
            bytes -= b;
            if (n[k] == 0) ++k;
        }
    }
    // Frees the slots already issued, so more ranges can be added.
    void drop_issued() {
        int j = 0;
        for (int i = k; i < cnt; ++i, ++j) {
            p[j] = p[i];
            n[j] = n[i];
        }
        k = 0;
        cnt = j;
    }
    int free_slots() const { return kSlots - cnt; }
};

// A thread's share of a PrefetchPlan (qlinear.h): ranges taken one at a time
// from the product's PlanShare (K and V of a range enter as two slots), then
// issued a slice at a time under the kernel's steps.
struct PlanFeed {
    PlanShare* s;      // null once the plan is used up
    int64_t per_row;   // bytes to issue per weight row done (0: no plan)
    PrefetchRanges cur;
    explicit PlanFeed(PlanShare* share) : s(share), per_row(share ? share->per_row : 0) {}
    // Tops `cur` up to `bytes` pending, or as far as the plan goes.
    void fill(int64_t bytes) {
        int64_t have = cur.total();
        if (!s || have >= bytes) return;
        cur.drop_issued();
        while (have < bytes && cur.free_slots() >= 2) {
            const int64_t i = s->next.fetch_add(1, std::memory_order_relaxed);
            if (i >= s->plan->n) {
                s = nullptr;
                return;
            }
            const int64_t off = s->plan->ranges[2 * i], nb = s->plan->ranges[2 * i + 1];
            cur.add(s->plan->base[0] + off, nb);
            cur.add(s->plan->base[1] + off, nb);
            have += 2 * nb;
        }
    }
    void run(int64_t bytes) {
        fill(bytes);
        cur.run(bytes);
    }
    // Whatever this thread took and has not issued yet.
    void finish() { cur.run(cur.total()); }
};

// Every byte of weight rows [ra, rb): codes, int3 high plane, group parameters.
inline void add_weight_rows(PrefetchRanges& pr, const QMatrix& w, int64_t ra, int64_t rb) {
    if (rb <= ra) return;
    const int64_t qstride = code_stride(w), ng = w.kp / w.group_size;
    // Group parameters (and int8's code sums) first: the block's decode reads
    // them before the products read the codes.
    if (coded(w)) {
        pr.add(w.scale_codes + ra * ng, (rb - ra) * ng);
        pr.add(w.min_codes + ra * ng, (rb - ra) * ng);
        pr.add(w.row_scale + ra, (rb - ra) * 4);
    } else {
        pr.add(w.scales + ra * ng, (rb - ra) * ng * 2);
        if (w.bits != 8) pr.add(w.mins + ra * ng, (rb - ra) * ng * 2);
    }
    if (w.code_sums) pr.add(w.code_sums + ra * (w.kp / QBLOCK), (rb - ra) * (w.kp / QBLOCK) * 2);
    pr.add(w.q + ra * qstride, (rb - ra) * qstride);
    if (w.bits == 3) pr.add(w.qh + ra * (w.kp / 8), (rb - ra) * (w.kp / 8));
}

namespace vnni_base {
#define LINGLI_VNNI_TARGET LINGLI_TARGET_VNNI
#define LINGLI_VNNI_EXT 0
#include "qlinear_x86_vnni.inc"
#undef LINGLI_VNNI_TARGET
#undef LINGLI_VNNI_EXT
}  // namespace vnni_base

namespace vnni_ext {
#define LINGLI_VNNI_TARGET LINGLI_TARGET_VNNI_EXT
#define LINGLI_VNNI_EXT 1
#include "qlinear_x86_vnni.inc"
#undef LINGLI_VNNI_TARGET
#undef LINGLI_VNNI_EXT
}  // namespace vnni_ext

// ======================================================= VNNI prefill ===
// Many activation rows (qlinear.h: VnniTiles). Lanes are activation rows:
// a tile holds 16 rows, and for block b its plane t (t = 0..7) is one
// 64-byte vector whose int32 lane l holds codes 4t..4t+3 of row l's block b.
// One block of one weight row against 16 activation rows is 8 vpdpbusd into
// int32 accumulators, then cvt, * (d_b lanes * s) and one FMA; the 8 planes
// of a block are loaded once and used by C = 8 weight rows. vpdpbusd takes
// one operand unsigned and one signed, so by format:
//   int4: the codes (0..15) are the unsigned side, the planes hold x as is.
//         Dword t of a block's 16 packed bytes is broadcast and split by two
//         ANDs: its low nibbles are codes 4t..4t+3 (plane t), its high
//         nibbles, kept in place as 16 * code, codes 16+4t.. (plane 4 + t;
//         that sum is shifted right by 4, exactly). Nothing is decoded to
//         memory: a decode pass (unpack, code sums) had cost as much as a
//         third of a 16-row product at K = 576, and at 16 rows the two ANDs
//         hide under the vpdpbusd (SmolLM2 shapes 1.14-1.29x faster).
//   int8, int3: the planes hold x + 128 (unsigned) and the weight codes,
//         signed, enter as an embedded broadcast 4-byte operand; the
//         accumulator starts at -128 * the block's weight code sum, which
//         undoes the +128. int3 is decoded per row block into int8 codes;
//         int8 is used in place and takes the sums from QMatrix::code_sums
//         when given, as a pass over the codes for them would stall on
//         memory with nothing to overlap.
struct VnniTiles {
    int64_t m = 0, ntile = 0, nb = 0, ng = 0, kp = 0;
    int group_size = 32;
    bool mins = false;
    bool biased = true;                           // planes hold x + 128 (not int4)
    std::vector<uint8_t, Aligned64<uint8_t>> xq;  // [ntile][nb][8][64]
    std::vector<float, Aligned64<float>> dl;      // [ntile][nb][16]: d of (row l, block b)
    std::vector<float, Aligned64<float>> cl;      // int4/int3: [ntile][ng][16] min coefficients C_g
};

VnniTiles* vnni_tiles(const QMatrix& w, const QActs& a) {
    thread_local VnniTiles t;
    t.m = a.m;
    t.ntile = (a.m + 15) / 16;
    t.kp = a.kp;
    t.nb = a.kp / QBLOCK;
    t.ng = a.kp / w.group_size;
    t.group_size = w.group_size;
    t.mins = w.bits != 8;
    t.biased = w.bits != 4;
    t.xq.resize(static_cast<size_t>(t.ntile * t.nb * 512));
    t.dl.resize(static_cast<size_t>(t.ntile * t.nb * 16));
    if (t.mins) t.cl.resize(static_cast<size_t>(t.ntile * t.ng * 16));
    return &t;
}

int64_t vnni_tile_count(const VnniTiles* t) { return t->ntile; }

// Per tile and block: the 16 x 32 codes are transposed as 16 x 8 dwords
// (transpose16x8), offset by 128 unless int4, and stored as the 8 planes.
LINGLI_TARGET_VNNI void vnni_tiles_fill(VnniTiles* tp, const QActs& a, int64_t t0, int64_t t1) {
    VnniTiles& t = *tp;
    const int64_t nb = t.nb, ng = t.ng, bpg = t.group_size / QBLOCK;
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(t.biased ? 0x80 : 0));
    for (int64_t T = t0; T < t1; ++T) {
        uint8_t* xq = t.xq.data() + T * nb * 512;
        float* dl = t.dl.data() + T * nb * 16;
        const int nl = static_cast<int>(std::min<int64_t>(16, t.m - T * 16));
        const int8_t* src[16];
        for (int l = 0; l < 16; ++l) src[l] = a.q + (T * 16 + std::min(l, nl - 1)) * a.kp;
        for (int64_t b = 0; b < nb; ++b) {
            __m512i Z[8];
            for (int p = 0; p < 8; ++p) {
                const __m256i lo = 2 * p < nl ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src[2 * p] + b * 32))
                                              : _mm256_setzero_si256();
                const __m256i hi = 2 * p + 1 < nl ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src[2 * p + 1] + b * 32))
                                                  : _mm256_setzero_si256();
                Z[p] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            }
            __m512i P[8];
            transpose16x8(Z, P);
            for (int j = 0; j < 8; ++j)
                _mm512_store_si512(xq + b * 512 + j * 64, _mm512_xor_si512(P[j], flip));
            for (int l = 0; l < 16; ++l) dl[b * 16 + l] = l < nl ? a.d[(T * 16 + l) * nb + b] : 0.f;
        }
        if (t.mins) {
            float* cl = t.cl.data() + T * ng * 16;
            for (int l = 0; l < 16; ++l) {
                const int64_t i = T * 16 + l;
                const float* d = a.d + i * nb;
                const int32_t* s = a.sums + i * nb;
                for (int64_t g = 0; g < ng; ++g) {
                    float c = 0.f;
                    if (l < nl)
                        for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) c += d[b] * static_cast<float>(s[b]);
                    cl[g * 16 + l] = c;
                }
            }
        }
    }
}

namespace {

// Decoded weight rows [ra, rb): int8 codes (int3), -128 * block code sums
// (int8/int3), and f32 group scales and (int4/int3) mins, less the row scale
// in the codes encoding. int4 needs only the group parameters (its codes
// are split in the kernel).
struct TileWeights {
    std::vector<int8_t, Aligned64<int8_t>> codes;  // [rows][kp] (int3)
    std::vector<int32_t> init;                     // [rows][nb] (int8/int3)
    std::vector<float> sf, mf;                     // [rows][ng]
};

LINGLI_TARGET_VNNI void decode_tile_rows(const QMatrix& w, int64_t ra, int64_t rb, TileWeights& tw) {
    const int64_t nb = w.kp / QBLOCK, ng = w.kp / w.group_size, n = rb - ra;
    const int64_t qstride = code_stride(w);
    const bool cod = coded(w);
    if (w.bits == 3) tw.codes.resize(static_cast<size_t>(n * w.kp));
    if (w.bits != 4) tw.init.resize(static_cast<size_t>(n * nb));
    tw.sf.resize(static_cast<size_t>(n * ng));
    if (w.bits != 8) tw.mf.resize(static_cast<size_t>(n * ng));
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    for (int64_t r = w.bits == 4 ? rb : ra; r < rb; ++r) {  // int4: parameters only
        const int64_t rr = r - ra;
        const uint8_t* q = w.q + r * qstride;
        const uint8_t* qh = w.qh ? w.qh + r * (w.kp / 8) : nullptr;
        int32_t* init = tw.init.data() + rr * nb;
        int64_t b = 0;
        if (w.bits == 8 && w.code_sums) {
            // Codes used in place, their block sums given: 16 blocks per step.
            const int16_t* cs = w.code_sums + r * nb;
            for (; b < nb; b += 16) {
                const __mmask16 bm = static_cast<__mmask16>(nb - b >= 16 ? 0xffffu : (1u << (nb - b)) - 1u);
                const __m512i s16 = _mm512_cvtepi16_epi32(_mm256_maskz_loadu_epi16(bm, cs + b));
                _mm512_mask_storeu_epi32(init + b, bm, _mm512_mullo_epi32(s16, _mm512_set1_epi32(-128)));
            }
        }
        if (w.bits == 8) {
            // Codes used in place; without code_sums their block sums come
            // from here, 4 blocks per step: sad of (code ^ 0x80) = code + 128
            // summed per qword, the qwords of each block added by two rounds
            // of pair sums.
            const __m512i flip8 = _mm512_set1_epi8(static_cast<char>(0x80));
            const __m512i ev = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
            const __m512i od = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
            const __m512i ixs = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
            for (; b + 4 <= nb; b += 4) {
                const __m512i A = _mm512_sad_epu8(_mm512_xor_si512(_mm512_loadu_si512(q + b * 32), flip8),
                                                  _mm512_setzero_si512());
                const __m512i B = _mm512_sad_epu8(_mm512_xor_si512(_mm512_loadu_si512(q + b * 32 + 64), flip8),
                                                  _mm512_setzero_si512());
                __m512i t = _mm512_add_epi64(_mm512_permutex2var_epi64(A, ev, B), _mm512_permutex2var_epi64(A, od, B));
                t = _mm512_add_epi64(t, _mm512_shuffle_epi32(t, _MM_PERM_BADC));  // qword 2k: block k
                const __m128i s4 = _mm_sub_epi32(_mm512_castsi512_si128(_mm512_permutexvar_epi32(ixs, t)),
                                                 _mm_set1_epi32(32 * 128));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(init + b), _mm_mullo_epi32(s4, _mm_set1_epi32(-128)));
            }
        }
        for (; b < nb; ++b) {
            __m256i sad;
            int32_t bias = 0;
            if (w.bits == 8) {
                const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * 32));
                sad = _mm256_sad_epu8(_mm256_xor_si256(v, flip), _mm256_setzero_si256());
                bias = -32 * 128;
            } else {
                const __m256i v = unpack_block_avx2(w, q, qh, b);
                _mm256_store_si256(reinterpret_cast<__m256i*>(tw.codes.data() + rr * w.kp + b * 32), v);
                sad = _mm256_sad_epu8(v, _mm256_setzero_si256());
            }
            __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(sad), _mm256_extracti128_si256(sad, 1));
            s2 = _mm_add_epi64(s2, _mm_unpackhi_epi64(s2, s2));
            init[b] = -128 * (static_cast<int32_t>(_mm_cvtsi128_si32(s2)) + bias);
        }
    }
    // Group parameters of all n rows as one run (the matrix stores them row
    // after row, as tw does): 16 at a time with no mask but the last, where
    // per row (18 groups at K = 576: a full and a masked step) they had cost
    // ~12% of a 16-row int4 product. Codes leave out the row scale R
    // (tile16 multiplies each weight row's sum by it once): T[c] and
    // (T[c] * mc) * 0.125, where group_scale / group_min round R * T[c] first.
    const int64_t cnt = n * ng, base = ra * ng;
    for (int64_t i = 0; i < cnt; i += 16) {
        const __mmask16 gm = static_cast<__mmask16>(cnt - i >= 16 ? 0xffffu : (1u << (cnt - i)) - 1u);
        if (w.bits == 8) {
            _mm512_mask_storeu_ps(tw.sf.data() + i, gm, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(gm, w.scales + base + i)));
        } else {
            __m512 sv, mv;
            if (cod) group_params16(w.scale_codes + base + i, w.min_codes + base + i, nullptr, gm, sv, mv);
            else group_params16_f16(w.scales + base + i, w.mins + base + i, gm, sv, mv);
            _mm512_mask_storeu_ps(tw.sf.data() + i, gm, sv);
            _mm512_mask_storeu_ps(tw.mf.data() + i, gm, mv);
        }
    }
}

// Stores f[c] (lane l: activation row l's y for weight row c) as rows of 8:
// out[l * ldo + c] for l < nl. An 8 x 16 transpose in registers (per 128-bit
// lane, then pairs of lanes), so a row is one 32-byte store instead of 8
// scalar ones (those had cost ~8% of a 16-row product, and ~25% of a large
// lm_head's, whose output does not stay in cache).
LINGLI_TARGET_VNNI __attribute__((always_inline)) inline void store_rows8(const __m512 (&f)[8], float* out,
                                                                         int64_t ldo, int64_t nl) {
    const __m512 a = _mm512_unpacklo_ps(f[0], f[1]), b = _mm512_unpackhi_ps(f[0], f[1]);
    const __m512 c = _mm512_unpacklo_ps(f[2], f[3]), d = _mm512_unpackhi_ps(f[2], f[3]);
    const __m512 e = _mm512_unpacklo_ps(f[4], f[5]), g = _mm512_unpackhi_ps(f[4], f[5]);
    const __m512 h = _mm512_unpacklo_ps(f[6], f[7]), k = _mm512_unpackhi_ps(f[6], f[7]);
    // 128-bit lane i of R[j] holds weight rows 0-3 of activation row 4i + j; S[j] rows 4-7.
    const __m512 R[4] = {_mm512_shuffle_ps(a, c, 0x44), _mm512_shuffle_ps(a, c, 0xEE),
                         _mm512_shuffle_ps(b, d, 0x44), _mm512_shuffle_ps(b, d, 0xEE)};
    const __m512 S[4] = {_mm512_shuffle_ps(e, h, 0x44), _mm512_shuffle_ps(e, h, 0xEE),
                         _mm512_shuffle_ps(g, k, 0x44), _mm512_shuffle_ps(g, k, 0xEE)};
    const __m512i lo = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i hi = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int j = 0; j < 4; ++j) {
        const __m512 u = _mm512_permutex2var_ps(R[j], lo, S[j]);  // activation rows j, 4 + j
        const __m512 v = _mm512_permutex2var_ps(R[j], hi, S[j]);  // 8 + j, 12 + j
        if (j < nl) _mm256_storeu_ps(out + j * ldo, _mm512_castps512_ps256(u));
        if (4 + j < nl) _mm256_storeu_ps(out + (4 + j) * ldo, _mm512_extractf32x8_ps(u, 1));
        if (8 + j < nl) _mm256_storeu_ps(out + (8 + j) * ldo, _mm512_castps512_ps256(v));
        if (12 + j < nl) _mm256_storeu_ps(out + (12 + j) * ldo, _mm512_extractf32x8_ps(v, 1));
    }
}

// One tile (16 activation rows; nl of them real) x C weight rows: out[l * ldo + c] = y.
// `codes` (cstride bytes a row): int4 the packed codes, int8/int3 int8 codes
// (`init` their -128 * block code sums); sf, mf the rows' group parameters
// (decode_tile_rows), `rs` the row scales they leave out (codes encoding;
// else null). With `pf`, pfb more bytes of it are prefetched at each group.
template <int BITS, int C, int BPG>
LINGLI_TARGET_VNNI void tile16(const VnniTiles& tl, int64_t T, const uint8_t* codes, int64_t cstride,
                               const int32_t* init, const float* sf, const float* mf, const float* rs,
                               float* out, int64_t ldo, int64_t nl, PrefetchRanges* pf, int64_t pfb,
                               PrefetchRanges* pf2, int64_t pfb2) {
    constexpr bool MINS = BITS != 8;
    const int64_t nb = tl.nb, ng = tl.ng;
    const uint8_t* xq = tl.xq.data() + T * nb * 512;
    const float* dl = tl.dl.data() + T * nb * 16;
    const __m512i lo4 = _mm512_set1_epi8(0x0F), hi4 = _mm512_set1_epi8(static_cast<char>(0xF0));
    __m512 f[C];
    for (int c = 0; c < C; ++c) f[c] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        if (pf) pf->run(pfb);
        if (pf2) pf2->run(pfb2);
        __m512 u[C];  // sum over the group's blocks of d_b * dot_b, then * s once
#pragma GCC unroll 4
        for (int bb = 0; bb < BPG; ++bb) {
            const int64_t b = g * BPG + bb;
            __m512i x[8];
#pragma GCC unroll 8
            for (int j = 0; j < 8; ++j) x[j] = _mm512_load_si512(xq + b * 512 + j * 64);
            const __m512 d = _mm512_load_ps(dl + b * 16);
#pragma GCC unroll 8
            for (int c = 0; c < C; ++c) {
                __m512i ia, ib;
                if constexpr (BITS == 4) {
                    const uint8_t* wp = codes + c * cstride + b * 16;
                    ia = _mm512_setzero_si512();
                    ib = _mm512_setzero_si512();
#pragma GCC unroll 4
                    for (int t = 0; t < 4; ++t) {
                        int32_t v;
                        std::memcpy(&v, wp + 4 * t, 4);
                        const __m512i W = _mm512_set1_epi32(v);
                        ia = _mm512_dpbusd_epi32(ia, _mm512_and_si512(W, lo4), x[t]);
                        ib = _mm512_dpbusd_epi32(ib, _mm512_and_si512(W, hi4), x[4 + t]);
                    }
                    ib = _mm512_srai_epi32(ib, 4);  // 16 * the high codes' dot
                } else {
                    const uint8_t* wp = codes + c * cstride + b * 32;
                    ia = _mm512_set1_epi32(init[c * nb + b]);
                    ib = _mm512_setzero_si512();
#pragma GCC unroll 8
                    for (int j = 0; j < 8; j += 2) {
                        // The 4 weight codes as an embedded broadcast operand (GCC
                        // would load them with a separate vpbroadcastd).
                        __asm__("vpdpbusd %2%{1to16%}, %1, %0"
                                : "+v"(ia)
                                : "v"(x[j]), "m"(*reinterpret_cast<const int32_t*>(wp + 4 * j)));
                        __asm__("vpdpbusd %2%{1to16%}, %1, %0"
                                : "+v"(ib)
                                : "v"(x[j + 1]), "m"(*reinterpret_cast<const int32_t*>(wp + 4 * j + 4)));
                    }
                }
                const __m512 p = _mm512_cvtepi32_ps(_mm512_add_epi32(ia, ib));
                u[c] = bb == 0 ? _mm512_mul_ps(p, d) : _mm512_fmadd_ps(p, d, u[c]);
            }
        }
#pragma GCC unroll 8
        for (int c = 0; c < C; ++c) f[c] = _mm512_fmadd_ps(u[c], _mm512_set1_ps(sf[c * ng + g]), f[c]);
    }
    if constexpr (MINS) {
        const float* cl = tl.cl.data() + T * ng * 16;
        for (int64_t g = 0; g < ng; ++g) {
            const __m512 cv = _mm512_load_ps(cl + g * 16);
#pragma GCC unroll 8
            for (int c = 0; c < C; ++c) f[c] = _mm512_fmadd_ps(cv, _mm512_set1_ps(mf[c * ng + g]), f[c]);
        }
    }
    if (rs)
        for (int c = 0; c < C; ++c) f[c] = _mm512_mul_ps(f[c], _mm512_set1_ps(rs[c]));
    if constexpr (C == 8) {
        store_rows8(f, out, ldo, nl);
    } else {
        float res[C][16];
        for (int c = 0; c < C; ++c) _mm512_storeu_ps(res[c], f[c]);
        for (int64_t l = 0; l < nl; ++l)
            for (int c = 0; c < C; ++c) out[l * ldo + c] = res[c][l];
    }
}

template <int BITS, int C, int BPG>
void tile16_rows(const QMatrix& w, const VnniTiles& tl, int64_t T, const TileWeights& tw, int64_t ra,
                 int64_t c0, float* out, int64_t ldo, PrefetchRanges* pf = nullptr, int64_t pfb = 0,
                 PrefetchRanges* pf2 = nullptr, int64_t pfb2 = 0) {
    const int64_t nb = tl.nb, ng = tl.ng, rr = c0 - ra;
    const uint8_t* codes = BITS == 3 ? reinterpret_cast<const uint8_t*>(tw.codes.data()) + rr * w.kp
                                     : w.q + c0 * code_stride(w);
    const int64_t cstride = BITS == 3 ? w.kp : code_stride(w);
    tile16<BITS, C, BPG>(tl, T, codes, cstride, BITS == 4 ? nullptr : tw.init.data() + rr * nb,
                         tw.sf.data() + rr * ng, BITS != 8 ? tw.mf.data() + rr * ng : nullptr,
                         BITS != 8 && coded(w) ? w.row_scale + c0 : nullptr, out + T * 16 * ldo + c0, ldo, std::min<int64_t>(16, tl.m - T * 16), pf, pfb, pf2, pfb2);
}

template <int BITS, int BPG>
void run_tiles(const QMatrix& w, const VnniTiles& tl, int64_t r0, int64_t r1, float* out, int64_t ldo,
               PlanShare* plan) {
    thread_local TileWeights tw;
    PlanFeed feed(plan);
    const int64_t plan_row = feed.per_row;
    // Weight rows per block: their codes (int3 decoded, int4 packed, int8 in
    // place) stay in L2 while every tile passes. One tile (batched decode, at
    // most 16 rows) passes once: blocks of 32 rows, read from L2 where the
    // previous block's steps prefetched them (one large block would be read
    // from memory with nothing to overlap: SmolLM2's 16-stream step, when
    // int4 was decoded too, 12.9 -> 12.0 ms).
    const int64_t rbk = tl.ntile == 1 ? 32
                                      : std::max<int64_t>(32, (kRowBlockBytes * 3 / 4) / std::max<int64_t>(1, w.kp) / 8 * 8);
    for (int64_t ra = r0; ra < r1; ra += rbk) {
        const int64_t rb = std::min(r1, ra + rbk);
        decode_tile_rows(w, ra, rb, tw);
        // The next block's packed weights come into L2 a slice per 8-row
        // step, under the computation, instead of stalling its first reads.
        // Past r1 too: a thread's next chunk (parallel_chunks) usually starts there.
        // One tile (batched decode) spreads each slice over the step's groups:
        // a burst of prefetches stalls the thread once the memory system's
        // queue is full (cold weights at 16 rows, 2 threads, alternating:
        // 8-14% faster; prefill, whose weights are reused by every tile,
        // keeps the burst, 3-5% faster there).
        PrefetchRanges next;
        add_weight_rows(next, w, rb, std::min(w.n, rb + rbk));
        const int64_t steps = std::max<int64_t>(1, (rb - ra) / 8);  // all of it during the first tile
        const int64_t slice = (next.total() + steps - 1) / steps;
        const bool spread = tl.ntile == 1;
        PrefetchRanges* pf = spread ? &next : nullptr;
        const int64_t per_group = (slice + tl.ng - 1) / tl.ng;
        for (int64_t T = 0; T < tl.ntile; ++T) {
            int64_t c0 = ra;
            for (; c0 + 8 <= rb; c0 += 8) {
                if (!spread) next.run(slice);
                // The caller's plan: spread over the groups like `next` (one
                // tile), else a burst per step of the first tile.
                PrefetchRanges* pf2 = nullptr;
                if (plan_row && spread) {
                    feed.fill(8 * plan_row);
                    pf2 = &feed.cur;
                } else if (plan_row && T == 0) {
                    feed.run(8 * plan_row);
                }
                tile16_rows<BITS, 8, BPG>(w, tl, T, tw, ra, c0, out, ldo, pf, per_group, pf2,
                                          (8 * plan_row + tl.ng - 1) / tl.ng);
            }
            if (plan_row && T == 0) feed.run((rb - c0) * plan_row);
            if (c0 + 4 <= rb) { tile16_rows<BITS, 4, BPG>(w, tl, T, tw, ra, c0, out, ldo); c0 += 4; }
            if (c0 + 2 <= rb) { tile16_rows<BITS, 2, BPG>(w, tl, T, tw, ra, c0, out, ldo); c0 += 2; }
            if (c0 < rb) tile16_rows<BITS, 1, BPG>(w, tl, T, tw, ra, c0, out, ldo);
        }
    }
    feed.finish();
}

template <int BITS>
void run_tiles_bits(const QMatrix& w, const VnniTiles& t, int64_t r0, int64_t r1, float* out, int64_t ldo,
                    PlanShare* plan) {
    switch (w.group_size / QBLOCK) {
        case 1: run_tiles<BITS, 1>(w, t, r0, r1, out, ldo, plan); break;
        case 2: run_tiles<BITS, 2>(w, t, r0, r1, out, ldo, plan); break;
        default: run_tiles<BITS, 4>(w, t, r0, r1, out, ldo, plan); break;
    }
}

}  // namespace

void qgemm_avx512_tiles(const QMatrix& w, const VnniTiles* t, int64_t r0, int64_t r1, float* out,
                        int64_t ldo, PlanShare* plan) {
    switch (w.bits) {
        case 8: run_tiles_bits<8>(w, *t, r0, r1, out, ldo, plan); break;
        case 4: run_tiles_bits<4>(w, *t, r0, r1, out, ldo, plan); break;
        default: run_tiles_bits<3>(w, *t, r0, r1, out, ldo, plan); break;
    }
}

// ============================================================ exported ===

LINGLI_TARGET_AVX2 void quantize_acts_avx2(const float* x, int64_t m, int64_t k, int64_t kp,
                                           int8_t* q, float* d, int32_t* sums) {
    const int64_t nb = kp / QBLOCK;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
    for (int64_t i = 0; i < m; ++i) {
        const float* xr = x + i * k;
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t k0 = b * QBLOCK;
            const int64_t n = std::max<int64_t>(0, std::min<int64_t>(QBLOCK, k - k0));
            alignas(32) float tmp[QBLOCK];
            const float* src = xr + k0;
            if (n < QBLOCK) {
                for (int64_t j = 0; j < QBLOCK; ++j) tmp[j] = j < n ? src[j] : 0.f;
                src = tmp;
            }
            __m256 v[4];
            __m256 amax = _mm256_setzero_ps();
            for (int t = 0; t < 4; ++t) {
                v[t] = _mm256_loadu_ps(src + 8 * t);
                amax = _mm256_max_ps(_mm256_and_ps(v[t], absmask), amax);  // NaN -> keeps amax
            }
            __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
            m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
            m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
            const float am = _mm_cvtss_f32(m4);
            const __m256 iscale = _mm256_set1_ps(am > 0.f ? 127.f / am : 0.f);
            __m256i c[4];
            for (int t = 0; t < 4; ++t) {
                __m256 s = _mm256_mul_ps(v[t], iscale);
                s = _mm256_min_ps(_mm256_max_ps(s, lo), hi);  // max(NaN, lo) = lo
                c[t] = _mm256_cvtps_epi32(s);                // round half to even (MXCSR default)
            }
            const __m256i s16a = _mm256_packs_epi32(c[0], c[1]), s16b = _mm256_packs_epi32(c[2], c[3]);
            const __m256i s8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(s16a, s16b),
                                                           _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i * kp + k0), s8);
            __m256i tot = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
            __m128i t4 = _mm_add_epi32(_mm256_castsi256_si128(tot), _mm256_extracti128_si256(tot, 1));
            t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0x4e));
            t4 = _mm_add_epi32(t4, _mm_shuffle_epi32(t4, 0xb1));
            d[i * nb + b] = am / 127.f;
            sums[i * nb + b] = _mm_cvtsi128_si32(t4);
        }
    }
}

LINGLI_TARGET_VNNI void quantize_acts_avx512(const float* x, int64_t m, int64_t k, int64_t kp,
                                             int8_t* q, float* d, int32_t* sums) {
    const int64_t nb = kp / QBLOCK;
    const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    for (int64_t i = 0; i < m; ++i) {
        const float* xr = x + i * k;
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t k0 = b * QBLOCK;
            const int64_t n = std::max<int64_t>(0, std::min<int64_t>(QBLOCK, k - k0));
            const __mmask16 k0m = static_cast<__mmask16>(n >= 16 ? 0xffff : (1u << n) - 1u);
            const __mmask16 k1m = static_cast<__mmask16>(n >= 32 ? 0xffff : n > 16 ? (1u << (n - 16)) - 1u : 0);
            const __m512 v0 = _mm512_maskz_loadu_ps(k0m, xr + k0);
            const __m512 v1 = _mm512_maskz_loadu_ps(k1m, xr + k0 + 16);
            __m512 amax = _mm512_max_ps(_mm512_abs_ps(v0), _mm512_setzero_ps());  // NaN -> 0
            amax = _mm512_max_ps(_mm512_abs_ps(v1), amax);
            const float am = _mm512_reduce_max_ps(amax);
            const __m512 iscale = _mm512_set1_ps(am > 0.f ? 127.f / am : 0.f);
            const __m512i c0 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v0, iscale), lo), hi));
            const __m512i c1 = _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(v1, iscale), lo), hi));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i * kp + k0), _mm512_cvtepi32_epi8(c0));
            _mm_storeu_si128(reinterpret_cast<__m128i*>(q + i * kp + k0 + 16), _mm512_cvtepi32_epi8(c1));
            d[i * nb + b] = am / 127.f;
            sums[i * nb + b] = _mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1));
        }
    }
}

void qgemm_avx2(const QMatrix& w, const QActs& a, int64_t r0, int64_t r1, float* out, int64_t ldo) {
    thread_local Avx2Prep p;
    if (w.bits != 8) {
        const int64_t ng = w.kp / w.group_size;
        p.ngp = (ng + 15) / 16 * 16;
        p.c.resize(static_cast<size_t>(a.m * p.ngp));
        for (int64_t i = 0; i < a.m; ++i) min_coeffs(a, i, w.group_size, p.c.data() + i * p.ngp, p.ngp);
        p.mg.assign(static_cast<size_t>(p.ngp), 0.f);
    }
    const int64_t rbk = rows_per_block(w, a.m);
    for (int64_t ra = r0; ra < r1; ra = (r1 - ra > rbk ? ra + rbk : r1)) {
        const int64_t rb = r1 - ra > rbk ? ra + rbk : r1;
        for (int64_t i0 = 0; i0 < a.m; i0 += 4) {
            switch (std::min<int64_t>(4, a.m - i0)) {
                case 4: tile_avx2<4>(w, a, p, i0, ra, rb, out, ldo); break;
                case 3: tile_avx2<3>(w, a, p, i0, ra, rb, out, ldo); break;
                case 2: tile_avx2<2>(w, a, p, i0, ra, rb, out, ldo); break;
                default: tile_avx2<1>(w, a, p, i0, ra, rb, out, ldo); break;
            }
        }
    }
}

void qgemm_avx512_few(const QMatrix& w, const VnniFew* f, int64_t r0, int64_t r1, float* out, int64_t ldo,
                      PlanShare* plan) {
    PlanFeed feed(plan);
    PlanFeed* fp = plan ? &feed : nullptr;
    switch (w.bits) {
        case 8: vnni_base::run_few_bits<8>(w, *f, r0, r1, out, ldo, fp); break;
        case 4: vnni_base::run_few_bits<4>(w, *f, r0, r1, out, ldo, fp); break;
        default:
            if (cpu_has_vnni_ext()) vnni_ext::run_few_bits<3>(w, *f, r0, r1, out, ldo, fp);
            else vnni_base::run_few_bits<3>(w, *f, r0, r1, out, ldo, fp);
            break;
    }
    feed.finish();
}

void qgemm_avx512_decode(const QMatrix& w, const VnniPrep* p, int64_t r0, int64_t r1, float* out) {
    switch (w.bits) {
        case 8: vnni_base::run_decode<8>(w, *p, r0, r1, out); break;
        case 4: vnni_base::run_decode<4>(w, *p, r0, r1, out); break;
        default:
            if (cpu_has_vnni_ext()) vnni_ext::run_decode<3>(w, *p, r0, r1, out);
            else vnni_base::run_decode<3>(w, *p, r0, r1, out);
            break;
    }
}

}  // namespace lingli

#endif  // __x86_64__
