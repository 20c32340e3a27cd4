// Standalone test of paged attention and the paged KV write on float32 and
// IEEE-half caches (built and run for aarch64 under qemu by
// tests/test_neon_qemu.py, where the half loads are the hardware __fp16
// conversion; the x86 paths are tested from Python against numpy).
//
//   * every one of the 65536 half bit patterns read back through attention
//     (one key per sequence, so the output is the value row itself) equals
//     test_common.h's software widening, NaN for NaN;
//   * paged_write to a half cache rounds as test_common.h's f32_to_f16 does,
//     over random, huge, tiny and special values;
//   * paged_attention against a double-precision reference over the widened
//     cache: decode (one token per sequence, scattered blocks, lengths not a
//     multiple of the block size) and causal prefill of one sequence, with
//     1..5 query heads per kv head and odd head sizes, on 1 and 2 threads.
//
//   build: g++ -O2 -std=c++17 -Icsrc csrc/tests/attention_test.cpp csrc/attention.cpp csrc/cpu_features.cpp
//   last line of output: "<P> passed, <F> failed"; exit status 1 if F > 0.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu_features.h"
#include "ops.h"
#include "tests/test_common.h"

using namespace lingli;

namespace {

bool same_value(float a, float b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

void check_widening() {
    // Sequence s owns block s; its one key (slot 0) is zero, so the softmax
    // weight is exactly 1 and the output is the value row: halves s*64 .. s*64+63.
    const int64_t S = 1024, Dh = 64, BS = 4;
    std::vector<uint16_t> k(S * BS * Dh, 0), v(S * BS * Dh, 0);
    for (int64_t s = 0; s < S; ++s)
        for (int64_t d = 0; d < Dh; ++d) v[s * BS * Dh + d] = static_cast<uint16_t>(s * Dh + d);
    std::vector<int32_t> tables(S), seq(S), pos(S, 0);
    for (int64_t s = 0; s < S; ++s) tables[s] = seq[s] = static_cast<int32_t>(s);
    std::vector<float> q(S * Dh, 0.5f), out(S * Dh, 0.f);
    paged_attention<uint16_t>(q.data(), k.data(), v.data(), tables.data(), 1, seq.data(), pos.data(),
                              out.data(), S, 1, 1, Dh, BS, 0.125f);
    int bad = 0;
    for (int64_t i = 0; i < S * Dh; ++i)
        if (!same_value(out[i], f16_to_f32(static_cast<uint16_t>(i)))) {
            if (bad++ < 4)
                std::printf("  half 0x%04x read as %a, expected %a\n", static_cast<unsigned>(i), out[i],
                            f16_to_f32(static_cast<uint16_t>(i)));
        }
    report(bad == 0, "all 65536 halves widen exactly (" + std::to_string(bad) + " differ)");
}

void check_write() {
    const int64_t T = 40, Hkv = 3, Dh = 24, BS = 16, NB = 8;
    std::vector<float> k(T * Hkv * Dh), v(T * Hkv * Dh);
    const float specials[] = {65504.f, 65519.99f, 65520.f, 1e6f, -7e4f, 5.96e-8f, 2.98e-8f, 2.99e-8f,
                              6.1e-5f, -0.f, 0.f, INFINITY, -INFINITY, NAN, 1.00048828125f, 1.000732421875f};
    for (int64_t i = 0; i < T * Hkv * Dh; ++i) {
        k[i] = i < 16 ? specials[i] : uniform() * std::exp2(static_cast<float>(next_u32() % 40) - 26.f);
        v[i] = -k[i];
    }
    // Tokens 0..T-1 of one sequence at positions 5.. (a table of scattered blocks).
    const int32_t table[NB] = {6, 2, 7, 0, 5, 1, 3, 4};
    std::vector<int32_t> seq(T, 0), pos(T);
    for (int64_t t = 0; t < T; ++t) pos[t] = static_cast<int32_t>(5 + t);
    std::vector<uint16_t> kc(NB * Hkv * BS * Dh, 0xffff), vc(NB * Hkv * BS * Dh, 0xffff);
    paged_write<uint16_t>(kc.data(), vc.data(), table, NB, seq.data(), pos.data(), k.data(), v.data(), T, Hkv,
                          Dh, BS);
    int bad = 0;
    for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < Hkv; ++h)
            for (int64_t d = 0; d < Dh; ++d) {
                const int64_t slot = ((table[pos[t] / BS] * Hkv + h) * BS + pos[t] % BS) * Dh + d;
                const int64_t src = (t * Hkv + h) * Dh + d;
                for (int kv = 0; kv < 2; ++kv) {
                    const uint16_t got = kv ? vc[slot] : kc[slot];
                    const float x = kv ? v[src] : k[src];
                    const uint16_t want = f32_to_f16(x);
                    const bool ok = std::isnan(x) ? ((got & 0x7c00u) == 0x7c00u && (got & 0x3ffu)) : got == want;
                    if (!ok && bad++ < 4)
                        std::printf("  %a written as 0x%04x, expected 0x%04x\n", x, got, want);
                }
            }
    report(bad == 0, "paged_write to a half cache rounds to nearest even");
}

// Cache elements to float and back: float32 as is, half by test_common.h.
float widen(float x) { return x; }
float widen(uint16_t x) { return f16_to_f32(x); }
template <typename KV>
KV narrow(float x) {
    if constexpr (std::is_same_v<KV, float>) return x;
    else return f32_to_f16(x);
}

// T query tokens; token t belongs to sequence seq[t] and sees its positions
// 0..pos[t]. The cache is filled with random values; the reference works in
// double on the widened cache.
template <typename KV>
void check_attention(const char* name, int64_t Hq, int64_t Hkv, int64_t Dh, int64_t BS,
                     const std::vector<int32_t>& seq, const std::vector<int32_t>& pos, int threads) {
    const int64_t T = static_cast<int64_t>(seq.size());
    const int64_t S = *std::max_element(seq.begin(), seq.end()) + 1;
    const int64_t maxpos = *std::max_element(pos.begin(), pos.end());
    const int64_t nb = maxpos / BS + 1, NB = S * nb + 3;
    // Sequence s's blocks: a fixed scatter of the pool.
    std::vector<int32_t> tables(S * nb);
    for (int64_t i = 0; i < S * nb; ++i) tables[i] = static_cast<int32_t>((i * 7 + 3) % NB);
    std::vector<KV> kc(NB * Hkv * BS * Dh), vc(NB * Hkv * BS * Dh);
    for (auto& x : kc) x = narrow<KV>(uniform() * 2.f);
    for (auto& x : vc) x = narrow<KV>(uniform());
    std::vector<float> q(T * Hq * Dh), out(T * Hq * Dh, NAN);
    for (auto& x : q) x = uniform();
    const float scale = 1.f / std::sqrt(static_cast<float>(Dh));
    set_num_threads(threads);
    paged_attention<KV>(q.data(), kc.data(), vc.data(), tables.data(), nb, seq.data(), pos.data(), out.data(), T,
                        Hq, Hkv, Dh, BS, scale);
    double worst = 0.0;
    for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < Hq; ++h) {
            const int64_t g = h / (Hq / Hkv), len = pos[t] + 1;
            auto row = [&](const std::vector<KV>& c, int64_t p) {
                return &c[((tables[seq[t] * nb + p / BS] * Hkv + g) * BS + p % BS) * Dh];
            };
            std::vector<double> s(len);
            double mx = -INFINITY;
            for (int64_t p = 0; p < len; ++p) {
                double dot = 0.0;
                for (int64_t d = 0; d < Dh; ++d) dot += double(q[(t * Hq + h) * Dh + d]) * widen(row(kc, p)[d]);
                s[p] = dot * scale;
                mx = std::max(mx, s[p]);
            }
            double sum = 0.0;
            for (auto& x : s) sum += (x = std::exp(x - mx));
            for (int64_t d = 0; d < Dh; ++d) {
                double y = 0.0;
                for (int64_t p = 0; p < len; ++p) y += s[p] / sum * widen(row(vc, p)[d]);
                const double err = std::fabs(y - out[(t * Hq + h) * Dh + d]);
                worst = std::isnan(err) ? INFINITY : std::max(worst, err);
            }
        }
    char msg[200];
    std::snprintf(msg, sizeof msg, "paged_attention %s %s Hq=%lld Hkv=%lld Dh=%lld BS=%lld T=%lld threads=%d: max err %.2e",
                  sizeof(KV) == 2 ? "half" : "float", name, static_cast<long long>(Hq), static_cast<long long>(Hkv),
                  static_cast<long long>(Dh), static_cast<long long>(BS), static_cast<long long>(T), threads, worst);
    report(worst <= 2e-6, msg);  // measured <= 1.7e-7
}

