"""Neighborhood / generalized neighborhood attention (NATTEN semantics) on the block-sparse core.

Every layout is handled as 3-D ``[B, n0, n1, n2, H, D]`` (1-D and 2-D inputs get leading dims of
size 1, window 1). Tiles are boxes: a query tile is TQ0 x TQ1 x TQ2 positions and a KV tile
TK0 x TK1 x TK2 positions of one dilation group, so a tile's tokens are gathered by index
arithmetic from where they lie (no permuted copy, dilation included: in-group index i' maps to
i' d + g).

Walks (closed form, per dim, in-group coordinates; windows are monotone in the query index):
* forward / dQ: a query tile visits the KV tiles from the one holding the window start of its
  first query to the one holding the window end of its last query (a box of tiles);
* dK/dV: a KV tile is visited by the query tiles from the first query whose window ends after the
  tile's first key to the last query whose window starts at or before its last key (both found
  by binary search on the monotone window bounds); deterministic, no atomics. Grouped-query heads
  are summed inside the program.
A KV tile inside every window of the query tile (and inside the sequence) skips element masking.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from ..autotune import bench_launch, spaces
from .block_sparse import (LOG2E, Family, bwd_delta_buffer, dkdv_update, load_rows, precision, q_walk_init, q_walk_step,
                           q_walk_store, register_family)
from .common import aligned, cdiv, descriptor_scratch, dtype_key, empty, pow2, wide

__all__ = ["NEIGHBORHOOD", "na_fwd", "na_bwd", "tuner_bucket", "compile_specs"]


@triton.jit
def _window(i, n, k, s, causal):
    """In-group window [start, end) of in-group index i (scalar or tensor) along one dim of n."""
    lead = tl.minimum((i // s) * s + s // 2, n - 1)
    start_nc = tl.minimum(tl.maximum(lead - k // 2, 0), n - k)
    lead_c = tl.minimum((i // s) * s + s - 1, n - 1)
    start_c = tl.maximum(lead_c - k + 1, 0)
    start = tl.where(causal != 0, start_c, start_nc)
    end = tl.where(causal != 0, i + 1, start_nc + k)
    return start, end


@triton.jit
def _tile_span(t, TQ, n, k, s, causal):
    """Windows of the first and the last valid query of query tile t (TQ in-group indices) along
    one dim: (first start, first end, last start, last end). Windows are monotone in the query,
    so every query of the tile sees keys inside [first start, last end) and every one sees
    [last start, first end)."""
    f, e = _window(t * TQ, n, k, s, causal)
    ls, le = _window(tl.minimum(t * TQ + TQ, n) - 1, n, k, s, causal)
    return f, e, ls, le


@triton.jit
def _lower_bound(target, n, k, s, causal, nbits, USE_END: tl.constexpr):
    """Smallest i in [0, n] with end(i) > target (USE_END) or start(i) > target, by bisection
    (nbits >= bit length of n iterations)."""
    lo = n * 0
    hi = n
    for _ in range(0, nbits):
        active = lo < hi
        mid = (lo + hi) // 2
        st, en = _window(mid, n, k, s, causal)
        if USE_END:
            pred = en > target
        else:
            pred = st > target
        hi = tl.where(active & pred, mid, hi)
        lo = tl.where(active & (pred == 0), mid + 1, lo)
    return lo


@triton.jit
def _query_tiles(t, TK, TQ, n, k, s, causal, nbits):
    """Along one dim of n, the query tiles (TQ in-group queries each) that KV tile t (TK keys) meets:
    the ``cnt`` tiles from ``lo`` whose windows meet any of its keys [kf, kl], and the interval
    [full_lo, full_hi] (empty when full_lo > full_hi) of those whose every window holds all of
    them, so need no element mask. Windows are monotone in the query: four bisections per program
    (first end past kf, first start past kl; first end past kl, first start past kf), not windows
    per step. Returns (lo, cnt, full_lo, full_hi)."""
    kf = t * TK
    kl = tl.minimum(kf + TK, n) - 1
    lo = _lower_bound(kf, n, k, s, causal, nbits, True) // TQ
    cnt = tl.maximum((_lower_bound(kl, n, k, s, causal, nbits, False) - 1) // TQ - lo + 1, 0)
    i_e = _lower_bound(kl, n, k, s, causal, nbits, True)
    i_s = _lower_bound(kf, n, k, s, causal, nbits, False)
    return lo, cnt, (i_e + TQ - 1) // TQ, tl.where(i_s >= n, n, i_s // TQ - 1)


@triton.jit
def _split3(x, A1, A2):
    """Row-major index x over (., A1, A2) -> three coordinates."""
    return x // (A1 * A2), (x // A2) % A1, x % A2


@triton.jit
def _group(gidx, n0, n1, n2, d0, d1, d2):
    """Dilation group of program axis gidx: per dim its offset g and its length ceil((n - g) / d)."""
    g0, g1, g2 = _split3(gidx, d1, d2)
    return g0, g1, g2, (n0 - g0 + d0 - 1) // d0, (n1 - g1 + d1 - 1) // d1, (n2 - g2 + d2 - 1) // d2


@triton.jit
def _box_layout(T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, d0, d1, d2, n1, n2):
    """What every T0 x T1 x T2 box tile shares: each row's in-box coordinates (l0, l1, l2) and its
    token offset from the box's first token. Computed once per program, so a walk's tile costs one
    scalar token plus this offset, not a chain of per-row multiplies inside the loop."""
    r = tl.arange(0, T0 * T1 * T2)
    l0 = tl.zeros_like(r)  # a dim of one position per tile: a constant the compiler folds away
    l1 = tl.zeros_like(r)
    if T0 > 1:
        l0 = r // (T1 * T2)
    if T1 > 1:
        l1 = (r // T2) % T1
    l2 = r % T2
    return l0, l1, l2, ((l0 * d0) * n1 + l1 * d1) * n2 + l2 * d2


@triton.jit
def _box_at(t0, t1, t2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, l0, l1, l2, ng0, ng1, ng2,
            g0, g1, g2, d0, d1, d2, n1, n2):
    """Box tile (t0, t1, t2) of in-group positions: its first token (scalar) and which rows lie inside
    the group. A walk only visits tiles whose first position is inside, so a dim of one position
    per tile needs no per-row test."""
    first = ((t0 * T0 * d0 + g0) * n1 + (t1 * T1 * d1 + g1)) * n2 + (t2 * T2 * d2 + g2)
    ok = l2 < ng2 - t2 * T2
    if T1 > 1:
        ok = ok & (l1 < ng1 - t1 * T1)
    if T0 > 1:
        ok = ok & (l0 < ng0 - t0 * T0)
    return first, ok


@triton.jit
def _box(t0, t1, t2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, ng0, ng1, ng2, g0, g1, g2,
         d0, d1, d2, n1, n2):
    """Box tile (t0, t1, t2) of T0 x T1 x T2 in-group positions: coordinates, validity, flat token."""
    l0, l1, l2, rel = _box_layout(T0, T1, T2, d0, d1, d2, n1, n2)
    first, ok = _box_at(t0, t1, t2, T0, T1, T2, l0, l1, l2, ng0, ng1, ng2, g0, g1, g2, d0, d1, d2, n1, n2)
    return t0 * T0 + l0, t1 * T1 + l1, t2 * T2 + l2, ok, first + rel


@triton.jit
def _group_desc(P, first_row, heads, ng0, ng1, ng2, d0, d1, d2, n1, n2, D: tl.constexpr,
                T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, BD: tl.constexpr):
    """A TMA tensor descriptor over one dilation group of one (batch, head) of a ``[B, n0, n1, n2,
    heads, D]`` tensor: the strided ``[ng0, ng1, ng2, D]`` tensor whose element (0, 0, 0, 0) is at
    ``P + first_row``, in boxes of T0 x T1 x T2 positions (out-of-range rows read 0)."""
    row = heads * D  # elements between consecutive tokens
    return tl.make_tensor_descriptor(
        P + first_row, shape=[ng0, ng1, ng2, D],
        strides=[tl.cast(d0 * n1 * n2, tl.int64) * row, tl.cast(d1 * n2, tl.int64) * row, tl.cast(d2, tl.int64) * row,
                 1],
        block_shape=[T0, T1, T2, BD])


@triton.jit
def _load_box(desc, t0, t1, t2, T0: tl.constexpr, T1: tl.constexpr, T2: tl.constexpr, BD: tl.constexpr):
    """Box tile (t0, t1, t2) of a ``_group_desc`` descriptor as [T0 T1 T2, BD] rows."""
    return tl.reshape(desc.load([t0 * T0, t1 * T1, t2 * T2, 0]), [T0 * T1 * T2, BD])


@triton.jit
def _next_tile(t0, t1, t2, lo1, lo2, cnt1, cnt2):
    """The tile after (t0, t1, t2) in a walk over a box of tiles (row-major, from (., lo1, lo2),
    cnt1 x cnt2 per plane): carried from step to step instead of divided out of a flat counter."""
    t2 += 1
    w2 = t2 == lo2 + cnt2
    t2 = tl.where(w2, lo2, t2)
    t1 += w2.to(tl.int32)
    w1 = t1 == lo1 + cnt1
    t1 = tl.where(w1, lo1, t1)
    t0 += w1.to(tl.int32)
    return t0, t1, t2


@triton.jit
def _na_q_kernel(
    Q, K, V, O, LSE, DO, DELTA, DQ,
    n0, n1, n2, k0, k1, k2, s0, s1, s2, d0, d1, d2, c0, c1, c2,
    H, GROUP, nt1, nt2, qk_scale, scale,
    D: tl.constexpr, BD: tl.constexpr,
    TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
    TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
    BWD: tl.constexpr, PREC: tl.constexpr, TMA: tl.constexpr = False, WIDE: tl.constexpr = False,
):
    """Forward (BWD=False: writes O, LSE) or dQ (BWD=True: writes DQ) for one query tile. WIDE: a
    KV tile's row offsets in int64 (a batch element of K past 2**31 elements). TMA: K/V
    tiles through tensor descriptors (sm_90's TMA; a plain load elsewhere): the dilation group's
    keys of this batch and KV head as one strided [ng0, ng1, ng2, D] tensor, a KV tile one box of
    it, so no row offsets live in registers; out-of-range rows read 0 as on the pointer path."""
    BM: tl.constexpr = TQ0 * TQ1 * TQ2
    pid_t = tl.program_id(0)
    gidx = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    Hkv = H // GROUP
    g0, g1, g2, ng0, ng1, ng2 = _group(gidx, n0, n1, n2, d0, d1, d2)
    t0, t1, t2 = _split3(pid_t, nt1, nt2)
    if (t0 * TQ0 >= ng0) | (t1 * TQ1 >= ng1) | (t2 * TQ2 >= ng2):
        return  # this group is shorter than the longest one
    ntok = n0 * n1 * n2
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D

    # the query tile: coordinates, rows, windows
    qc0, qc1, qc2, q_ok, tok = _box(t0, t1, t2, TQ0, TQ1, TQ2, ng0, ng1, ng2, g0, g1, g2, d0, d1, d2, n1, n2)
    q_rows = ((b.to(tl.int64) * ntok + tok) * H + h) * D
    stat_rows = (b.to(tl.int64) * H + h) * ntok + tok  # lse / delta are head-major: [B, H, N]
    st0, en0 = _window(qc0, ng0, k0, s0, c0)
    st1, en1 = _window(qc1, ng1, k1, s1, c1)
    st2, en2 = _window(qc2, ng2, k2, s2, c2)
    # first / last valid query of the tile per dim (windows are monotone)
    f0, e0, ls0, le0 = _tile_span(t0, TQ0, ng0, k0, s0, c0)
    f1, e1, ls1, le1 = _tile_span(t1, TQ1, ng1, k1, s1, c1)
    f2, e2, ls2, le2 = _tile_span(t2, TQ2, ng2, k2, s2, c2)
    lo0 = f0 // TK0
    lo1 = f1 // TK1
    lo2 = f2 // TK2
    cnt0 = (le0 - 1) // TK0 - lo0 + 1
    cnt1 = (le1 - 1) // TK1 - lo1 + 1
    cnt2 = (le2 - 1) // TK2 - lo2 + 1

    q, do, lse, delta, acc, m_i, l_i = q_walk_init(Q, O, DO, LSE, DELTA, q_rows, stat_rows, q_ok, offs_d, d_ok,
                                                   scale, BM, BD, BWD)
    kl0, kl1, kl2, k_rel = _box_layout(TK0, TK1, TK2, d0, d1, d2, n1, n2)
    if WIDE:
        k_rel = k_rel.to(tl.int64)
    k_rel = k_rel * (Hkv * D)  # element offsets of a KV tile's rows from its first row
    kv_bh = (b.to(tl.int64) * ntok * Hkv + hk) * D
    if TMA:
        group0 = kv_bh + ((g0 * n1 + g1) * n2 + g2).to(tl.int64) * (Hkv * D)
        k_desc = _group_desc(K, group0, Hkv, ng0, ng1, ng2, d0, d1, d2, n1, n2, D, TK0, TK1, TK2, BD)
        v_desc = _group_desc(V, group0, Hkv, ng0, ng1, ng2, d0, d1, d2, n1, n2, D, TK0, TK1, TK2, BD)
    kt0 = lo0
    kt1 = lo1
    kt2 = lo2
    for _ in range(0, cnt0 * cnt1 * cnt2):
        if TMA:
            kt = _load_box(k_desc, kt0, kt1, kt2, TK0, TK1, TK2, BD)
            vt = _load_box(v_desc, kt0, kt1, kt2, TK0, TK1, TK2, BD)
        else:
            first, k_ok = _box_at(kt0, kt1, kt2, TK0, TK1, TK2, kl0, kl1, kl2, ng0, ng1, ng2, g0, g1, g2,
                                  d0, d1, d2, n1, n2)
            k_off = kv_bh + first.to(tl.int64) * (Hkv * D)
            kt = load_rows(K + k_off, k_rel, k_ok, offs_d, d_ok)
            vt = load_rows(V + k_off, k_rel, k_ok, offs_d, d_ok)
        sc = tl.dot(q, tl.trans(kt), input_precision=PREC)
        # element mask only on tiles not inside the sequence and every query's window
        full = ((ls0 <= kt0 * TK0) & (kt0 * TK0 + TK0 <= tl.minimum(e0, ng0))
                & (ls1 <= kt1 * TK1) & (kt1 * TK1 + TK1 <= tl.minimum(e1, ng1))
                & (ls2 <= kt2 * TK2) & (kt2 * TK2 + TK2 <= tl.minimum(e2, ng2)))
        if not full:  # (windows lie inside the group: a key inside one is a real key)
            kc0 = kt0 * TK0 + kl0
            kc1 = kt1 * TK1 + kl1
            kc2 = kt2 * TK2 + kl2
            mask = ((kc0[None, :] >= st0[:, None]) & (kc0[None, :] < en0[:, None])
                    & (kc1[None, :] >= st1[:, None]) & (kc1[None, :] < en1[:, None])
                    & (kc2[None, :] >= st2[:, None]) & (kc2[None, :] < en2[:, None]))
            sc = tl.where(mask, sc, float("-inf"))
        acc, m_i, l_i = q_walk_step(acc, m_i, l_i, sc, qk_scale, lse, do, kt, vt, delta, PREC, BWD)
        kt0, kt1, kt2 = _next_tile(kt0, kt1, kt2, lo1, lo2, cnt1, cnt2)
    q_walk_store(O, LSE, DQ, q_rows, stat_rows, q_ok, offs_d, d_ok, acc, m_i, l_i, BWD)


@triton.jit
def _na_kv_kernel(
    Q, K, V, LSE, DO, DELTA, DK, DV,
    n0, n1, n2, k0, k1, k2, s0, s1, s2, d0, d1, d2, c0, c1, c2,
    H, GROUP, nt1, nt2, nbits, qk_scale, scale,
    D: tl.constexpr, BD: tl.constexpr,
    TQ0: tl.constexpr, TQ1: tl.constexpr, TQ2: tl.constexpr,
    TK0: tl.constexpr, TK1: tl.constexpr, TK2: tl.constexpr,
    PREC: tl.constexpr, R: tl.constexpr,
):
    """dK, dV of one KV tile (of one KV head), over the query tiles and query heads that use it.
    R: the spatial rank (dims before the last R have one position: every tile is full there).
    (No TMA variant: with its unpipelined loop, loading q and dO through descriptors made the step
    longer in the static count, 471 -> 504 instructions at 1-D 32x32.)"""
    BN: tl.constexpr = TK0 * TK1 * TK2
    pid_t = tl.program_id(0)
    gidx = tl.program_id(1)
    pid_bh = tl.program_id(2)
    Hkv = H // GROUP
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    g0, g1, g2, ng0, ng1, ng2 = _group(gidx, n0, n1, n2, d0, d1, d2)
    t0, t1, t2 = _split3(pid_t, nt1, nt2)
    if (t0 * TK0 >= ng0) | (t1 * TK1 >= ng1) | (t2 * TK2 >= ng2):
        return
    ntok = n0 * n1 * n2
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D

    kc0, kc1, kc2, k_ok, ktok = _box(t0, t1, t2, TK0, TK1, TK2, ng0, ng1, ng2, g0, g1, g2, d0, d1, d2, n1, n2)
    k_rows = ((b.to(tl.int64) * ntok + ktok) * Hkv + hk) * D
    k = load_rows(K, k_rows, k_ok, offs_d, d_ok)
    v = load_rows(V, k_rows, k_ok, offs_d, d_ok)
    # per dim: the query tiles whose windows meet this KV tile, and those needing no element mask
    lo0, cnt0, fl0, fh0 = _query_tiles(t0, TK0, TQ0, ng0, k0, s0, c0, nbits)
    lo1, cnt1, fl1, fh1 = _query_tiles(t1, TK1, TQ1, ng1, k1, s1, c1, nbits)
    lo2, cnt2, fl2, fh2 = _query_tiles(t2, TK2, TQ2, ng2, k2, s2, c2, nbits)

    ql0, ql1, ql2, q_tok = _box_layout(TQ0, TQ1, TQ2, d0, d1, d2, n1, n2)
    # a query tile's rows from its first: tokens for lse / delta ([B, H, N]: contiguous in a run of
    # the tile, so a step loads them without per-element address arithmetic), x H D for q / dO
    q_rel = q_tok.to(tl.int64) * (H * D)
    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BD], dtype=tl.float32)
    for hh in range(0, GROUP):
        h = hk * GROUP + hh
        stat_bh = (b.to(tl.int64) * H + h) * ntok
        qt0 = lo0
        qt1 = lo1
        qt2 = lo2
        for _ in range(0, cnt0 * cnt1 * cnt2):
            first, q_ok = _box_at(qt0, qt1, qt2, TQ0, TQ1, TQ2, ql0, ql1, ql2, ng0, ng1, ng2, g0, g1, g2,
                                  d0, d1, d2, n1, n2)
            row0 = ((b.to(tl.int64) * ntok + first) * H + h) * D
            qt = load_rows(Q + row0, q_rel, q_ok, offs_d, d_ok)
            dot_ = load_rows(DO + row0, q_rel, q_ok, offs_d, d_ok)
            stat0 = stat_bh + first
            lse = tl.load(LSE + stat0 + q_tok, mask=q_ok, other=float("inf"))  # invalid queries: P = 0
            delta = tl.load(DELTA + stat0 + q_tok, mask=q_ok, other=0.0)
            pt = tl.math.exp2(tl.dot(k, tl.trans(qt), input_precision=PREC) * qk_scale - lse[None, :])
            full = (fl2 <= qt2) & (qt2 <= fh2)
            if R >= 2:
                full = full & (fl1 <= qt1) & (qt1 <= fh1)
            if R >= 3:
                full = full & (fl0 <= qt0) & (qt0 <= fh0)
            if not full:
                st0, en0 = _window(qt0 * TQ0 + ql0, ng0, k0, s0, c0)
                st1, en1 = _window(qt1 * TQ1 + ql1, ng1, k1, s1, c1)
                st2, en2 = _window(qt2 * TQ2 + ql2, ng2, k2, s2, c2)
                mask_t = ((kc0[:, None] >= st0[None, :]) & (kc0[:, None] < en0[None, :])
                          & (kc1[:, None] >= st1[None, :]) & (kc1[:, None] < en1[None, :])
                          & (kc2[:, None] >= st2[None, :]) & (kc2[:, None] < en2[None, :]))
                pt = tl.where(mask_t, pt, 0.0)
            dk, dv = dkdv_update(dk, dv, pt, qt, dot_, v, delta, scale, PREC)
            qt0, qt1, qt2 = _next_tile(qt0, qt1, qt2, lo1, lo2, cnt1, cnt2)
    tl.store(DK + k_rows[:, None] + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=k_ok[:, None] & d_ok[None, :])
    tl.store(DV + k_rows[:, None] + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=k_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# launchers


def _geom_args(geom):
    n, k, s, d, c = geom
    return (*n, *k, *s, *d, *(int(x) for x in c))


def _tile_kw(cfg):
    """The tile-shape constexprs (TQ0..TQ2, TK0..TK2) of a config."""
    return {f"T{p}{i}": cfg.kw[f"T{p}{i}"] for p in "QK" for i in range(3)}


def _tma(cfg) -> bool:
    """Whether a config loads its K/V tiles through TMA descriptors."""
    return bool(cfg.kw.get("TMA", 0))


def _grid(geom, cfg, prefix, rows):
    """(tiles of the longest dilation group, dilation groups, rows) and the tiles per dim."""
    n, _, _, d, _ = geom
    nt = [cdiv(cdiv(n[i], d[i]), cfg.kw[f"{prefix}{i}"]) for i in range(3)]
    return (nt[0] * nt[1] * nt[2], d[0] * d[1] * d[2], rows), nt


def tuner_bucket(dtype: torch.dtype, D: int, rank: int, stride) -> tuple:
    """The tuner's bucket: (dtype name or "tf32", head dim, rank, strided). A strided window (any stride > 1)
    visits mostly whole tiles, a stride-1 window many masked ones, and the best tiles differ: each
    class is tuned on its own first call, so one does not run the other's choice."""
    return (dtype_key(dtype), D, rank, any(x > 1 for x in stride))


def _bucket(q, geom, rank):
    return tuner_bucket(q.dtype, q.shape[-1], rank, geom[2])


def _launch_q(cfg, geom, scale, q, k, v, o, lse, do, delta, dq, bwd):
    """The forward (bwd=False: writes o, lse) or dQ (bwd=True: writes dq) launch of ``_na_q_kernel``."""
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    grid, nt = _grid(geom, cfg, "TQ", B * H)
    if _tma(cfg):
        descriptor_scratch()  # on-device descriptors need Triton's scratch allocator
    return _na_q_kernel[grid](
        q, k, v, o, lse, do, delta, dq, *_geom_args(geom), H, H // k.shape[-2], nt[1], nt[2], scale * LOG2E,
        scale, D=D, BD=pow2(D), **_tile_kw(cfg), BWD=bwd, PREC=precision(q.dtype), TMA=_tma(cfg), WIDE=wide(k),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def na_fwd(q, k, v, geom, rank, scale):
    """q [B, n0, n1, n2, H, D], k/v [B, n0, n1, n2, H_kv, D] contiguous -> (o, lse [B, H, N] fp32:
    head-major, so that a query tile's values are contiguous for dK/dV's per-step loads)."""
    k, v = aligned(k), aligned(v)  # the TMA configs' descriptors need a 16-byte aligned base
    n = geom[0]
    o = empty(q.shape, q.dtype, q.device)
    lse = empty((q.shape[0], q.shape[-2], n[0] * n[1] * n[2]), torch.float32, q.device)

    def launch(cfg):  # do / delta / dq are not read when bwd=False
        return _launch_q(cfg, geom, scale, q, k, v, o, lse, q, lse, q, bwd=False)

    cfg = spaces.NEIGHBORHOOD_FWD.choose(_bucket(q, geom, rank), q.device, lambda c: bench_launch(lambda: launch(c)))
    launch(cfg)
    return o, lse


def na_bwd(q, k, v, o, lse, do, geom, rank, scale):
    k, v = aligned(k), aligned(v)  # as in na_fwd (the dQ walk's TMA configs); dk, dv are fresh
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    Hkv = k.shape[-2]
    n = geom[0]
    delta = bwd_delta_buffer(lse)
    dq = empty(q.shape, q.dtype, q.device)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    bucket = _bucket(q, geom, rank)

    def launch_dq(cfg):
        return _launch_q(cfg, geom, scale, q, k, v, o, lse, do, delta, dq, bwd=True)

    def launch_dkdv(cfg):
        if cfg.kw["R"] != rank:  # its full-tile test skips the dims before the last R
            raise RuntimeError(f"subquad: dK/dV config {cfg.name()} does not fit a rank-{rank} input")
        grid, nt = _grid(geom, cfg, "TK", B * Hkv)
        return _na_kv_kernel[grid](
            q, k, v, lse, do, delta, dk, dv, *_geom_args(geom), H, H // Hkv, nt[1], nt[2], max(n).bit_length(),
            scale * LOG2E, scale, D=D, BD=pow2(D), **_tile_kw(cfg), PREC=precision(q.dtype), R=cfg.kw["R"],
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cfg = spaces.NEIGHBORHOOD_BWD_DQ.choose(bucket, q.device, lambda c: bench_launch(lambda: launch_dq(c)))
    launch_dq(cfg)
    cfg = spaces.NEIGHBORHOOD_BWD_DKDV.choose(bucket, q.device, lambda c: bench_launch(lambda: launch_dkdv(c)))
    launch_dkdv(cfg)
    return dq, dk, dv


def _encode(geom, rank, scale):
    n, k, s, d, c = geom
    return [], [*n, *k, *s, *d, *(int(x) for x in c), rank], scale  # 5 x 3 geometry values, the rank


def _decode(tables, ints, scale):
    n, k, s, d, c = (tuple(ints[i:i + 3]) for i in range(0, 15, 3))
    return (n, k, s, d, tuple(bool(x) for x in c)), ints[15], scale


NEIGHBORHOOD = register_family(Family(
    "neighborhood", na_fwd, na_bwd, _encode, _decode,
    lse_shape=lambda q, ints: (q.shape[0], q.shape[-2], ints[0] * ints[1] * ints[2])))


def compile_specs(dtype: str, K: int, V: int):
    """Static compile check entries (see ``subquad.autotune.check``) for head dim K (= V), every
    spatial rank: (tuner, jit function, signature, constexprs(cfg), buckets, units(cfg)); units: the
    integer arguments a typical launch of cfg passes as 1 (the dims its rank lacks, every dilation,
    the GQA group), which Triton's launcher turns into constants."""
    tdt = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]
    x, f32 = f"*{tdt}", "*fp32"
    ints = {name: "i32" for name in ["n0", "n1", "n2", "k0", "k1", "k2", "s0", "s1", "s2", "d0", "d1", "d2",
                                      "c0", "c1", "c2", "H", "GROUP", "nt1", "nt2"]}
    prec = precision(getattr(torch, dtype))
    buckets = [(dtype, K, rank, strided) for rank in (1, 2, 3) for strided in (False, True)]

    def units(c):
        return ["d0", "d1", "d2", "GROUP"] + [f"{p}{i}" for i in range(3 - c.kw["R"]) for p in "nksd"]

    q_sig = dict(Q=x, K=x, V=x, O=x, LSE=f32, DO=x, DELTA=f32, DQ=x, **ints, qk_scale="fp32", scale="fp32")
    for tuner, bwd in ((spaces.NEIGHBORHOOD_FWD, False), (spaces.NEIGHBORHOOD_BWD_DQ, True)):
        yield (tuner, _na_q_kernel, q_sig,
               lambda c, bwd=bwd: dict(D=K, BD=pow2(K), BWD=bwd, PREC=prec, TMA=_tma(c),
                                       **_tile_kw(c)), buckets, units)
    kv_sig = dict(Q=x, K=x, V=x, LSE=f32, DO=x, DELTA=f32, DK=x, DV=x, **ints, nbits="i32", qk_scale="fp32",
                  scale="fp32")
    yield (spaces.NEIGHBORHOOD_BWD_DKDV, _na_kv_kernel, kv_sig,
           lambda c: dict(D=K, BD=pow2(K), PREC=prec, R=c.kw["R"], **_tile_kw(c)), buckets, units)
