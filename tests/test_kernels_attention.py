"""Triton paged attention and KV write (kernels/attention.py) in the interpreter.

Every shape of tests/test_ops_cpu.py's ATTN_CASES and BATCH_CASES is checked
against the torch reference and against runtime._C.paged_attention on the
same float32 data, in fp32 and fp16, through each path: the host's own plan,
decode kernel only, prefill kernel only and split-key decode. bf16 is left
out: tl.dot in bf16 is wrong in the interpreter (toolchain.md section 3).
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

import ref_ops as ref
from kernels import attention as A
from kernels.attention import kv_write, kv_write_ref, paged_attention, paged_attention_ref
from runtime import _C

ATTN_CASES = [  # (Hq, Hkv, Dh, block_size, prefix_len, T), as in test_ops_cpu.py
    (4, 4, 64, 16, 36, 1),     # MHA decode, 37 keys (not a multiple of 16)
    (9, 3, 64, 16, 21, 7),     # GQA 9/3 prefill continuing a 21-token prefix
    (9, 3, 40, 16, 0, 19),     # GQA prefill from scratch, Dh 40, a run longer than BLOCK_M
    (2, 1, 7, 16, 44, 1),      # tiny odd head dim, MQA decode
    (4, 2, 128, 16, 100, 3),   # larger head dim, 103 keys
    (3, 3, 16, 5, 11, 4),      # odd block size
]

BATCH_CASES = [  # (Hq, Hkv, Dh, block_size, [(prefix_len, new_tokens) per sequence])
    (4, 2, 64, 16, [(36, 1), (0, 1), (15, 1), (16, 1)]),          # batched decode, edge lengths
    (9, 3, 40, 16, [(21, 7), (3, 1), (0, 19)]),                   # prefill chunks mixed with decode
    (2, 1, 7, 5, [(11, 4), (44, 1), (0, 1), (9, 2), (4, 6)]),     # odd block size and head dim
    (8, 2, 64, 16, [(30 + 7 * i, 1) for i in range(9)]),          # 9 decode streams, 4 heads per kv head
]

# How the batch is routed: the host's plan, or everything through one kernel.
MODES = {
    "auto": {},
    "decode": {"prefill_min_run": 10**9},
    "prefill": {"prefill_min_run": 1},
    "split": {"prefill_min_run": 10**9, "decode_splits": 4},
}
TOL = {torch.float32: dict(rtol=1e-5, atol=5e-5), torch.float16: dict(rtol=1e-2, atol=1e-2)}


def rng_for(*key) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def single_case(case):
    c = ref.single_sequence_case(rng_for("attn", case), *case)
    return dict(q=c["q"], k_cache=c["k_cache"], v_cache=c["v_cache"], block_tables=c["block_table"],
                positions=c["positions"], scale=1 / np.sqrt(case[2]), seq_ids=None)


def batch_case(case, order: str):
    """Several sequences in one shuffled block pool; tokens interleaved or grouped by sequence."""
    hq, hkv, dh, bs, seqs = case
    rng = rng_for("attn-batch", case[:4], len(seqs))
    lens = [p + n for p, n in seqs]
    nblocks = sum(-(-L // bs) for L in lens) + 4
    perm = rng.permutation(nblocks).astype(np.int32)
    k_cache = (rng.standard_normal((nblocks, hkv, bs, dh)) * 100).astype(np.float32)
    v_cache = (rng.standard_normal((nblocks, hkv, bs, dh)) * 100).astype(np.float32)
    tables = np.full((len(seqs), max(-(-L // bs) for L in lens) + 1), -7, np.int32)  # junk padding
    q, pos, sid, used = [], [], [], 0
    for i, ((prefix, n), L) in enumerate(zip(seqs, lens)):
        nb = -(-L // bs)
        tables[i, :nb] = perm[used:used + nb]
        used += nb
        for p in range(L):
            k_cache[tables[i, p // bs], :, p % bs] = rng.standard_normal((hkv, dh))
            v_cache[tables[i, p // bs], :, p % bs] = rng.standard_normal((hkv, dh))
        q.append((rng.standard_normal((n, hq, dh)) * 2).astype(np.float32))
        pos.append(np.arange(prefix, L, dtype=np.int32))
        sid.append(np.full(n, i, np.int32))
    order_ix = rng.permutation(sum(n for _, n in seqs)) if order == "interleaved" else slice(None)
    return dict(q=np.ascontiguousarray(np.concatenate(q)[order_ix]), k_cache=k_cache, v_cache=v_cache,
                block_tables=tables, positions=np.concatenate(pos)[order_ix], scale=1 / np.sqrt(dh),
                seq_ids=np.concatenate(sid)[order_ix])


def to_torch(a: dict, dtype: torch.dtype) -> dict:
    return {k: (torch.from_numpy(v).to(dtype) if v.dtype == np.float32 else torch.from_numpy(v))
            if isinstance(v, np.ndarray) else v for k, v in a.items()}


def check_all_paths(a: dict, dtype: torch.dtype, modes=tuple(MODES)) -> None:
    want_c = torch.from_numpy(_C.paged_attention(  # the CPU backend, on the fp32 data
        a["q"], a["k_cache"], a["v_cache"], a["block_tables"], a["positions"], a["scale"], a["seq_ids"]))
    t = to_torch(a, dtype)
    want = paged_attention_ref(**t)
    assert want.dtype == dtype
    torch.testing.assert_close(want.float(), want_c, **TOL[dtype])  # same semantics as the CPU op
    for mode in modes:
        got = paged_attention(**t, **MODES[mode])
        assert got.shape == t["q"].shape and got.dtype == dtype
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"{mode} vs ref: {m}")
        torch.testing.assert_close(got.float(), want_c, **TOL[dtype], msg=lambda m: f"{mode} vs _C: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", ATTN_CASES, ids=[str(c) for c in ATTN_CASES])
def test_paged_attention(case, dtype):
    check_all_paths(single_case(case), dtype)


@pytest.mark.parametrize("order", ["interleaved", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", BATCH_CASES, ids=[str(c[:4]) for c in BATCH_CASES])
def test_paged_attention_batch(case, dtype, order):
    # Interleaved tokens are all single-token runs (decode); grouped ones mix
    # prefill runs with decode tokens in the default plan.
    check_all_paths(batch_case(case, order), dtype, modes=("auto", "prefill", "split")
                    if order == "interleaved" else ("auto",))


def test_plan_routes_runs():
    seq = torch.tensor([0, 0, 0, 1, 2, 2, 2, 0, 0], dtype=torch.int32)
    pos = torch.tensor([5, 6, 7, 3, 0, 1, 3, 8, 9], dtype=torch.int32)  # 2 -> 3 breaks a run
    starts, lens, dec = A._plan(seq, pos, 2)
    assert starts.tolist() == [0, 4, 7] and lens.tolist() == [3, 2, 2] and dec.tolist() == [3, 6]
    starts, lens, dec = A._plan(seq, pos, 3)
    assert starts.tolist() == [0] and lens.tolist() == [3] and dec.tolist() == [3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("case", BATCH_CASES, ids=[str(c[:4]) for c in BATCH_CASES])
def test_plan_made_once_gives_the_same_output(case):
    """A make_plan plan (the backend makes one per forward pass) skips the checks and
    the per-call planning; the output is the same as planning inside the call."""
    t = to_torch(batch_case(case, "grouped"), torch.float32)
    group = t["q"].shape[1] // t["k_cache"].shape[1]
    plan = A.make_plan(t["positions"], t["seq_ids"], group, t["q"].device)
    assert plan.run_start.numel() + plan.dec_tok.numel() > 0
    torch.testing.assert_close(paged_attention(**t, plan=plan), paged_attention(**t), rtol=0, atol=0)
    torch.testing.assert_close(paged_attention(**t, plan=plan), paged_attention_ref(**t), **TOL[torch.float32])


def test_cases_reach_both_kernels():
    """The shapes above cover a prefill run longer than a tile and multi-split decode."""
    block_m = A._prefill_kernel.configs[0].kwargs["BLOCK_M"]
    assert 19 > block_m and A._SPLIT_ALIGN * 3 < 103


def test_wrong_positions_are_caught():
    """The tolerances can fail: attending one key short must not pass."""
    a = to_torch(single_case(ATTN_CASES[1]), torch.float32)
    want = paged_attention_ref(**a)
    got = paged_attention(**{**a, "positions": a["positions"] - 1})
    assert not torch.allclose(got, want, **TOL[torch.float32])


def test_single_key_is_v():
    rng = rng_for("attn-one")
    k_seq = rng.standard_normal((1, 2, 8)).astype(np.float32)
    v_seq = rng.standard_normal((1, 2, 8)).astype(np.float32)
    kc, vc, table = (torch.from_numpy(x) for x in ref.make_paged_cache(k_seq, v_seq, 16, rng))
    q = torch.from_numpy(rng.standard_normal((1, 4, 8)).astype(np.float32))
    for mode in MODES.values():
        out = paged_attention(q, kc, vc, table, torch.zeros(1, dtype=torch.int32), 0.3, **mode)
        torch.testing.assert_close(out[0], torch.from_numpy(v_seq[0]).repeat_interleave(2, 0),
                                   rtol=1e-6, atol=1e-6)


def test_empty_batch():
    kc = torch.zeros(2, 1, 4, 8)
    out = paged_attention(torch.zeros(0, 2, 8), kc, kc, torch.zeros(2, dtype=torch.int32),
                          torch.zeros(0, dtype=torch.int32), 1.0)
    assert out.shape == (0, 2, 8)


def attn_args(**kw):
    a = dict(q=torch.zeros(1, 4, 8), k_cache=torch.zeros(3, 2, 4, 8), v_cache=torch.zeros(3, 2, 4, 8),
             block_tables=torch.tensor([[2, 0], [1, 0]], dtype=torch.int32),
             positions=torch.tensor([5], dtype=torch.int32), scale=1.0,
             seq_ids=torch.tensor([1], dtype=torch.int32))
    return {**a, **kw}


@pytest.mark.parametrize("fn", [paged_attention, paged_attention_ref], ids=["kernel", "ref"])
@pytest.mark.parametrize("kw,match", [
    (dict(q=torch.zeros(4, 8)), r"q must be a 3-D tensor"),
    (dict(q=torch.zeros(1, 4, 8, dtype=torch.float16)), r"q dtype torch.float16 must match"),
    (dict(q=torch.zeros(1, 3, 8)), r"Hq = 3 must be a multiple of kv heads Hkv = 2"),
    (dict(q=torch.zeros(1, 4, 6)), r"k_cache has Dh = 8, q has Dh = 6"),
    (dict(v_cache=torch.zeros(3, 2, 4, 7)), r"v_cache \(3, 2, 4, 7\) .* must match k_cache"),
    (dict(k_cache=torch.zeros(3, 2, 4, 8, dtype=torch.int32)), r"k_cache dtype must be float32"),
    (dict(positions=torch.tensor([5])), r"positions must be an int32 tensor, got torch.int64"),
    (dict(positions=torch.tensor([5, 1], dtype=torch.int32)), r"positions has shape \(2,\), expected \[1\]"),
    (dict(positions=torch.tensor([-1], dtype=torch.int32)), r"positions\[0\] = -1 is negative"),
    (dict(positions=torch.tensor([8], dtype=torch.int32)),
     r"positions\[0\] = 8 needs block_tables entry 2 but the table has only 2 entries"),
    (dict(seq_ids=torch.tensor([2], dtype=torch.int32)), r"seq_ids\[0\] = 2 is out of range \[0, 2\)"),
    (dict(block_tables=torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)),
     r"block_tables\[1, 1\] = 3 is out of range \[0, 3\)"),
    (dict(block_tables=torch.tensor([2, 0], dtype=torch.int32)),  # 1-D table: one sequence
     r"seq_ids\[0\] = 1 is out of range \[0, 1\)"),
])
def test_bad_inputs(fn, kw, match):
    with pytest.raises(ValueError, match=match):
        fn(**attn_args(**kw))


def test_junk_past_needed_entries_is_fine():
    # Token of row 1 at position 3 needs only entry 0; entry 1 (-5) is never read.
    a = attn_args(block_tables=torch.tensor([[2, 0], [1, -5]], dtype=torch.int32),
                  positions=torch.tensor([3], dtype=torch.int32))
    torch.testing.assert_close(paged_attention(**a), paged_attention_ref(**a))


# ----------------------------------------------------------------- kv write --

def write_case(dtype: torch.dtype):
    kc, vc, tables, seq_ids, pos, k, v = ref.paged_write_case(rng_for("paged-write"))
    return (kc, vc, tables, seq_ids, pos, k, v), dict(
        k_cache=torch.from_numpy(kc).to(dtype), v_cache=torch.from_numpy(vc).to(dtype),
        block_tables=torch.from_numpy(tables), positions=torch.from_numpy(pos),
        k=torch.from_numpy(k).to(dtype), v=torch.from_numpy(v).to(dtype), seq_ids=torch.from_numpy(seq_ids))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_kv_write(dtype):
    (kc, vc, tables, seq_ids, pos, k, v), a = write_case(dtype)
    want = {n: a[n].clone() for n in ("k_cache", "v_cache")}
    kv_write_ref(**{**a, **want})
    before = a["k_cache"].clone()
    assert kv_write(**a) is None
    assert not torch.equal(a["k_cache"], before)
    torch.testing.assert_close(a["k_cache"], want["k_cache"], rtol=0, atol=0)
    torch.testing.assert_close(a["v_cache"], want["v_cache"], rtol=0, atol=0)
    _C.paged_write(kc, vc, tables, seq_ids, pos, k, v)  # the CPU op, on fp32 data
    torch.testing.assert_close(a["k_cache"], torch.from_numpy(kc).to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(a["v_cache"], torch.from_numpy(vc).to(dtype), rtol=0, atol=0)


def test_kv_write_then_attend():
    """Written keys are what attention reads: fill a cache token by token, compare with _C."""
    a = single_case(ATTN_CASES[5])
    rng = rng_for("write-attend")
    L, (_, hkv, _, dh) = int(a["positions"][-1]) + 1, a["k_cache"].shape
    k = rng.standard_normal((L, hkv, dh)).astype(np.float32)
    v = rng.standard_normal((L, hkv, dh)).astype(np.float32)
    t = to_torch(a, torch.float32)
    kv_write(t["k_cache"], t["v_cache"], t["block_tables"], torch.arange(L, dtype=torch.int32),
             torch.from_numpy(k), torch.from_numpy(v))
    want = ref.attention(a["q"], k, v, a["positions"], a["scale"])
    torch.testing.assert_close(paged_attention(**t).double(), torch.from_numpy(want), rtol=1e-5, atol=5e-5)


@pytest.mark.parametrize("fn", [kv_write, kv_write_ref], ids=["kernel", "ref"])
def test_kv_write_bad_inputs(fn):
    _, a = write_case(torch.float32)
    one = dict(k=a["k"][:1], v=a["v"][:1])
    with pytest.raises(ValueError, match=r"positions\[0\] = 15 needs block_tables entry 3 but .* only 3"):
        fn(**{**a, **one, "seq_ids": a["seq_ids"][:1], "positions": torch.tensor([15], dtype=torch.int32)})
    with pytest.raises(ValueError, match=r"seq_ids\[0\] = 2 is out of range"):
        fn(**{**a, **one, "seq_ids": torch.tensor([2], dtype=torch.int32), "positions": a["positions"][:1]})
    zero, table9 = torch.tensor([0], dtype=torch.int32), torch.tensor([[9]], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"block_tables\[0, 0\] = 9 is out of range \[0, 9\)"):
        fn(**{**a, **one, "block_tables": table9, "seq_ids": zero, "positions": zero})
    with pytest.raises(ValueError, match=r"kv_write: k has shape \(5, 2, 7\), expected \[5, 3, 7\]"):
        fn(**{**a, "k": a["k"][:, :2]})
    with pytest.raises(ValueError, match=r"kv_write: v dtype torch.float16 must match"):
        fn(**{**a, "v": a["v"].half()})
