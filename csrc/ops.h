// Plain-C interface of Lingli's CPU kernels.
//
// Everything here takes raw pointers to C-contiguous buffers and trusts its
// arguments: shape/dtype/range validation happens once, in bindings.cpp,
// before the GIL is released. Keeping pybind11 out of the kernel files lets
// them be compiled (and syntax-checked) for any target without Python headers.
#pragma once

#include <cstdint>

namespace lingli {

// y[M,N] = x[M,K] @ w[N,K]^T, with w in float32 or IEEE half (raw uint16 bits).
void linear_f32(const float* x, const float* w, float* y, int64_t M, int64_t N, int64_t K);
void linear_f16(const float* x, const uint16_t* w, float* y, int64_t M, int64_t N, int64_t K);

// y[M,D] = x / sqrt(mean(x^2) + eps) * weight
void rms_norm(const float* x, const float* weight, float* y, int64_t M, int64_t D, float eps);

// In-place rotary embedding on x[T,H,Dh]; cos/sin are [P, half_rot]; positions
// must already be checked to lie in [0, P).
void rope(float* x, const int32_t* positions, const float* cos, const float* sin,
          int64_t T, int64_t H, int64_t Dh, int64_t half_rot, bool interleaved);

// out[M,F] = silu(gate) * up
void silu_mul(const float* gate, const float* up, float* out, int64_t M, int64_t F);

// In-place, numerically stable softmax over each row of x[M,N].
void softmax(float* x, int64_t M, int64_t N);

// One sequence of causal attention over a paged KV cache (see bindings.cpp for
// the layout). block_table / q_positions must already be validated.
// k/v [T, Hkv, Dh] into the cache slots of each token (blocks already reserved).
void paged_write(float* k_cache, float* v_cache, const int32_t* block_tables, int64_t table_stride,
                 const int32_t* seq_ids, const int32_t* positions, const float* k, const float* v,
                 int64_t T, int64_t Hkv, int64_t Dh, int64_t block_size);

// block_tables [S, table_stride]; seq_ids [T] picks each token's row (nullptr: row 0).
void paged_attention(const float* q, const float* k_cache, const float* v_cache,
                     const int32_t* block_tables, int64_t table_stride, const int32_t* seq_ids,
                     const int32_t* q_positions, float* out,
                     int64_t T, int64_t Hq, int64_t Hkv, int64_t Dh, int64_t block_size,
                     float scale);

// STREAM-like read probe over nbytes: best GB/s (1e9 B/s) of the 64 MiB chunks
// read during `repeats` passes (see membw.cpp).
double read_bandwidth(int64_t nbytes, int repeats);

// IEEE binary16 -> binary32 in software (subnormals, inf and nan included).
inline float half_to_float(uint16_t h) {
    uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;  // +-0
        } else {
            // Subnormal: shift the mantissa up until its leading 1 becomes the
            // implicit bit, lowering the exponent once per shift.
            uint32_t e = 127 - 15 + 1;
            while (!(mant & 0x400u)) {
                mant <<= 1;
                --e;
            }
            bits = sign | (e << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);  // inf, or nan with its payload
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    __builtin_memcpy(&f, &bits, sizeof f);
    return f;
}

}  // namespace lingli
