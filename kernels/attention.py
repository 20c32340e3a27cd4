"""Paged attention over block tables (decode and causal prefill, GQA) and the KV cache write.

Same semantics as runtime._C.paged_attention / paged_write (csrc/attention.cpp):
q [T, Hq, Dh]; k_cache, v_cache [num_blocks, Hkv, block_size, Dh] (one layer);
block_tables int32 [S, nb] (a 1-D [nb] table is one sequence); seq_ids int32
[T] names each token's row (None: every token is sequence 0); positions int32
[T]. Token t attends to its sequence's keys at positions 0..positions[t]; key
position p lives in block block_tables[seq, p // block_size], slot
p % block_size. Query head h reads kv head h // (Hq // Hkv).

The host splits the batch into runs of consecutive tokens of one sequence with
consecutive positions. Runs of at least `prefill_min_run` tokens go to the
prefill kernel (FlashAttention-style: a program per BLOCK_M query rows of one
run and one query head); the other tokens go to the decode kernel (a program
per token and kv head, all Hq/Hkv query heads of that kv head as one tile, so
each K/V block is read once per group). When there is too little decode work
to fill the GPU, the decode kernel also splits each token's keys into
`decode_splits` parts and a small kernel merges their partial softmaxes
(flash-decoding). Softmax and accumulation are fp32 (exp2 with log2(e) folded
into the scale); the output has q's dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._util import autotune, check_tensor
from ._util import shape_str as _shape

_LOG2E = 1.4426950408889634


# ------------------------------------------------------------------ kernels --

@triton.jit
def _attend_tile(acc, m_i, l_i, q, K, V, table, kpos, kmask, valid, g,
                 stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                 qk_scale, d, dmask, BS: tl.constexpr, PREC: tl.constexpr):
    """One online-softmax step over BLOCK_N keys gathered through the block table.
    valid [rows, BLOCK_N] masks the scores; kmask [BLOCK_N] the loads."""
    blk = tl.load(table + kpos // BS, mask=kmask, other=0).to(tl.int64)
    slot = (kpos % BS).to(tl.int64)
    lmask = kmask[:, None] & dmask[None, :]
    k = tl.load(K + (blk * stride_kb + g * stride_kh + slot * stride_ks)[:, None] + d[None, :],
                mask=lmask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    s = tl.where(valid, s, float("-inf"))
    # Every row has a finite max from the first tile on (key 0 is always
    # visible), so m_i - m_new is never -inf - -inf.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + (blk * stride_vb + g * stride_vh + slot * stride_vs)[:, None] + d[None, :],
                mask=lmask, other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, m_new, l_i


@autotune(
    configs=[triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1),  # first: interpreter
             triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2),
             triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=3),
             triton.Config({"BLOCK_N": 128}, num_warps=4, num_stages=2),
             triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2),
             triton.Config({"BLOCK_N": 32}, num_warps=2, num_stages=3)],
    key=["GROUP_P", "DH_P", "BS", "SPLITS"])
@triton.jit
def _decode_kernel(Q, K, V, Out, Tables, Pos, Seq, Tok, Mx, Lx, Acc,
                   qk_scale, keys_per_split,
                   stride_qt, stride_qh, stride_kb, stride_kh, stride_ks,
                   stride_vb, stride_vh, stride_vs, stride_ot, stride_oh, stride_tab,
                   HQ: tl.constexpr, GROUP: tl.constexpr, GROUP_P: tl.constexpr,
                   BS: tl.constexpr, DH: tl.constexpr, DH_P: tl.constexpr,
                   SPLITS: tl.constexpr, PREC: tl.constexpr, BLOCK_N: tl.constexpr):
    i = tl.program_id(0)
    g = tl.program_id(1)
    sp = tl.program_id(2)
    t = tl.load(Tok + i).to(tl.int64)
    kv_len = tl.load(Pos + t) + 1
    table = Tables + tl.load(Seq + t).to(tl.int64) * stride_tab
    lo = sp * keys_per_split
    hi = tl.minimum(lo + keys_per_split, kv_len)

    rows = tl.arange(0, GROUP_P)  # padded to >= 16 rows for tl.dot
    heads = g * GROUP + rows
    rmask = rows < GROUP
    d = tl.arange(0, DH_P)
    dmask = d < DH
    q = tl.load(Q + t * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)

    m_i = tl.full([GROUP_P], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_P], tl.float32)
    acc = tl.zeros([GROUP_P, DH_P], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        kmask = kpos < hi
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, K, V, table, kpos, kmask, kmask[None, :], g,
                                     stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                                     qk_scale, d, dmask, BS, PREC)
    if SPLITS == 1:
        o = acc / l_i[:, None]
        tl.store(Out + t * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 o.to(Out.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    else:
        # Partial results; an empty split (lo >= kv_len) leaves m = -inf, l = 0.
        part = (i * HQ + heads) * SPLITS + sp
        tl.store(Mx + part, m_i, mask=rmask)
        tl.store(Lx + part, l_i, mask=rmask)
        tl.store(Acc + part[:, None] * DH_P + d[None, :], acc, mask=rmask[:, None])


# Keys per decode split are a multiple of the largest BLOCK_N in play, so no
# split starts mid-tile (32 under the interpreter, where only one config runs).
_SPLIT_ALIGN = max(c.kwargs["BLOCK_N"] for c in _decode_kernel.configs)


@triton.jit
def _merge_splits_kernel(Out, Tok, Mx, Lx, Acc, stride_ot, stride_oh,
                         HQ: tl.constexpr, DH: tl.constexpr, DH_P: tl.constexpr,
                         SPLITS: tl.constexpr):
    i = tl.program_id(0)
    h = tl.program_id(1)
    t = tl.load(Tok + i).to(tl.int64)
    part = (i * HQ + h) * SPLITS + tl.arange(0, SPLITS)
    d = tl.arange(0, DH_P)
    m = tl.load(Mx + part)
    w = tl.exp2(m - tl.max(m, 0))  # split 0 is never empty, so the max is finite
    l = tl.sum(tl.load(Lx + part) * w, 0)
    acc = tl.load(Acc + part[:, None] * DH_P + d[None, :])
    o = tl.sum(acc * w[:, None], 0) / l
    tl.store(Out + t * stride_ot + h * stride_oh + d, o.to(Out.dtype.element_ty), mask=d < DH)


@autotune(
    configs=[triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1),  # interpreter
             triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
             triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
             triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
             triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=2)],
    key=["DH_P", "BS", "GROUP"])
@triton.jit
def _prefill_kernel(Q, K, V, Out, Tables, Pos, Seq, RunStart, RunLen, qk_scale,
                    stride_qt, stride_qh, stride_kb, stride_kh, stride_ks,
                    stride_vb, stride_vh, stride_vs, stride_ot, stride_oh, stride_tab,
                    GROUP: tl.constexpr, BS: tl.constexpr, DH: tl.constexpr, DH_P: tl.constexpr,
                    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    r = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    h = tl.program_id(2)
    g = h // GROUP
    t0 = tl.load(RunStart + r).to(tl.int64)
    n = tl.load(RunLen + r)
    table = Tables + tl.load(Seq + t0).to(tl.int64) * stride_tab
    p0 = tl.load(Pos + t0) + m0  # a run's positions are consecutive

    rows = tl.arange(0, BLOCK_M)
    rmask = m0 + rows < n  # the grid covers the longest run: shorter ones have idle tiles
    qpos = p0 + rows
    d = tl.arange(0, DH_P)
    dmask = d < DH
    tok = t0 + m0 + rows
    q = tl.load(Q + tok[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    # Keys up to the tile's last query position; an idle tile reads none.
    kv_len = tl.where(m0 < n, p0 + tl.minimum(n - m0, BLOCK_M), 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DH_P], tl.float32)
    for start in range(0, kv_len, BLOCK_N):
        kpos = start + tl.arange(0, BLOCK_N)
        kmask = kpos < kv_len
        causal = (kpos[None, :] <= qpos[:, None]) & kmask[None, :]
        acc, m_i, l_i = _attend_tile(acc, m_i, l_i, q, K, V, table, kpos, kmask, causal, g,
                                     stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                                     qk_scale, d, dmask, BS, PREC)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # idle tiles: 0/0 in unstored rows
    tl.store(Out + tok[:, None] * stride_ot + h * stride_oh + d[None, :],
             o.to(Out.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


@triton.jit
def _kv_write_kernel(KC, VC, Kn, Vn, Tables, Pos, Seq,
                     stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cb, stride_ch, stride_cs, stride_db, stride_dh, stride_ds, stride_tab,
                     BS: tl.constexpr, DH: tl.constexpr, DH_P: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pos = tl.load(Pos + t)
    blk = tl.load(Tables + tl.load(Seq + t).to(tl.int64) * stride_tab + pos // BS).to(tl.int64)
    slot = pos % BS
    d = tl.arange(0, DH_P)
    dmask = d < DH
    k = tl.load(Kn + t * stride_kt + h * stride_kh + d, mask=dmask)
    v = tl.load(Vn + t * stride_vt + h * stride_vh + d, mask=dmask)
    tl.store(KC + blk * stride_cb + h * stride_ch + slot * stride_cs + d, k, mask=dmask)
    tl.store(VC + blk * stride_db + h * stride_dh + slot * stride_ds + d, v, mask=dmask)


# ------------------------------------------------------------ input checks --

def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_cache(op: str, k_cache, v_cache) -> None:
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(op, name, c, ("num_blocks", "Hkv", "block_size", "Dh"))
        _need(c.stride(-1) == 1, f"{op}: {name} must be contiguous along Dh")
    _need(v_cache.shape == k_cache.shape and v_cache.dtype == k_cache.dtype,
          f"{op}: v_cache {_shape(v_cache)} {v_cache.dtype} must match "
          f"k_cache {_shape(k_cache)} {k_cache.dtype}")
    _need(k_cache.shape[2] > 0, f"{op}: block_size (k_cache.shape[2]) must be > 0")


def _index_args(op: str, T: int, block_tables, positions, seq_ids, dev):
    """Checks the integer inputs; returns (2-D table, positions, seq_ids) with seq_ids filled in."""
    _need(isinstance(block_tables, torch.Tensor) and block_tables.dim() in (1, 2),
          f"{op}: block_tables must be a tensor [S, nb] (or [nb]), got {_shape(block_tables)}")
    for name, x in (("block_tables", block_tables), ("positions", positions), ("seq_ids", seq_ids)):
        if x is None and name == "seq_ids":
            continue
        _need(isinstance(x, torch.Tensor) and x.dtype == torch.int32,
              f"{op}: {name} must be an int32 tensor, got "
              f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
        _need(x.device == dev, f"{op}: {name} is on {x.device}, the cache on {dev}")
    _need(tuple(positions.shape) == (T,), f"{op}: positions has shape {_shape(positions)}, expected [{T}]")
    if seq_ids is None:
        seq_ids = torch.zeros(T, dtype=torch.int32, device=dev)
    _need(tuple(seq_ids.shape) == (T,), f"{op}: seq_ids has shape {_shape(seq_ids)}, expected [{T}]")
    tables = block_tables if block_tables.dim() == 2 else block_tables[None]
    return tables.contiguous(), positions.contiguous(), seq_ids.contiguous()


def _check_positions(op: str, tables, positions, seq_ids, block_size: int, num_blocks: int):
    """Every block a token reads must be in its table row and name a real block
    (the kernels do not bounds-check their gathers). Checked on host copies
    fetched in one transfer (one sync), which are returned for planning."""
    S, nb = tables.shape
    T = positions.numel()
    host = torch.cat([positions, seq_ids, tables.flatten()]).cpu()
    positions, seq_ids, tables = host[:T], host[T:2 * T], host[2 * T:].view(S, nb)
    if T == 0:
        return positions, seq_ids
    neg = (positions < 0).nonzero()
    if neg.numel():
        t = int(neg[0])
        raise ValueError(f"{op}: positions[{t}] = {int(positions[t])} is negative")
    bad = ((seq_ids < 0) | (seq_ids >= S)).nonzero()
    if bad.numel():
        t = int(bad[0])
        raise ValueError(f"{op}: seq_ids[{t}] = {int(seq_ids[t])} is out of range [0, {S}) "
                         f"of the block_tables rows")
    need = positions.long() // block_size + 1  # table entries token t reads
    over = (need > nb).nonzero()
    if over.numel():
        t = int(over[0])
        raise ValueError(f"{op}: positions[{t}] = {int(positions[t])} needs block_tables entry "
                         f"{int(need[t]) - 1} but the table has only {nb} entries (block_size {block_size})")
    # Entries each row uses: up to the largest need of its tokens (junk beyond is fine).
    row_need = torch.zeros(S, dtype=torch.long, device=tables.device).scatter_reduce(
        0, seq_ids.long(), need, "amax")
    used = torch.arange(nb, device=tables.device)[None, :] < row_need[:, None]
    bad = (used & ((tables < 0) | (tables >= num_blocks))).nonzero()
    if bad.numel():
        s, i = (int(x) for x in bad[0])
        raise ValueError(f"{op}: block_tables[{s}, {i}] = {int(tables[s, i])} is out of range "
                         f"[0, {num_blocks}) of the cache blocks")
    return positions, seq_ids


def _check_attention(q, k_cache, v_cache, block_tables, positions, seq_ids, trusted: bool = False):
    op = "paged_attention"
    _check_cache(op, k_cache, v_cache)
    check_tensor(op, "q", q, ("T", "Hq", "Dh"), floats=False)
    _need(q.dtype == k_cache.dtype, f"{op}: q dtype {q.dtype} must match the cache dtype {k_cache.dtype}")
    _need(q.device == k_cache.device == v_cache.device, f"{op}: q, k_cache and v_cache must be on one device")
    _need(q.stride(-1) == 1, f"{op}: q must be contiguous along Dh")
    T, Hq, Dh = q.shape
    NB, Hkv, BS, Dhc = k_cache.shape
    _need(Dhc == Dh, f"{op}: k_cache has Dh = {Dhc}, q has Dh = {Dh}")
    _need(Hkv > 0 and Hq % Hkv == 0,
          f"{op}: query heads Hq = {Hq} must be a multiple of kv heads Hkv = {Hkv}")
    tables, positions, seq_ids = _index_args(op, T, block_tables, positions, seq_ids, q.device)
    if trusted:     # the caller's plan vouches for the positions and tables (no sync)
        return tables, positions, seq_ids, None, None
    return (tables, positions, seq_ids, *_check_positions(op, tables, positions, seq_ids, BS, NB))


# -------------------------------------------------------------------- host --

def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 dots would default to tf32 on the GPU (10-bit mantissa): keep them exact.
    return "ieee" if dtype == torch.float32 else "tf32"


def _plan(seq: torch.Tensor, pos: torch.Tensor, min_run: int):
    """Split the batch into runs of consecutive tokens of one sequence with
    consecutive positions: (run starts, run lengths) of the runs of >= min_run
    tokens, and the indices of all other tokens (the decode tokens)."""
    T = seq.numel()
    brk = torch.ones(T, dtype=torch.bool, device=seq.device)
    brk[1:] = (seq[1:] != seq[:-1]) | (pos[1:] != pos[:-1] + 1)
    starts = brk.nonzero().flatten()
    lens = torch.diff(starts, append=torch.tensor([T], device=seq.device))
    long = lens >= min_run
    tok_long = long.repeat_interleave(lens, output_size=T)
    return (starts[long].to(torch.int32), lens[long].to(torch.int32),
            (~tok_long).nonzero().flatten().to(torch.int32))


@dataclass(frozen=True)
class AttentionPlan:
    """How paged_attention cuts one batch (see _plan), made once per forward pass
    from host copies of positions and seq_ids, so the layers' calls neither check
    nor plan again and never wait for the device."""
    run_start: torch.Tensor     # int32 [R] on the device: first token of each prefill run
    run_len: torch.Tensor       # int32 [R]
    dec_tok: torch.Tensor       # int32 [D]: the decode tokens
    max_run: int
    max_len: int                # longest decode context


def make_plan(positions: torch.Tensor, seq_ids: torch.Tensor, group: int, device: torch.device,
              prefill_min_run: int | None = None) -> AttentionPlan:
    """A plan for tokens at host `positions` of sequences `seq_ids` (CPU int32 [T]),
    for Hq // Hkv = group. The caller vouches that every position has its block
    in the table (the engine reserves blocks before it schedules a token)."""
    min_run = max(2, group) if prefill_min_run is None else prefill_min_run
    _need(min_run >= 1, f"make_plan: prefill_min_run must be >= 1, got {min_run}")
    pos, seq = positions.to(torch.int32).cpu(), seq_ids.to(torch.int32).cpu()
    run_start, run_len, dec_tok = _plan(seq, pos, min_run)
    max_run = int(run_len.max()) if run_len.numel() else 0
    max_len = int(pos[dec_tok.long()].max()) + 1 if dec_tok.numel() else 0
    return AttentionPlan(*(x.to(device) for x in (run_start, run_len, dec_tok)), max_run, max_len)


def _default_splits(n_items: int, max_len: int, dev: torch.device) -> int:
    """Key splits per decode token: only when tokens x kv heads leave SMs idle
    and the contexts are long enough to be worth a merge pass."""
    if dev.type != "cuda" or n_items == 0 or max_len < 2 * _SPLIT_ALIGN:
        return 1
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    want = min(2 * sms // n_items, max_len // _SPLIT_ALIGN, 32)
    return 1 << max(0, int(want).bit_length() - 1) if want > 1 else 1


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, positions: torch.Tensor, scale: float,
                    seq_ids: torch.Tensor | None = None, *,
                    prefill_min_run: int | None = None,
                    decode_splits: int | None = None,
                    plan: AttentionPlan | None = None) -> torch.Tensor:
    """Causal paged attention; out [T, Hq, Dh] in q's dtype.

    prefill_min_run: runs of at least this many tokens use the prefill kernel
    (default max(2, Hq // Hkv): shorter runs read K/V less often per token as
    decode tiles). decode_splits: key splits per decode token, a power of two
    (default: chosen from the GPU's SM count; 1 under the interpreter).
    plan: from make_plan (once per forward pass); skips the position checks and
    the planning, and with them the host-device sync of every call.
    """
    tables, positions, seq_ids, h_pos, h_seq = _check_attention(
        q, k_cache, v_cache, block_tables, positions, seq_ids, trusted=plan is not None)
    T, Hq, Dh = q.shape
    _, Hkv, BS, _ = k_cache.shape
    group = Hq // Hkv
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if T == 0:
        return out
    if plan is None:  # planned on the host copies the checks fetched: no further syncs
        plan = make_plan(h_pos, h_seq, group, q.device, prefill_min_run)
    run_start, run_len, dec_tok, max_run, max_len = (
        plan.run_start, plan.run_len, plan.dec_tok, plan.max_run, plan.max_len)

    DH_P = max(16, triton.next_power_of_2(Dh))
    prec = _dot_precision(q.dtype)
    qk_scale = float(scale) * _LOG2E
    kv_strides = (*k_cache.stride()[:3], *v_cache.stride()[:3])
    common = (q.stride(0), q.stride(1), *kv_strides, out.stride(0), out.stride(1), tables.stride(0))

    if run_start.numel():
        grid = lambda meta: (run_start.numel(), triton.cdiv(max_run, meta["BLOCK_M"]), Hq)  # noqa: E731
        _prefill_kernel[grid](q, k_cache, v_cache, out, tables, positions, seq_ids, run_start, run_len,
                              qk_scale, *common, GROUP=group, BS=BS, DH=Dh, DH_P=DH_P, PREC=prec)

    n_dec = dec_tok.numel()
    if n_dec:
        splits = _default_splits(n_dec * Hkv, max_len, q.device) if decode_splits is None else decode_splits
        _need(splits >= 1 and splits & (splits - 1) == 0,
              f"paged_attention: decode_splits must be a power of two, got {splits}")
        per_split = triton.cdiv(triton.cdiv(max_len, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
        if splits == 1:
            mx = lx = acc = out  # unused
        else:
            mx = torch.empty(n_dec, Hq, splits, dtype=torch.float32, device=q.device)
            lx = torch.empty_like(mx)
            acc = torch.empty(n_dec, Hq, splits, DH_P, dtype=torch.float32, device=q.device)
        _decode_kernel[(n_dec, Hkv, splits)](
            q, k_cache, v_cache, out, tables, positions, seq_ids, dec_tok, mx, lx, acc,
            qk_scale, per_split, *common, HQ=Hq, GROUP=group,
            GROUP_P=max(16, triton.next_power_of_2(group)), BS=BS, DH=Dh, DH_P=DH_P,
            SPLITS=splits, PREC=prec)
        if splits > 1:
            _merge_splits_kernel[(n_dec, Hq)](out, dec_tok, mx, lx, acc, out.stride(0), out.stride(1),
                                              HQ=Hq, DH=Dh, DH_P=DH_P, SPLITS=splits)
    return out


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        block_tables: torch.Tensor, positions: torch.Tensor, scale: float,
                        seq_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch: gather every token's keys 0..max position, mask, fp32 softmax."""
    tables, positions, seq_ids, _, _ = _check_attention(q, k_cache, v_cache, block_tables, positions, seq_ids)
    T, Hq, Dh = q.shape
    _, Hkv, BS, _ = k_cache.shape
    if T == 0:
        return torch.empty_like(q)
    L = int(positions.max()) + 1
    kpos = torch.arange(L, device=q.device)
    # Entries past a token's own needs may be junk: clamp them, the mask drops them.
    blk = tables[seq_ids.long()][:, (kpos // BS).clamp(max=tables.shape[1] - 1)].long()
    blk = blk.clamp(0, k_cache.shape[0] - 1)
    slot = (kpos % BS)[None, :].expand(T, L)
    k = k_cache[blk, :, slot].float().repeat_interleave(Hq // Hkv, dim=2)  # [T, L, Hq, Dh]
    v = v_cache[blk, :, slot].float().repeat_interleave(Hq // Hkv, dim=2)
    s = torch.einsum("thd,tlhd->thl", q.float(), k) * scale
    s = s.masked_fill(kpos[None, None, :] > positions[:, None, None].long(), float("-inf"))
    return torch.einsum("thl,tlhd->thd", torch.softmax(s, dim=-1), v).to(q.dtype)


def _check_write(k_cache, v_cache, block_tables, positions, k, v, seq_ids, trusted: bool = False):
    op = "kv_write"
    _check_cache(op, k_cache, v_cache)
    NB, Hkv, BS, Dh = k_cache.shape
    T = positions.shape[0] if isinstance(positions, torch.Tensor) and positions.dim() == 1 else -1
    _need(T >= 0, f"{op}: positions must be a 1-D tensor [T], got {_shape(positions)}")
    for name, x in (("k", k), ("v", v)):
        _need(isinstance(x, torch.Tensor) and tuple(x.shape) == (T, Hkv, Dh),
              f"{op}: {name} has shape {_shape(x)}, expected [{T}, {Hkv}, {Dh}] "
              f"(T from positions, Hkv and Dh from the cache)")
        _need(x.dtype == k_cache.dtype,
              f"{op}: {name} dtype {x.dtype} must match the cache dtype {k_cache.dtype}")
        _need(x.device == k_cache.device, f"{op}: {name} is on {x.device}, the cache on {k_cache.device}")
        _need(x.stride(-1) == 1, f"{op}: {name} must be contiguous along Dh")
    tables, positions, seq_ids = _index_args(op, T, block_tables, positions, seq_ids, k_cache.device)
    if trusted:
        return tables, positions, seq_ids, None, None
    return (tables, positions, seq_ids, *_check_positions(op, tables, positions, seq_ids, BS, NB))


def kv_write(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
             positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             seq_ids: torch.Tensor | None = None, trusted: bool = False) -> None:
    """Store k, v [T, Hkv, Dh] in place at block block_tables[seq, pos // block_size],
    slot pos % block_size of each token (one program per token and kv head).
    trusted: the caller vouches for positions and tables (as for a make_plan
    plan): no range check, so no host-device sync."""
    tables, positions, seq_ids, _, _ = _check_write(k_cache, v_cache, block_tables, positions, k, v,
                                                    seq_ids, trusted)
    T, Hkv, Dh = k.shape
    if T == 0:
        return
    _kv_write_kernel[(T, Hkv)](k_cache, v_cache, k, v, tables, positions, seq_ids,
                               k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                               *k_cache.stride()[:3], *v_cache.stride()[:3], tables.stride(0),
                               BS=k_cache.shape[2], DH=Dh, DH_P=triton.next_power_of_2(Dh))


def kv_write_ref(k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 seq_ids: torch.Tensor | None = None) -> None:
    """Plain torch scatter with the same checks as kv_write."""
    tables, positions, seq_ids, _, _ = _check_write(k_cache, v_cache, block_tables, positions, k, v, seq_ids)
    BS = k_cache.shape[2]
    blk = tables[seq_ids.long(), positions.long() // BS].long()
    slot = positions.long() % BS
    k_cache[blk, :, slot] = k
    v_cache[blk, :, slot] = v


__all__ = ["AttentionPlan", "make_plan", "paged_attention", "paged_attention_ref", "kv_write",
           "kv_write_ref"]
