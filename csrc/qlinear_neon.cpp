// AArch64 NEON quantized matrix products (qlinear.h has the contract,
// runtime/quant/formats.py the bit layouts).
//
// Two entry points share one template body and differ only in the 32-input
// integer block dot:
//   qgemm_neon      plain Armv8.0 NEON: SMULL/SMLAL(2) into int16, SADALP to int32
//   qgemm_neon_dot  Armv8.2 dot product: two SDOT per block
// The file builds with plain -march=armv8-a: only qgemm_neon_dot carries a
// function-level target attribute, and the dispatcher calls it only when
// cpu_has_dotprod() (HWCAP_ASIMDDP) is true.
//
// GCC refuses to inline the always_inline vdotq_s32 into a function that lacks
// +dotprod, so the shared templates are plain `inline` and the entry points are
// `flatten`: everything is inlined into the entry point, which (for the dot
// path) has the target, and the SDOT helper is inlined there too.
//
// Per weight row and 4 blocks at a time: unpack each 32-weight block once into
// two int8x16 (inputs 0..15, 16..31), dot it with up to 4 activation rows,
// reduce the four blocks' int32x4 partials to one int32x4 with pairwise adds,
// and accumulate  d_b * (s_b * isum_b + m_b * sums_b)  four blocks per FMA.
#include "qlinear.h"

#if defined(__aarch64__)
#include <arm_neon.h>

#include <algorithm>
#include <cstring>
#include <vector>

#define LINGLI_TARGET_DOTPROD __attribute__((target("arch=armv8.2-a+dotprod")))

