// Splitting a range of rows over OpenMP threads: the one loop every kernel uses.
#pragma once
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lingli {

// Call fn(begin, end) once per thread on contiguous, non-empty slices of [0, n),
// so each thread streams its own slice (of weight rows, activation rows, ...).
// nt <= 1 (or n <= 1) runs fn(0, n) on the calling thread.
template <class Fn>
void parallel_ranges(int64_t n, int nt, Fn fn) {
    if (nt > n) nt = static_cast<int>(n);
    if (nt <= 1) {
        fn(int64_t(0), n);
        return;
    }
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        const int64_t t = omp_get_thread_num(), nth = omp_get_num_threads();
#else
        const int64_t t = 0, nth = 1;
#endif
        const int64_t b = n * t / nth, e = n * (t + 1) / nth;
        if (e > b) fn(b, e);
    }
}

}  // namespace lingli
