// Standalone test of the quantized matrix kernels (built and run for aarch64
// under qemu by tests/test_neon_qemu.py; the x86 build checks qgemm_plain only).
//
// Weights are quantized here by a small RTN that follows runtime/quant/formats.py
// (f16 scales/mins, codes against the rounded values) and packed into the
// portable layout. Every kernel is compared with
//   * an exact reference: the integer block dots from the unpacked codes, summed
//     in double (this also checks each kernel's unpacking against the packer),
//   * qgemm_plain, with tolerance 1e-5 relative to sum_b |d_b|(|s| |isum_b| + |m| |sums_b|).
// quantize_acts_plain is checked against the formula in qlinear.h.
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

#include "cpu_features.h"
#include "qlinear.h"

using namespace lingli;

namespace {

// ----------------------------------------------------------------- utils --
uint32_t g_seed = 12345;
uint32_t next_u32() {
    g_seed = g_seed * 1664525u + 1013904223u;
    return g_seed;
}
float uniform() { return ((next_u32() >> 8) / 16777216.0f) * 2.f - 1.f; }  // [-1, 1)

uint16_t f32_to_f16(float f) {  // round to nearest even, like numpy's astype(float16)
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t e = (x >> 23) & 0xffu;
    uint32_t mant = x & 0x7fffffu;
    if (e == 0xff) return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0u));
    const int32_t exp = static_cast<int32_t>(e) - 127 + 15;
    if (exp >= 31) return static_cast<uint16_t>(sign | 0x7c00u);
    if (exp <= 0) {  // half subnormal (or zero)
        if (exp < -10) return static_cast<uint16_t>(sign);
        mant |= 0x800000u;
        const int shift = 14 - exp;
        uint32_t h = mant >> shift;
        const uint32_t rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (h & 1u))) ++h;
        return static_cast<uint16_t>(sign | h);
    }
    uint32_t h = (static_cast<uint32_t>(exp) << 10) | (mant >> 13);
    const uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry rounds into the exponent
    return static_cast<uint16_t>(sign | h);
}

