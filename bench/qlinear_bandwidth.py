"""Quantized matrix-vector (decode) throughput against the measured read bandwidth.

    python bench/qlinear_bandwidth.py [--n 11008 --k 4096 --group-size 64]

Weights are cycled over 8 copies so every call reads them from memory, not
cache; GB/s counts every byte a call reads (codes, high plane, group parameters).
The limit is `_C.read_bandwidth` at the same thread count, in the same run.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from runtime import _C
from runtime.quant.formats import padded_k


def random_weights(rng, bits: int, n: int, kp: int, g: int):
    q = {8: lambda: rng.integers(-127, 127, (n, kp), dtype=np.int8),
         4: lambda: rng.integers(0, 255, (n, kp // 2), dtype=np.uint8),
         3: lambda: rng.integers(0, 255, (n, kp // 4), dtype=np.uint8)}[bits]()
    qh = rng.integers(0, 255, (n, kp // 8), dtype=np.uint8) if bits == 3 else None
    if bits == 8:
        return q, qh, (rng.random((n, kp // g)) * 0.01).astype(np.float16), None, None
    s = rng.integers(180, 256, (n, kp // g), dtype=np.uint8)        # scale codes
    m = rng.integers(-128, 0, (n, kp // g), dtype=np.int8)           # min codes
    return q, qh, s, m, (rng.random(n) * 0.01).astype(np.float32)


def best_time(fn, copies, rounds: int = 6) -> float:
    best = 1e9
    for _ in range(rounds):
        t = time.perf_counter()
        for c in copies:
            fn(c)
        best = min(best, (time.perf_counter() - t) / len(copies))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=11008)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    n, k, g = a.n, a.k, a.group_size
    kp = padded_k(k, g)
    x = rng.standard_normal((1, k)).astype(np.float32)
    print(f"N={n} K={k} G={g} path={_C.qlinear_path()}")
    print("| weights | threads | ms/call | GB/s | read GB/s | share |")
    print("|---|---|---|---|---|---|")
    for th in a.threads:
        _C.set_num_threads(th)
        bw = _C.read_bandwidth(512 << 20, 5)
        for bits in (8, 4, 3):
            copies = [random_weights(rng, bits, n, kp, g) for _ in range(8)]
            nbytes = sum(p.nbytes for p in copies[0] if p is not None)
            t = best_time(lambda c: _C.qlinear(x, bits, g, *c), copies)
            print(f"| int{bits} | {th} | {t * 1e3:.2f} | {nbytes / t / 1e9:.1f} | {bw:.1f} | "
                  f"{nbytes / t / 1e9 / bw:.0%} |")
        w16 = [rng.standard_normal((n, k)).astype(np.float16) for _ in range(3)]
        t = best_time(lambda w: _C.linear(x, w), w16, rounds=4)
        print(f"| f16 | {th} | {t * 1e3:.2f} | {w16[0].nbytes / t / 1e9:.1f} | {bw:.1f} | "
              f"{w16[0].nbytes / t / 1e9 / bw:.0%} |")


if __name__ == "__main__":
    main()
