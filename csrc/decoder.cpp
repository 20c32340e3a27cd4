// decoder_layers: runtime/model.py's layer_loop in C++ (decoder.h).
//
//   h = rms_norm(x);  qkv = h @ Wqkv;  q = rope(q), cache <- rope(k), v
//   x += attention(q, cache) @ Wo
//   h = rms_norm(x);  x += (silu(h @ Wg) * (h @ Wu)) @ Wd
//
// Each step is the kernel the Python loop's backend call runs, with the same
// arguments, and the residual and bias additions are done in the same order
// as numpy's in-place adds: the results are bit-identical.

#include "decoder.h"

#include <memory>

#include "ops.h"

namespace lingli {
namespace {

// y[T, n] = x[T, k] @ w.T (+ bias); plan: KV memory to prefetch under the product.
void dense(const DenseWeight& w, const float* x, int64_t T, float* y, const PrefetchPlan* plan) {
    if (w.f32 != nullptr) {
        linear_f32(x, w.f32, y, T, w.n, w.k);
    } else if (w.f16 != nullptr) {
        linear_f16(x, w.f16, y, T, w.n, w.k);
    } else if (w.parts.size() == 1) {
        qlinear(x, T, w.parts[0], y, w.act_steps, plan);
    } else {
        qlinear_parts(x, T, w.parts.data(), static_cast<int>(w.parts.size()), y, w.act_steps, plan);
    }
    if (w.bias != nullptr)
        for (int64_t t = 0; t < T; ++t)
            for (int64_t j = 0; j < w.n; ++j) y[t * w.n + j] += w.bias[j];
}

void add_into(float* x, const float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

std::unique_ptr<float[]> scratch(int64_t n) { return std::unique_ptr<float[]>(new float[n > 0 ? n : 1]); }

}  // namespace

template <typename KV>
void decoder_layers(const DecoderLayer* layers, int64_t num_layers, const DecoderDims& d, float* x,
                    int64_t T, const int32_t* positions, const float* cos, const float* sin,
                    const DecoderCache<KV>& c) {
    const int64_t H = d.hidden, Hq = d.heads, Hkv = d.kv_heads, Dh = d.head_dim, F = d.ffn;
    const int64_t nqkv = (Hq + 2 * Hkv) * Dh;
    auto h = scratch(T * H), y = scratch(T * H), qkv = scratch(T * nqkv), q = scratch(T * Hq * Dh),
         attn = scratch(T * Hq * Dh), gu = scratch(T * 2 * F), act = scratch(T * F);
    for (int64_t i = 0; i < num_layers; ++i) {
        const DecoderLayer& L = layers[i];
        rms_norm(x, L.attn_norm, h.get(), T, H, d.eps);
        // The blocks attention is about to read, fetched under this product's arithmetic.
        const PrefetchPlan plan{{reinterpret_cast<const char*>(c.k[i]), reinterpret_cast<const char*>(c.v[i])},
                                c.kv_ranges, c.n_ranges};
        dense(L.qkv, h.get(), T, qkv.get(), c.kv_ranges != nullptr && c.n_ranges > 0 ? &plan : nullptr);
        rope_write(qkv.get(), nqkv, q.get(), c.k[i], c.v[i], c.block_tables, c.table_stride, c.seq_ids,
                   positions, cos, sin, d.half_rot, d.interleaved, T, Hq, Hkv, Dh, c.block_size);
        paged_attention(q.get(), static_cast<const KV*>(c.k[i]), static_cast<const KV*>(c.v[i]),
                        c.block_tables, c.table_stride, c.seq_ids, positions, attn.get(), T, Hq, Hkv, Dh,
                        c.block_size, d.scale);
        dense(L.o, attn.get(), T, y.get(), nullptr);
        add_into(x, y.get(), T * H);
        rms_norm(x, L.mlp_norm, h.get(), T, H, d.eps);
        dense(L.gate_up, h.get(), T, gu.get(), nullptr);
        silu_mul(gu.get(), 2 * F, gu.get() + F, 2 * F, act.get(), T, F);
        dense(L.down, act.get(), T, y.get(), nullptr);
        add_into(x, y.get(), T * H);
    }
}

template void decoder_layers<float>(const DecoderLayer*, int64_t, const DecoderDims&, float*, int64_t,
                                    const int32_t*, const float*, const float*, const DecoderCache<float>&);
template void decoder_layers<uint16_t>(const DecoderLayer*, int64_t, const DecoderDims&, float*, int64_t,
                                       const int32_t*, const float*, const float*,
                                       const DecoderCache<uint16_t>&);

}  // namespace lingli
