"""Bi-level routing attention (BiFormer) on the block-sparse core.

Layout: q, k, v ``[B, N, H, D]`` contiguous (N = n1 n2 tokens in row-major order; a 1-D input is
a 1 x T image). Region r = (s1, s2) is the box ``[s1 r1, (s1+1) r1) x [s2 r2, (s2+1) r2)`` of the
padded grid; slot l in [0, RT = r1 r2) of region r is the position (s1 r1 + l // r2, s2 r2 + l % r2),
a real token when inside (n1, n2). Tokens are read where they lie (row offsets computed per slot,
int64), never copied into a region-major or gathered layout. A walk step divides nothing: a
region's corner token (and, for a padded layout, its real rows and columns) comes from a small
per-geometry table (``region_table``), and the positions of the next tile follow from the last
by carries (``_walk_next``); the divisions by the region sizes happen once per program. This cut
a step's instructions by 9-61% at BiFormer's head dim 32, where the index arithmetic had
outweighed the softmax (static SASS counts, sm_90: bench/README.md).

Routing (``route_regions``, steps 2-3 of the reference) in two launches where the reference's
torch ops take seven (BiFormer's small stages pay routing in host time per op): ``_pool_kernel``,
one program per (band of region rows, group of 16 region columns, 64 channels, batch),
reads its tokens in row-major runs and adds each run to its regions by one dot with a 0/1
membership matrix (reads q and k once: 2 B N H D itemsize bytes) into fp32 means;
``_select_kernel``, one program per (16 query regions, batch x routing head), computes their
affinities to all R key regions (fp32 dots: 2 B H D R^2 FLOPs in all) and picks the topk largest
by topk rounds of a row max, ties to the lower index, as the reference's stable sort does. The
sums run in another order than torch's, so a near tie can resolve the other way (the tests
compare the chosen affinities in float64).

Walks (``idx`` = the routing ``[B, HR, R, topk]``, HR = 1 shared / H per head):
* forward / dQ (``_route_q_kernel``): one program per (query tile, batch x head); a query tile is
  BM consecutive slots of one region (the whole region when it is small). It walks the packed KV
  positions p in [0, topk RT): position p is slot ``p % RT`` of region ``idx[r, p // RT]``, BN
  positions per tile, so small regions (BiFormer's late stages: 4 tokens) are packed several to a
  KV tile and tl.dot sees full-width tiles. Padded keys are masked (-inf); when the sizes divide,
  only positions past the walk's end are (tested on the position itself, so the walk's carries
  are not recomputed in the scores' register layout).
* dK / dV (``_route_kv_kernel``): one program per (KV tile of one region r', batch x head); it
  walks the inverse routing, the list of query regions that routed to r' (built once per call
  by ``inverse_routing``: one small kernel, a prefix-sum compaction, deterministic, no atomics),
  packed the same way: position p is query slot ``p % RT`` of the ``p // RT``-th query region of
  the list. Padded queries read lse = +inf (P = 0); padded keys are not stored.

Work per program (head dim D, BD = pow2(D)): the forward visits ceil(topk RT / BN) KV tiles of BN
keys for each query tile of BM queries: 4 BM BN BD FLOPs and 2 BN D itemsize bytes of K/V per
visit; dQ 6 BM BN BD per visit, dK/dV 8 BM BN BD per (KV tile, query tile of the inverse list).
Useful FLOPs of the whole op: 4 B H Nq_real Nk_routed D forward (Nk_routed = real keys of the
routed regions), 2.5x that for the backward.
"""

from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..autotune import bench_launch, spaces
from ..reference import routing as _ref
from .block_sparse import (LOG2E, Family, block_sparse_attention, bwd_delta_buffer, dkdv_update, load_rows, precision,
                           q_walk_init, q_walk_step, q_walk_store, register_family)
from .common import cdiv, dtype_key, empty, pow2, wide

__all__ = ["ROUTING", "routing_attention", "region_means", "route_regions", "inverse_routing", "route_fwd", "route_bwd",
           "region_class", "compile_specs"]


@triton.jit
def _split_slots(l, R2):
    """In-box (row, column) of region slots l (division: once per program, not per walk step)."""
    return l // R2, l % R2