namespace lingli {
namespace {

// ------------------------------------------------------- weight unpacking --
// WRow<BITS>(w, r).block(b, lo, hi): codes of block b of row r as int8 in
// natural order, lo = inputs 0..15, hi = inputs 16..31.
template <int BITS>
struct WRow;

template <>
struct WRow<8> {  // signed codes, 32 bytes per block
    const int8_t* q;
    WRow(const QMatrix& w, int64_t r) : q(reinterpret_cast<const int8_t*>(w.q) + r * w.kp) {}
    inline void block(int64_t b, int8x16_t& lo, int8x16_t& hi) const {
        lo = vld1q_s8(q + 32 * b);
        hi = vld1q_s8(q + 32 * b + 16);
    }
};

template <>
struct WRow<4> {  // 16 bytes per block: low nibbles inputs 0..15, high nibbles 16..31
    const uint8_t* q;
    WRow(const QMatrix& w, int64_t r) : q(w.q + r * (w.kp / 2)) {}
    inline void block(int64_t b, int8x16_t& lo, int8x16_t& hi) const {
        const uint8x16_t v = vld1q_u8(q + 16 * b);
        lo = vreinterpretq_s8_u8(vandq_u8(v, vdupq_n_u8(0x0F)));
        hi = vreinterpretq_s8_u8(vshrq_n_u8(v, 4));
    }
};

alignas(16) const uint8_t kHighIdx01[16] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1};
alignas(16) const uint8_t kHighIdx23[16] = {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3};
alignas(16) const uint8_t kBitSel[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};

template <>
struct WRow<3> {
    // Low plane, 8 bytes per block: input 8j+i at bits 2j..2j+1 of byte i.
    // High plane, 4 bytes per block: input e at bit e%8 of byte e/8.
    const uint8_t* ql;
    const uint8_t* qh;
    uint8x16_t idx01, idx23, bitsel;
    WRow(const QMatrix& w, int64_t r)
        : ql(w.q + r * (w.kp / 4)), qh(w.qh + r * (w.kp / 8)),
          idx01(vld1q_u8(kHighIdx01)), idx23(vld1q_u8(kHighIdx23)), bitsel(vld1q_u8(kBitSel)) {}
    inline void block(int64_t b, int8x16_t& lo, int8x16_t& hi) const {
        const uint8x8_t l = vld1_u8(ql + 8 * b);
        const uint8x8_t three = vdup_n_u8(3);
        const uint8x16_t c0 = vcombine_u8(vand_u8(l, three), vand_u8(vshr_n_u8(l, 2), three));
        const uint8x16_t c1 = vcombine_u8(vand_u8(vshr_n_u8(l, 4), three), vshr_n_u8(l, 6));
        uint32_t word;
        std::memcpy(&word, qh + 4 * b, 4);
        const uint8x16_t h = vreinterpretq_u8_u32(vdupq_n_u32(word));  // bytes h0 h1 h2 h3 x4
        const uint8x16_t four = vdupq_n_u8(4);
        // byte e of [h_{e/8} broadcast] & (1 << e%8) -> 0xFF where the high bit is set
        const uint8x16_t h0 = vandq_u8(vtstq_u8(vqtbl1q_u8(h, idx01), bitsel), four);
        const uint8x16_t h1 = vandq_u8(vtstq_u8(vqtbl1q_u8(h, idx23), bitsel), four);
        lo = vreinterpretq_s8_u8(vorrq_u8(c0, h0));
        hi = vreinterpretq_s8_u8(vorrq_u8(c1, h1));
    }
};

// ------------------------------------------------------------ block dots --
// dot<BITS>(lo, hi, x): int32x4 whose lanes sum to sum_{i<32} w[i] * x[i].

struct PlainDot {
    template <int BITS>
    static inline int32x4_t dot(int8x16_t w0, int8x16_t w1, const int8_t* x) {
        const int8x16_t x0 = vld1q_s8(x), x1 = vld1q_s8(x + 16);
        int16x8_t p = vmull_s8(vget_low_s8(w0), vget_low_s8(x0));
        p = vmlal_high_s8(p, w0, x0);
        if (BITS == 8) {
            // |w| <= 128, |x| <= 127: two products per int16 lane at most.
            int16x8_t p1 = vmull_s8(vget_low_s8(w1), vget_low_s8(x1));
            p1 = vmlal_high_s8(p1, w1, x1);
            return vpadalq_s16(vpaddlq_s16(p), p1);
        }
        // w in [0, 15]: four products (<= 4 * 15 * 127 = 7620) fit an int16 lane.
        p = vmlal_s8(p, vget_low_s8(w1), vget_low_s8(x1));
        p = vmlal_high_s8(p, w1, x1);
        return vpaddlq_s16(p);
    }
};

struct SdotDot {
    template <int BITS>
    LINGLI_TARGET_DOTPROD static inline int32x4_t dot(int8x16_t w0, int8x16_t w1, const int8_t* x) {
        const int32x4_t acc = vdotq_s32(vdupq_n_s32(0), w0, vld1q_s8(x));
        return vdotq_s32(acc, w1, vld1q_s8(x + 16));
    }
};

// ----------------------------------------------------------------- kernel --
// One weight row against NR (1..4) activation rows starting at i0.
// sb/mb: the row's scale/min expanded to one float per block.
template <int BITS, class Dot, int NR>
inline void row_times_acts(const WRow<BITS>& wr, const float* sb, const float* mb,
                           const QActs& a, int64_t i0, int64_t nb, float* out, int64_t ldo) {
    const int8_t* x[NR];
    const float* d[NR];
    const int32_t* sm[NR];
    float32x4_t acc[NR];
#pragma GCC unroll 4
    for (int i = 0; i < NR; ++i) {
        x[i] = a.q + (i0 + i) * a.kp;
        d[i] = a.d + (i0 + i) * nb;
        sm[i] = a.sums + (i0 + i) * nb;
        acc[i] = vdupq_n_f32(0.f);
    }
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
        int32x4_t p[NR][4];
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
            int8x16_t w0, w1;
            wr.block(b + j, w0, w1);
#pragma GCC unroll 4
            for (int i = 0; i < NR; ++i)
                p[i][j] = Dot::template dot<BITS>(w0, w1, x[i] + QBLOCK * (b + j));
        }
        const float32x4_t s4 = vld1q_f32(sb + b);
#pragma GCC unroll 4
        for (int i = 0; i < NR; ++i) {
            const int32x4_t isum = vpaddq_s32(vpaddq_s32(p[i][0], p[i][1]), vpaddq_s32(p[i][2], p[i][3]));
            float32x4_t t = vmulq_f32(s4, vcvtq_f32_s32(isum));
            if (BITS != 8) t = vfmaq_f32(t, vld1q_f32(mb + b), vcvtq_f32_s32(vld1q_s32(sm[i] + b)));
            acc[i] = vfmaq_f32(acc[i], vld1q_f32(d[i] + b), t);
        }
    }
    float tail[NR];
