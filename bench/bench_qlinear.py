"""Quantized linear (runtime._C.qlinear) benchmarks at LLaMA-7B/1B layer shapes.

    pytest bench/bench_qlinear.py --benchmark-only

Decode (M=1) streams every weight byte once, so its figure of merit is weight
bytes / time (q + qh + scales + mins) against runtime._C.read_bandwidth with
the same thread count, measured just before and after each benchmark (the
higher of the two is the limit). Weights are cold as in real decode: each
call uses the next of several copies adding up to >= 512 MiB (see
bench_ops.py). A float16 `linear` at the same shapes is the baseline.

Prefill (M=512, int4) is compute-bound: reported as GOP/s (2*M*N*K / time)
and as a share of the int8 VNNI peak that runtime._C.vnni_peak measures at
the same thread count just before and after (the higher of the two). Batched
decode reports its GOP/s against the same peak.

Batched decode (M = 2..16 rows, a continuous-batching engine's decode step)
reads cold weights like M=1 and should cost little more while the weight
read dominates: reported as weight GB/s (against the read bandwidth, as
M=1) and GOP/s, for TinyLlama-1.1B's MLP shapes at int4 g32, and SmolLM2's
int8 output layer and int4 gate/up product at 16 rows (int8 matrices carry
their block code sums, as the runtime gives them).

Shapes are (N, K) with w [N, K]: 4096x4096 (attention), 11008x4096 (MLP up,
4096 -> 11008), 4096x11008 (MLP down) of LLaMA-7B, 5632x2048 and 2048x5632 of
TinyLlama-1.1B. Codes and scales are random: the kernels' speed does not
depend on the values. Set LINGLI_ISA to benchmark another SIMD path.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from runtime import _C
from runtime.quant.formats import QuantizedTensor, block_code_sums

from .conftest import MACHINE_THREADS

COLD_BYTES = 512 << 20
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (5632, 2048), (2048, 5632)]
THREADS = sorted({1, min(2, MACHINE_THREADS), MACHINE_THREADS})
FORMATS = [(8, 64), (4, 64), (3, 64), (8, 32), (4, 32), (3, 32)]

M1_CASES = [(n, k, bits, g, t) for (bits, g) in FORMATS for (n, k) in SHAPES for t in THREADS
            if g == 64 or (n, k) in ((4096, 4096), (4096, 11008))]
F16_CASES = [(n, k, t) for (n, k) in SHAPES for t in THREADS]
BATCH_CASES = [(m, n, k, 4, 32, MACHINE_THREADS) for (n, k) in SHAPES[3:] for m in (2, 4, 8, 16)]
# SmolLM2 at 16 streams, both on the prefill tiles: its int8 output layer
# (49152 x 576, with the block code sums the runtime keeps for int8) and its
# int4 gate/up product (3072 x 576, codes split from their packed bytes).
BATCH_CASES += [(16, 49152, 576, 8, 32, MACHINE_THREADS), (16, 3072, 576, 4, 32, MACHINE_THREADS)]
PREFILL_CASES = [(512, n, k, 4, 64, MACHINE_THREADS) for n, k in SHAPES[:3]]
PREFILL_CASES += [(16, 4096, 4096, 4, 64, MACHINE_THREADS), (512, 4096, 4096, 3, 64, MACHINE_THREADS),
                  (512, 4096, 4096, 8, 64, MACHINE_THREADS)]


def random_qtensor(rng, n: int, k: int, bits: int, g: int) -> QuantizedTensor:
    ng = k // g
    if bits == 8:
        scales = (rng.random((n, ng), dtype=np.float32) * 0.02 + 0.001).astype(np.float16)
        q = rng.integers(-127, 128, size=(n, k), dtype=np.int8)
        # With its block code sums, as CpuBackend.weight gives every int8 matrix.
        return QuantizedTensor(8, g, (n, k), q, scales, code_sums=block_code_sums(q))
    codes = rng.integers(180, 256, size=(n, ng), dtype=np.uint8)     # scales within ~2^-5 of the row's
    mins = rng.integers(-128, 0, size=(n, ng), dtype=np.int8)
    row_scale = (rng.random(n, dtype=np.float32) * 0.02 + 0.001).astype(np.float32)
    q = rng.integers(0, 256, size=(n, k * bits // 8 if bits == 4 else k // 4), dtype=np.uint8)
    qh = rng.integers(0, 256, size=(n, k // 8), dtype=np.uint8) if bits == 3 else None
    return QuantizedTensor(bits, g, (n, k), q, codes, mins, qh, row_scale)


def copy_qtensor(t: QuantizedTensor) -> QuantizedTensor:
    c = lambda a: None if a is None else a.copy()
    return QuantizedTensor(t.bits, t.group_size, t.shape, c(t.q), c(t.scales), c(t.mins), c(t.qh),
                           c(t.row_scale), code_sums=c(t.code_sums))


def call(x, t: QuantizedTensor, out):
    # Positional, as CpuBackend.linear calls it (pybind11's keyword matching is ~1 us a call).
    return _C.qlinear(x, t.bits, t.group_size, t.q, t.qh, t.scales, t.mins, t.row_scale, out, 1,
                      t.code_sums)


def _bw_report(benchmark, read_bw, report, label, nbytes, threads, bw_before):
    bw = max(bw_before, read_bw(threads))
    st = benchmark.stats.stats
    best, median = nbytes / st.min / 1e9, nbytes / st.median / 1e9
    benchmark.extra_info.update(
        isa=_C.isa(), path=_C.qlinear_path(), threads=threads, weight_bytes=nbytes,
        gbps_best=round(best, 2), gbps_median=round(median, 2),
        read_bandwidth_gbps=round(bw, 2), pct_of_read_bw=round(100 * best / bw, 1),
    )
    report(f"{label} threads={threads} {_C.qlinear_path():11} {best:6.1f} GB/s best "
           f"({median:6.1f} median) = {100 * best / bw:5.1f}% of read bw {bw:.1f} GB/s")


@pytest.mark.parametrize("N,K,bits,g,threads", M1_CASES,
                         ids=[f"{n}x{k}-int{b}-g{g}-t{t}" for n, k, b, g, t in M1_CASES])
def test_qlinear_m1(benchmark, read_bw, report, N, K, bits, g, threads):
    bw_before = read_bw(threads)
    t = _bench_cold(benchmark, 1, N, K, bits, g, threads)
    _bw_report(benchmark, read_bw, report, f"qlinear M=1 {N:>5}x{K:<5} int{bits} g{g:<3}",
               t.nbytes, threads, bw_before)


def _bench_cold(benchmark, M, N, K, bits, g, threads):
    """Time qlinear [M, K] x [N, K] cycling through copies of the weights larger
    than the caches, so every call streams them from memory; returns the tensor."""
    old = _C.get_num_threads()
    _C.set_num_threads(threads)
    try:
        rng = np.random.default_rng(0)
        t = random_qtensor(rng, N, K, bits, g)
        copies = [t] + [copy_qtensor(t) for _ in range(-(-COLD_BYTES // t.nbytes) - 1)]
        x = rng.standard_normal((M, K), dtype=np.float32)
        out = np.empty((M, N), np.float32)
        call(x, t, out)  # start the thread pool
        ts = itertools.cycle(copies)
        benchmark(lambda: call(x, next(ts), out))
    finally:
        _C.set_num_threads(old)
    return t


@pytest.mark.parametrize("N,K,threads", F16_CASES, ids=[f"{n}x{k}-f16-t{t}" for n, k, t in F16_CASES])
def test_linear_f16_m1(benchmark, read_bw, report, N, K, threads):
    bw_before = read_bw(threads)
    old = _C.get_num_threads()
    _C.set_num_threads(threads)
    try:
        rng = np.random.default_rng(0)
        w = rng.standard_normal((N, K), dtype=np.float32).astype(np.float16)
        copies = [w] + [w.copy() for _ in range(-(-COLD_BYTES // w.nbytes) - 1)]
        x = rng.standard_normal((1, K), dtype=np.float32)
        out = np.empty((1, N), np.float32)
        _C.linear(x, w, out)
        ws = itertools.cycle(copies)
        benchmark(lambda: _C.linear(x, next(ws), out))
    finally:
        _C.set_num_threads(old)
    _bw_report(benchmark, read_bw, report, f"linear  M=1 {N:>5}x{K:<5} f16       ",
               w.nbytes, threads, bw_before)


@pytest.mark.parametrize("M,N,K,bits,g,threads", BATCH_CASES,
                         ids=[f"M{m}-{n}x{k}-int{b}-g{g}-t{t}" for m, n, k, b, g, t in BATCH_CASES])
def test_qlinear_batched(benchmark, read_bw, vnni_peak, report, M, N, K, bits, g, threads):
    bw_before, peak_before = read_bw(threads), vnni_peak(threads)
    t = _bench_cold(benchmark, M, N, K, bits, g, threads)
    gops = 2.0 * M * N * K / benchmark.stats.stats.min / 1e9
    peak = max(peak_before, vnni_peak(threads))
    benchmark.extra_info.update(gops_best=round(gops, 1), vnni_peak_gops=round(peak, 1))
    _bw_report(benchmark, read_bw, report, f"qlinear M={M:<3}{N:>5}x{K:<5} int{bits} g{g:<3}",
               t.nbytes, threads, bw_before)
    report(f"qlinear M={M:<3}{N:>5}x{K:<5} int{bits} g{g:<3} {gops:7.1f} GOP/s best"
           + (f" = {100 * gops / peak:5.1f}% of VNNI peak {peak:.0f} GOP/s" if peak else ""))


@pytest.mark.parametrize("M,N,K,bits,g,threads", PREFILL_CASES,
                         ids=[f"M{m}-{n}x{k}-int{b}-g{g}-t{t}" for m, n, k, b, g, t in PREFILL_CASES])
def test_qlinear_prefill(benchmark, vnni_peak, report, M, N, K, bits, g, threads):
    peak_before = vnni_peak(threads)
    old = _C.get_num_threads()
    _C.set_num_threads(threads)
    try:
        rng = np.random.default_rng(0)
        t = random_qtensor(rng, N, K, bits, g)
        x = rng.standard_normal((M, K), dtype=np.float32)
        out = np.empty((M, N), np.float32)
        call(x, t, out)
        benchmark.pedantic(call, args=(x, t, out), rounds=5, iterations=1, warmup_rounds=1)
    finally:
        _C.set_num_threads(old)
    st = benchmark.stats.stats
    ops = 2.0 * M * N * K
    best, median = ops / st.min / 1e9, ops / st.median / 1e9
    peak = max(peak_before, vnni_peak(threads))
    pct = round(100 * best / peak, 1) if peak else None
    benchmark.extra_info.update(
        isa=_C.isa(), path=_C.qlinear_path(), threads=threads, gops_best=round(best, 1),
        gops_median=round(median, 1), vnni_peak_gops=round(peak, 1), pct_of_vnni_peak=pct,
    )
    report(f"qlinear M={M:<4}{N:>5}x{K:<5} int{bits} g{g:<3} threads={threads} {_C.qlinear_path():11} "
           f"{best:7.1f} GOP/s best ({median:7.1f} median)"
           + (f" = {pct:5.1f}% of VNNI peak {peak:.0f} GOP/s" if peak else ""))