@triton.jit
def _walk_start(BN: tl.constexpr, RT, R2):
    """The first tile of a packed walk, positions p = 0 .. BN-1, as (list entry a, slot row lr, slot
    column lc) with p = a RT + lr R2 + lc."""
    p = tl.arange(0, BN)
    lr, lc = _split_slots(p % RT, R2)
    return p // RT, lr, lc


@triton.jit
def _walk_next(a, lr, lc, BN: tl.constexpr, R1, R2, RT):
    """The next tile of a packed walk: positions advanced by BN with carries (BN = da RT + dr R2 + dc,
    dr < R1, dc < R2), no division per position."""
    da = BN // RT
    dr, dc = _split_slots(BN % RT, R2)
    lc += dc
    cc = lc >= R2
    lc = tl.where(cc, lc - R2, lc)
    lr += dr + cc.to(tl.int32)
    cr = lr >= R1
    lr = tl.where(cr, lr - R1, lr)
    return a + da + cr.to(tl.int32), lr, lc


@triton.jit
def _region_rows(TAB, reg, lr, lc, ok, n2, PADDED: tl.constexpr):
    """Flat tokens and validity of slots (lr, lc) of regions ``reg`` (tensors of one shape; ``ok``:
    the entries that exist). Reads the region table (``region_table``): the box's corner token and,
    when the layout is padded, its real rows and columns."""
    row = TAB + reg * 3
    tok = tl.load(row, mask=ok, other=0) + lr * n2 + lc
    if PADDED:
        ok = ok & (lr < tl.load(row + 1, mask=ok, other=0)) & (lc < tl.load(row + 2, mask=ok, other=0))
    return tok, ok


@triton.jit
def _region_tile(TAB, reg, t, BT: tl.constexpr, R2, RT, n2, PADDED: tl.constexpr):
    """Flat tokens and validity of tile t (BT consecutive slots) of region ``reg``: the program's
    own tile, divided once."""
    l = t * BT + tl.arange(0, BT)
    lr, lc = _split_slots(l, R2)
    return _region_rows(TAB, reg + 0 * l, lr, lc, l < RT, n2, PADDED)  # reg broadcast to the slots


@triton.jit
def _rows_of(tok, WIDE: tl.constexpr):
    """Tokens as the type of a walk's row offsets from its (batch, head) base: int32 (cheaper
    address arithmetic: ~10% of a step's instructions) unless the offsets may reach 2^31."""
    if WIDE:  # one return: the compiler rejects a function whose returns differ in type
        tok = tok.to(tl.int64)
    return tok


