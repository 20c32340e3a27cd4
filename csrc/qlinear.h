// Quantized matrix products: the contract between the dispatcher and each ISA.
//
// Weights are in Lingli's portable layout (runtime/quant/formats.py has the
// bit diagrams): codes in 32-input blocks, f16 scales (and f16 mins for
// int4/int3) per group of G = 32/64/128 inputs. Activations are quantized on
// the fly per 32-input block: d = max|x| / 127, q = nearbyint(x * (127 / max|x|))
// in [-127, 127], plus the block's code sum (for the asymmetric min term):
//
//   y[r] = sum_b d_b * ( s[r,g(b)] * sum_i q_x[i] * q_w[r,i]  +  m[r,g(b)] * sum_b )
//
// (int8 weights are symmetric: the m term is absent.) Every ISA computes the
// same integer block dots, so paths differ only in float summation order.
#pragma once
#include <cstdint>

namespace lingli {

constexpr int QBLOCK = 32;

struct QMatrix {
    int bits;                 // 8, 4 or 3
    int group_size;           // 32, 64 or 128
    int64_t n, k, kp;         // rows, logical inputs, inputs padded to a multiple of group_size
    const uint8_t* q;         // int8: kp bytes/row (signed); int4: kp/2; int3 low plane: kp/4
    const uint8_t* qh;        // int3 high plane, kp/8 bytes/row; nullptr otherwise
    const uint16_t* scales;   // f16 bits [n, kp / group_size]
    const uint16_t* mins;     // f16 bits [n, kp / group_size]; nullptr for int8
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
void qgemm_avx512(const QMatrix& w, const QActs& a, int64_t r0, int64_t r1, float* out, int64_t ldo);  // AVX-512 VNNI
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

// AVX-512 VNNI has three kernels by the number of activation rows m: decode
// (m = 1, qgemm_avx512), batched decode (1 < m < vnni_tile_min_rows(kp)) and
// prefill tiles (from there). The batched kernel's cost grows with m in steps
// of 2 rows, the tiles' in steps of 16 (one tile) plus a fixed part that
// grows with K: with K >= 1024 batched decode is the faster up to 32 rows,
// with shorter K the tiles are from 10.
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
                        int64_t ldo);

// AVX-512 VNNI batched decode: vnni_few() sizes the calling thread's buffer
// and vnni_few_fill() rearranges the activations into it (serially; it is
// cheap next to the products); qgemm_avx512_few() takes weight rows [r0, r1).
struct VnniFew;
VnniFew* vnni_few(const QMatrix& w, const QActs& a);
void vnni_few_fill(VnniFew* f, const QMatrix& w, const QActs& a);
void qgemm_avx512_few(const QMatrix& w, const VnniFew* f, int64_t r0, int64_t r1, float* out, int64_t ldo);
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
void qlinear(const float* x, int64_t m, const QMatrix& w, float* out, int act_steps = 1);

// Name of the quantized kernel current_isa() selects ("plain", "avx2",
// "avx512_vnni", "neon", "neon_dot"), for benchmarks and tests.
const char* qgemm_path();

}  // namespace lingli
