// Quantized linear layers: the dispatcher and the plain (reference) kernels.
//
// qlinear() quantizes the activation rows to int8 per 32-input block (on all
// threads when there are many rows), splits the weight rows into one
// contiguous range per thread and runs the current ISA's QGemmFn on each
// range. The plain kernels below are the reference every SIMD path is
// tested against; they compute the same exact integer block dots, so the
// paths differ only in the order of the float sums.

#include "qlinear.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_features.h"
#include "ops.h"  // half_to_float
#include "parallel.h"

namespace lingli {

// ------------------------------------------------------------------ plain --

// The formula every quantizer implements: d = amax / 127 and
// q = nearbyint(clamp(x * (127 / amax), -127, 127)), where the clamp also
// maps NaN to -127 (as the SIMD max/min instructions do). An all-zero block
// gets d = 0 and zero codes.
void quantize_acts_plain(const float* x, int64_t m, int64_t k, int64_t kp, int8_t* q, float* d,
                         int32_t* sums) {
    const int64_t nb = kp / QBLOCK;
    for (int64_t i = 0; i < m; ++i) {
        const float* xr = x + i * k;
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t k0 = b * QBLOCK, n = std::max<int64_t>(0, std::min<int64_t>(QBLOCK, k - k0));
            float amax = 0.f;
            for (int64_t j = 0; j < n; ++j) {
                const float a = std::fabs(xr[k0 + j]);
                amax = a > amax ? a : amax;  // NaN never wins
            }
            const float iscale = amax > 0.f ? 127.f / amax : 0.f;
            int8_t* qb = q + i * kp + k0;
            int32_t s = 0;
            for (int64_t j = 0; j < QBLOCK; ++j) {
                float v = j < n ? xr[k0 + j] * iscale : 0.f;
                v = v > -127.f ? v : -127.f;  // NaN -> -127
                v = v < 127.f ? v : 127.f;
                const int c = static_cast<int>(std::nearbyint(v));
                qb[j] = static_cast<int8_t>(c);
                s += c;
            }
            d[i * nb + b] = amax / 127.f;
            sums[i * nb + b] = s;
        }
    }
}

namespace {

inline int weight_code(const QMatrix& w, int64_t r, int64_t e) {
    switch (w.bits) {
        case 8:
            return static_cast<int8_t>(w.q[r * w.kp + e]);
        case 4: {
            const uint8_t byte = w.q[r * (w.kp / 2) + (e / 32) * 16 + (e % 16)];
            return (e % 32) < 16 ? (byte & 15) : (byte >> 4);
        }
        default: {  // 3
            const int64_t b = e / 32, t = e % 32;
            const uint8_t lo = w.q[r * (w.kp / 4) + b * 8 + (t % 8)];
            const uint8_t hi = w.qh[r * (w.kp / 8) + e / 8];
            return ((lo >> (2 * (t / 8))) & 3) | (((hi >> (e % 8)) & 1) << 2);
        }
    }
}

}  // namespace

void qgemm_plain(const QMatrix& w, const QActs& a, int64_t r0, int64_t r1, float* out,
                 int64_t ldo) {
    const int64_t nb = w.kp / QBLOCK, ng = w.kp / w.group_size, bpg = w.group_size / QBLOCK;
    std::vector<int> codes(static_cast<size_t>(w.kp));
    const bool mins = w.bits != 8;
    for (int64_t r = r0; r < r1; ++r) {
        for (int64_t e = 0; e < w.kp; ++e) codes[e] = weight_code(w, r, e);
        for (int64_t i = 0; i < a.m; ++i) {
            const int8_t* xq = a.q + i * a.kp;
            float y = 0.f;
            for (int64_t g = 0; g < ng; ++g) {
                const float s = group_scale(w, r, g);
                const float mn = group_min(w, r, g, s);
                for (int64_t b = g * bpg; b < (g + 1) * bpg; ++b) {
                    int32_t dot = 0;
                    for (int64_t j = b * QBLOCK; j < (b + 1) * QBLOCK; ++j) dot += codes[j] * xq[j];
                    float t = s * static_cast<float>(dot);
                    if (mins) t += mn * static_cast<float>(a.sums[i * nb + b]);
                    y += a.d[i * nb + b] * t;
                }
            }
            out[i * ldo + r] = y;
        }
    }
}