@triton.jit
def _route_q_kernel(
    Q, K, V, O, LSE, DO, DELTA, DQ, IDX, TAB,
    ntok, n2, R1, R2, RT, H, TOPK, idx_sb, idx_sh, nqt, qk_scale, scale,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BWD: tl.constexpr,
    PREC: tl.constexpr, PADDED: tl.constexpr, WIDE: tl.constexpr = False,
):
    """Forward (BWD=False: writes O, LSE) or dQ (BWD=True: writes DQ) of one query tile. The walk's
    row offsets from the (batch, head) base are int32 unless WIDE (N H D >= 2^31)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    reg = pid // nqt
    t = pid % nqt
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    bh = b.to(tl.int64) * ntok * H + h  # lse row of token 0 of this (batch, head); x D: its q/k/v row

    tok, q_ok = _region_tile(TAB, reg, t, BM, R2, RT, n2, PADDED)
    stat_rows = bh + tok.to(tl.int64) * H
    q_rows = stat_rows * D
    # a query that saw no key (every routed region padding) has lse = -inf: q_walk_init gives it P = 0
    q, do, lse, delta, acc, m_i, l_i = q_walk_init(Q, O, DO, LSE, DELTA, q_rows, stat_rows, q_ok, offs_d, d_ok,
                                                   scale, BM, BD, BWD)

    idx_row = IDX + b.to(tl.int64) * idx_sb + h * idx_sh + reg * TOPK
    a, lr, lc = _walk_start(BN, RT, R2)
    total = TOPK * RT
    for p0 in range(0, total, BN):
        a_ok = a < TOPK
        kreg = tl.load(idx_row + a, mask=a_ok, other=0)
        ktok, k_ok = _region_rows(TAB, kreg, lr, lc, a_ok, n2, PADDED)
        k_rows = _rows_of(ktok, WIDE) * (H * D)
        kt = load_rows(K + bh * D, k_rows, k_ok, offs_d, d_ok)
        vt = load_rows(V + bh * D, k_rows, k_ok, offs_d, d_ok)
        sc = tl.dot(q, tl.trans(kt), input_precision=PREC)
        if PADDED:
            sc = tl.where(k_ok[None, :], sc, float("-inf"))
        elif p0 + BN > total:  # only the walk's last tile, tested on the position alone (testing the
            # carried values would recompute the walk's carries in the scores' register layout)
            sc = tl.where((p0 + tl.arange(0, BN) < total)[None, :], sc, float("-inf"))
        acc, m_i, l_i = q_walk_step(acc, m_i, l_i, sc, qk_scale, lse, do, kt, vt, delta, PREC, BWD)
        a, lr, lc = _walk_next(a, lr, lc, BN, R1, R2, RT)
    q_walk_store(O, LSE, DQ, q_rows, stat_rows, q_ok, offs_d, d_ok, acc, m_i, l_i, BWD)


@triton.jit
def _route_kv_kernel(
    Q, K, V, LSE, DO, DELTA, DK, DV, INV_CNT, INV_IDX, TAB,
    ntok, n2, R1, R2, RT, H, inv_sb, inv_sh, R, nkt, qk_scale, scale,
    D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PREC: tl.constexpr,
    PADDED: tl.constexpr, WIDE: tl.constexpr = False,
):
    """dK, dV of one KV tile (BN slots of one region) over the query regions routed to it (walk
    offsets int32 unless WIDE, as in ``_route_q_kernel``)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    kreg = pid // nkt
    t = pid % nkt
    offs_d = tl.arange(0, BD)
    d_ok = offs_d < D
    bh = b.to(tl.int64) * ntok * H + h

    ktok, k_ok = _region_tile(TAB, kreg, t, BN, R2, RT, n2, PADDED)
    k_rows = (bh + ktok.to(tl.int64) * H) * D
    k = load_rows(K, k_rows, k_ok, offs_d, d_ok)
    v = load_rows(V, k_rows, k_ok, offs_d, d_ok)
    key = b.to(tl.int64) * inv_sb + h * inv_sh + kreg
    inv_row = INV_IDX + key * R
    cnt = tl.load(INV_CNT + key)
    total = cnt * RT

    dk = tl.zeros([BN, BD], dtype=tl.float32)
    dv = tl.zeros([BN, BD], dtype=tl.float32)
    a, lr, lc = _walk_start(BM, RT, R2)
    for p0 in range(0, total, BM):
        a_ok = a < cnt
        qreg = tl.load(inv_row + a, mask=a_ok, other=0)
        qtok, q_ok = _region_rows(TAB, qreg, lr, lc, a_ok, n2, PADDED)
        stat_rows = _rows_of(qtok, WIDE) * H  # from bh
        qt = load_rows(Q + bh * D, stat_rows * D, q_ok, offs_d, d_ok)
        dot_ = load_rows(DO + bh * D, stat_rows * D, q_ok, offs_d, d_ok)
        lse = tl.load(LSE + bh + stat_rows, mask=q_ok, other=float("inf"))  # padded queries: P = 0
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        delta = tl.load(DELTA + bh + stat_rows, mask=q_ok, other=0.0)
        # padded keys of this tile get garbage rows of P, but their dK/dV rows are never stored
        # and a row of dK/dV depends only on its own row of P: no key mask needed
        pt = tl.math.exp2(tl.dot(k, tl.trans(qt), input_precision=PREC) * qk_scale - lse[None, :])
        dk, dv = dkdv_update(dk, dv, pt, qt, dot_, v, delta, scale, PREC)
        a, lr, lc = _walk_next(a, lr, lc, BM, R1, R2, RT)
    tl.store(DK + k_rows[:, None] + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=k_ok[:, None] & d_ok[None, :])
    tl.store(DV + k_rows[:, None] + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=k_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------------------------
# routing tables


@triton.jit
def _inverse_kernel(IDX, CNT, INV, R, TOPK, BR: tl.constexpr, BT: tl.constexpr):
    """Key region r' of one (batch, routing head): the query regions whose routing row holds r',
    in increasing order, compacted with a prefix sum (no atomics: deterministic)."""
    key = tl.program_id(0)
    rk = key % R
    row0 = (key - rk).to(tl.int64) * TOPK  # first routing entry of this (batch, routing head)
    cols = tl.arange(0, BT)
    cnt = 0
    for r0 in range(0, R, BR):
        r = r0 + tl.arange(0, BR)
        ok = (r < R)[:, None] & (cols < TOPK)[None, :]
        ids = tl.load(IDX + row0 + r[:, None] * TOPK + cols[None, :], mask=ok, other=-1)
        hit = tl.max((ids == rk).to(tl.int32), axis=1)
        pos = cnt + tl.cumsum(hit, axis=0) - hit
        tl.store(INV + key.to(tl.int64) * R + pos, r, mask=hit > 0)
        cnt += tl.sum(hit, axis=0)
    tl.store(CNT + key, cnt)


@triton.jit
def _pool_kernel(Q, K, MEANS, ntok, n1, n2, S1, S2, R1, R2, G, HD, BT: tl.constexpr, BS: tl.constexpr,
                 BC: tl.constexpr, PREC: tl.constexpr):
    """Region sums of q and k (step 2) for one band of R1 image rows, one group of BS region
    columns (all of them when S2 <= BS), BC of the H D channels, one batch; writes the means,
    ``MEANS[b, r, 0 | 1, c]`` fp32, over the region's real tokens (0 for a region without). The
    group's real tokens are read in row-major runs of BT (a group spanning the width is one
    contiguous run, whatever the region size) and each run is added to its region columns by one
    ``tl.dot`` with a 0/1 membership matrix [BS, BT]: no region table, no lane idle on 4-token
    regions (one program per region left 28 of 32 rows masked there). A NaN / inf token makes the
    means of every region column of its run non-finite (0 x NaN in the dot), where the reference
    keeps it to its own region: that batch element's routing then differs, its output has NaN
    either way (known, not fixed: two more dots per step to count non-finite entries)."""
    band = tl.program_id(0) // G
    grp = tl.program_id(0) % G
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    b = tl.program_id(2)
    c_ok = c < HD
    # real rows of the band and columns of the group, 0 where padding only (unclamped, two negative
    # counts would make a positive loop bound past the image)
    rows = tl.maximum(tl.minimum(R1, n1 - band * R1), 0)
    col0 = grp * BS * R2
    width = tl.maximum(tl.minimum(BS * R2, n2 - col0), 0)
    first = (band * R1 * n2 + col0).to(tl.int64)  # the group's first token
    j = tl.arange(0, BS)
    sq = tl.zeros([BS, BC], dtype=tl.float32)
    sk = tl.zeros([BS, BC], dtype=tl.float32)
    base = b.to(tl.int64) * ntok * HD
    for i0 in range(0, rows * width, BT):
        i = i0 + tl.arange(0, BT)
        ok = i < rows * width
        col = i % width
        off = base + (first + (i // width) * n2 + col)[:, None] * HD + c[None, :]
        m = ok[:, None] & c_ok[None, :]
        xq = tl.load(Q + off, mask=m, other=0.0)
        xk = tl.load(K + off, mask=m, other=0.0)
        member = ((col // R2)[None, :] == j[:, None]) & ok[None, :]
        sq += tl.dot(member.to(xq.dtype), xq, input_precision=PREC)  # 0/1 weights: the sums, in fp32
        sk += tl.dot(member.to(xk.dtype), xk, input_precision=PREC)
    s2 = grp * BS + j
    cols = tl.maximum(tl.minimum(R2, n2 - s2 * R2), 0)
    cnt = tl.maximum(rows * cols, 1).to(tl.float32)
    out = MEANS + ((b * S1 + band) * S2 + s2).to(tl.int64)[:, None] * (2 * HD) + c[None, :]
    m = (s2 < S2)[:, None] & c_ok[None, :]
    tl.store(out, sq / cnt[:, None], mask=m)
    tl.store(out + HD, sk / cnt[:, None], mask=m)


@triton.jit
def _select_kernel(MEANS, IDX, R, HD, CH, HR, TOPK, BQ: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr):
    """Routing (step 3) of BQ query regions of one (batch, routing head): the affinity to every key
    region over the routing head's CH channels (all H D when shared: the sum over heads is one
    contraction), then the TOPK largest, largest first, ties to the lower index (torch's stable
    descending sort; NaN counts as the largest, as there): ``IDX[b, hr, r, :]`` int32."""
    rq = tl.program_id(0) * BQ + tl.arange(0, BQ)
    b = tl.program_id(1) // HR
    hr = tl.program_id(1) % HR
    rk = tl.arange(0, BK)
    base = MEANS + b.to(tl.int64) * R * (2 * HD) + hr * CH
    a = tl.zeros([BQ, BK], dtype=tl.float32)
    for c0 in range(0, CH, BC):
        c = c0 + tl.arange(0, BC)
        qm = tl.load(base + rq[:, None] * (2 * HD) + c[None, :], mask=(rq < R)[:, None] & (c < CH)[None, :],
                     other=0.0)
        km = tl.load(base + HD + rk[:, None] * (2 * HD) + c[None, :], mask=(rk < R)[:, None] & (c < CH)[None, :],
                     other=0.0)
        a += tl.dot(qm, tl.trans(km), input_precision="ieee")
    a = tl.where(a != a, float("inf"), a)
    col = rk[None, :] + tl.zeros([BQ, BK], dtype=tl.int32)
    taken = col >= R  # padding columns are never chosen; TOPK <= R leaves a real one each round
    out = IDX + ((b * HR + hr).to(tl.int64) * R + rq) * TOPK
    for t in range(0, TOPK):
        cur = tl.where(taken, float("-inf"), a)
        best = tl.max(cur, axis=1)
        j = tl.min(tl.where((cur == best[:, None]) & ~taken, col, BK), axis=1)
        tl.store(out + t, j, mask=rq < R)
        taken = taken | (col == j[:, None])


INVERSE_ENTRIES = 4096  # routing entries the inverse kernel holds per step (BR x BT)


def inverse_routing(idx: torch.Tensor, R: int, block_rows: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The transpose of a routing ``idx`` int32 ``[B, HR, R, topk]`` (no repeats in a row): for key
    region r' of (b, hr), i.e. ``j = (b HR + hr) R + r'``, the query regions that routed to it are
    ``inv[j, :cnt[j]]``, in increasing order. Returns (cnt int32 [B HR R], inv int32 [B HR R, R];
    entries past cnt are unset). One launch: at small sizes the op is bound by host time, which a
    sort-based CSR build in torch ops (~14 launches) dominated. ``block_rows``: routing rows per
    step (default: up to INVERSE_ENTRIES entries), a power of two; tests set it small to cross steps."""
    B, HR, _, topk = idx.shape
    n = B * HR * R
    cnt = torch.empty(n, dtype=torch.int32, device=idx.device)
    inv = torch.empty((n, R), dtype=torch.int32, device=idx.device)
    BT = pow2(topk)
    BR = block_rows or max(1, min(pow2(R), INVERSE_ENTRIES // BT))
    cfg = spaces.ROUTING_INVERSE.default(())
    _inverse_kernel[(n,)](idx, cnt, inv, R, topk, BR=BR, BT=BT, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return cnt, inv


POOL_TOKENS, POOL_CHANNELS, POOL_COLUMNS = 32, 64, 16  # pooling: a step's tokens, channels; region columns
# of a program (16: tl.dot's least M; wider groups would give a 1-D sequence fewer programs)
SELECT_ROWS, SELECT_CHANNELS = 16, 32  # query regions per select program, channels per affinity dot
SELECT_MAX_REGIONS = 256  # a select program holds [16, pow2(R)] affinities; above, torch's sort


def region_means(q: torch.Tensor, k: torch.Tensor, g: _ref.RegionGeometry) -> torch.Tensor:
    """Step 2 of the reference for q, k ``[B, *spatial, H, D]`` contiguous: fp32 ``[B, R, 2, H D]``,
    the mean of q (``[:, :, 0]``) and of k (``[:, :, 1]``) over each region's real tokens (0 for a
    region of padding only). One launch; reads q and k once (2 B N H D itemsize bytes)."""
    B, H, D = _dims(q)
    HD = H * D
    means = empty((B, g.R, 2, HD), torch.float32, q.device)
    G = cdiv(g.S2, POOL_COLUMNS)
    BC = min(POOL_CHANNELS, pow2(HD))  # HD >= 16
    cfg = spaces.ROUTING_POOL.default(())
    _pool_kernel[(g.S1 * G, cdiv(HD, BC), B)](
        q, k, means, g.N, g.n1, g.n2, g.S1, g.S2, g.r1, g.r2, G, HD, BT=POOL_TOKENS, BS=POOL_COLUMNS, BC=BC,
        PREC=precision(q.dtype, follow_torch=False), num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return means


def route_regions(q: torch.Tensor, k: torch.Tensor, g: _ref.RegionGeometry, topk: int,
                  per_head: bool = False) -> torch.Tensor:
    """Steps 2-3 of the reference (region means, affinity, stable top-k) for q, k ``[B, *spatial, H,
    D]`` contiguous (laid out as ``[B, N, H, D]``): int32 ``[B, HR, R, topk]`` (HR = H per head, else
    1). Two launches (pooling, then affinity and top-k) where the torch ops of ``reference.route``
    take seven: at BiFormer's small stages routing is paid in host time per op. The same choice as
    the reference up to rounding (fp32 sums in another order): a near tie may resolve the other
    way. More than SELECT_MAX_REGIONS regions: the reference's torch ops."""
    B, H, D = _dims(q)
    if pow2(g.R) > SELECT_MAX_REGIONS:
        idx = _ref.route(q.reshape(B, g.N, H, D), k.reshape(B, g.N, H, D), g, topk, per_head)
        return (idx if per_head else idx[:, None]).to(torch.int32).contiguous()
    HD, HR = H * D, (H if per_head else 1)
    means = region_means(q, k, g)
    idx = torch.empty((B, HR, g.R, topk), dtype=torch.int32, device=q.device)
    BK = pow2(g.R)
    cfg = spaces.ROUTING_SELECT.default((BK,))
    _select_kernel[(cdiv(g.R, SELECT_ROWS), B * HR)](
        means, idx, g.R, HD, D if per_head else HD, HR, topk, BQ=SELECT_ROWS, BK=BK, BC=SELECT_CHANNELS,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return idx


def region_class(RT: int) -> int:
    """The tuner bucket's region-size class: 16, 32 or 64 (= at least 64 tokens per region). The
    query tile of the forward / dQ and the KV tile of dK/dV hold one region's slots, so their size
    follows the region: a 4-token region gets 16-row tiles, not 64."""
    return min(64, max(16, pow2(RT)))


# ----------------------------------------------------------------------------------------------
# launchers


@functools.lru_cache(maxsize=64)
def region_table(g: _ref.RegionGeometry, device: torch.device) -> torch.Tensor:
    """int32 ``[R, 3]``: per region, the flat token of its box's corner and how many of its box rows
    and columns are real (fewer at a padded edge). The walks read a region's tokens from it instead
    of dividing region ids per position. Cached per geometry and device: no copy per call (and a
    call inside a CUDA graph capture, after the first, makes none)."""
    return torch.tensor(_ref.region_extents(g), dtype=torch.int32, device=device)


def _geom_args(g: _ref.RegionGeometry, device):
    """The geometry arguments of both kernels: TAB, ntok, n2, R1, R2, RT."""
    return (region_table(g, device), g.N, g.n2, g.r1, g.r2, g.RT)


def walk_class(topk: int, RT: int) -> int:
    """The tuner bucket's walk-length class, routed slots per query region (topk RT) as a power of
    two in [64, 512]: a walk of one or two KV tiles wants narrow tiles, a long one wide tiles (at
    64-token regions: 32-wide KV tiles for topk 1, 128-wide for BiFormer's 600x500 stage)."""
    return min(512, max(64, pow2(topk * RT)))


def _bucket(q, g, topk):
    return (dtype_key(q.dtype), q.shape[-1], region_class(g.RT), walk_class(topk, g.RT))


def _dims(q):
    """(B, H, D) of a ``[B, *spatial, H, D]`` tensor: the launchers take the caller's shape as is
    (contiguous, it is laid out as ``[B, N, H, D]``), so autograd records no reshapes around them."""
    return q.shape[0], q.shape[-2], q.shape[-1]


def _launch_q(cfg, g, scale, q, k, v, o, lse, do, delta, dq, idx, bwd):
    B, H, D = _dims(q)
    HR, topk = idx.shape[1], idx.shape[-1]
    BM = cfg.kw["BM"]
    nqt = cdiv(g.RT, BM)
    grid = (g.R * nqt, B * H)
    return _route_q_kernel[grid](
        q, k, v, o, lse, do, delta, dq, idx, *_geom_args(g, q.device), H, topk, HR * g.R * topk,
        (g.R * topk) if HR > 1 else 0, nqt, scale * LOG2E, scale,
        D=D, BD=pow2(D), BM=BM, BN=cfg.kw["BN"], BWD=bwd, PREC=precision(q.dtype), PADDED=g.padded, WIDE=wide(q),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def route_fwd(q, k, v, idx, g, scale):
    """q, k, v ``[B, *spatial, H, D]`` contiguous, idx int32 ``[B, HR, R, topk]`` -> (o in q's shape,
    lse ``[B, *spatial, H]`` fp32)."""
    o = empty(q.shape, q.dtype, q.device)
    lse = empty(q.shape[:-1], torch.float32, q.device)

    def launch(cfg):  # do / delta / dq are not read when bwd=False
        return _launch_q(cfg, g, scale, q, k, v, o, lse, q, lse, q, idx, bwd=False)

    cfg = spaces.ROUTING_FWD.choose(_bucket(q, g, idx.shape[-1]), q.device, lambda c: bench_launch(lambda: launch(c)))
    launch(cfg)
    return o, lse


def route_bwd(q, k, v, o, lse, do, idx, g, scale):
    B, H, D = _dims(q)
    HR = idx.shape[1]
    delta = bwd_delta_buffer(lse)
    dq = empty(q.shape, q.dtype, q.device)
    dk = empty(k.shape, k.dtype, k.device)
    dv = empty(v.shape, v.dtype, v.device)
    cnt, inv = inverse_routing(idx, g.R)
    bucket = _bucket(q, g, idx.shape[-1])

    def launch_dq(cfg):
        return _launch_q(cfg, g, scale, q, k, v, o, lse, do, delta, dq, idx, bwd=True)

    def launch_dkdv(cfg):
        BN = cfg.kw["BN"]
        nkt = cdiv(g.RT, BN)
        return _route_kv_kernel[(g.R * nkt, B * H)](
            q, k, v, lse, do, delta, dk, dv, cnt, inv, *_geom_args(g, q.device), H, HR * g.R, g.R if HR > 1 else 0,
            g.R, nkt, scale * LOG2E, scale, D=D, BD=pow2(D), BM=cfg.kw["BM"], BN=BN, PREC=precision(q.dtype),
            PADDED=g.padded, WIDE=wide(q), num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cfg = spaces.ROUTING_BWD_DQ.choose(bucket, q.device, lambda c: bench_launch(lambda: launch_dq(c)))
    launch_dq(cfg)
    cfg = spaces.ROUTING_BWD_DKDV.choose(bucket, q.device, lambda c: bench_launch(lambda: launch_dkdv(c)))
    launch_dkdv(cfg)
    return dq, dk, dv


ROUTING = register_family(Family(
    "routing", route_fwd, route_bwd,
    encode=lambda idx, g, scale: ([idx], list(g), scale),
    decode=lambda tables, ints, scale: (tables[0], _ref.RegionGeometry(*ints), scale),
    lse_shape=lambda q, ints: q.shape[:-1]))


@torch.library.custom_op("subquad::route_regions", mutates_args=())
def _route_op(q: torch.Tensor, k: torch.Tensor, geometry: List[int], topk: int, per_head: bool) -> torch.Tensor:
    """``route_regions`` as a custom op: what torch.compile sees of it (see ``block_sparse``)."""
    return route_regions(q, k, _ref.RegionGeometry(*geometry), topk, per_head)


@_route_op.register_fake
def _route_fake(q, k, geometry, topk, per_head):
    R = _ref.RegionGeometry(*geometry).R
    return q.new_empty((q.shape[0], q.shape[-2] if per_head else 1, R, topk), dtype=torch.int32)


def routing_attention(q, k, v, num_regions: Sequence[int], topk: int, scale: float, routing):
    """The Triton path of ``subquad.bilevel_routing_attention`` on validated inputs: routing by
    ``route_regions`` (or the caller's), then the kernels. Returns (o in q's shape, the routing:
    int32 ``[B, R, topk]`` shared / ``[B, H, R, topk]`` per head, or the caller's tensor)."""
    g = _ref.region_geometry(tuple(q.shape[1:-2]), num_regions)
    q, k, v = (x.contiguous() for x in (q, k, v))  # no copy (and no autograd node) when they are
    if isinstance(routing, str):
        if torch.compiler.is_compiling():  # routing is not differentiable: the op sees no autograd
            idx = _route_op(q.detach(), k.detach(), list(g), topk, routing == "per_head")
        else:
            idx = route_regions(q, k, g, topk, routing == "per_head")
        out_idx = idx if routing == "per_head" else idx[:, 0]
    else:
        out_idx = routing
        idx = (routing if routing.dim() == 4 else routing[:, None]).to(torch.int32).contiguous()
    return block_sparse_attention(q, k, v, ROUTING, idx, g, scale), out_idx


def compile_specs(dtype: str, K: int, V: int):
    """Static compile check entries (see ``subquad.autotune.check``) for head dim K (= V), every
    region-size class: (tuner, jit function, signature, constexprs(cfg), buckets, units(cfg)); units:
    the integer arguments a launch often passes as 1 (a sequence's one region row, topk 1 as in
    BiFormer's first stage, one head), which Triton's launcher turns into constants."""
    if K > 128:
        return
    tdt = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]
    x, f32, i32 = f"*{tdt}", "*fp32", "*i32"
    geo = {"TAB": i32, **{name: "i32" for name in ["ntok", "n2", "R1", "R2", "RT", "H"]}}
    prec = precision(getattr(torch, dtype))
    buckets = [(dtype, K, c, 64) for c in (16, 32, 64)]  # the walk class does not change the candidates
    q_sig = dict(Q=x, K=x, V=x, O=x, LSE=f32, DO=x, DELTA=f32, DQ=x, IDX=i32, **geo, TOPK="i32", idx_sb="i32",
                 idx_sh="i32", nqt="i32", qk_scale="fp32", scale="fp32")
    for tuner, bwd in ((spaces.ROUTING_FWD, False), (spaces.ROUTING_BWD_DQ, True)):
        yield (tuner, _route_q_kernel, q_sig,
               lambda c, bwd=bwd: dict(D=K, BD=pow2(K), BM=c.kw["BM"], BN=c.kw["BN"], BWD=bwd, PREC=prec,
                                       PADDED=True), buckets, lambda c: ["R1", "TOPK", "H"])
    kv_sig = dict(Q=x, K=x, V=x, LSE=f32, DO=x, DELTA=f32, DK=x, DV=x, INV_CNT=i32, INV_IDX=i32, **geo,
                  inv_sb="i32", inv_sh="i32", R="i32", nkt="i32", qk_scale="fp32", scale="fp32")
    yield (spaces.ROUTING_BWD_DKDV, _route_kv_kernel, kv_sig,
           lambda c: dict(D=K, BD=pow2(K), BM=c.kw["BM"], BN=c.kw["BN"], PREC=prec, PADDED=True), buckets,
           lambda c: ["R1", "H"])
    # the inverse routing at its largest step (BR x BT = INVERSE_ENTRIES); independent of the head dim
    inv_sig = dict(IDX=i32, CNT=i32, INV=i32, R="i32", TOPK="i32")
    yield (spaces.ROUTING_INVERSE, _inverse_kernel, inv_sig, lambda c: dict(BR=INVERSE_ENTRIES // 16, BT=16), [()],
           lambda c: ["TOPK"])
    # routing: pooling (padded, the heavier variant) and the select kernel at its widest block
    pool_sig = dict(Q=x, K=x, MEANS=f32,
                    **{name: "i32" for name in ["ntok", "n1", "n2", "S1", "S2", "R1", "R2", "G", "HD"]})
    yield (spaces.ROUTING_POOL, _pool_kernel, pool_sig,
           lambda c: dict(BT=POOL_TOKENS, BS=POOL_COLUMNS, BC=POOL_CHANNELS, PREC=precision(getattr(torch, dtype),
                                                                                          follow_torch=False)),
           [()], lambda c: ["n1", "S1", "R1", "G"])
    sel_sig = dict(MEANS=f32, IDX=i32, **{name: "i32" for name in ["R", "HD", "CH", "HR", "TOPK"]})
    yield (spaces.ROUTING_SELECT, _select_kernel, sel_sig,
           lambda c: dict(BQ=SELECT_ROWS, BK=c.kw["BKMAX"], BC=SELECT_CHANNELS), [(64,), (SELECT_MAX_REGIONS,)],
           lambda c: ["HR", "TOPK"])
