"""Ahead-of-time compile check of every Triton kernel for real NVIDIA targets.

The other kernel tests run in Triton's CPU interpreter, which accepts code that
a GPU compile rejects (tl.dot shape/dtype rules, non-power-of-two aranges,
layout conversions, shared memory / register limits, ...). This test compiles
each @triton.jit kernel in kernels/*.py with triton.compile for sm_90
(H100/H200) and sm_80 (A100) down to PTX and, with the ptxas the triton wheel
ships, to a cubin: no GPU needed.

Each kernel is specialized exactly as a launch would: the JIT's own binder sees
tensors and ints shaped like the Python wrappers' arguments (pointer dtypes,
16-byte alignment, ints divisible by 16 or equal to 1), the wrappers'
constexprs, and each autotune config's meta-parameters, num_warps and
num_stages.

@triton.jit builds interpreter objects when TRITON_INTERPRET=1 (set by
conftest.py), so the compiling runs in a child process (this file run as a
script) with TRITON_INTERPRET=0 and a fresh TRITON_CACHE_DIR, so nothing is a
cache hit. One child per target, both at once.

A case fails on a compiler error (the message names the kernel, its
specialization and config, and holds the compiler's error), and when a kernel
that is not autotuned needs more shared memory than the target has (it could
not launch). Autotune configs over the limit (the autotuner skips them with
OutOfResources) and register spills (from ptxas -v) are printed as notes: run
with -s to see them.

Config coverage: LINGLI_AOT_FULL=1 compiles every autotune config of every case
(many minutes). By default each case compiles one config in rotation (the cases
of a kernel cover its whole list, on each target from another start), the main
cases (fp16, G=128 for the GEMM) also the first and the largest tile, and the
fp32 / odd-size cases only the first: about 150 compiles per target, about
60-70 s on two idle cores.

One target by hand, with a line per compile (shared bytes, registers, spilled
bytes):  TRITON_INTERPRET=0 .venv/bin/python tests/test_kernels_compile.py 90
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TARGETS = (90, 80)
# opt-in shared memory per block (bytes): H100/H200 227 KiB, A100 163 KiB
MAX_SHARED = {90: 232448, 80: 166912}
_TIMEOUT_S = 900


# ------------------------------------------------------------------ child side
# Everything below up to the pytest part runs only in the child (TRITON_INTERPRET=0).

def _largest(configs: list) -> int:
    """Index of the largest tile (then the most warps) of a config list."""
    def size(c):
        kw = c.kwargs
        return (kw.get("BLOCK_M", 1) * kw.get("BLOCK_N", 1) * kw.get("BLOCK_K", 1), c.num_warps)
    return max(range(len(configs)), key=lambda i: size(configs[i]))


class _Picker:
    """Which autotune configs of one kernel a case compiles. full: all of them.
    Otherwise one per case in rotation (the cases together cover the whole list;
    each target starts the rotation elsewhere), plus the first and the largest
    tile for the cases marked main, and only the first (smallest, fastest to
    compile) for the cases marked small."""

    def __init__(self, full: bool, offset: int) -> None:
        self.full, self.n = full, offset

    def __call__(self, configs: list, main: bool = False, small: bool = False) -> list:
        if self.full:
            return list(configs)
        if small:
            return list(configs[:1])
        self.n += 1
        idx = {self.n % len(configs)}
        if main:
            idx |= {0, _largest(configs)}
        return [configs[i] for i in sorted(idx)]


def _cases(full: bool, offset: int = 0):
    """(name, JITFunction or Autotuner, args, kwargs, configs or None), shaped like the wrappers' launches."""
    import torch
    import triton

    from kernels import activation, attention, norm, quant_gemm, rope

    def t(shape, dtype):
        return torch.empty(shape, dtype=dtype)

    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
    f16, b16, f32 = torch.float16, torch.bfloat16, torch.float32

    # ---- quant_gemm: split-K (decode, M <= 16) and tiled (prefill), as quant_matmul launches them
    pick_s, pick_t = _Picker(full, offset), _Picker(full, offset)
    gemm = [(bits, group, dtype, 4096, 4096) for bits in (8, 4, 3) for group, dtype in
            ((128, f16), (32, f16), (128, b16))]     # G=32 < BLOCK_K: the per-row scale path of _load_w
    gemm += [(bits, 32, f16, 1000, 1000) for bits in (8, 4, 3)]     # odd sizes: no divisibility by 16
    gemm += [(4, 128, f32, 4096, 4096), (3, 32, f32, 4096, 4096)]   # fp32 x: the ieee-dot path
    for bits, group, dtype, n, k in gemm:
        kp = -(-k // group) * group
        pk = {name: t(shape, dt) for name, (shape, dt) in quant_gemm.packed_shapes(n, k, bits, group).items()}
        qh = pk.get("qhigh", pk["qweight"])          # unused planes get a valid pointer, as in quant_matmul
        mins = pk.get("mins", pk["scales"])
        tag = f"int{bits} G={group} {names[dtype]}" + ("" if n == 4096 else f" N={n} K={k}")
        small = n != 4096 or dtype == f32
        main = dtype == f16 and group == 128 and not small
        for m in (1, 5):
            x = t((m, k), dtype)
            args = (x, pk["qweight"], qh, pk["scales"], mins, t((m, n), f32), m, n, k, kp, x.stride(0), x.stride(1))
            kw = dict(BITS=bits, GROUP=group, BLOCK_M=1 if m == 1 else quant_gemm.SPLITK_MAX_M,
                      DOT_F32=dtype == f32)
            yield (f"quant_gemm._splitk_kernel {tag} M={m}", quant_gemm._splitk_kernel, args, kw,
                   pick_s(quant_gemm._SPLITK_CONFIGS, main=main and (m > 1 or bits == 4), small=small))
        m = 200
        x = t((m, k), dtype)
        args = (x, pk["qweight"], qh, pk["scales"], mins, t((m, n), dtype), m, n, k, kp, x.stride(0), x.stride(1),
                triton.next_power_of_2(m))
        kw = dict(BITS=bits, GROUP=group, DOT_F32=dtype == f32)
        yield (f"quant_gemm._tiled_kernel {tag} M={m}", quant_gemm._tiled_kernel, args, kw,
               pick_t(quant_gemm._TILED_CONFIGS, main=main, small=small))

    # ---- attention: decode (+ the split merge), prefill, kv_write, as paged_attention / kv_write launch them
    pick_d, pick_p = _Picker(full, offset), _Picker(full, offset)
    hq, bs, nb, T = 32, 16, 64, 8
    attn = [(dtype, dh, group) for dtype in (f16, b16) for dh in (128, 64) for group in (4, 8)]
    attn += [(f32, 128, 4), (f16, 96, 4), (f16, 128, 1), (b16, 64, 1)]
    for dtype, dh, group in attn:
        hkv = hq // group
        tag = f"{names[dtype]} Dh={dh} group={group}"
        extra = dtype == f32 or dh == 96 or group == 1
        main = (dtype, dh, group) in ((f16, 128, 4), (b16, 64, 8))
        q = t((T, hq, dh), dtype)
        kc, vc = t((nb, hkv, bs, dh), dtype), t((nb, hkv, bs, dh), dtype)
        out = torch.empty_like(q)
        tables = t((4, nb), torch.int32)
        pos, seq, idx = t((T,), torch.int32), t((T,), torch.int32), t((T,), torch.int32)
        dh_p = max(16, triton.next_power_of_2(dh))
        prec = attention._dot_precision(dtype)
        kv_strides = (*kc.stride()[:3], *vc.stride()[:3])
        common = (q.stride(0), q.stride(1), *kv_strides, out.stride(0), out.stride(1), tables.stride(0))
        for splits in (1, 8):
            if splits == 1:
                mx = lx = acc = out                  # unused
            else:
                mx = t((T, hq, splits), f32)
                lx = torch.empty_like(mx)
                acc = t((T, hq, splits, dh_p), f32)
            args = (q, kc, vc, out, tables, pos, seq, idx, mx, lx, acc, 0.125 * attention._LOG2E,
                    3 * attention._SPLIT_ALIGN, *common)
            kw = dict(HQ=hq, GROUP=group, GROUP_P=max(16, triton.next_power_of_2(group)), BS=bs,
                      DH=dh, DH_P=dh_p, SPLITS=splits, PREC=prec)
            yield (f"attention._decode_kernel {tag} splits={splits}", attention._decode_kernel, args, kw,
                   pick_d(attention._decode_kernel.configs, main=main and (splits == 1) == (dtype == f16),
                          small=dtype == f32))
            if splits > 1 and group != 8:                # the merge does not depend on the group
                for sp in (splits, 32):
                    mx = t((T, hq, sp), f32)
                    acc = t((T, hq, sp, dh_p), f32)
                    yield (f"attention._merge_splits_kernel {names[dtype]} Dh={dh} splits={sp}",
                           attention._merge_splits_kernel,
                           (out, idx, mx, torch.empty_like(mx), acc, out.stride(0), out.stride(1)),
                           dict(HQ=hq, DH=dh, DH_P=dh_p, SPLITS=sp), None)
        args = (q, kc, vc, out, tables, pos, seq, idx, idx, 0.125 * attention._LOG2E, *common)
        kw = dict(GROUP=group, BS=bs, DH=dh, DH_P=dh_p, PREC=prec)
        yield (f"attention._prefill_kernel {tag}", attention._prefill_kernel, args, kw,
               pick_p(attention._prefill_kernel.configs, main=main, small=extra))
        kn, vn = t((T, hkv, dh), dtype), t((T, hkv, dh), dtype)
        yield (f"attention._kv_write_kernel {tag}", attention._kv_write_kernel,
               (kc, vc, kn, vn, tables, pos, seq, kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1),
                *kc.stride()[:3], *vc.stride()[:3], tables.stride(0)),
               dict(BS=bs, DH=dh, DH_P=triton.next_power_of_2(dh)), None)

    # ---- norm, rope, activation (norm weights and rope tables are fp32 in the backend)
    for dtype in (f16, b16, f32):
        for h in (576, 4096, 16384):                 # one pass in 1024 / 4096, two passes of 8192
            x = t((T, h), dtype)
            out = t((T, h), dtype)
            block = min(triton.next_power_of_2(h), norm._MAX_BLOCK)
            yield (f"norm._rms_norm_kernel {names[dtype]} H={h}", norm._rms_norm_kernel,
                   (x, t((h,), f32), out, x.stride(0), out.stride(0), h, 1e-5),
                   dict(BLOCK=block, ONE_PASS=block >= h, num_warps=4 if block <= 2048 else 8), None)
        for h, dh, half in ((32, 128, 64), (8, 64, 32), (9, 64, 16)):   # the last: partial rotary
            x = t((T, 3 * h, dh), dtype)[:, :h]      # q of a fused qkv output
            cos = t((4096, half), f32)
            block_p = triton.next_power_of_2(half)
            block_h = min(triton.next_power_of_2(h), max(1, rope._MAX_TILE // block_p))
            for inter in (False, True):
                yield (f"rope._rope_kernel {names[dtype]} H={h} Dh={dh} R/2={half} interleaved={inter}",
                       rope._rope_kernel,
                       (x, t((T,), torch.int32), cos, cos, x.stride(0), x.stride(1), cos.stride(0), h, half),
                       dict(INTERLEAVED=inter, BLOCK_H=block_h, BLOCK_P=block_p, num_warps=4), None)
        for f in (11008, 100):
            gu = t((T, 2 * f), dtype)                # the halves of a fused gate_up output
            gate, up, out = gu[:, :f], gu[:, f:], t((T, f), dtype)
            block = min(triton.next_power_of_2(f), 1024)
            yield (f"activation._silu_mul_kernel {names[dtype]} F={f}", activation._silu_mul_kernel,
                   (gate, up, out, gate.stride(0), up.stride(0), out.stride(0), f),
                   dict(BLOCK=block, num_warps=4), None)


def _jit_functions() -> set[str]:
    """module.name of every launched @triton.jit kernel in kernels/*.py (helpers
    called from other kernels, such as _load_w, compile as part of those)."""
    import importlib

    import triton

    found = set()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        if path.stem.startswith("__"):
            continue
        mod = importlib.import_module(f"kernels.{path.stem}")
        jits = {}
        for name, obj in vars(mod).items():
            fn = obj.fn if isinstance(obj, triton.runtime.Autotuner) else obj
            if isinstance(fn, triton.runtime.jit.JITFunction) and fn.__module__ == mod.__name__:
                jits[name] = fn
        for name, fn in jits.items():
            if not any(f"{name}(" in other.src for other_name, other in jits.items() if other_name != name):
                found.add(f"{path.stem}.{name}")
    return found


def _compile(fn, args, kwargs, target):
    """Specialize fn on args like JITFunction.run does, then triton.compile it for target."""
    import triton
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(kwargs, debug=False)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def child_main(arch: int, full: bool, verbose: bool = False) -> dict:
    import contextlib
    import io
    import re

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    knobs.nvidia.dump_ptxas_log = True          # ptxas -v: registers and spills, printed by make_cubin
    target = GPUTarget("cuda", arch, 32)
    results, seen = [], set()
    for name, kern, args, kwargs, configs in _cases(full, offset=7 * TARGETS.index(arch)):
        fn = kern if isinstance(kern, JITFunction) else kern.fn
        seen.add(name.split(" ")[0])
        for cfg in configs if configs is not None else [None]:
            kw = dict(kwargs) if cfg is None else {**kwargs, **cfg.all_kwargs()}
            label = name if cfg is None else f"{name} [{cfg}]"
            t0 = time.time()
            log = io.StringIO()
            try:
                with contextlib.redirect_stdout(log):
                    ck = _compile(fn, args, kw, target)
            except Exception as e:  # noqa: BLE001 - report every compiler failure
                results.append({"case": label, "ok": False, "s": round(time.time() - t0, 2),
                                "error": f"{type(e).__name__}: {e}"[-4000:]})
            else:
                ptx, cubin = ck.asm.get("ptx", ""), ck.asm.get("cubin", b"")
                ok = bool(re.search(rf"\.target sm_{arch}", ptx)) and ".entry" in ptx and len(cubin) > 0
                regs = re.search(r"Used (\d+) registers", log.getvalue())
                spill = re.search(r"(\d+) bytes spill stores", log.getvalue())
                results.append({"case": label, "ok": ok, "s": round(time.time() - t0, 2),
                                "autotuned": configs is not None, "shared": ck.metadata.shared,
                                "regs": int(regs.group(1)) if regs else None,
                                "spill": int(spill.group(1)) if spill else 0,
                                "ptx": len(ptx), "cubin": len(cubin),
                                "error": "" if ok else f"no .entry for sm_{arch} in the PTX, or no cubin"})
            if verbose:
                r = results[-1]
                print("ok  " if r["ok"] else "FAIL", r["s"], r["case"], r.get("shared", ""), r.get("regs", ""),
                      r.get("spill", ""), r["error"][-1500:], flush=True)
    return {"arch": arch, "results": results, "kernels": sorted(seen), "jit": sorted(_jit_functions())}


# ------------------------------------------------------------------ pytest side

def _ptxas_works() -> str | None:
    """None when the wheel's ptxas runs here, else why not."""
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return "triton is not installed"
    ptxas = Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin" / "ptxas"
    ptxas = Path(os.environ.get("TRITON_PTXAS_PATH", ptxas))
    try:
        subprocess.run([str(ptxas), "--version"], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"ptxas ({ptxas}) does not run here: {e}"
    return None


@pytest.mark.slow
def test_kernels_compile_for_sm90_and_sm80(tmp_path):
    why = _ptxas_works()
    if why:
        pytest.skip(why)
    full = os.environ.get("LINGLI_AOT_FULL", "") not in ("", "0")
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=pythonpath, OMP_NUM_THREADS="1")
    env.pop("TRITON_ALWAYS_COMPILE", None)
    procs = {}
    for arch in TARGETS:            # both at once: each child is single-threaded
        out, log = tmp_path / f"sm{arch}.json", tmp_path / f"sm{arch}.log"
        with open(log, "w") as f:
            procs[arch] = (out, log, subprocess.Popen(
                [sys.executable, __file__, str(arch), str(out)] + (["--full"] if full else []),
                cwd=ROOT, env=dict(env, TRITON_CACHE_DIR=str(tmp_path / f"cache{arch}")),
                stdout=f, stderr=subprocess.STDOUT))
    failures, notes, summary = [], [], []
    deadline = time.monotonic() + _TIMEOUT_S
    for arch, (out, log, p) in procs.items():
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for _, _, q in procs.values():
                q.kill()
                q.wait()
            pytest.fail(f"sm_{arch}: the compile children ran past {_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
        assert p.returncode == 0 and out.exists(), \
            f"sm_{arch}: the compile child failed:\n{log.read_text()[-6000:]}"
        rep = json.loads(out.read_text())
        missing = set(rep["jit"]) - set(rep["kernels"])
        assert not missing, f"kernels in kernels/*.py with no compile case: {sorted(missing)} (add them to _cases)"
        res = rep["results"]
        limit = MAX_SHARED[arch]
        summary.append(f"sm_{arch}: {sum(r['ok'] for r in res)}/{len(res)} compiled "
                       f"in {sum(r['s'] for r in res):.0f} s")
        for r in res:
            where = f"sm_{arch} {r['case']}"
            if not r["ok"]:
                failures.append(f"{where}:\n    {r['error']}")
            elif r["shared"] > limit:
                # an autotune config that needs too much shared memory is skipped
                # (OutOfResources) at run time; a plain kernel would fail to launch
                msg = f"{where}: needs {r['shared']} B of shared memory, the limit is {limit} B"
                (notes if r["autotuned"] else failures).append(msg)
            if r["ok"] and r.get("spill"):
                notes.append(f"{where}: {r['regs']} registers, {r['spill']} B spilled")
    print("\n".join(summary + ["notes (not failures):"] + notes))
    assert not failures, (f"{len(failures)} kernel compiles failed ({'; '.join(summary)}):\n\n"
                          + "\n\n".join(failures))


if __name__ == "__main__":
    # child: python tests/test_kernels_compile.py ARCH [OUT.json] [--full]
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET=0: @triton.jit would build interpreter objects")
    sys.path.insert(0, str(ROOT))
    argv = [a for a in sys.argv[1:] if a != "--full"]
    full = "--full" in sys.argv or os.environ.get("LINGLI_AOT_FULL", "") not in ("", "0")
    report = child_main(int(argv[0]), full, verbose=len(argv) == 1)
    if len(argv) > 1:
        Path(argv[1]).write_text(json.dumps(report))