// ------------------------------------------------------------- dispatch ---

namespace {

enum class QPath { Plain, Avx2, Avx512Vnni, Neon, NeonDot };

QPath qpath() {
    switch (current_isa()) {
#if defined(__x86_64__)
        case Isa::Avx512:
            if (cpu_has_avx512_vnni()) return QPath::Avx512Vnni;
            return QPath::Avx2;  // AVX-512F without VNNI: the AVX2 kernels
        case Isa::Avx2:
            return QPath::Avx2;
#endif
#if defined(__aarch64__)
        case Isa::Neon:
            return cpu_has_dotprod() ? QPath::NeonDot : QPath::Neon;
#endif
        default:
            return QPath::Plain;
    }
}

// The per-range kernel of a path (AVX-512 VNNI has none: qgemm_rows runs its
// three kernels itself).
QGemmFn qgemm_for(QPath p) {
    switch (p) {
#if defined(__x86_64__)
        case QPath::Avx2: return qgemm_avx2;
#endif
#if defined(__aarch64__)
        case QPath::Neon: return qgemm_neon;
        case QPath::NeonDot: return qgemm_neon_dot;
#endif
        default: return qgemm_plain;
    }
}

using QuantFn = void (*)(const float*, int64_t, int64_t, int64_t, int8_t*, float*, int32_t*);

QuantFn quant_for(QPath p) {
    switch (p) {
#if defined(__x86_64__)
        case QPath::Avx2: return quantize_acts_avx2;
        case QPath::Avx512Vnni: return quantize_acts_avx512;
#endif
        default: return quantize_acts_plain;
    }
}

void quantize_acts_with(QuantFn fn, const float* x, int64_t m, int64_t k, int64_t kp, int8_t* q,
                        float* d, int32_t* sums) {
    const int64_t nb = kp / QBLOCK;
    parallel_ranges(m, threads_for_bytes(m * k * 4), [&](int64_t i0, int64_t i1) {
        fn(x + i0 * k, i1 - i0, k, kp, q + i0 * kp, d + i0 * nb, sums + i0 * nb);
    });
}

}  // namespace

void quantize_acts(const float* x, int64_t m, int64_t k, int64_t kp, int8_t* q, float* d,
                   int32_t* sums) {
    quantize_acts_with(quant_for(qpath()), x, m, k, kp, q, d, sums);
}

const char* qgemm_path() {
    switch (qpath()) {
        case QPath::Avx2: return "avx2";
        case QPath::Avx512Vnni: return "avx512_vnni";
        case QPath::Neon: return "neon";
        case QPath::NeonDot: return "neon_dot";
        default: return "plain";
    }
}

// Rows per work chunk for parallel_chunks: `per` chunks per thread, in
// multiples of 32 rows (the tiles' weight block). Decode (one activation row)
// takes 8 per thread; the batched kernels 4, as their per-call setup (tile
// weights, next-block prefetch) made finer chunks of small matrices ~5% slower.
static int64_t row_grain(int64_t n, int nt, int64_t per) {
    return std::max<int64_t>(32, (n / (per * int64_t(nt)) + 31) / 32 * 32);
}

