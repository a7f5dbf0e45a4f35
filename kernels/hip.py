"""HiP attention in Triton: the mask estimation (tree search, ``hip_select_blocks``, the last section
of this file) and the sparse attention on the block-sparse core: forward, dQ, dK/dV, decoding.

What is computed (the contract with ``subquad.hip``'s selection, see ``reference/hip.py``): for a
query block qb of ``block_size_q`` (bsq) queries, with ``off = Tk - Tq``, ``p_first = off + qb bsq``
and query i at ``p_i = off + i``, let ``L = max(0, p_first - window + 1)`` (start of the local
region) and ``E = p_first - window + 1`` (end of the search range). Query i attends, under one
softmax with ``scale``, to

* the sinks ``[0, min(sink_tokens, L))`` (the part of the sinks not inside the local region),
* the tokens ``sink_tokens + j bk + t`` (t < bk) of every selected key block j of its (batch, head,
  query block) row of ``blocks`` (ascending, -1 padded at the end) that lie below E,
* its local region ``[L, p_i]``.

These three sets are disjoint (selected tokens lie in ``[sink_tokens, E)`` and E <= L), so every
key is counted once, and all lie at or before ``p_first <= p_i`` except the local region's
diagonal part, which is the only place a causal element mask is needed.

Kernels (each a Triton program; ``tl.dot`` for every matrix product; fp32 accumulation):

* ``_hip_q_kernel`` (forward, or dQ with ``BWD``): one program per (query tile of BM rows inside
  one query block, query head). It walks (1) the *gathered list*: the sink tokens followed by the
  tokens of the selected blocks, BN positions per KV tile, each position's row found from the
  ``blocks`` table (``BN / bk`` key blocks per tile, so 2-token blocks still fill 64-wide tensor
  core tiles); the list length is ``min(S, L) + n_sel bk`` with ``n_sel = min(Kb, ceil((E - S) /
  bk))``, so trailing -1 padding costs no tile; the only mask is a column mask (-1 entries, the
  partial last block, positions past the list), shared by every row since all these keys precede
  the block; then (2) the local region ``[L, p_last]`` as contiguous tiles, with the causal mask
  only on tiles that reach past the tile's first query. Grid ``(tiles x GROUP, B x H_kv)`` with
  the GROUP query heads of a KV head adjacent in launch order, so they run together and share
  the sink and local-region K/V loads through L2 (their selected blocks differ).
* ``_hip_dkdv_gather_kernel``: the backward of the gathered list, mirroring the forward per
  (query tile, head): per KV tile it recomputes P from lse, forms that tile's dK and dV
  contributions with ``dkdv_update`` and adds them into fp32 buffers with ``tl.atomic_add``
  (relaxed). Why atomics: a 2-token key block is selected by an arbitrary set of query blocks,
  so a KV-tile-centric walk of the transposed selection would run a 64-key tile for every
  selecting query block while only ~bk of its keys are selected (up to BN / bk = 32x the useful
  work for scattered selections); the gathered walk does exactly the forward's work. Cost:
  2 x BN x D fp32 atomics per visited tile, and dK/dV of the sinks and of the selected blocks
  are summed in a run-dependent order (bitwise non-deterministic in the last bits; the local
  part is deterministic).
* ``_hip_dkdv_local_kernel``: per (KV tile of BN contiguous keys, KV head): the local regions in
  closed form (the query rows whose local region meets the tile form one contiguous range, found
  by arithmetic since L and p are monotone in the row), summed over the GROUP query heads in the
  program (deterministic, no atomics); it adds the gathered part from the fp32 buffers and
  writes dK, dV in the input dtype.

Decoding (Tq of 1 to a few queries, Tk up to 1M, a reused ``blocks``): the same forward kernel;
its work and memory are ``sink_tokens + Kb bk + window + Tq`` keys per (query, head), nothing
proportional to Tk (no Tk-sized allocation or pass; -1 padding and the search-range end are
handled in the kernel). Split-K (flash-decoding style), because one program per (query tile,
head) leaves the GPU idle: at the issue's decoding shape (B=1, H=32, defaults; the decoding
bucket's default tile BN=64, 16 query rows, 4 warps) that is 32 programs on 132 SMs, each walking
ceil(528 / 64) + ceil(257 / 64) = 14 KV tiles back to back (~1 us of load latency each, ~15 us)
while the whole K/V to read is ~3.4 MB (~1-2 us of HBM time at 3 TB/s). For Tq <= 16,
``num_splits`` cuts each program's walk (gathered tiles, then local tiles, as one sequence) into
up to ceil(SMs / programs) runs of >= 2 tiles (5 here: 160 programs of ~3 tiles); each run
writes its normalised o and lse (fp32 parts, ``nsplit x B x Tq x H x (D + 1)`` floats), and
``_hip_combine_kernel`` (one launch) merges them by their lse. The dQ / dK / dV kernels do not
split (the backward is a prefill-shaped problem).

Counts (D = head dim, per (query, head); n_g = gathered keys = min(S, L) + selected tokens,
n_l = local keys; bytes at itemsize s):

* forward: 4 D (n_g + n_l) FLOPs per query (QK^T, PV), executed in BM x BN tiles: per query tile
  ceil(n_g / BN) + ceil((window + BM) / BN) tile visits of 4 BM BN D; K/V traffic 2 BN D s per
  visit (sink / local visits shared by the GROUP heads through L2);
* dQ: 6 D (n_g + n_l) per query (QK^T, dO V^T, dS K), same visits;
* dK/dV gathered: 8 D n_g per query (QK^T, P^T dO, V dO^T, dS^T Q) + 2 BN D fp32 atomics (8 BN D
  bytes) per visit; dK/dV local: 8 D n_l per query plus the diagonal-tile waste, visits
  ceil((window + BN + bsq) / BM) query tiles per KV tile and query head.
At prefill T=128k with the defaults (topk 512, bk 2, S 16, window 256), n_g + n_l <= 784 keys
per query against T/2 = 64k on average for causal dense attention: 84x fewer FLOPs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..autotune import bench_launch, spaces
from ..reference import hip as _ref
from .block_sparse import (LOG2E, Family, block_sparse_attention, bwd_delta_buffer, dkdv_update, load_rows, precision,
                           q_walk_init, q_walk_step, q_walk_store, register_family)
from .common import POISON, cdiv, dtype_key, empty, next_pow2, pow2

__all__ = ["hip_sparse_attention", "hip_fwd", "hip_bwd", "hip_select_blocks", "select_meta",
           "compile_specs"]


@triton.jit
def _block_geometry(qb, Tq, Tk, bsq, S, W, bk, Kb):
    """Per query block: (p_first, local start L, search end E, sink end, gathered list length)."""
    p_first = Tk - Tq + qb * bsq
    E = p_first - W + 1
    L = tl.maximum(E, 0)
    sink_end = tl.minimum(S, L)
    n_sel = tl.where(E > S, tl.minimum(Kb, (E - S + bk - 1) // bk), 0)
    return p_first, L, E, sink_end, sink_end + n_sel * bk


@triton.jit
def _gathered(BLKROW, pos, sink_end, n_gather, S, E, bk):
    """Key token and validity of gathered-list positions ``pos``: sinks [0, sink_end) first, then
    the tokens of the selected blocks in slot order (``BLKROW`` points at this query block's row
    of the blocks table); -1 slots and tokens at or past the search end E are invalid."""
    is_sink = pos < sink_end
    u = tl.maximum(pos - sink_end, 0)
    slot = u // bk
    in_sel = (pos >= sink_end) & (pos < n_gather)
    j = tl.load(BLKROW + slot, mask=in_sel, other=-1)
    tok = tl.where(is_sink, pos, S + j * bk + (u - slot * bk))
    ok = is_sink | (in_sel & (j >= 0) & (tok < E))
    tok = tl.where(ok, tok, 0)
    return tok, ok


@triton.jit
def _q_tile(pid0, GROUP, RPB, bsq, Tq, BM: tl.constexpr):
    """Program axis 0 -> (query head within the group, query block, rows, row mask, first row, end)."""
    hh = pid0 % GROUP
    t = pid0 // GROUP
    qb = t // RPB
    row0 = qb * bsq + (t % RPB) * BM
    row_end = tl.minimum(qb * bsq + bsq, Tq)
    rows = row0 + tl.arange(0, BM)
    return hh, qb, rows, rows < row_end, row0, row_end


@triton.jit
def _kv_rows(kv_base, tok, Hkv, hk, skt, D: tl.constexpr, STRIDED: tl.constexpr):
    """Element offsets of KV positions ``tok`` of KV head hk: kv_base = b Tk for a contiguous
    [B, Tk, H_kv, D] tensor, else (STRIDED, a cache read in place) b skb + hk skh with the strides
    in rows of D. The contiguous form is kept as it was: its compiled code does not change."""
    if STRIDED:
        rows = (kv_base + tok.to(tl.int64) * skt) * D
    else:
        rows = ((kv_base + tok) * Hkv + hk) * D
    return rows


@triton.jit
def _hip_q_kernel(
    Q, K, V, O, LSE, DO, DELTA, DQ, BLK, skb, skt, skh,
    Tq, Tk, H, GROUP, NQB, Kb, RPB, bsq, bk, S, W, qk_scale, scale, NSPLIT, n_stat,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BWD: tl.constexpr, PREC: tl.constexpr,
    SPLIT: tl.constexpr = False, KV_STRIDED: tl.constexpr = False,
):
    """Forward (BWD=False: writes O, LSE) or dQ (BWD=True: writes DQ) of one query tile of one head.
    SPLIT (forward only): program axis 0 also runs over NSPLIT parts of the tile walk (gathered
    tiles then local tiles, as one sequence cut into NSPLIT runs); each part writes its normalised
    o (fp32) and lse to part s of O [NSPLIT, n_stat, D] / LSE [NSPLIT, n_stat] for
    ``_hip_combine_kernel``. KV_STRIDED: K and V are read through the strides (batch, token, head)
    they share, ``skb, skt, skh``, in rows of D elements (``kv_in_place``); offsets stay multiples
    of D, so the compiler still vectorises the row loads."""
    pid_bk = tl.program_id(1)
    Hkv = H // GROUP
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    pid0 = tl.program_id(0)
    if SPLIT:
        part = pid0 % NSPLIT
        pid0 = pid0 // NSPLIT
    hh, qb, rows, q_ok, row0, row_end = _q_tile(pid0, GROUP, RPB, bsq, Tq, BM)
    if row0 >= row_end:
        return
    h = hk * GROUP + hh
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    p_first, L, E, sink_end, n_gather = _block_geometry(qb, Tq, Tk, bsq, S, W, bk, Kb)
    off = Tk - Tq
    p_lo = off + row0
    p_hi = off + row_end - 1
    p_q = off + rows
    g_lo = 0
    g_hi = n_gather
    l_lo = L
    l_hi = p_hi + 1
    if SPLIT:  # this part's run of the gathered tiles then the local tiles
        n_gt = (n_gather + BN - 1) // BN
        n_all = n_gt + (p_hi + 1 - L + BN - 1) // BN
        per = (n_all + NSPLIT - 1) // NSPLIT
        t_lo = tl.minimum(part * per, n_all)
        t_hi = tl.minimum(t_lo + per, n_all)
        g_lo = tl.minimum(t_lo, n_gt) * BN
        g_hi = tl.minimum(t_hi, n_gt) * BN
        l_lo = L + tl.maximum(t_lo - n_gt, 0) * BN
        l_hi = tl.minimum(L + tl.maximum(t_hi - n_gt, 0) * BN, p_hi + 1)

    stat_rows = (b.to(tl.int64) * Tq + rows) * H + h
    q_rows = stat_rows * D
    kv_base = b.to(tl.int64) * Tk
    if KV_STRIDED:
        kv_base = b.to(tl.int64) * skb + hk.to(tl.int64) * skh
    blkrow = BLK + ((b.to(tl.int64) * H + h) * NQB + qb) * Kb
    q, do, lse, delta, acc, m_i, l_i = q_walk_init(Q, O, DO, LSE, DELTA, q_rows, stat_rows, q_ok, offs_d, d_ok,
                                                   scale, BM, BD, BWD)

    # (1) sinks + selected blocks, gathered BN positions at a time; every key precedes the block
    for start in range(g_lo, g_hi, BN):
        tok, ok = _gathered(blkrow, start + tl.arange(0, BN), sink_end, n_gather, S, E, bk)
        k_rows = _kv_rows(kv_base, tok, Hkv, hk, skt, D, KV_STRIDED)
        kt = load_rows(K, k_rows, ok, offs_d, d_ok)
        vt = load_rows(V, k_rows, ok, offs_d, d_ok)
        sc = tl.dot(q, tl.trans(kt), input_precision=PREC)
        sc = tl.where(ok[None, :], sc, float("-inf"))
        acc, m_i, l_i = q_walk_step(acc, m_i, l_i, sc, qk_scale, lse, do, kt, vt, delta, PREC, BWD)

    # (2) the local region [L, p_hi], contiguous; causal mask only where a tile passes p_lo
    for start in range(l_lo, l_hi, BN):
        cols = start + tl.arange(0, BN)
        ok = cols <= p_hi
        k_rows = _kv_rows(kv_base, cols, Hkv, hk, skt, D, KV_STRIDED)
        kt = load_rows(K, k_rows, ok, offs_d, d_ok)
        vt = load_rows(V, k_rows, ok, offs_d, d_ok)
        sc = tl.dot(q, tl.trans(kt), input_precision=PREC)
        if start + BN - 1 > p_lo:
            sc = tl.where(cols[None, :] <= p_q[:, None], sc, float("-inf"))
        acc, m_i, l_i = q_walk_step(acc, m_i, l_i, sc, qk_scale, lse, do, kt, vt, delta, PREC, BWD)

    if SPLIT:  # forward only: part s of the partial outputs
        stat_rows += part.to(tl.int64) * n_stat
        q_rows = stat_rows * D
    q_walk_store(O, LSE, DQ, q_rows, stat_rows, q_ok, offs_d, d_ok, acc, m_i, l_i, BWD)


@triton.jit
def _hip_combine_kernel(OP, LP, O, LSE, n_stat, NSPLIT, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    """Split-K combine: BR (query, head) rows; o = sum_s 2^(lse_s - lse) o_s, lse = log2 sum_s 2^lse_s
    over the NSPLIT parts (parts that saw no key have lse_s = -inf)."""
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    r_ok = rows < n_stat
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    mask2 = r_ok[:, None] & d_ok[None, :]
    acc = tl.zeros([BR, BD], dtype=tl.float32)
    m = tl.full([BR], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BR], dtype=tl.float32)
    for s in range(0, NSPLIT):
        prow = s * n_stat + rows
        lse_s = tl.load(LP + prow, mask=r_ok, other=float("-inf"))
        o_s = tl.load(OP + prow[:, None] * D + offs_d[None, :], mask=mask2, other=0.0)
        m_new = tl.maximum(m, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m - m_safe)
        w = tl.math.exp2(lse_s - m_safe)
        l = l * alpha + w
        acc = acc * alpha[:, None] + w[:, None] * o_s
        m = m_new
    l_safe = tl.where(l == 0.0, 1.0, l)
    tl.store(O + rows[:, None] * D + offs_d[None, :], (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=mask2)
    tl.store(LSE + rows, tl.where(l == 0.0, float("-inf"), m + tl.math.log2(l_safe)), mask=r_ok)


@triton.jit
def _hip_dkdv_gather_kernel(
    Q, K, V, LSE, DO, DELTA, DK32, DV32, BLK,
    Tq, Tk, H, GROUP, NQB, Kb, RPB, bsq, bk, S, W, qk_scale, scale,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    """dK (scaled) and dV of the gathered list (sinks + selected blocks) of one query tile of one
    head, added into the fp32 buffers DK32 / DV32 [B, Tk, H_kv, D] with atomics."""
    pid_bk = tl.program_id(1)
    Hkv = H // GROUP
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    hh, qb, rows, q_ok, row0, row_end = _q_tile(tl.program_id(0), GROUP, RPB, bsq, Tq, BM)
    if row0 >= row_end:
        return
    h = hk * GROUP + hh
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    p_first, L, E, sink_end, n_gather = _block_geometry(qb, Tq, Tk, bsq, S, W, bk, Kb)

    stat_rows = (b.to(tl.int64) * Tq + rows) * H + h
    q_rows = stat_rows * D
    kv_base = b.to(tl.int64) * Tk
    blkrow = BLK + ((b.to(tl.int64) * H + h) * NQB + qb) * Kb
    q = load_rows(Q, q_rows, q_ok, offs_d, d_ok)
    do = load_rows(DO, q_rows, q_ok, offs_d, d_ok)
    lse = tl.load(LSE + stat_rows, mask=q_ok, other=float("inf"))  # invalid queries: P = 0
    delta = tl.load(DELTA + stat_rows, mask=q_ok, other=0.0)
    for start in range(0, n_gather, BN):
        tok, ok = _gathered(blkrow, start + tl.arange(0, BN), sink_end, n_gather, S, E, bk)
        k_rows = ((kv_base + tok) * Hkv + hk) * D
        kt = load_rows(K, k_rows, ok, offs_d, d_ok)
        vt = load_rows(V, k_rows, ok, offs_d, d_ok)
        pt = tl.math.exp2(tl.dot(kt, tl.trans(q), input_precision=PREC) * qk_scale - lse[None, :])
        pt = tl.where(ok[:, None], pt, 0.0)
        dk = tl.zeros([BN, BD], dtype=tl.float32)
        dv = tl.zeros([BN, BD], dtype=tl.float32)
        dk, dv = dkdv_update(dk, dv, pt, q, do, vt, delta, scale, PREC)
        ptrs = k_rows[:, None] + offs_d[None, :]
        mask2 = ok[:, None] & d_ok[None, :]
        tl.atomic_add(DK32 + ptrs, dk, mask=mask2, sem="relaxed")
        tl.atomic_add(DV32 + ptrs, dv, mask=mask2, sem="relaxed")


@triton.jit
def _hip_dkdv_local_kernel(
    Q, K, V, LSE, DO, DELTA, DK32, DV32, DK, DV,
    Tq, Tk, H, GROUP, bsq, W, qk_scale, scale,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
):
    """dK, dV of one KV tile (BN contiguous keys of one KV head): the local regions that meet it,
    over the GROUP query heads, plus the gathered part from DK32 / DV32; writes DK, DV."""
    pid_bk = tl.program_id(1)
    Hkv = H // GROUP
    b = pid_bk // Hkv
    hk = pid_bk % Hkv
    t0 = tl.program_id(0) * BN
    cols = t0 + tl.arange(0, BN)
    k_ok = cols < Tk
    t1 = tl.minimum(t0 + BN, Tk) - 1
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    off = Tk - Tq
    k_rows = ((b.to(tl.int64) * Tk + cols) * Hkv + hk) * D
    k = load_rows(K, k_rows, k_ok, offs_d, d_ok)
    v = load_rows(V, k_rows, k_ok, offs_d, d_ok)

    # query rows whose local region [L_r, p_r] meets [t0, t1]: p_r >= t0 and L_r <= t1 (monotone)
    row_lo = tl.maximum(t0 - off, 0)
    num = t1 + W - 1 - off
    qb_hi = tl.where(num >= 0, num // bsq, -1)
    row_hi = tl.minimum((qb_hi + 1) * bsq, Tq)  # exclusive
    j_lo = row_lo // BM
    j_hi = tl.where(row_hi > row_lo, (row_hi + BM - 1) // BM, j_lo)
    tile_full_k = t0 + BN <= Tk

    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BD], dtype=tl.float32)
    for hh in range(0, GROUP):
        h = hk * GROUP + hh
        for j in range(j_lo, j_hi):
            rows = j * BM + tl.arange(0, BM)
            q_ok = rows < Tq
            stat_rows = (b.to(tl.int64) * Tq + rows) * H + h
            qt = load_rows(Q, stat_rows * D, q_ok, offs_d, d_ok)
            dot_ = load_rows(DO, stat_rows * D, q_ok, offs_d, d_ok)
            lse = tl.load(LSE + stat_rows, mask=q_ok, other=float("inf"))
            delta = tl.load(DELTA + stat_rows, mask=q_ok, other=0.0)
            pt = tl.math.exp2(tl.dot(k, tl.trans(qt), input_precision=PREC) * qk_scale - lse[None, :])
            # full: every row valid, L of the last row <= t0, p of the first row >= t1, keys valid
            last = j * BM + BM - 1
            L_last = tl.maximum(off + (last // bsq) * bsq - W + 1, 0)
            full = (last < Tq) & (L_last <= t0) & (off + j * BM >= t1) & tile_full_k
            if not full:
                p_r = off + rows
                L_r = tl.maximum(off + (rows // bsq) * bsq - W + 1, 0)
                mask_t = (cols[:, None] >= L_r[None, :]) & (cols[:, None] <= p_r[None, :]) & k_ok[:, None]
                pt = tl.where(mask_t, pt, 0.0)
            dk, dv = dkdv_update(dk, dv, pt, qt, dot_, v, delta, scale, PREC)
    ptrs = k_rows[:, None] + offs_d[None, :]
    mask2 = k_ok[:, None] & d_ok[None, :]
    dk = dk + tl.load(DK32 + ptrs, mask=mask2, other=0.0)
    dv = dv + tl.load(DV32 + ptrs, mask=mask2, other=0.0)
    tl.store(DK + ptrs, dk.to(DK.dtype.element_ty), mask=mask2)
    tl.store(DV + ptrs, dv.to(DV.dtype.element_ty), mask=mask2)


# ----------------------------------------------------------------------------------------------
# launchers


def _bucket(q):
    """(dtype, head dim, decoding): decoding (Tq <= 16, one 16-row tile per head) is tuned apart
    from prefill, so a first decoding call does not pick the prefill kernels' tiles."""
    return (dtype_key(q.dtype), q.shape[-1], q.shape[1] <= 16)


