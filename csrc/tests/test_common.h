// Helpers shared by the standalone C++ kernel tests (qlinear_test.cpp,
// attention_test.cpp): a fixed-seed generator, IEEE half conversions written
// apart from the kernels' own (ops.h), and the pass/fail tally.
#pragma once
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>

namespace {

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

int g_passed = 0, g_failed = 0;

void report(bool ok, const std::string& what) {
    if (ok) {
        ++g_passed;
    } else {
        ++g_failed;
        std::printf("FAIL %s\n", what.c_str());
    }
}

}  // namespace
