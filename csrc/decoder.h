// The LLaMA decoder layers in one call: the loop of runtime/model.py's
// layer_loop, kernel for kernel, without a return to Python between them.
//
// A token's Python work between kernel calls (argument conversion, output
// arrays, the loop itself) is ~10% of a TinyLlama-shape decode step and ~15%
// of a SmolLM2 one on 2 threads; here it is a handful of pointer reads.
// The kernels, their order and their arguments are the Python loop's, so the
// floats are the same (tests/test_decoder_stack.py holds them equal).
// Like ops.h, everything here trusts its arguments: bindings.cpp checks them.
#pragma once

#include <cstdint>
#include <vector>

#include "qlinear.h"

namespace lingli {

// One weight matrix [n, k] of a layer with its optional bias [n]: quantized
// parts side by side (qlinear / qlinear_parts), or float32 / float16 rows.
struct DenseWeight {
    std::vector<QMatrix> parts;       // quantized: 1..kMaxParts, one act_steps
    int act_steps = 1;
    const float* f32 = nullptr;       // float: exactly one of f32, f16
    const uint16_t* f16 = nullptr;
    int64_t n = 0, k = 0;
    const float* bias = nullptr;
};

struct DecoderLayer {
    const float* attn_norm;  // [H]
    DenseWeight qkv;         // [(Hq + 2 Hkv) Dh, H]
    DenseWeight o;           // [H, Hq Dh]
    const float* mlp_norm;   // [H]
    DenseWeight gate_up;     // [2F, H]
    DenseWeight down;        // [H, F]
};

struct DecoderDims {
    int64_t hidden, heads, kv_heads, head_dim, ffn;
    float eps, scale;
    int64_t half_rot;   // rotary pairs per head (cos/sin columns)
    bool interleaved;
};

// Where this forward pass's tokens read and write the cache (as BatchKV).
template <typename KV>
struct DecoderCache {
    KV* const* k;            // per layer: [num_blocks, Hkv, block_size, Dh]
    KV* const* v;
    int64_t block_size;
    const int32_t* block_tables;  // [S, table_stride]
    int64_t table_stride;
    const int32_t* seq_ids;       // [T]
    const int64_t* kv_ranges;     // [n][2] byte ranges attention reads, or nullptr
    int64_t n_ranges;
};

// x[T, H] += every layer's attention and MLP, in place.
template <typename KV>
void decoder_layers(const DecoderLayer* layers, int64_t num_layers, const DecoderDims& d, float* x,
                    int64_t T, const int32_t* positions, const float* cos, const float* sin,
                    const DecoderCache<KV>& cache);

}  // namespace lingli