// Runs the products for activations already quantized (acts.m rows).
static void qgemm_rows(QPath path, const QMatrix& w, const QActs& acts, float* out,
                       const PrefetchPlan* plan) {
    const int64_t m = acts.m;
    PlanShare share;
    if (plan && plan->n > 0) {
        int64_t total = 0;
        for (int64_t i = 0; i < plan->n; ++i) total += 2 * plan->ranges[2 * i + 1];
        share.plan = plan;
        share.per_row = (total + w.n - 1) / w.n;
    }
    PlanShare* ps = share.plan ? &share : nullptr;
    // Work ~ weight bytes for decode; for prefill the products dominate.
    int nt = threads_for_bytes(w.n * row_bytes(w) + m * w.n * w.kp / 16);
    if (nt > w.n) nt = static_cast<int>(w.n);
#if defined(__x86_64__)
    if (path == QPath::Avx512Vnni && m >= vnni_tile_min_rows(w.kp)) {
        // Activations rearranged once (threads split the tiles), then shared.
        VnniTiles* tiles = vnni_tiles(w, acts);
        parallel_ranges(vnni_tile_count(tiles), nt,
                        [&](int64_t t0, int64_t t1) { vnni_tiles_fill(tiles, acts, t0, t1); });
        parallel_chunks(w.n, nt, row_grain(w.n, nt, 4),
                        [&](int64_t r0, int64_t r1) { qgemm_avx512_tiles(w, tiles, r0, r1, out, w.n, ps); });
        return;
    }
    if (path == QPath::Avx512Vnni && m == 1) {
        // Decode: the activation row rearranged once, shared by the threads.
        const VnniPrep* prep = vnni_prep(w, acts);
        parallel_chunks(w.n, nt, row_grain(w.n, nt, 8),
                        [&](int64_t r0, int64_t r1) { qgemm_avx512_decode(w, prep, r0, r1, out); });
        return;
    }
    if (path == QPath::Avx512Vnni && m > 1) {
        // Batched decode: activations rearranged once, shared by the threads.
        VnniFew* few = vnni_few(w, acts);
        vnni_few_fill(few, w, acts);
        parallel_chunks(w.n, nt, row_grain(w.n, nt, 4),
                        [&](int64_t r0, int64_t r1) { qgemm_avx512_few(w, few, r0, r1, out, w.n, ps); });
        return;
    }
#endif
    const QGemmFn fn = qgemm_for(path);
    parallel_chunks(w.n, nt, row_grain(w.n, nt, m == 1 ? 8 : 4),
                    [&](int64_t r0, int64_t r1) { fn(w, acts, r0, r1, out, w.n); });
}

void qlinear(const float* x, int64_t m, const QMatrix& w, float* out, int act_steps, const PrefetchPlan* plan) {
    if (m <= 0 || w.n <= 0) return;
    const QPath path = qpath();
    const QuantFn quant = quant_for(path);
    const int64_t nb = w.kp / QBLOCK;
    const int64_t rows = act_steps == 2 ? 2 * m : m;
    // Per calling thread, reused across calls (decode calls this per layer).
    thread_local std::vector<int8_t> qbuf;
    thread_local std::vector<float> dbuf;
    thread_local std::vector<int32_t> sbuf;
    qbuf.resize(static_cast<size_t>(rows * w.kp));
    dbuf.resize(static_cast<size_t>(rows * nb));
    sbuf.resize(static_cast<size_t>(rows * nb));
    quantize_acts_with(quant, x, m, w.k, w.kp, qbuf.data(), dbuf.data(), sbuf.data());
    if (act_steps != 2) {
        qgemm_rows(path, w, QActs{m, w.kp, qbuf.data(), dbuf.data(), sbuf.data()}, out, plan);
        return;
    }
    // Two-step activations: rows [m, 2m) quantize what the int8 codes of rows
    // [0, m) miss (x - d * q, at most d/2 per input), so one block of
    // outliers costs ~14 bits of precision instead of ~7. The products run as
    // 2m rows in one call (the weights are still read once) and are summed.
    thread_local std::vector<float> resid, both;
    resid.resize(static_cast<size_t>(m * w.k));
    both.resize(static_cast<size_t>(2 * m * w.n));
    // Pointers, not the thread_local vectors: each worker thread has its own.
    float* r = resid.data();
    const int8_t* q = qbuf.data();
    const float* d = dbuf.data();
    const int64_t k = w.k, kp = w.kp;
    parallel_ranges(m, threads_for_bytes(m * k * 4), [=](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i)
            for (int64_t j = 0; j < k; ++j) r[i * k + j] = x[i * k + j] - d[i * nb + j / QBLOCK] * q[i * kp + j];
    });
    quantize_acts_with(quant, resid.data(), m, w.k, w.kp, qbuf.data() + m * w.kp, dbuf.data() + m * nb,
                       sbuf.data() + m * nb);
    qgemm_rows(path, w, QActs{rows, w.kp, qbuf.data(), dbuf.data(), sbuf.data()}, both.data(), plan);
    for (int64_t i = 0; i < m * w.n; ++i) out[i] = both[i] + both[m * w.n + i];
}

