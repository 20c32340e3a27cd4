// Standalone test of the quantized matrix kernels (built and run for aarch64
// under qemu by tests/test_neon_qemu.py; the x86 build checks qgemm_plain only).
//
// Weights are quantized here by a small RTN that follows runtime/quant/formats.py
// (int8: f16 scales; int4/int3 in both encodings: f16 scales and mins, or
// scale and min codes under a row scale; codes against the rounded values)
// and packed into the portable layout; one distribution then sets the group
// parameters to extreme values (codes: the extreme codes; f16: subnormal,
// zero and the largest finite halves). Every int4/int3 case runs in both
// encodings. Every kernel is compared with
//   * an exact reference: the integer block dots from the unpacked codes, summed
//     in double (this also checks each kernel's unpacking against the packer),
//   * qgemm_plain, with tolerance 1e-5 relative to sum_b |d_b|(|s| |isum_b| + |m| |sums_b|).
// quantize_acts_plain is checked against the formula in qlinear.h, and
// scale_factor() against 2^((c - 255) / 16).
//
//   build: g++ -O2 -std=c++17 -Icsrc csrc/tests/qlinear_test.cpp csrc/qlinear*.cpp csrc/cpu_features.cpp
//   last line of output: "<P> passed, <F> failed"; exit status 1 if F > 0.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <mutex>

#include "cpu_features.h"
#include "parallel.h"
#include "qlinear.h"
#include "tests/test_common.h"

using namespace lingli;

