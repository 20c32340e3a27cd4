"""Decode (M=1) linear benchmarks against the machine's measured read bandwidth.

    pytest bench/bench_ops.py --benchmark-only

A matrix-vector product reads every weight once and does 2 flops per weight,
so at M=1 it is memory-bound: its figure of merit is weight bytes / time,
compared with runtime._C.read_bandwidth (a threaded streaming read of 512 MiB)
with the same thread count, measured just before and just after each
benchmark (the higher of the two is the limit, so the percentage is
conservative). Shapes are SmolLM2-135M's
(576 hidden, 1536 MLP, 49152 vocab) plus a 4096x4096 layer of a 7B model.

Weights are cold, as in real decode where all layers stream past once per
token: each call uses the next of several copies of w adding up to >= 512 MiB,
so no copy is still in the last-level cache (this VM's host has a large L3:
a hot 64 MiB matrix reads at L3, not DRAM, speed). Set LINGLI_ISA to
benchmark another SIMD path.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from runtime import _C

from .conftest import MACHINE_THREADS

COLD_BYTES = 512 << 20  # total size of the rotated weight copies
SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576), (4096, 4096)]  # (N, K): w is [N, K]
CASES = [(n, k, dt, MACHINE_THREADS) for n, k in SHAPES for dt in ("float32", "float16")]
if MACHINE_THREADS > 1:  # single-thread figures for the large layer
    CASES += [(4096, 4096, dt, 1) for dt in ("float32", "float16")]


@pytest.mark.parametrize("N,K,wdtype,threads", CASES,
                         ids=[f"{n}x{k}-{dt}-t{t}" for n, k, dt, t in CASES])
def test_linear_m1(benchmark, read_bw, report, N, K, wdtype, threads):
    bw_before = read_bw(threads)
    old = _C.get_num_threads()
    _C.set_num_threads(threads)
    try:
        rng = np.random.default_rng(0)
        w = rng.standard_normal((N, K), dtype=np.float32).astype(wdtype)
        copies = [w] + [w.copy() for _ in range(-(-COLD_BYTES // w.nbytes) - 1)]
        x = rng.standard_normal((1, K), dtype=np.float32)
        out = np.empty((1, N), np.float32)
        _C.linear(x, w, out)  # start the thread pool
        ws = itertools.cycle(copies)
        benchmark(lambda: _C.linear(x, next(ws), out))
    finally:
        _C.set_num_threads(old)

    bw = max(bw_before, read_bw(threads))
    st = benchmark.stats.stats
    gbps_best, gbps_median = w.nbytes / st.min / 1e9, w.nbytes / st.median / 1e9
    benchmark.extra_info.update(
        isa=_C.isa(), threads=threads, weight_bytes=w.nbytes,
        gbps_best=round(gbps_best, 2), gbps_median=round(gbps_median, 2),
        read_bandwidth_gbps=round(bw, 2), pct_of_read_bw=round(100 * gbps_best / bw, 1),
    )
    report(f"linear M=1 {N:>5}x{K:<4} {wdtype:7} threads={threads} isa={_C.isa():6} "
           f"{gbps_best:6.1f} GB/s best ({gbps_median:6.1f} median) = "
           f"{100 * gbps_best / bw:5.1f}% of read bw {bw:.1f} GB/s")