float f16_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1fu, mant = h & 0x3ffu, x;
    if (e == 0) {
        if (mant == 0) {
            x = sign;
        } else {  // subnormal: normalize
            e = 127 - 15 + 1;
            while (!(mant & 0x400u)) {
                mant <<= 1;
                --e;
            }
            x = sign | (e << 23) | ((mant & 0x3ffu) << 13);
        }
    } else if (e == 31) {
        x = sign | 0x7f800000u | (mant << 13);
    } else {
        x = sign | ((e + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

// --------------------------------------------------- RTN + packing (formats.py)
struct QWeights {
    int bits, group_size;
    int64_t n, k, kp;
    std::vector<int32_t> codes;  // [n, kp] unpacked (signed for int8)
    std::vector<uint8_t> q, qh;
    std::vector<uint16_t> scales, mins;
    QMatrix view() const {
        return QMatrix{bits, group_size, n, k, kp, q.data(), bits == 3 ? qh.data() : nullptr,
                       scales.data(), bits == 8 ? nullptr : mins.data()};
    }
};

QWeights quantize_rtn(const std::vector<float>& w, int64_t n, int64_t k, int bits, int G) {
    QWeights qw;
    qw.bits = bits;
    qw.group_size = G;
    qw.n = n;
    qw.k = k;
    qw.kp = (k + G - 1) / G * G;
    const int64_t kp = qw.kp, ng = kp / G;
    qw.codes.assign(n * kp, 0);
    qw.scales.assign(n * ng, 0);
    if (bits != 8) qw.mins.assign(n * ng, 0);
    const int qmax = (1 << bits) - 1;
    for (int64_t r = 0; r < n; ++r) {
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
            } else {
                float lo = INFINITY, hi = -INFINITY;
                for (int64_t c = c0; c < c1; ++c) {
                    lo = std::min(lo, src[c]);
                    hi = std::max(hi, src[c]);
                }
                const uint16_t mh = f32_to_f16(lo);
                const float m = f16_to_f32(mh);
                const uint16_t sh = f32_to_f16((hi - m) / static_cast<float>(qmax));
                const float s = f16_to_f32(sh), inv = s > 0 ? 1.f / s : 0.f;
                qw.scales[r * ng + g] = sh;
                qw.mins[r * ng + g] = mh;
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
int g_passed = 0, g_failed = 0;

void report(bool ok, const std::string& what) {
    if (ok) {
        ++g_passed;
    } else {
        ++g_failed;
        std::printf("FAIL %s\n", what.c_str());
    }
}

// Exact y and the error scale sum_b |d|(|s isum| + |m sums|), in double.
void exact_reference(const QWeights& w, const QA& a, std::vector<double>& y, std::vector<double>& scale) {
    const int64_t nb = w.kp / 32, ng = w.kp / w.group_size;
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
                const double s = f16_to_f32(w.scales[r * ng + g]);
                const double m = w.bits == 8 ? 0.0 : f16_to_f32(w.mins[r * ng + g]);
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

enum class Dist { Uniform, Outliers, Signs, Sparse };
const char* dist_name(Dist d) {
    switch (d) {
        case Dist::Uniform: return "uniform";
        case Dist::Outliers: return "outliers";
        case Dist::Signs: return "signs";
        case Dist::Sparse: return "sparse";
    }
    return "?";
}

float sample(Dist dist) {
    switch (dist) {
        case Dist::Uniform: return uniform();
        case Dist::Outliers: return (next_u32() % 61 == 0) ? 40.f * uniform() : uniform();
        case Dist::Signs: return (next_u32() & 1) ? 1.f : -1.f;  // int8 codes all +-127
        case Dist::Sparse: return (next_u32() % 3 == 0) ? uniform() : 0.f;  // zero groups too
    }
    return 0.f;
}

struct Path {
    const char* name;
    QGemmFn fn;
};

void run_case(int bits, int G, int64_t M, int64_t N, int64_t K, Dist dist, const std::vector<Path>& paths) {
    char tag[160];
    std::snprintf(tag, sizeof tag, "int%d G=%d M=%lld N=%lld K=%lld %s", bits, G, (long long)M, (long long)N,
                  (long long)K, dist_name(dist));
    std::vector<float> wf(N * K), xf(M * K);
    for (auto& v : wf) v = sample(dist);
    for (auto& v : xf) v = sample(dist == Dist::Signs ? Dist::Signs : Dist::Uniform);
    if (M > 2 && dist == Dist::Sparse)
        for (int64_t c = 0; c < K; ++c) xf[1 * K + c] = 0.f;  // an all-zero activation row
    const QWeights w = quantize_rtn(wf, N, K, bits, G);
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
void check_dispatch() {
#if defined(__aarch64__)
    set_isa(Isa::Neon);
    const std::string path = qgemm_path();
    const std::string want = cpu_has_dotprod() ? "neon_dot" : "neon";
    std::printf("dispatcher path: %s\n", path.c_str());
    report(path == want, "qgemm_path() is " + path + ", expected " + want);
    for (int bits : {8, 4, 3}) {
        const int64_t M = 5, N = 37, K = 300;
        std::vector<float> wf(N * K), xf(M * K);
        for (auto& v : wf) v = uniform();
        for (auto& v : xf) v = uniform();
        const QWeights w = quantize_rtn(wf, N, K, bits, 64);
        std::vector<float> y_neon(M * N, NAN), y_plain(M * N, NAN);
        set_isa(Isa::Neon);
        qlinear(xf.data(), M, w.view(), y_neon.data());
        set_isa(Isa::Plain);
        qlinear(xf.data(), M, w.view(), y_plain.data());
        bool ok = true;
        for (int64_t i = 0; i < M * N && ok; ++i)
            ok = std::fabs(y_neon[i] - y_plain[i]) <= 1e-5f * (std::sqrt(float(K)) + std::fabs(y_plain[i]));
        report(ok, "qlinear() neon vs plain int" + std::to_string(bits));
    }
    set_isa(Isa::Neon);
#endif
}

}  // namespace

int main() {
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
    const Dist dists[] = {Dist::Uniform, Dist::Outliers, Dist::Signs, Dist::Sparse};
    int which = 0;
    for (int bits : {8, 4, 3})
        for (int G : {32, 64, 128})
            for (const auto& sh : shapes) {
                // every shape with uniform data, and a rotating other distribution
                run_case(bits, G, sh[0], sh[1], sh[2], Dist::Uniform, paths);
                run_case(bits, G, sh[0], sh[1], sh[2], dists[1 + (which++ % 3)], paths);
            }
    check_dispatch();
    std::printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed ? 1 : 0;
}