namespace {

// --------------------------------------------------- RTN + packing (formats.py)
// T[c] computed apart from qlinear.h's scale_factor (checked equal in main).
float scale_step(int c) { return static_cast<float>(std::exp2((c - 255) / 16.0)); }

struct QWeights {
    int bits, group_size;
    bool coded;  // int4/int3: codes encoding (else f16); int8: false
    int64_t n, k, kp;
    std::vector<int32_t> codes;  // [n, kp] unpacked (signed for int8)
    std::vector<uint8_t> q, qh;
    std::vector<uint16_t> scales, mins;  // int8 (scales), int4/int3 f16 encoding
    std::vector<uint8_t> scale_codes;    // int4/int3 codes encoding
    std::vector<int8_t> min_codes;
    std::vector<float> row_scale;
    QMatrix view() const {
        const bool f16m = bits != 8 && !coded;
        return QMatrix{bits, group_size, n, k, kp, q.data(), bits == 3 ? qh.data() : nullptr,
                       coded ? nullptr : scales.data(), f16m ? mins.data() : nullptr,
                       coded ? scale_codes.data() : nullptr, coded ? min_codes.data() : nullptr,
                       coded ? row_scale.data() : nullptr};
    }
    // Group g of row r: s, and m (0 for int8), as the kernels compute them in float.
    float s(int64_t r, int64_t g) const {
        const int64_t ng = kp / group_size;
        return coded ? row_scale[r] * scale_step(scale_codes[r * ng + g]) : f16_to_f32(scales[r * ng + g]);
    }
    float m(int64_t r, int64_t g) const {
        const int64_t ng = kp / group_size;
        if (bits == 8) return 0.f;
        return coded ? (s(r, g) * static_cast<float>(min_codes[r * ng + g])) * 0.125f : f16_to_f32(mins[r * ng + g]);
    }
};

QWeights quantize_rtn(const std::vector<float>& w, int64_t n, int64_t k, int bits, int G, bool coded) {
    QWeights qw;
    qw.bits = bits;
    qw.group_size = G;
    qw.coded = bits != 8 && coded;
    qw.n = n;
    qw.k = k;
    qw.kp = (k + G - 1) / G * G;
    const int64_t kp = qw.kp, ng = kp / G;
    qw.codes.assign(n * kp, 0);
    const int qmax = (1 << bits) - 1;
    if (!qw.coded) {
        qw.scales.assign(n * ng, 0);
        if (bits != 8) qw.mins.assign(n * ng, 0);
    } else {
        qw.scale_codes.assign(n * ng, 0);
        qw.min_codes.assign(n * ng, 0);
        qw.row_scale.assign(n, 0.f);
    }
    std::vector<float> lo(ng), want(ng);  // per group of the row: min, scale before coding
    for (int64_t r = 0; r < n; ++r) {
        if (qw.coded) {
            // A group's s covers its range and its min (|m| <= 16 s, so an
            // all-equal group's s comes from its min); the row scale is the largest s.
            for (int64_t g = 0; g < ng; ++g) {
                float l = INFINITY, h = -INFINITY;
                for (int64_t c = g * G; c < std::min(k, g * G + G); ++c) {
                    l = std::min(l, w[r * k + c]);
                    h = std::max(h, w[r * k + c]);
                }
                lo[g] = l;
                want[g] = std::max((h - l) / static_cast<float>(qmax), std::fabs(l) / 15.f);
                qw.row_scale[r] = std::max(qw.row_scale[r], want[g]);
            }
        }
        for (int64_t g = 0; g < ng; ++g) {
            const int64_t c0 = g * G, c1 = std::min(k, c0 + G);  // real inputs of the group
            const float* src = w.data() + r * k;
            int32_t* dst = qw.codes.data() + r * kp;
            if (bits == 8) {
                float amax = 0.f;
                for (int64_t c = c0; c < c1; ++c) amax = std::max(amax, std::fabs(src[c]));
                const uint16_t sh = f32_to_f16(amax / 127.0f);
                const float s = f16_to_f32(sh), inv = s > 0 ? 1.f / s : 0.f;
                qw.scales[r * ng + g] = sh;
                for (int64_t c = c0; c < c1; ++c)
                    dst[c] = static_cast<int32_t>(std::min(127.f, std::max(-127.f, std::nearbyint(src[c] * inv))));
            } else if (!qw.coded) {  // f16 s and m
                float l = INFINITY, h = -INFINITY;
                for (int64_t c = c0; c < c1; ++c) {
                    l = std::min(l, src[c]);
                    h = std::max(h, src[c]);
                }
                const uint16_t mh = f32_to_f16(l);
                const float m = f16_to_f32(mh);
                const uint16_t sh = f32_to_f16((h - m) / static_cast<float>(qmax));
                const float s = f16_to_f32(sh), inv = s > 0 ? 1.f / s : 0.f;
                qw.scales[r * ng + g] = sh;
                qw.mins[r * ng + g] = mh;
                for (int64_t c = c0; c < c1; ++c)
                    dst[c] = static_cast<int32_t>(
                        std::min<float>(qmax, std::max(0.f, std::nearbyint((src[c] - m) * inv))));
            } else {
                const float R = qw.row_scale[r];
                const int sc = want[g] > 0.f && R > 0.f
                                   ? static_cast<int>(std::min(255.0, std::max(0.0, std::nearbyint(16.0 * std::log2(want[g] / R)) + 255)))
                                   : 0;
                qw.scale_codes[r * ng + g] = static_cast<uint8_t>(sc);
                const float sq = qw.s(r, g);
                const int mc = sq > 0.f ? static_cast<int>(std::min(127.0, std::max(-128.0, std::nearbyint(8.0 * lo[g] / sq))))
                                        : 0;
                qw.min_codes[r * ng + g] = static_cast<int8_t>(mc);
                const float m = qw.m(r, g), inv = sq > 0 ? 1.f / sq : 0.f;
                for (int64_t c = c0; c < c1; ++c)
                    dst[c] = static_cast<int32_t>(
                        std::min<float>(qmax, std::max(0.f, std::nearbyint((src[c] - m) * inv))));
            }
        }
    }
    // pack
    const int32_t* codes = qw.codes.data();
    if (bits == 8) {
        qw.q.resize(n * kp);
        for (int64_t i = 0; i < n * kp; ++i) qw.q[i] = static_cast<uint8_t>(static_cast<int8_t>(codes[i]));
    } else if (bits == 4) {
        qw.q.assign(n * kp / 2, 0);
        for (int64_t r = 0; r < n; ++r)
            for (int64_t b = 0; b < kp / 32; ++b)
                for (int i = 0; i < 16; ++i) {  // byte 16b+i = q[32b+i] | q[32b+16+i] << 4
                    const int32_t* c = codes + r * kp + 32 * b;
                    qw.q[r * kp / 2 + 16 * b + i] = static_cast<uint8_t>(c[i] | (c[16 + i] << 4));
                }
    } else {
        qw.q.assign(n * kp / 4, 0);
        qw.qh.assign(n * kp / 8, 0);
        for (int64_t r = 0; r < n; ++r)
            for (int64_t b = 0; b < kp / 32; ++b) {
                const int32_t* c = codes + r * kp + 32 * b;
                for (int i = 0; i < 8; ++i) {  // byte 8b+i = sum_j (q[32b+8j+i] & 3) << 2j
                    uint8_t v = 0;
                    for (int j = 0; j < 4; ++j) v |= static_cast<uint8_t>((c[8 * j + i] & 3) << (2 * j));
                    qw.q[r * kp / 4 + 8 * b + i] = v;
                }
                for (int e = 0; e < 32; ++e)  // bit e of the LE word at 4b = q[32b+e] >> 2
                    qw.qh[r * kp / 8 + 4 * b + e / 8] |= static_cast<uint8_t>(((c[e] >> 2) & 1) << (e % 8));
            }
    }
    return qw;
}

// ------------------------------------------- activations (the contract's formula)
struct QA {
    int64_t m, kp;
    std::vector<int8_t> q;
    std::vector<float> d;
    std::vector<int32_t> sums;
    QActs view() const { return QActs{m, kp, q.data(), d.data(), sums.data()}; }
};

QA quantize_acts_direct(const std::vector<float>& x, int64_t m, int64_t k, int64_t kp) {
    QA a{m, kp, std::vector<int8_t>(m * kp, 0), std::vector<float>(m * kp / 32, 0.f),
         std::vector<int32_t>(m * kp / 32, 0)};
    for (int64_t i = 0; i < m; ++i)
        for (int64_t b = 0; b < kp / 32; ++b) {
            float amax = 0.f;
            for (int64_t c = 32 * b; c < std::min(k, 32 * b + 32); ++c) amax = std::max(amax, std::fabs(x[i * k + c]));
            if (amax == 0.f) continue;
            a.d[i * kp / 32 + b] = amax / 127.f;
            const float inv = 127.f / amax;
            int32_t s = 0;
            for (int64_t c = 32 * b; c < std::min(k, 32 * b + 32); ++c) {
                const int32_t v = static_cast<int32_t>(std::nearbyint(x[i * k + c] * inv));
                a.q[i * kp + c] = static_cast<int8_t>(v);
                s += v;
            }
            a.sums[i * kp / 32 + b] = s;
        }
    return a;
}

// ----------------------------------------------------------------- checks --
// Exact y and the error scale sum_b |d|(|s isum| + |m sums|), in double.
void exact_reference(const QWeights& w, const QA& a, std::vector<double>& y, std::vector<double>& scale) {
    const int64_t nb = w.kp / 32;
    y.assign(a.m * w.n, 0.0);
    scale.assign(a.m * w.n, 0.0);
    for (int64_t i = 0; i < a.m; ++i)
        for (int64_t r = 0; r < w.n; ++r) {
            double acc = 0, mag = 0;
            for (int64_t b = 0; b < nb; ++b) {
                int64_t isum = 0;
                for (int c = 0; c < 32; ++c)
                    isum += int64_t(w.codes[r * w.kp + 32 * b + c]) * a.q[i * a.kp + 32 * b + c];
                const int64_t g = b * 32 / w.group_size;
                const double s = w.s(r, g), m = w.m(r, g);
                const double d = a.d[i * nb + b];
                const double sm = a.sums[i * nb + b];
                acc += d * (s * double(isum) + m * sm);
                mag += std::fabs(d) * (std::fabs(s * double(isum)) + std::fabs(m * sm));
            }
            y[i * w.n + r] = acc;
            scale[i * w.n + r] = mag;
        }
}

bool close(double got, double want, double scale) {
    return std::isfinite(got) && std::fabs(got - want) <= 1e-5 * scale + 1e-30;
}

// Extremes: uniform weights whose int4/int3 group parameters are then set to
// scale codes 0 / 255 and min codes -128 / 127 (and random ones between), or
// (f16 encoding) to the smallest and largest subnormal and the largest finite
// halves, +-0 mins and random normal ones.
enum class Dist { Uniform, Outliers, Signs, Sparse, Extremes };
const char* dist_name(Dist d) {
    switch (d) {
        case Dist::Uniform: return "uniform";
        case Dist::Outliers: return "outliers";
        case Dist::Signs: return "signs";
        case Dist::Sparse: return "sparse";
        case Dist::Extremes: return "extremes";
    }
    return "?";
}

float sample(Dist dist) {
    switch (dist) {
        case Dist::Uniform: return uniform();
        case Dist::Outliers: return (next_u32() % 61 == 0) ? 40.f * uniform() : uniform();
        case Dist::Signs: return (next_u32() & 1) ? 1.f : -1.f;  // int8 codes all +-127
        case Dist::Sparse: return (next_u32() % 3 == 0) ? uniform() : 0.f;  // zero groups too
        case Dist::Extremes: return uniform();
    }
    return 0.f;
}

struct Path {
    const char* name;
    QGemmFn fn;
};

void run_case(int bits, bool coded, int G, int64_t M, int64_t N, int64_t K, Dist dist,
              const std::vector<Path>& paths) {
    char tag[160];
    std::snprintf(tag, sizeof tag, "int%d%s G=%d M=%lld N=%lld K=%lld %s", bits,
                  bits == 8 ? "" : coded ? " codes" : " f16", G, (long long)M, (long long)N, (long long)K,
                  dist_name(dist));
    std::vector<float> wf(N * K), xf(M * K);
    for (auto& v : wf) v = sample(dist);
    for (auto& v : xf) v = sample(dist == Dist::Signs ? Dist::Signs : Dist::Uniform);
    if (M > 2 && dist == Dist::Sparse)
        for (int64_t c = 0; c < K; ++c) xf[1 * K + c] = 0.f;  // an all-zero activation row
    QWeights w = quantize_rtn(wf, N, K, bits, G, coded);
    if (dist == Dist::Extremes && w.coded)
        for (size_t j = 0; j < w.scale_codes.size(); ++j) {
            const uint32_t u = next_u32();
            w.scale_codes[j] = static_cast<uint8_t>(j % 3 == 0 ? 0 : j % 3 == 1 ? 255 : u & 255);
            w.min_codes[j] = static_cast<int8_t>(j % 4 == 0 ? -128 : j % 4 == 1 ? 127 : static_cast<int>(u >> 24) - 128);
        }
    if (dist == Dist::Extremes && bits != 8 && !w.coded)
        for (size_t j = 0; j < w.scales.size(); ++j) {
            const uint32_t u = next_u32();
            // subnormals 2^-24 and 1023 * 2^-24, 65504, a random normal scale;
            // mins -0, +0, -65504, 1023 * 2^-24 and random normal ones of either sign
            static const uint16_t kS[] = {0x0001, 0x03ff, 0x7bff};
            static const uint16_t kM[] = {0x8000, 0x0000, 0xfbff, 0x03ff};
            w.scales[j] = j % 4 < 3 ? kS[j % 4] : static_cast<uint16_t>(0x0400 + (u & 0x77ff) % 0x7800);
            w.mins[j] = j % 5 < 4 ? kM[j % 5] : static_cast<uint16_t>(((u >> 16) & 0x8000) | (0x0400 + (u >> 17) % 0x7800));
        }
    const QMatrix qm = w.view();

    // quantize_acts_plain against the formula
    QA a{M, w.kp, std::vector<int8_t>(M * w.kp, 99), std::vector<float>(M * w.kp / 32, -1.f),
         std::vector<int32_t>(M * w.kp / 32, -1)};
    quantize_acts_plain(xf.data(), M, K, w.kp, a.q.data(), a.d.data(), a.sums.data());
    {
        const QA direct = quantize_acts_direct(xf, M, K, w.kp);
        bool ok = true;
        for (int64_t i = 0; i < M && ok; ++i)
            for (int64_t b = 0; b < w.kp / 32 && ok; ++b) {
                const int64_t j = i * w.kp / 32 + b;
                ok = std::fabs(a.d[j] - direct.d[j]) <= 1e-6f * direct.d[j];
                int32_t s = 0;
                for (int64_t c = 32 * b; c < 32 * b + 32 && ok; ++c) {
                    const int32_t got = a.q[i * w.kp + c], want = direct.q[i * w.kp + c];
                    s += got;
                    if (got == want) continue;
                    // tolerate a different rounding only at an exact .5 tie (up to float error)
                    float amax = 0.f;
                    for (int64_t cc = 32 * b; cc < std::min(K, 32 * b + 32); ++cc)
                        amax = std::max(amax, std::fabs(xf[i * K + cc]));
                    const float t = c < K && amax > 0 ? xf[i * K + c] * (127.f / amax) : 0.f;
                    ok = std::abs(got - want) == 1 && std::fabs(std::fabs(t - std::trunc(t)) - 0.5f) < 1e-4f;
                }
                ok = ok && s == a.sums[j];
                if (!ok) std::printf("  acts mismatch at row %lld block %lld\n", (long long)i, (long long)b);
            }
        report(ok, std::string("quantize_acts_plain ") + tag);
    }

    std::vector<double> y_exact, scale;
    exact_reference(w, a, y_exact, scale);
    const QActs qa = a.view();

    // the plain kernel, the reference for the others
    std::vector<float> y_plain(M * N, NAN);
    qgemm_plain(qm, qa, 0, N, y_plain.data(), N);
    {
        bool ok = true;
        for (int64_t i = 0; i < M * N && ok; ++i) {
            ok = close(y_plain[i], y_exact[i], scale[i]);
            if (!ok) std::printf("  plain[%lld] = %.9g, exact %.9g\n", (long long)i, y_plain[i], y_exact[i]);
        }
        report(ok, std::string("plain vs exact ") + tag);
    }

    for (const Path& p : paths) {
        // full range, ldo = N
        std::vector<float> y(M * N, NAN);
        p.fn(qm, qa, 0, N, y.data(), N);
        bool ok = true;
        for (int64_t i = 0; i < M * N && ok; ++i) {
            ok = close(y[i], y_plain[i], scale[i]) && close(y[i], y_exact[i], scale[i]);
            if (!ok)
                std::printf("  %s[%lld] = %.9g, plain %.9g, exact %.9g\n", p.name, (long long)i, y[i], y_plain[i],
                            y_exact[i]);
        }
        report(ok, std::string(p.name) + " vs plain " + tag);

        // a row sub-range [r0, r1) into a wider output (ldo = N + 3): nothing else written
        if (N >= 3) {
            const int64_t r0 = 1, r1 = N - 1, ldo = N + 3;
            std::vector<float> ys(M * ldo, -7.f);
            p.fn(qm, qa, r0, r1, ys.data(), ldo);
            bool ok2 = true;
            for (int64_t i = 0; i < M && ok2; ++i)
                for (int64_t r = 0; r < ldo && ok2; ++r) {
                    const float got = ys[i * ldo + r];
                    if (r >= r0 && r < r1)
                        ok2 = got == y[i * N + r];  // same kernel, same order: bit-identical
                    else
                        ok2 = got == -7.f;
                }
            report(ok2, std::string(p.name) + " rows [1, N-1) ldo=N+3 " + tag);
        }
    }
}

// The dispatcher end to end: qgemm_path() names the kernel cpu_has_dotprod()
// implies, and qlinear() on the NEON ISA matches qlinear() on the plain one.
// parallel_chunks: every row of [0, n) in exactly one call (none for n = 0),
// calls cut at multiples of the grain, on no more threads than asked for.
void check_parallel_chunks() {
    bool ok = true;
    for (int nt : {1, 2, 3, 4})
        for (int64_t n : {int64_t(0), int64_t(1), int64_t(5), int64_t(31), int64_t(32), int64_t(33), int64_t(100),
                          int64_t(1000)})
            for (int64_t grain : {int64_t(0), int64_t(1), int64_t(7), int64_t(32), int64_t(64)}) {
                std::vector<int> seen(static_cast<size_t>(n), 0);
                std::mutex mu;
                bool cuts = true;
                parallel_chunks(n, nt, grain, [&](int64_t b, int64_t e) {
                    const int t = omp_thread_id();
                    std::lock_guard<std::mutex> lock(mu);
                    const int64_t g = std::max<int64_t>(1, grain);
                    const bool whole = b == 0 && e == n;  // one thread: one call
                    cuts = cuts && b < e && (whole || (b % g == 0 && (e == n || e - b == g))) && t < nt;
                    for (int64_t i = b; i < e && i < n; ++i) ++seen[static_cast<size_t>(i)];
                });
                ok = ok && cuts && std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; });
            }
    report(ok, "parallel_chunks covers every row once, in grain-aligned chunks");
}

