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
// One head's vector v[Dh] rotated in place by one position's angles (c, s: half_rot each).
void rope_head(float* v, const float* c, const float* s, int64_t half_rot, bool interleaved);

// out[M,F] = silu(gate) * up; gate and up rows start ldg / ldu floats apart
// (F when contiguous; 2F for the halves of a fused gate|up product).
void silu_mul(const float* gate, int64_t ldg, const float* up, int64_t ldu, float* out, int64_t M,
              int64_t F);

// In-place, numerically stable softmax over each row of x[M,N].
void softmax(float* x, int64_t M, int64_t N);

// The paged KV cache holds float32 or IEEE half (raw uint16 bits): KV is
// float or uint16_t (both instantiated in attention.cpp).
// k/v [T, Hkv, Dh] into the cache slots of each token (blocks already reserved);
// half caches round to nearest even, as numpy's astype(float16) does.
template <typename KV>
void paged_write(KV* k_cache, KV* v_cache, const int32_t* block_tables, int64_t table_stride,
                 const int32_t* seq_ids, const int32_t* positions, const float* k, const float* v,
                 int64_t T, int64_t Hkv, int64_t Dh, int64_t block_size);

// A fused q/k/v product's rows qkv[T, ld] = [q (Hq heads) | k (Hkv) | v (Hkv)] x Dh:
// q rotated into q_out [T, Hq, Dh], k rotated and v stored into the cache as
// paged_write stores them; the same floats as rope on q and k, then paged_write.
template <typename KV>
void rope_write(const float* qkv, int64_t ld, float* q_out, KV* k_cache, KV* v_cache,
                const int32_t* block_tables, int64_t table_stride, const int32_t* seq_ids,
                const int32_t* positions, const float* cos, const float* sin, int64_t half_rot,
                bool interleaved, int64_t T, int64_t Hq, int64_t Hkv, int64_t Dh, int64_t block_size);

// block_tables [S, table_stride]; seq_ids [T] picks each token's row (nullptr: row 0).
template <typename KV>
void paged_attention(const float* q, const KV* k_cache, const KV* v_cache,
                     const int32_t* block_tables, int64_t table_stride, const int32_t* seq_ids,
                     const int32_t* q_positions, float* out,
                     int64_t T, int64_t Hq, int64_t Hkv, int64_t Dh, int64_t block_size,
                     float scale);

// STREAM-like read probe over nbytes: best GB/s (1e9 B/s) of the 64 MiB chunks
// read during `repeats` passes (see membw.cpp).
double read_bandwidth(int64_t nbytes, int repeats);

// int8 dot-product rate of `threads` threads together (vpdpbusd, 512-bit) in
// GOP/s, best of 5; 0 without AVX-512 VNNI (see vnni_peak.cpp).
double vnni_peak(int threads);

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

// IEEE binary32 -> binary16, rounding to nearest even (what F16C's vcvtps2ph
// and numpy's astype(float16) do): overflow to inf, subnormals kept, nan stays nan.
inline uint16_t float_to_half(float f) {
    uint32_t x;
    __builtin_memcpy(&x, &f, sizeof x);
    const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u)  // inf, or nan (quieted, top payload bits kept)
        return static_cast<uint16_t>(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u | ((ax >> 13) & 0x3ffu) : 0u));
    if (ax >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 65520 rounds to inf
    uint32_t h, rem, half;
    if (ax >= 0x38800000u) {  // a normal half: rebias the exponent, drop 13 bits
        const uint32_t r = ax - 0x38000000u;
        h = r >> 13, rem = r & 0x1fffu, half = 0x1000u;
    } else {                  // subnormal (or zero): the value in units of 2^-24
        const uint32_t e = ax >> 23, shift = 126 - e;
        if (shift > 24) return static_cast<uint16_t>(sign);
        const uint32_t m = (ax & 0x7fffffu) | 0x800000u;
        h = m >> shift, rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1);
    }
    if (rem > half || (rem == half && (h & 1u))) ++h;  // may carry into the exponent: still right
    return static_cast<uint16_t>(sign | h);
}

}  // namespace lingli