#pragma GCC unroll 4
    for (int i = 0; i < NR; ++i) tail[i] = 0.f;
    for (; b < nb; ++b) {  // the last nb % 4 blocks (group size 32 only)
        int8x16_t w0, w1;
        wr.block(b, w0, w1);
#pragma GCC unroll 4
        for (int i = 0; i < NR; ++i) {
            const float isum = static_cast<float>(vaddvq_s32(Dot::template dot<BITS>(w0, w1, x[i] + QBLOCK * b)));
            float t = sb[b] * isum;
            if (BITS != 8) t += mb[b] * static_cast<float>(sm[i][b]);
            tail[i] += d[i][b] * t;
        }
    }
#pragma GCC unroll 4
    for (int i = 0; i < NR; ++i) out[(i0 + i) * ldo] = vaddvq_f32(acc[i]) + tail[i];
}

template <int BITS, class Dot>
inline void qgemm_bits(const QMatrix& w, const QActs& a, int64_t r0, int64_t r1, float* out, int64_t ldo) {
    const int64_t nb = w.kp / QBLOCK;
    const int64_t ng = w.kp / w.group_size;
    const int64_t per_group = w.group_size / QBLOCK;
    // Weight rows go in tiles of RT: the tile's packed rows stay in L1 while
    // each chunk of 4 activation rows streams past them.
    constexpr int64_t RT = 8;
    std::vector<float> expanded(static_cast<size_t>(2 * RT * nb));
    for (int64_t rt = r0; rt < r1; rt += RT) {
        const int64_t re = std::min(r1, rt + RT);
        for (int64_t r = rt; r < re; ++r) {
            float* sb = expanded.data() + (r - rt) * 2 * nb;
            float* mb = sb + nb;
            for (int64_t g = 0; g < ng; ++g) {
                const float s = group_scale(w, r, g);  // either encoding (qlinear.h)
                const float m = group_min(w, r, g, s);
                for (int64_t k = 0; k < per_group; ++k) {
                    sb[g * per_group + k] = s;
                    mb[g * per_group + k] = m;
                }
            }
        }
        for (int64_t i0 = 0; i0 < a.m; i0 += 4) {
            const int64_t nr = std::min<int64_t>(4, a.m - i0);
            for (int64_t r = rt; r < re; ++r) {
                const WRow<BITS> wr(w, r);
                const float* sb = expanded.data() + (r - rt) * 2 * nb;
                const float* mb = sb + nb;
                float* o = out + r;
                switch (nr) {
                    case 4: row_times_acts<BITS, Dot, 4>(wr, sb, mb, a, i0, nb, o, ldo); break;
                    case 3: row_times_acts<BITS, Dot, 3>(wr, sb, mb, a, i0, nb, o, ldo); break;
                    case 2: row_times_acts<BITS, Dot, 2>(wr, sb, mb, a, i0, nb, o, ldo); break;
                    default: row_times_acts<BITS, Dot, 1>(wr, sb, mb, a, i0, nb, o, ldo); break;
                }
            }
        }
    }
}

template <class Dot>
inline void qgemm_any(const QMatrix& w, const QActs& a, int64_t r0, int64_t r1, float* out, int64_t ldo) {
    if (r1 <= r0 || a.m <= 0) return;
    switch (w.bits) {
        case 8: qgemm_bits<8, Dot>(w, a, r0, r1, out, ldo); break;
        case 4: qgemm_bits<4, Dot>(w, a, r0, r1, out, ldo); break;
        case 3: qgemm_bits<3, Dot>(w, a, r0, r1, out, ldo); break;
        default: break;  // the loader only produces 8/4/3
    }
}

}  // namespace

__attribute__((flatten)) void qgemm_neon(const QMatrix& w, const QActs& a, int64_t r0, int64_t r1,
                                         float* out, int64_t ldo) {
    qgemm_any<PlainDot>(w, a, r0, r1, out, ldo);
}

LINGLI_TARGET_DOTPROD __attribute__((flatten)) void qgemm_neon_dot(const QMatrix& w, const QActs& a,
                                                                   int64_t r0, int64_t r1, float* out,
                                                                   int64_t ldo) {
    qgemm_any<SdotDot>(w, a, r0, r1, out, ldo);
}

}  // namespace lingli

#endif  // __aarch64__