void check_dispatch() {
#if defined(__aarch64__)
    set_isa(Isa::Neon);
    const std::string path = qgemm_path();
    const std::string want = cpu_has_dotprod() ? "neon_dot" : "neon";
    std::printf("dispatcher path: %s\n", path.c_str());
    report(path == want, "qgemm_path() is " + path + ", expected " + want);
    for (int bits : {8, 4, 3})
        for (bool coded : {false, true}) {
            if (bits == 8 && coded) continue;
            const int64_t M = 5, N = 37, K = 300;
            std::vector<float> wf(N * K), xf(M * K);
            for (auto& v : wf) v = uniform();
            for (auto& v : xf) v = uniform();
            const QWeights w = quantize_rtn(wf, N, K, bits, 64, coded);
            std::vector<float> y_neon(M * N, NAN), y_plain(M * N, NAN);
            set_isa(Isa::Neon);
            qlinear(xf.data(), M, w.view(), y_neon.data());
            set_isa(Isa::Plain);
            qlinear(xf.data(), M, w.view(), y_plain.data());
            bool ok = true;
            for (int64_t i = 0; i < M * N && ok; ++i)
                ok = std::fabs(y_neon[i] - y_plain[i]) <= 1e-5f * (std::sqrt(float(K)) + std::fabs(y_plain[i]));
            report(ok, "qlinear() neon vs plain int" + std::to_string(bits) +
                           (bits == 8 ? "" : coded ? " codes" : " f16"));
        }
    set_isa(Isa::Neon);
#endif
}