def _q_grid(cfg, q, k, bsq):
    """(BM, RPB, grid) of the query-tile kernels: BM rows of one query block per program."""
    B, Tq, H = q.shape[0], q.shape[1], q.shape[2]
    Hkv = k.shape[2]
    nqb = cdiv(Tq, bsq)
    bm = min(cfg.kw["BM"], pow2(min(bsq, Tq)))
    rpb = cdiv(min(bsq, Tq), bm)
    return bm, rpb, (nqb * rpb * (H // Hkv), B * Hkv)


def _geom(q, k, blocks):
    """(Tq, Tk, H, GROUP, NQB, Kb)."""
    Tq, Tk, H = q.shape[1], k.shape[1], q.shape[2]
    return (Tq, Tk, H, H // k.shape[2], blocks.shape[2], blocks.shape[3])


_SM_COUNT = {}
DECODE_MAX_TQ = 16  # Tq up to this is decoding: its own tuning bucket, split-K when programs are few


def _sm_count(device) -> int:
    """Streaming multiprocessors of a CUDA device (cached); 132 (an H100) under the interpreter."""
    if device.type != "cuda":
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def num_splits(q, k, blocks, geom, bn: int, programs: int) -> int:
    """Split-K factor of the forward: 1 for prefill; for decoding (Tq <= DECODE_MAX_TQ) enough parts
    to give every SM a program (one wave), each part at least 2 KV tiles of the walk."""
    bsq, bk, S, W = geom
    Tq = q.shape[1]
    if Tq > DECODE_MAX_TQ:
        return 1
    tiles = cdiv(S + blocks.shape[3] * bk, bn) + cdiv(W + min(bsq, Tq), bn)
    return max(1, min(cdiv(_sm_count(q.device), programs), tiles // 2))


def kv_in_place(k, v):
    """(k, v) as the kernels read them (through ``row_strides``): in place when their channels are
    contiguous and they share strides that are multiples of D (a slice ``cache[:, :Tk]`` of a
    preallocated cache, a ``[B, H_kv, T, D]`` cache transposed, K/V sliced from a fused qkv
    projection), so that a decoding step does not copy the whole cache; else contiguous copies."""
    if not _rows_of_d(k) or v.stride() != k.stride():
        k, v = k.contiguous(), v.contiguous()
    return k, v


def _rows_of_d(x) -> bool:
    """x [B, T, H, D] has contiguous channels and its other strides are whole rows of D."""
    return x.stride(3) == 1 and all(s % x.shape[3] == 0 for s in x.stride()[:3])


def row_strides(x) -> tuple:
    """The (batch, token, head) strides of x [B, T, H, D] in rows of D elements (see _rows_of_d)."""
    return tuple(s // x.shape[3] for s in x.stride()[:3])


def _launch_q(cfg, q, k, v, o, lse, do, delta, dq, blocks, geom, scale, bwd, nsplit=1):
    """One launch of ``_hip_q_kernel`` (k, v from ``kv_in_place``); forward with nsplit > 1: o /
    lse are the fp32 part buffers [nsplit, B, Tq, H(, D)]."""
    bsq, bk, S, W = geom
    Tq, Tk, H, group, nqb, kb = _geom(q, k, blocks)
    bm, rpb, grid = _q_grid(cfg, q, k, bsq)
    D = q.shape[-1]
    n_stat = q.shape[0] * Tq * H
    return _hip_q_kernel[(grid[0] * nsplit, grid[1])](
        q, k, v, o, lse, do, delta, dq, blocks, *row_strides(k), Tq, Tk, H, group, nqb, kb, rpb, bsq, bk, S, W,
        scale * LOG2E, scale, nsplit, n_stat, D=D, BD=pow2(D), BM=bm, BN=cfg.kw["BN"], BWD=bwd,
        PREC=precision(q.dtype), SPLIT=nsplit > 1, KV_STRIDED=not k.is_contiguous(), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)


def hip_fwd(q, k, v, blocks, geom, scale):
    """q [B, Tq, H, D] and blocks int32 [B, H, NQB, Kb] contiguous, k/v [B, Tk, H_kv, D] (see
    ``kv_in_place``); geom = (block_size_q, block_size_k, sink_tokens, window) -> (o, lse [B, Tq, H]
    fp32, log2)."""
    k, v = kv_in_place(k, v)
    o = empty(q.shape, q.dtype, q.device)
    lse = empty(q.shape[:3], torch.float32, q.device)
    B, Tq, H, D = q.shape
    n_stat = B * Tq * H

    def launch(cfg):  # do / delta / dq are not read when bwd=False
        _, _, grid = _q_grid(cfg, q, k, geom[0])
        nsplit = num_splits(q, k, blocks, geom, cfg.kw["BN"], grid[0] * grid[1])
        if nsplit == 1:
            return _launch_q(cfg, q, k, v, o, lse, q, lse, q, blocks, geom, scale, bwd=False)
        op = empty((nsplit, B, Tq, H, D), torch.float32, q.device)
        lp = empty((nsplit, B, Tq, H), torch.float32, q.device)
        compiled = _launch_q(cfg, q, k, v, op, lp, q, lse, q, blocks, geom, scale, bwd=False, nsplit=nsplit)
        ccfg = spaces.HIP_COMBINE.default(_bucket(q))
        _hip_combine_kernel[(cdiv(n_stat, ccfg.kw["BR"]),)](
            op, lp, o, lse, n_stat, nsplit, D=D, BD=pow2(D), BR=ccfg.kw["BR"], num_warps=ccfg.num_warps,
            num_stages=ccfg.num_stages)
        return compiled

    cfg = spaces.HIP_FWD.choose(_bucket(q), q.device, lambda c: bench_launch(lambda: launch(c)))
    launch(cfg)
    return o, lse


def hip_bwd(q, k, v, o, lse, do, blocks, geom, scale):
    """(dq, dk, dv) for the saved forward; blocks held fixed. The dK/dV kernels index k, v and their
    gradients alike: they read contiguous copies of a strided cache."""
    k, v = k.contiguous(), v.contiguous()
    bsq, bk, S, W = geom
    Tq, Tk, H, group, nqb, kb = _geom(q, k, blocks)
    B, D, Hkv = q.shape[0], q.shape[-1], k.shape[2]
    delta = bwd_delta_buffer(lse)
    dq = empty(q.shape, q.dtype, q.device)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    bucket = _bucket(q)
    prec = precision(q.dtype)

    def launch_dq(cfg):
        return _launch_q(cfg, q, k, v, o, lse, do, delta, dq, blocks, geom, scale, bwd=True)

    cfg = spaces.HIP_BWD_DQ.choose(bucket, q.device, lambda c: bench_launch(lambda: launch_dq(c)))
    launch_dq(cfg)

    dk32 = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv32 = torch.zeros(v.shape, dtype=torch.float32, device=v.device)

    def launch_gather(cfg):
        dk32.zero_()
        dv32.zero_()
        bm, rpb, grid = _q_grid(cfg, q, k, bsq)
        return _hip_dkdv_gather_kernel[grid](
            q, k, v, lse, do, delta, dk32, dv32, blocks, Tq, Tk, H, group, nqb, kb, rpb, bsq, bk, S, W,
            scale * LOG2E, scale, D=D, BD=pow2(D), BM=bm, BN=cfg.kw["BN"], PREC=prec,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cfg = spaces.HIP_BWD_DKDV_GATHER.choose(bucket, q.device, lambda c: bench_launch(lambda: launch_gather(c)))
    launch_gather(cfg)

    def launch_local(cfg):
        bn = cfg.kw["BN"]
        return _hip_dkdv_local_kernel[(cdiv(Tk, bn), B * Hkv)](
            q, k, v, lse, do, delta, dk32, dv32, dk, dv, Tq, Tk, H, group, bsq, W, scale * LOG2E, scale,
            D=D, BD=pow2(D), BM=cfg.kw["BM"], BN=bn, PREC=prec, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cfg = spaces.HIP_BWD_DKDV_LOCAL.choose(bucket, q.device, lambda c: bench_launch(lambda: launch_local(c)))
    launch_local(cfg)
    return dq, dk, dv


def hip_sparse_attention(q, k, v, blocks, *, block_size_q, block_size_k, sink_tokens, window, scale=None):
    """HiP attention over a given selection, on the Triton kernels (differentiable in q, k, v).

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, H_kv, D]`` with ``H % H_kv == 0`` and ``Tq <= Tk``
            (query i sits at position ``Tk - Tq + i``); fp32 / fp16 / bf16; D in 16..256.
        blocks: int32 ``[B, H, ceil(Tq / block_size_q), Kb]``: per query block the selected key
            blocks j (tokens ``sink_tokens + j block_size_k + [0, block_size_k)``), ascending, -1
            padded at the end: ``reference.hip.canonical_blocks`` form (a repeat or a -1 before a
            block would be misread; see the module docstring for the exact key set).
        block_size_q, block_size_k: >= 1 (any value; query tiles are min(64, pow2) rows of one
            query block). sink_tokens, window: >= 0. scale: default ``D ** -0.5``.

    Inputs are checked by ``subquad.hip``; here only internal invariants are asserted.
    Returns o ``[B, Tq, H, D]`` in q's dtype.
    """
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    assert k.shape == v.shape and k.shape[0] == B and k.shape[3] == D and H % Hkv == 0 and Tq <= Tk
    assert blocks.dtype == torch.int32 and blocks.dim() == 4
    assert tuple(blocks.shape[:3]) == (B, H, cdiv(Tq, block_size_q)), (blocks.shape, Tq, block_size_q)
    assert block_size_q >= 1 and block_size_k >= 1 and sink_tokens >= 0 and window >= 0
    assert B * Hkv <= 65535, "batch x kv heads exceeds the grid limit"
    scale = D ** -0.5 if scale is None else float(scale)
    bsq, _, sink_tokens, window = _ref.clip_params(Tq, Tk, block_size_q=block_size_q, sink_tokens=sink_tokens,
                                                   window=window)  # the same keys, positions within int32
    geom = (int(bsq), int(block_size_k), int(sink_tokens), int(window))
    # k, v as they lie: the forward reads a strided cache in place (kv_in_place)
    return block_sparse_attention(q.contiguous(), k, v, HIP, blocks.contiguous(), geom, scale)


HIP = register_family(Family(
    "hip", hip_fwd, hip_bwd,
    encode=lambda blocks, geom, scale: ([blocks], list(geom), scale),
    decode=lambda tables, ints, scale: (tables[0], tuple(ints), scale),
    lse_shape=lambda q, ints: q.shape[:3]))


def compile_specs(dtype: str, K: int, V: int):
    """Static compile check entries (see ``subquad.autotune.check``): (tuner, jit function,
    signature, constexprs(cfg), buckets, units(cfg)) for the attention kernels and the selection kernel
    at head dim K; units: the integer arguments a launch often passes as 1 (a GQA group of one,
    a decoding step's single query), which Triton's launcher turns into constants."""
    tdt = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]
    x, f32 = f"*{tdt}", "*fp32"
    prec = precision(getattr(torch, dtype))
    buckets = [(dtype, K, False), (dtype, K, True)]
    q_ints = {n: "i32" for n in ["Tq", "Tk", "H", "GROUP", "NQB", "Kb", "RPB", "bsq", "bk", "S", "W"]}
    q_sig = dict(Q=x, K=x, V=x, O=x, LSE=f32, DO=x, DELTA=f32, DQ=x, BLK="*i32", skb="i32", skt="i32", skh="i32",
                 **q_ints, qk_scale="fp32", scale="fp32", NSPLIT="i32", n_stat="i32")
    yield (spaces.HIP_FWD, _hip_q_kernel, q_sig,
           lambda c: dict(D=K, BD=pow2(K), BM=c.kw["BM"], BN=c.kw["BN"], BWD=False, PREC=prec), buckets[:1],
           lambda c: ["GROUP"])
    yield (spaces.HIP_BWD_DQ, _hip_q_kernel, q_sig,
           lambda c: dict(D=K, BD=pow2(K), BM=c.kw["BM"], BN=c.kw["BN"], BWD=True, PREC=prec), buckets,
           lambda c: ["GROUP"])
    # decoding (Tq <= 16: BM is clamped to 16 rows): the split-K forward and its combine step
    split_sig = dict(q_sig, O=f32)
    yield (spaces.HIP_FWD, _hip_q_kernel, split_sig,
           lambda c: dict(D=K, BD=pow2(K), BM=16, BN=c.kw["BN"], BWD=False, PREC=prec, SPLIT=True),
           [(dtype, K, True)], lambda c: ["GROUP", "Tq"])
    # the same on a KV cache read in place (kv_in_place: a cache's slice, a head-major cache)
    yield (spaces.HIP_FWD, _hip_q_kernel, split_sig,
           lambda c: dict(D=K, BD=pow2(K), BM=16, BN=c.kw["BN"], BWD=False, PREC=prec, SPLIT=True, KV_STRIDED=True),
           [(dtype, K, True)], lambda c: ["GROUP", "Tq"])
    yield (spaces.HIP_COMBINE, _hip_combine_kernel, dict(OP=f32, LP=f32, O=x, LSE=f32, n_stat="i32", NSPLIT="i32"),
           lambda c: dict(D=K, BD=pow2(K), BR=c.kw["BR"]), [(dtype, K, True)])
    g_sig = dict(Q=x, K=x, V=x, LSE=f32, DO=x, DELTA=f32, DK32=f32, DV32=f32, BLK="*i32", **q_ints,
                 qk_scale="fp32", scale="fp32")
    yield (spaces.HIP_BWD_DKDV_GATHER, _hip_dkdv_gather_kernel, g_sig,
           lambda c: dict(D=K, BD=pow2(K), BM=c.kw["BM"], BN=c.kw["BN"], PREC=prec), buckets,
           lambda c: ["GROUP"])
    l_ints = {n: "i32" for n in ["Tq", "Tk", "H", "GROUP", "bsq", "W"]}
    l_sig = dict(Q=x, K=x, V=x, LSE=f32, DO=x, DELTA=f32, DK32=f32, DV32=f32, DK=x, DV=x, **l_ints,
                 qk_scale="fp32", scale="fp32")
    yield (spaces.HIP_BWD_DKDV_LOCAL, _hip_dkdv_local_kernel, l_sig,
           lambda c: dict(D=K, BD=pow2(K), BM=c.kw["BM"], BN=c.kw["BN"], PREC=prec), buckets,
           lambda c: ["GROUP"])
    yield from _select_compile_specs(dtype, K, V)


# ==============================================================================================
# Mask estimation (the tree search of step 2)
#
# HiP mask estimation in Triton: the tree search of ``subquad.reference.hip`` (step 2), one
# program per (query block, batch x query head), every iteration scored with ``tl.dot``.
#
# Per program (query block qb of batch b, query head h, kv head h // GROUP):
#
# * ``p_first = Tk - Tq + qb bq``, search range ``[S, E)`` with ``E = p_first - W + 1``,
#   ``NB = ceil(max(E - S, 0) / bk)`` key blocks, ``Kb = ceil(topk / bk)``. If ``NB <= Kb`` the row
#   is ``0 .. NB-1`` then -1s and the program ends.
# * Otherwise the strided queries (rows ``qb bq + t query_stride`` that exist, padded to NQS >= 16
#   rows) are loaded once ``[NQS, D]``. The kept nodes of the tree live in a per-program scratch
#   row as (start, end) pairs, in position order; round 0 holds the Kb initial groups
#   ``[floor(i NB / Kb), floor((i+1) NB / Kb))`` (int32 arithmetic without overflow). A round:
#   1. for chunks of CH kept nodes: both children of each (left = first ``floor(g/2)`` blocks,
#      right = the rest, only when the node has ``g >= 2`` blocks; a single block is its own
#      child), their representative blocks ``start + floor(size/2)``, the ``2 CH x BK`` tokens
#      gathered as one key tile ``[NR = 2 CH BK, D]`` -> ``tl.dot`` with the strided queries -> max
#      over the queries and over each block's tokens -> per child the fp32 score mapped to an
#      order-preserving integer in ``[0, 2^32)`` (invalid children -1), stored with the child's
#      (start, end) at position ``2 node + side``, i.e. in position order;
#   2. the Kb-th largest score ``thr`` is found exactly by a radix search, 4 bits a step (8 steps
#      of 16 candidate counts over the 2 KBP children); kept = score > thr, plus the first (lowest
#      start) children with score == thr up to Kb in all (the reference's tie rule); a prefix sum
#      compacts them, still in position order, into the kept-node row.
#   Rounds: ``ceil(log2(ceil(NB / Kb)))`` (then every kept node is a single block, and the row is
#   already sorted); the Kb starts are written.
# * Scratch rows live in global memory (L2), one per program of a launch; the steps are separated
#   by ``tl.debug_barrier`` (a CTA barrier, which orders the program's own global stores before its
#   loads) and scratch loads bypass L1 (``.cg``). Launches cover at most ``SCRATCH_BYTES`` of
#   scratch (40 KBP bytes a program); longer inputs run in several waves of query blocks.
# * fp32 inputs: IEEE dots run on FMA units; the scores are summed over 16-column slices of D
#   (``DC``) so the operands stay in registers (one [NQS, BD] x [BD, NR] FMA dot spills kilobytes).
# * Counts of boolean masks are summed in fp32 (exact): LLVM turns an integer sum of an i1 tensor
#   into a bit-packed popcount that goes through local memory (a stack frame in the compile check).
#
# Exactness: fp32 inputs use IEEE dots, so a score differs from the reference's torch matmul only
# by summation order (a few ulps); the selection is identical unless two children's scores are that
# close (a near-tie flips). Integer-valued inputs make every dot exact: the tests use them to
# check the selection and the tie rule exactly. -0.0 is mapped to +0.0 (torch ranks them equal).
#
# Counts per program and round (D = head dim, s = itemsize): ``2 KBP BK`` gathered keys (padded;
# useful ``<= 2 Kb bk``): ``2 NQS D x 2 KBP BK`` FLOPs of ``tl.dot`` (useful
# ``2 ceil(bq / query_stride) D x 2 Kb bk``), ``2 KBP BK D s`` bytes of K, ``40 KBP`` bytes of
# scratch traffic, ``8 x 16 x 2 KBP`` integer compares for the threshold. At the defaults (topk 512,
# bk 2, bq 64, stride 2: Kb = KBP = 256, NQS = 32) and D = 128, fp16: 8.4 MFLOP and 256 KiB of
# gathered K per round; rounds = ceil(log2(NB / 256)), 8 for the last query blocks at T = 128k,
# so about 67 MFLOP per (query block, head): 4.4 TFLOP for T = 128k, H = 32 (2048 query blocks).
#
# Supported (checked in ``subquad.hip``): head dim 16..256, ``block_size_k <= 128``,
# ``ceil(block_size_q / query_stride) <= 128``, ``ceil(topk / block_size_k) <= 2048``; any
# block_size_q, query_stride, sink_tokens, window.

SCRATCH_BYTES = 64 << 20  # per launch; more query blocks run in further launches


@triton.jit
def _hip_select_kernel(
    Q, K, BLK, SEL, CS, CST, skb, skt, skh,
    Tq, Tk, H, GROUP, NQB, Kb, bq, bk, qstride, S, W, qb0,
    D: tl.constexpr, BD: tl.constexpr, NQS: tl.constexpr, BK: tl.constexpr, KBP: tl.constexpr,
    CH: tl.constexpr, DC: tl.constexpr, PREC: tl.constexpr, KV_STRIDED: tl.constexpr = False,
):
    """Selection row of query block ``qb0 + program_id(0)`` for (batch, head) ``program_id(1)``; K
    contiguous, or (KV_STRIDED) read through its strides ``skb, skt, skh`` in rows of D elements."""
    NR: tl.constexpr = 2 * CH * BK
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    qb = qb0 + pid_q
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    Hkv = H // GROUP
    p_first = Tk - Tq + qb * bq
    E = p_first - W + 1
    NB = (tl.maximum(E - S, 0) + bk - 1) // bk
    lane = tl.arange(0, KBP)
    out_row = BLK + (pid_bh.to(tl.int64) * NQB + qb) * Kb
    if NB <= Kb:
        tl.store(out_row + lane, tl.where(lane < NB, lane, -1), mask=lane < Kb)
    else:
        slot = pid_q.to(tl.int64) * tl.num_programs(1) + pid_bh
        sel_row = SEL + slot * (2 * KBP)  # kept nodes: starts [KBP], ends [KBP]
        cs_row = CS + slot * (2 * KBP)  # children's scores (order-preserving ints)
        cst_row = CST + slot * (4 * KBP)  # children: starts [2 KBP], ends [2 KBP]
        offs_d = tl.arange(0, BD)
        d_ok = offs_d < D
        t = tl.arange(0, NQS)
        qi = qb * bq + t * qstride
        q_ok = (t * qstride < bq) & (qi < Tq)
        q_rows = ((b.to(tl.int64) * Tq + qi) * H + h) * D
        if DC == BD:
            q = load_rows(Q, q_rows, q_ok, offs_d, d_ok)  # [NQS, BD], held for the whole search
        k_head = b.to(tl.int64) * Tk * Hkv + hk
        k_tstride = Hkv
        if KV_STRIDED:
            k_head = b.to(tl.int64) * skb + hk.to(tl.int64) * skh
            k_tstride = skt
        # rounds until every kept node is one block: ceil(log2(ceil(NB / Kb)))
        gmax = (NB + Kb - 1) // Kb
        rounds = gmax * 0
        for _ in range(0, 31):
            rounds += ((1 << rounds) < gmax).to(tl.int32)
        # round 0: the initial groups [floor(i NB / Kb), floor((i+1) NB / Kb)), in int32 without
        # overflow: floor(i NB / Kb) = i (NB div Kb) + floor(i (NB mod Kb) / Kb)
        nq = NB // Kb
        nr = NB % Kb
        tl.store(sel_row + lane, lane * nq + (lane * nr) // Kb, mask=lane < Kb)
        tl.store(sel_row + KBP + lane, (lane + 1) * nq + ((lane + 1) * nr) // Kb, mask=lane < Kb)
        cc = tl.arange(0, 2 * CH)  # children of a chunk: (node c0 + cc % CH, side cc // CH)
        side = cc // CH  # 0: left child, 1: right child
        u = tl.arange(0, BK)  # token within the representative block
        c2 = tl.arange(0, 2 * KBP)
        dig = tl.arange(0, 16).to(tl.int64)
        for _ in range(0, rounds):
            tl.debug_barrier()
            for c0 in range(0, KBP, CH):
                cnode = c0 + cc % CH
                n_ok = cnode < Kb
                gs = tl.load(sel_row + cnode, mask=n_ok, other=0, cache_modifier=".cg")
                sz = tl.load(sel_row + KBP + cnode, mask=n_ok, other=1, cache_modifier=".cg") - gs
                half = sz // 2
                split = sz >= 2
                cstart = tl.where(side == 0, gs, gs + half)
                csize = tl.where(side == 0, tl.where(split, half, sz), sz - half)
                cvalid = n_ok & ((side == 0) | split)
                tok2 = S + (cstart + csize // 2)[:, None] * bk + u[None, :]  # [2 CH, BK]
                ok2 = cvalid[:, None] & (u[None, :] < bk) & (tok2 < E)
                tok = tl.reshape(tl.where(ok2, tok2, -1), (NR,))  # (a reshaped bool goes through local memory)
                k_ok = tok >= 0
                k_rows = (k_head + tok.to(tl.int64) * k_tstride) * D
                if DC == BD:
                    kt = load_rows(K, k_rows, k_ok, offs_d, d_ok)  # [NR, BD]
                    sc = tl.dot(q, tl.trans(kt), input_precision=PREC)  # [NQS, NR]
                else:  # fp32 (FMA dots): DC columns at a time keeps the operands in registers
                    sc = tl.zeros([NQS, NR], dtype=tl.float32)
                    for d0 in tl.static_range(0, BD, DC):
                        offs_c = d0 + tl.arange(0, DC)
                        c_ok = offs_c < D
                        qc = load_rows(Q, q_rows, q_ok, offs_c, c_ok)
                        kc = load_rows(K, k_rows, k_ok, offs_c, c_ok)
                        sc += tl.dot(qc, tl.trans(kc), input_precision=PREC)
                sc = tl.where(q_ok[:, None], sc, float("-inf"))
                m = tl.where(k_ok, tl.max(sc, 0), float("-inf"))
                score = tl.max(tl.reshape(m, (2 * CH, BK)), 1)  # [2 CH] per child
                score = tl.where(score == 0.0, 0.0, score)  # -0.0 -> +0.0
                bits = score.to(tl.int32, bitcast=True)
                ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32, monotone in the float value
                uo = tl.where(cvalid, ordered.to(tl.int64) + 2147483648, -1)  # [0, 2^32); invalid -1
                # children in position order: (node, side) -> 2 node + side
                tl.store(cs_row + 2 * cnode + cc // CH, uo, mask=cnode < KBP)
                tl.store(cst_row + 2 * cnode + cc // CH, cstart, mask=cnode < KBP)
                tl.store(cst_row + 2 * KBP + 2 * cnode + cc // CH, cstart + csize, mask=cnode < KBP)
            tl.debug_barrier()
            uo = tl.load(cs_row + c2, cache_modifier=".cg")  # [2 KBP] in position order
            # thr = the Kb-th largest score, 4 bits at a time (counts are monotone in the digit)
            thr = tl.zeros([], tl.int64)
            for step in range(0, 8):
                cand = thr + (dig << (28 - 4 * step))  # [16]
                # counted in fp32 (exact up to 2^24): LLVM turns an integer sum of an i1 tensor into a
                # bit-packed popcount that goes through local memory
                cnt = tl.sum(tl.where(uo[None, :] >= cand[:, None], 1.0, 0.0), 1)
                thr += tl.max(tl.where(cnt >= Kb, dig, 0), 0) << (28 - 4 * step)
            # keep every score above thr and, among those equal to it, the lowest starts
            gt = uo > thr
            tie = uo == thr
            need = Kb - tl.sum(tl.where(gt, 1.0, 0.0), 0)  # counts in fp32, as above
            kept = gt | (tie & (tl.cumsum(tl.where(tie, 1.0, 0.0), 0) <= need))  # exactly Kb, position order
            pos = tl.cumsum(tl.where(kept, 1.0, 0.0), 0).to(tl.int32) - 1
            child_start = tl.load(cst_row + c2, cache_modifier=".cg")
            child_end = tl.load(cst_row + 2 * KBP + c2, cache_modifier=".cg")
            tl.debug_barrier()
            tl.store(sel_row + pos, child_start, mask=kept)
            tl.store(sel_row + KBP + pos, child_end, mask=kept)
        tl.debug_barrier()
        final = tl.load(sel_row + lane, mask=lane < Kb, other=0, cache_modifier=".cg")
        tl.store(out_row + lane, final, mask=lane < Kb)


# ----------------------------------------------------------------------------------------------
# launcher


def select_meta(D: int, topk: int, block_size_q: int, block_size_k: int, query_stride: int, NR: int,
                fp32: bool = False) -> dict:
    """The kernel's block constexprs for a problem and a config's keys-per-dot NR (fp32: the dots
    run on FMA units, DC = 16 columns at a time)."""
    kb = cdiv(topk, block_size_k)
    kbp = pow2(kb)
    bkp = next_pow2(block_size_k)
    ch = max(1, min(kbp, NR // (2 * bkp)))
    bd = pow2(D)
    return dict(D=D, BD=bd, NQS=pow2(cdiv(block_size_q, query_stride)), BK=bkp, KBP=kbp, CH=ch,
                DC=min(bd, 16) if fp32 else bd)


def _select_bucket(q, meta, nqb):
    """(dtype, D, KBP, BK, NQS, decoding): a single query block (decoding) runs few programs, each a
    long serial search, so it is tuned apart from prefill (wider dots may win there)."""
    return (str(q.dtype).replace("torch.", ""), q.shape[-1], meta["KBP"], meta["BK"], meta["NQS"], nqb == 1)


def hip_select_blocks(q, k, *, topk, block_size_q, block_size_k, query_stride, sink_tokens, window, scale=None):
    """The HiP selection on the GPU: ``blocks`` int32 ``[B, H, ceil(Tq / block_size_q), ceil(topk /
    block_size_k)]``, equal to ``subquad.reference.hip.select_blocks`` (see the module docstring for
    near-ties). q ``[B, Tq, H, D]``, k ``[B, Tk, H_kv, D]``; inputs are checked by ``subquad.hip``.
    ``scale`` does not enter the ranking."""
    del scale
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    # the same selection with every position and stride product within int32
    block_size_q, query_stride, sink_tokens, window = _ref.clip_params(
        Tq, Tk, block_size_q=block_size_q, query_stride=query_stride, sink_tokens=sink_tokens, window=window)
    q = q.contiguous()
    if not _rows_of_d(k):  # other layouts are read in place (see kv_in_place)
        k = k.contiguous()
    kb = cdiv(topk, block_size_k)
    nqb = cdiv(Tq, block_size_q)
    blocks = torch.empty((B, H, nqb, kb), dtype=torch.int32, device=q.device)
    if blocks.numel() == 0:  # an empty batch
        return blocks
    if POISON:
        blocks.fill_(-7)  # never a valid entry: an unwritten slot fails the comparison
    prec = precision(q.dtype, follow_torch=False)
    meta0 = select_meta(D, topk, block_size_q, block_size_k, query_stride, 128)
    per_slot = 40 * meta0["KBP"]  # int32 [2, KBP] + int64 [2 KBP] + int32 [2, 2 KBP]
    wave = max(1, min(nqb, SCRATCH_BYTES // (per_slot * B * H)))
    sel = torch.empty(wave * B * H * 2 * meta0["KBP"], dtype=torch.int32, device=q.device)
    cs = torch.empty(wave * B * H * 2 * meta0["KBP"], dtype=torch.int64, device=q.device)
    cst = torch.empty(wave * B * H * 4 * meta0["KBP"], dtype=torch.int32, device=q.device)

    def launch(cfg, qb0=0, n=None):
        meta = select_meta(D, topk, block_size_q, block_size_k, query_stride, cfg.kw["NR"], q.dtype == torch.float32)
        n = min(wave, nqb - qb0) if n is None else n
        return _hip_select_kernel[(n, B * H)](
            q, k, blocks, sel, cs, cst, *row_strides(k), Tq, Tk, H, H // Hkv, nqb, kb, block_size_q, block_size_k,
            query_stride, sink_tokens, window, qb0, PREC=prec, **meta, KV_STRIDED=not k.is_contiguous(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cfg = spaces.HIP_SELECT.choose(_select_bucket(q, meta0, nqb), q.device,
                                   lambda c: bench_launch(lambda: launch(c, max(0, nqb - wave))))
    for qb0 in range(0, nqb, wave):
        launch(cfg, qb0)
    return blocks


@torch.library.custom_op("subquad::hip_select_blocks", mutates_args=())
def select_op(q: torch.Tensor, k: torch.Tensor, topk: int, block_size_q: int, block_size_k: int, query_stride: int,
              sink_tokens: int, window: int) -> torch.Tensor:
    """``hip_select_blocks`` as a custom op: what torch.compile sees of it (see ``block_sparse``)."""
    return hip_select_blocks(q, k, topk=topk, block_size_q=block_size_q, block_size_k=block_size_k,
                             query_stride=query_stride, sink_tokens=sink_tokens, window=window)


@select_op.register_fake
def _select_fake(q, k, topk, block_size_q, block_size_k, query_stride, sink_tokens, window):
    return q.new_empty((q.shape[0], q.shape[2], cdiv(q.shape[1], block_size_q), cdiv(topk, block_size_k)),
                       dtype=torch.int32)


def _select_compile_specs(dtype: str, K: int, V: int):
    """Static compile check entries (see ``subquad.autotune.check``): the selection kernel at the
    defaults (topk 512, block_size_k 2, query_stride 2) and head dim K, for prefill (block_size_q
    64) and for a decoding step (Tq = 1: block_size_q is clipped to Tq, so 16 strided query rows)."""
    tdt = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]
    x = f"*{tdt}"
    ints = {n: "i32" for n in ["Tq", "Tk", "H", "GROUP", "NQB", "Kb", "bq", "bk", "qstride", "S", "W", "qb0"]}
    sig = dict(Q=x, K=x, BLK="*i32", SEL="*i32", CS="*i64", CST="*i32", skb="i32", skt="i32", skh="i32", **ints)
    prec = precision(getattr(torch, dtype), follow_torch=False)
    for bq, decoding, strided in ((64, False, False), (1, True, False), (1, True, True)):  # strided: kv_in_place
        probe = select_meta(K, 512, bq, 2, 2, 128)
        yield (spaces.HIP_SELECT, _hip_select_kernel, sig,
               lambda c, bq=bq, strided=strided: dict(PREC=prec, KV_STRIDED=strided,
                                                      **select_meta(K, 512, bq, 2, 2, c.kw["NR"], dtype == "float32")),
               [(dtype, K, probe["KBP"], probe["BK"], probe["NQS"], decoding)])
