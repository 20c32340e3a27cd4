// Quantized matrix products: the contract between the dispatcher and each ISA.
//
// Weights are in Lingli's portable layout (runtime/quant/formats.py has the
// bit diagrams): codes in 32-input blocks and, per group of G = 32/64/128
// inputs, a scale s (int8: f16) or, for int4/int3, s and a min m in one of
// two encodings chosen per matrix: f16 s and f16 m, or s and m coded in one
// byte each against a float row scale (below: "group parameters").
// Activations are quantized on the fly per 32-input block: d = max|x| / 127,
// q = nearbyint(x * (127 / max|x|)) in [-127, 127], plus the block's code sum
// (for the asymmetric min term):
//
//   y[r] = sum_b d_b * ( s[r,g(b)] * sum_i q_x[i] * q_w[r,i]  +  m[r,g(b)] * sum_b )
//
// (int8 weights are symmetric: the m term is absent.) Every ISA computes the
// same integer block dots, so paths differ only in float summation order.
#pragma once
#include <atomic>
#include <cstdint>
#include <cstring>

#include "ops.h"  // half_to_float

namespace lingli {

constexpr int QBLOCK = 32;

struct QMatrix {
    int bits;                    // 8, 4 or 3
    int group_size;              // 32, 64 or 128
    int64_t n, k, kp;            // rows, logical inputs, inputs padded to a multiple of group_size
    const uint8_t* q;            // int8: kp bytes/row (signed); int4: kp/2; int3 low plane: kp/4
    const uint8_t* qh;           // int3 high plane, kp/8 bytes/row; nullptr otherwise
    // Group parameters, [n, kp / group_size] each. int8: scales only. int4/int3:
    // exactly one encoding, the other's pointers nullptr (coded() tells which):
    //   f16:   scales, mins (f16 bits)
    //   codes: scale_codes, min_codes, row_scale [n]
    const uint16_t* scales;      // f16 bits: int8, int4/int3 f16 encoding
    const uint16_t* mins;        // f16 bits: int4/int3 f16 encoding
    const uint8_t* scale_codes;  // int4/int3 codes encoding
    const int8_t* min_codes;     // int4/int3 codes encoding
    const float* row_scale;      // int4/int3 codes encoding: [n]
    // int8, optional: the sum of each 32-code block, [n, kp / 32]. The prefill
    // tiles need them (qlinear_x86.cpp: VNNI prefill); given, they skip a pass
    // over the codes that cannot overlap with any arithmetic.
    const int16_t* code_sums = nullptr;
};

// Whether w's group parameters are the byte codes (int4/int3 only) rather than f16.
inline bool coded(const QMatrix& w) { return w.scale_codes != nullptr; }

// ------------------------------------------------------ group parameters --
// int4/int3 groups carry either f16 s and m (the "f16" encoding, e.g. weights
// converted from ggml Q4_1, which it represents exactly) or s and m coded in
// one byte each against one float32 row scale R (the "codes" encoding,
// formats.py format version 2):
//
//   scale code c (uint8):  | 7..4: octave e | 3..0: step j |
//       s = R * T[c],  T[c] = F[j] * 2^(e - 15) = 2^((c - 255) / 16)
//       F[j] = float32(2^((j - 15) / 16)), so T[255] = 1 and T[0] ~ 2^-15.9
//   min code mc (int8):    m = (s * mc) * 0.125   (an eighth of s per step)
//
// every product rounded to float32 in that order (one rounding each; the
// * 0.125 is exact). T[c] is exact in float32: F[j] with 15 - e taken off
// its exponent field, which is how the kernels build it (SIMD: F by a
// 16-entry permute, the exponent by an integer add). int8's s is f16.
constexpr uint32_t kScaleStepBits[16] = {  // F[j] as float32 bits
    0x3f05aac3, 0x3f0b95c2, 0x3f11c3d3, 0x3f1837f0, 0x3f1ef532, 0x3f25fed7, 0x3f2d583f, 0x3f3504f3,
    0x3f3d08a4, 0x3f45672a, 0x3f4e248c, 0x3f5744fd, 0x3f60ccdf, 0x3f6ac0c7, 0x3f75257d, 0x3f800000};

inline float scale_factor(uint8_t c) {  // T[c]
    const uint32_t bits = kScaleStepBits[c & 15] - (static_cast<uint32_t>(15 - (c >> 4)) << 23);
    float t;
    std::memcpy(&t, &bits, 4);
    return t;
}

// s of group g of row r (any format and encoding).
inline float group_scale(const QMatrix& w, int64_t r, int64_t g) {
    const int64_t i = r * (w.kp / w.group_size) + g;
    return coded(w) ? w.row_scale[r] * scale_factor(w.scale_codes[i]) : half_to_float(w.scales[i]);
}

// m of group g of row r, given its s = group_scale(w, r, g) (int8: 0).
inline float group_min(const QMatrix& w, int64_t r, int64_t g, float s) {
    if (w.bits == 8) return 0.f;
    const int64_t i = r * (w.kp / w.group_size) + g;
    return coded(w) ? (s * static_cast<float>(w.min_codes[i])) * 0.125f : half_to_float(w.mins[i]);
}

// Row stride of w.q in bytes: kp * bits / 8, except int3, whose high plane
// (kp / 8 bytes a row) is the separate w.qh.
inline int64_t code_stride(const QMatrix& w) { return w.bits == 3 ? w.kp / 4 : w.kp * w.bits / 8; }

// Bytes of one weight row: codes and group parameters (int8: f16 s; int4/int3
// f16: s and m; codes: two bytes per group and the row scale).
inline int64_t row_bytes(const QMatrix& w) {
    const int64_t ng = w.kp / w.group_size;
    return w.kp * w.bits / 8 + (w.bits == 8 ? 2 * ng : coded(w) ? 2 * ng + 4 : 4 * ng);
}

// Memory the caller reads right after a product: the next attention's K and V
// blocks, which a decode step otherwise finds cold (every layer's weights
// pass through the cache in between). The batched kernels prefetch it into
// L2 under their arithmetic, at an even rate per weight row, so it streams in
// while the vector units are the bottleneck instead of stalling attention.
// The same ranges are read in both bases (K and V of one layer).
struct PrefetchPlan {
    const char* base[2];
    const int64_t* ranges;  // [n][2]: byte offset, bytes
    int64_t n;
};

// One product's plan, shared by its threads: each takes the next range when
// it has issued the last, `per_row` bytes of prefetch per weight row done.
struct PlanShare {
    const PrefetchPlan* plan = nullptr;
    std::atomic<int64_t> next{0};
    int64_t per_row = 0;
};

struct QActs {
    int64_t m, kp;            // rows of x, padded inputs (same kp as the weights)
    const int8_t* q;          // [m, kp]
    const float* d;           // [m, kp / 32]
    const int32_t* sums;      // [m, kp / 32]
};

// out[i * ldo + r] = y for every activation row i < a.m and weight row r in [r0, r1).
using QGemmFn = void (*)(const QMatrix& w, const QActs& a, int64_t r0, int64_t r1,
                         float* out, int64_t ldo);

void qgemm_plain(const QMatrix& w, const QActs& a, int64_t r0, int64_t r1, float* out, int64_t ldo);
#if defined(__x86_64__)
void qgemm_avx2(const QMatrix& w, const QActs& a, int64_t r0, int64_t r1, float* out, int64_t ldo);
#endif
#if defined(__aarch64__)
void qgemm_neon(const QMatrix& w, const QActs& a, int64_t r0, int64_t r1, float* out, int64_t ldo);      // no dotprod
void qgemm_neon_dot(const QMatrix& w, const QActs& a, int64_t r0, int64_t r1, float* out, int64_t ldo);  // sdot
#endif

// x [m, k] float -> q [m, kp], d and sums [m, kp/32]; inputs past k count as 0.
void quantize_acts_plain(const float* x, int64_t m, int64_t k, int64_t kp,
                         int8_t* q, float* d, int32_t* sums);
#if defined(__x86_64__)
// Same codes as quantize_acts_plain, bit for bit (same formula, round half to even).
void quantize_acts_avx2(const float* x, int64_t m, int64_t k, int64_t kp,
                        int8_t* q, float* d, int32_t* sums);
void quantize_acts_avx512(const float* x, int64_t m, int64_t k, int64_t kp,
                          int8_t* q, float* d, int32_t* sums);
// The quantized AVX-512 path needs AVX-512 F/BW/VL and VNNI, not just AVX-512F.
bool cpu_has_avx512_vnni();

// AVX-512 VNNI has three kernels by the number of activation rows m, each
// with its activations rearranged once per call and shared by the threads
// (so none has the QGemmFn form): decode (m = 1, qgemm_avx512_decode),
// batched decode (1 < m < vnni_tile_min_rows(kp)) and prefill tiles (from
// there). The batched kernel's cost grows with m in steps of 2 rows, the
// tiles' in steps of 16 (one tile) plus a fixed part that grows with K: with
// K >= 1024 batched decode is the faster up to 32 rows (but for int4 at
// exactly 16 rows, where the tiles were 1.07-1.13x faster: not worth a rule
// of its own), with shorter K the tiles are from 10.
inline int64_t vnni_tile_min_rows(int64_t kp) { return kp >= 1024 ? 32 : 10; }

// AVX-512 VNNI prefill: the activation rows are rearranged once per call
// into tiles of 16 rows (one per int32 lane), which every thread then
// shares. vnni_tiles() sizes the calling thread's buffer (serially);
// vnni_tiles_fill() fills tiles [t0, t1) (threads split the tiles);
// qgemm_avx512_tiles() then takes weight rows [r0, r1).
struct VnniTiles;
VnniTiles* vnni_tiles(const QMatrix& w, const QActs& a);
int64_t vnni_tile_count(const VnniTiles* t);
void vnni_tiles_fill(VnniTiles* t, const QActs& a, int64_t t0, int64_t t1);
void qgemm_avx512_tiles(const QMatrix& w, const VnniTiles* t, int64_t r0, int64_t r1, float* out,
                        int64_t ldo, PlanShare* plan = nullptr);

// AVX-512 VNNI decode (m = 1): vnni_prep() rearranges the activations into
// the calling thread's buffer (serially), qgemm_avx512_decode() takes weight
// rows [r0, r1), so threads share one preparation however many chunks they run.
struct VnniPrep;
VnniPrep* vnni_prep(const QMatrix& w, const QActs& a, int slot = 0);  // slot < kMaxParts
void qgemm_avx512_decode(const QMatrix& w, const VnniPrep* p, int64_t r0, int64_t r1, float* out);

// AVX-512 VNNI batched decode: vnni_few() sizes the calling thread's buffer
// and vnni_few_fill() rearranges the activations into it (serially; it is
// cheap next to the products); qgemm_avx512_few() takes weight rows [r0, r1).
struct VnniFew;
VnniFew* vnni_few(const QMatrix& w, const QActs& a);
void vnni_few_fill(VnniFew* f, const QMatrix& w, const QActs& a);
void qgemm_avx512_few(const QMatrix& w, const VnniFew* f, int64_t r0, int64_t r1, float* out, int64_t ldo,
                      PlanShare* plan = nullptr);
#endif

// ------------------------------------------------------------ dispatcher ---
// Both pick the path for current_isa() (qlinear.cpp is the one place that
// maps an ISA to its quantized kernels) and run on num_threads() threads.

// quantize_acts_plain's contract, on the current ISA's quantizer.
void quantize_acts(const float* x, int64_t m, int64_t k, int64_t kp,
                   int8_t* q, float* d, int32_t* sums);

// out[m, w.n] = x[m, w.k] @ dequantize(w).T with x quantized per 32-block
// (arguments already validated: w.k <= w.kp, pointers match the format).
// act_steps = 2 also quantizes the residual x - d * q to int8 and adds its
// product: ~14-bit activations at the cost of twice the multiplies (the
// weights are still read once), for inputs whose outliers int8 blocks lose.
// `plan` (may be null): memory to prefetch under the products (PrefetchPlan);
// the batched AVX-512 VNNI kernels take it, the others ignore it.
void qlinear(const float* x, int64_t m, const QMatrix& w, float* out, int act_steps = 1,
             const PrefetchPlan* plan = nullptr);

// Several matrices with the same inputs (formats may differ: a model's q/k/v
// or gate/up when they were quantized differently) side by side in one
// output: out[m, sum of n] holds part p in columns [sum of n before p, ...).
// The same results as one qlinear per part. With one activation row
// (decode) the row is quantized once and one parallel pass covers every
// part's rows: the per-call costs of separate small products were most of
// their time. Parts have the same k; nparts <= kMaxParts.
constexpr int kMaxParts = 8;
void qlinear_parts(const float* x, int64_t m, const QMatrix* parts, int nparts, float* out,
                   int act_steps = 1, const PrefetchPlan* plan = nullptr);

// Name of the quantized kernel current_isa() selects ("plain", "avx2",
// "avx512_vnni", "neon", "neon_dot"), for benchmarks and tests.
const char* qgemm_path();

}  // namespace lingli