// qlinear_parts on the current ISA: the same floats as one qlinear per part,
// side by side (one and several activation rows, mixed formats and group sizes).
void check_parts() {
    const int64_t K = 300;
    const int fmts[][3] = {{3, 32, 0}, {4, 32, 1}, {3, 64, 1}, {8, 128, 0}};  // bits, G, coded
    const int64_t ns[] = {37, 5, 64, 9};
    std::vector<QWeights> ws;
    std::vector<QMatrix> views;
    for (int p = 0; p < 4; ++p) {
        std::vector<float> wf(ns[p] * K);
        for (auto& v : wf) v = uniform();
        ws.push_back(quantize_rtn(wf, ns[p], K, fmts[p][0], fmts[p][1], fmts[p][2] != 0));
    }
    for (const QWeights& w : ws) views.push_back(w.view());
    const int64_t ntot = 37 + 5 + 64 + 9;
    for (int64_t M : {int64_t(1), int64_t(3)}) {
        std::vector<float> xf(M * K), got(M * ntot, NAN), want(M * ntot, NAN);
        for (auto& v : xf) v = uniform();
        int64_t off = 0;
        for (int p = 0; p < 4; ++p) {
            std::vector<float> y(M * ns[p]);
            qlinear(xf.data(), M, views[p], y.data());
            for (int64_t i = 0; i < M; ++i)
                for (int64_t r = 0; r < ns[p]; ++r) want[i * ntot + off + r] = y[i * ns[p] + r];
            off += ns[p];
        }
        qlinear_parts(xf.data(), M, views.data(), 4, got.data());
        report(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)) == 0,
               std::string("qlinear_parts == qlinear per part on ") + qgemm_path() + ", M = " + std::to_string(M));
    }
}

}  // namespace