void qlinear_parts(const float* x, int64_t m, const QMatrix* parts, int nparts, float* out,
                   int act_steps, const PrefetchPlan* plan) {
    int64_t off[kMaxParts + 1] = {0};
    for (int p = 0; p < nparts; ++p) off[p + 1] = off[p] + parts[p].n;
    const int64_t ntot = off[nparts];
    if (m <= 0 || ntot <= 0) return;
    if (m != 1 || act_steps != 1) {
        // Batched rows: each part's products dominate its call; run them one by
        // one into a buffer and place its columns.
        thread_local std::vector<float> part_out;
        for (int p = 0; p < nparts; ++p) {
            const int64_t n = parts[p].n;
            part_out.resize(static_cast<size_t>(m * n));
            qlinear(x, m, parts[p], part_out.data(), act_steps, p == 0 ? plan : nullptr);
            for (int64_t i = 0; i < m; ++i)
                std::memcpy(out + i * ntot + off[p], part_out.data() + i * n, n * sizeof(float));
        }
        return;
    }
    // One row, quantized once at the longest padded K: a part with a shorter kp
    // reads a prefix of it, the same 32-input blocks its own call would make.
    const QPath path = qpath();
    int64_t kp = 0, bytes = 0;
    for (int p = 0; p < nparts; ++p) {
        kp = std::max(kp, parts[p].kp);
        bytes += parts[p].n * row_bytes(parts[p]);
    }
    const int64_t nb = kp / QBLOCK;
    thread_local std::vector<int8_t> qbuf;
    thread_local std::vector<float> dbuf;
    thread_local std::vector<int32_t> sbuf;
    qbuf.resize(static_cast<size_t>(kp));
    dbuf.resize(static_cast<size_t>(nb));
    sbuf.resize(static_cast<size_t>(nb));
    quantize_acts_with(quant_for(path), x, 1, parts[0].k, kp, qbuf.data(), dbuf.data(), sbuf.data());
    // Work chunks never straddle two parts: (part, first row, end row) each.
    struct Chunk {
        int p;
        int64_t r0, r1;
    };
    int nt = threads_for_bytes(bytes);
    if (nt > ntot) nt = static_cast<int>(ntot);
    const int64_t grain = row_grain(ntot, nt, 8);
    std::vector<Chunk> chunks;
    for (int p = 0; p < nparts; ++p)
        for (int64_t r = 0; r < parts[p].n; r += grain) chunks.push_back({p, r, std::min(parts[p].n, r + grain)});
    // Pointers, not the thread_local vectors: each worker thread has its own.
    int8_t* qx = qbuf.data();
    float* dx = dbuf.data();
    int32_t* sx = sbuf.data();
    auto acts = [=](int p) { return QActs{1, parts[p].kp, qx, dx, sx}; };
#if defined(__x86_64__)
    if (path == QPath::Avx512Vnni) {
        const VnniPrep* prep[kMaxParts];
        for (int p = 0; p < nparts; ++p) prep[p] = vnni_prep(parts[p], acts(p), p);
        parallel_chunks(static_cast<int64_t>(chunks.size()), nt, 1, [&](int64_t c0, int64_t c1) {
            for (int64_t c = c0; c < c1; ++c) {
                const Chunk& ch = chunks[c];
                qgemm_avx512_decode(parts[ch.p], prep[ch.p], ch.r0, ch.r1, out + off[ch.p]);
            }
        });
        return;
    }
#endif
    const QGemmFn fn = qgemm_for(path);
    parallel_chunks(static_cast<int64_t>(chunks.size()), nt, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t c = c0; c < c1; ++c) {
            const Chunk& ch = chunks[c];
            fn(parts[ch.p], acts(ch.p), ch.r0, ch.r1, out + off[ch.p], parts[ch.p].n);
        }
    });
}

}  // namespace lingli