template <typename KV>
void attention_cases(int threads) {
    struct Heads { int64_t hq, hkv, dh; };
    const Heads heads[] = {{1, 1, 7}, {4, 2, 16}, {9, 3, 64}, {5, 1, 40}, {6, 2, 128}};
    for (const Heads& h : heads)
        for (int64_t BS : {16, 5}) {
            // Decode: 6 sequences, one token each, at lengths around the block size.
            std::vector<int32_t> seq, pos;
            const int32_t lens[] = {1, 16, 17, 33, 5, 70};
            for (int s = 0; s < 6; ++s) {
                seq.push_back(s);
                pos.push_back(lens[s] - 1);
            }
            check_attention<KV>("decode", h.hq, h.hkv, h.dh, BS, seq, pos, threads);
            // Prefill: one sequence, tokens at positions 3..22 (causal).
            std::vector<int32_t> seq1(20, 0), pos1(20);
            for (int t = 0; t < 20; ++t) pos1[t] = 3 + t;
            check_attention<KV>("prefill", h.hq, h.hkv, h.dh, BS, seq1, pos1, threads);
        }
}

}  // namespace

int main() {
    std::printf("isa: %s\n", isa_name(current_isa()));
    check_widening();
    check_write();
    for (int threads : {1, 2}) {
        attention_cases<float>(threads);
        attention_cases<uint16_t>(threads);
    }
    std::printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed ? 1 : 0;
}