int main() {
    {
        bool ok = true;
        for (int c = 0; c < 256 && ok; ++c) ok = scale_factor(static_cast<uint8_t>(c)) == scale_step(c);
        report(ok, "scale_factor(c) == 2^((c - 255) / 16)");
    }
    std::vector<Path> paths;
#if defined(__aarch64__)
    paths.push_back({"neon", qgemm_neon});
    const bool dot = cpu_has_dotprod();
    if (dot) paths.push_back({"neon_dot", qgemm_neon_dot});
    std::printf("dotprod: %s\n", dot ? "yes" : "no");
#endif
    std::printf("paths: plain");
    for (const Path& p : paths) std::printf(" %s", p.name);
    std::printf("\n");

    const int64_t shapes[][3] = {
        // M, N, K
        {1, 1, 32},    {1, 7, 128},   {1, 33, 4100}, {2, 5, 96},  {3, 9, 200}, {5, 17, 577},
        {17, 11, 320}, {4, 8, 1024},  {17, 3, 33},   {2, 1, 1},   {5, 4, 511}, {1, 64, 2048},
    };
    const Dist dists[] = {Dist::Uniform, Dist::Outliers, Dist::Signs, Dist::Sparse, Dist::Extremes};
    int which = 0;
    for (int bits : {8, 4, 3})
        for (bool coded : {false, true}) {  // int4/int3: f16 and codes encodings
            if (bits == 8 && coded) continue;
            for (int G : {32, 64, 128})
                for (const auto& sh : shapes) {
                    // every shape with uniform data, and a rotating other distribution
                    run_case(bits, coded, G, sh[0], sh[1], sh[2], Dist::Uniform, paths);
                    run_case(bits, coded, G, sh[0], sh[1], sh[2], dists[1 + (which++ % 4)], paths);
                }
        }
    check_dispatch();
    check_parts();
    check_parallel_chunks();
    std::printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed ? 1 : 0;
}
