// Run-time choice of the SIMD path and of the thread count.
//
// The extension is built without -mavx2/-march flags so one .so loads on any
// x86-64; SIMD functions carry __attribute__((target(...))) and are only
// called when the CPU (checked with __builtin_cpu_supports) has the feature.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lingli {

enum class Isa { Plain = 0, Neon = 1, Avx2 = 2, Avx512 = 3 };

const char* isa_name(Isa isa);
// Returns false if `name` is not one of plain/neon/avx2/avx512.
bool isa_from_name(const std::string& name, Isa* out);
bool cpu_has(Isa isa);
std::vector<Isa> available_isas();
Isa best_isa();

// AArch64 only: whether the CPU has the Armv8.2 dot-product instructions
// (SDOT/UDOT, HWCAP_ASIMDDP). The quantized NEON path picks qgemm_neon_dot
// when true and qgemm_neon otherwise. Always false on other architectures.
bool cpu_has_dotprod();

// The path every kernel dispatches on. set_isa() requires cpu_has(isa).
Isa current_isa();
void set_isa(Isa isa);

// Threads used by every parallel kernel (defaults to omp_get_max_threads()).
int num_threads();
void set_num_threads(int n);

// Threads worth starting for a kernel touching `bytes` bytes: tiny problems
// run on one thread because waking the pool costs more than it saves.
int threads_for_bytes(int64_t bytes);

}  // namespace lingli

// Function-level target attributes for the SIMD variants (see file comment).
#if defined(__x86_64__)
#define LINGLI_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LINGLI_TARGET_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#endif
