"""Neighborhood attention (NATTEN semantics, including GNA) in pure PyTorch: the executable spec
and the CPU path.

Layout: q ``[B, *spatial, H, D]``, k and v ``[B, *spatial, H_kv, D]`` with 1, 2 or 3 spatial
dims and ``H % H_kv == 0`` (grouped-query: query head ``h`` reads kv head ``h // (H // H_kv)``).
The output has q's shape (stride does not subsample).

Per spatial dim of length n, with window (kernel size) k, stride s, dilation d, causal flag c::

    dilation:  query i is in group g = i mod d, at in-group index i' = i div d; the group has
               n_g = ceil((n - g) / d) tokens. The rules below run inside the group with n_g for
               n, and in-group key j' maps back to j = j' d + g (keys of other groups: never).
    kL = floor(k/2), kR = floor(k/2) + (k mod 2) - 1        (even k: one more on the left)
    non-causal: leader L = min(floor(i'/s) s + floor(s/2), n_g - 1)
                start' = clamp(L - kL, 0, n_g - k); keys j' in [start', start' + k)
                (every query sees exactly k keys; at a border the window shifts inward; all the
                queries of a stride group share one window)
    causal:     leader L = min(floor(i'/s) s + s - 1, n_g - 1)
                keys j' in [max(L - k + 1, 0), i']   (truncated at the left border, ends at the
                query itself)

In 1-3 dims a key is attended iff it is attended in every dim (box neighborhoods). Every query
attends at least itself, so no softmax row is empty. Valid parameters (checked in
``subquad.neighborhood``): 2 <= k, 1 <= s <= k, 1 <= d, k d <= n per dim.

Building blocks the kernels and tests reuse (all vectorised over a tensor of indices, or plain
ints): ``dilation_group``, ``ingroup_window``, ``window_start_end``, ``window_table``,
``dim_mask``, ``neighborhood_mask``. Ops: ``neighborhood_attention_naive`` (dense masked
attention in float64, tests only) and ``neighborhood_attention`` (the CPU path: box query tiles
against the hull of their windows, O(N prod(k)) memory, differentiable by autograd).
``neighborhood_speedup_bound`` counts the KV tiles a block-sparse kernel visits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from .common import empty_output, gathered_chunks, rounded

Tensor = torch.Tensor
IntOrTensor = Union[int, Tensor]

__all__ = [
    "SpeedupBound",
    "default_tile_shape",
    "dilation_group",
    "dim_mask",
    "ingroup_window",
    "neighborhood_attention",
    "neighborhood_attention_naive",
    "neighborhood_mask",
    "neighborhood_speedup_bound",
    "normalize_per_dim",
    "query_tile_shape",
    "window_start_end",
    "window_table",
]


def normalize_per_dim(value, nd: int) -> Tuple:
    """An int/bool, or a sequence of one per dim -> a tuple of length ``nd`` (no validation)."""
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return (value,) * nd


# ---------------------------------------------------------------------------------------------
# Per-dim window rules
# ---------------------------------------------------------------------------------------------

def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


def _minimum(a, b):
    if _is_tensor(a) or _is_tensor(b):
        return torch.minimum(torch.as_tensor(a), torch.as_tensor(b))
    return min(a, b)


def _maximum(a, b):
    if _is_tensor(a) or _is_tensor(b):
        return torch.maximum(torch.as_tensor(a), torch.as_tensor(b))
    return max(a, b)


def dilation_group(i: IntOrTensor, n: int, d: int = 1):
    """``(g, i', n_g)``: dilation group ``i mod d``, in-group index ``i div d`` and the group's
    size ``ceil((n - g) / d)`` (a tensor where ``i`` is one)."""
    g = i % d
    ip = i // d
    ng = (n - g + d - 1) // d
    return g, ip, ng


def ingroup_window(ip: IntOrTensor, ng: IntOrTensor, k: int, s: int = 1, causal: bool = False):
    """In-group key range ``[start', end')`` of in-group query ``ip`` in a group of ``ng`` tokens.

    Non-causal: ``end' - start' == k`` always. Causal: ``end' == ip + 1`` and the range holds
    between 1 and k keys (fewer than k when truncated at the left border, or for a query before
    its stride group's leader).
    """
    if causal:
        leader = _minimum((ip // s) * s + s - 1, ng - 1)
        start = _maximum(leader - k + 1, 0)
        return start, ip + 1
    leader = _minimum((ip // s) * s + s // 2, ng - 1)
    start = _minimum(_maximum(leader - k // 2, 0), ng - k)
    return start, start + k


def window_start_end(i: IntOrTensor, n: int, k: int, s: int = 1, d: int = 1, causal: bool = False):
    """Keys of query ``i`` along one dim, in ORIGINAL coordinates: ``start, start + d, ...``, all
    ``< end``; i.e. ``range(start, end, d)``, with ``end = last key + 1`` (tight, ``<= n``).

    Vectorised over a tensor ``i`` (returns tensors) or plain ints (returns ints). The in-group
    range is ``[(start - g) / d, (end - 1 - g) / d + 1)`` with ``g = i mod d``; see
    ``ingroup_window`` and ``dilation_group`` for the two halves.
    """
    g, ip, ng = dilation_group(i, n, d)
    s0, e0 = ingroup_window(ip, ng, k, s, causal)
    return s0 * d + g, (e0 - 1) * d + g + 1


def window_table(n: int, k: int, s: int = 1, d: int = 1, causal: bool = False, device=None):
    """Fixed-width gather table along one dim: ``(idx [n, k] int64, valid [n, k] bool)``.

    Slot ``t`` of query ``i`` is key ``start + t d`` (always a valid index in ``[0, n)``); it is
    attended iff ``valid[i, t]``, which is all-true for a non-causal dim and marks the causal
    window's truncation otherwise (``t < number of keys``).
    """
    i = torch.arange(n, dtype=torch.int64, device=device)
    start, end = window_start_end(i, n, k, s, d, causal)
    t = torch.arange(k, dtype=torch.int64, device=device)
    idx = start[:, None] + t[None, :] * d
    count = (end - start + d - 1) // d
    valid = t[None, :] < count[:, None]
    # In-range by construction: non-causal start' + k <= n_g; causal start' + k - 1 <= leader < n_g.
    return idx, valid


def dim_mask(n: int, k: int, s: int = 1, d: int = 1, causal: bool = False, device=None) -> Tensor:
    """Bool ``[n, n]``: ``[i, j]`` is True iff query i attends key j along this dim."""
    i = torch.arange(n, dtype=torch.int64, device=device)
    start, end = window_start_end(i, n, k, s, d, causal)
    j = i[None, :]
    return (j >= start[:, None]) & (j < end[:, None]) & ((j - start[:, None]) % d == 0)


def neighborhood_mask(shape: Sequence[int], kernel_size, stride=1, dilation=1, is_causal=False,
                      device=None) -> Tensor:
    """The dense mask: bool ``[N, N]`` over row-major flattened positions (N = prod(shape)).

    ``[q, kv]`` is True iff the key is attended in every dim (box neighborhood).
    """
    shape = tuple(int(x) for x in shape)
    nd = len(shape)
    ks, ss, ds, cs = (normalize_per_dim(x, nd) for x in (kernel_size, stride, dilation, is_causal))
    mask = torch.ones(1, 1, dtype=torch.bool, device=device)
    for a in range(nd):
        m = dim_mask(shape[a], ks[a], ss[a], ds[a], bool(cs[a]), device=device)  # [n_a, n_a]
        P, K = mask.shape  # flattened [queries of dims < a, keys of dims < a]
        mask = (mask[:, None, :, None] & m[None, :, None, :]).reshape(P * shape[a], K * shape[a])
    return mask


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------

def _split(q: Tensor, k: Tensor):
    nd = q.dim() - 3
    B, spatial, H, D = q.shape[0], tuple(q.shape[1:1 + nd]), q.shape[-2], q.shape[-1]
    Hkv = k.shape[-2]
    return nd, B, spatial, H, Hkv, D


def neighborhood_attention_naive(q: Tensor, k: Tensor, v: Tensor, kernel_size, stride=1, dilation=1,
                                 is_causal=False, scale: Optional[float] = None) -> Tensor:
    """The definition: dense attention in float64 under ``neighborhood_mask`` (tests only,
    O(N^2) memory). Returns float64 ``[B, *spatial, H, D]``; differentiable."""
    nd, B, spatial, H, Hkv, D = _split(q, k)
    N = math.prod(spatial)
    scale = D ** -0.5 if scale is None else float(scale)
    G = H // Hkv
    mask = neighborhood_mask(spatial, kernel_size, stride, dilation, is_causal, device=q.device)
    qh = q.double().reshape(B, N, H, D).transpose(1, 2)                      # [B, H, N, D]
    kh = k.double().reshape(B, N, Hkv, D).transpose(1, 2).repeat_interleave(G, dim=1)
    vh = v.double().reshape(B, N, Hkv, v.shape[-1]).transpose(1, 2).repeat_interleave(G, dim=1)
    s = (qh @ kh.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    o = torch.softmax(s, dim=-1) @ vh
    return o.transpose(1, 2).reshape(B, *spatial, H, v.shape[-1])


def query_tile_shape(shape: Sequence[int], kernel_size, target: int = 32) -> Tuple[int, ...]:
    """Query tile shape of the CPU path: per dim the power of two >= k (so a tile's key hull is at
    most about twice the window per dim), then the largest dim halved (the first of equals) while
    the tile holds more than ``target`` queries, then the dim with the smallest tile/window ratio
    doubled while under ``target``; never more than the dim's length. E.g. 2-D k=7 -> (4, 8).

    Score work per query is the tile's key hull, prod(tile + k - 1), so small tiles waste less;
    but each tile is one small matmul, so tiles of ~32 queries balance the two on a CPU."""
    nd = len(shape)
    ks = normalize_per_dim(kernel_size, nd)
    tq = [min(int(n), 1 << max(0, int(k) - 1).bit_length()) for n, k in zip(shape, ks)]
    while math.prod(tq) > target:
        a = max(range(nd), key=lambda i: tq[i])
        tq[a] = max(1, tq[a] // 2)
    while math.prod(tq) < target:
        grow = [a for a in range(nd) if tq[a] < shape[a]]
        if not grow:
            break
        a = min(grow, key=lambda i: tq[i] / ks[i])
        tq[a] = min(int(shape[a]), tq[a] * 2)
    return tuple(tq)


def _dim_tiles(n: int, k: int, s: int, d: int, causal: bool, tq: int, device):
    """One dim of the CPU path's tiling. Query tiles are ``tq`` consecutive in-group queries of one
    dilation group; each tile's keys are the hull of its queries' windows, padded to the widest
    hull W of the dim. Returns (q_idx [T, tq], k_idx [T, W], mask [T, tq, W], tile_of [n],
    slot_of [n]): original-coordinate query/key indices (clamped in range; padding is masked or
    dropped), the element mask, and where each query sits (tile, slot)."""
    q_idx, los, his, sts, ens, gs, ngs = [], [], [], [], [], [], []
    tile_of = torch.empty(n, dtype=torch.int64, device=device)
    slot_of = torch.empty(n, dtype=torch.int64, device=device)
    T = 0
    for g in range(min(d, n)):
        ng = (n - g + d - 1) // d
        nt = -(-ng // tq)
        ip = torch.arange(nt * tq, dtype=torch.int64, device=device).clamp(max=ng - 1).reshape(nt, tq)
        st, en = ingroup_window(ip, ng, k, s, causal)      # padding rows repeat the last query
        real = torch.arange(ng, dtype=torch.int64, device=device)
        tile_of[g + d * real] = T + real // tq
        slot_of[g + d * real] = real % tq
        q_idx.append(g + d * ip)
        los.append(st.min(1).values)
        his.append(en.max(1).values)
        sts.append(st)
        ens.append(en)
        gs.append(torch.full((nt,), g, dtype=torch.int64, device=device))
        ngs.append(torch.full((nt,), ng, dtype=torch.int64, device=device))
        T += nt
    q_idx, lo, hi, st, en, g, ng = (torch.cat(x) for x in (q_idx, los, his, sts, ens, gs, ngs))
    W = int((hi - lo).max())
    jp = lo[:, None] + torch.arange(W, dtype=torch.int64, device=device)[None, :]      # [T, W] in-group
    mask = (jp[:, None, :] >= st[:, :, None]) & (jp[:, None, :] < en[:, :, None])     # [T, tq, W]
    k_idx = g[:, None] + d * torch.minimum(jp, ng[:, None] - 1)
    return q_idx, k_idx, mask, tile_of, slot_of


def _combine(parts: List[Tensor], sizes: List[int]) -> Tensor:
    """Row-major flat index from per-dim [Tc, w_a] index tables: [Tc, prod(w)]."""
    out = parts[0]
    for p, n in zip(parts[1:], sizes[1:]):
        out = (out[:, :, None] * n + p[:, None, :]).reshape(out.shape[0], -1)
    return out


def _tile_chunk(qg: Tensor, kg: Tensor, vg: Tensor, bias: Tensor, Hkv: int, out_dtype: torch.dtype) -> Tensor:
    """Attention of a chunk of Tc query tiles from their gathered rows: qg ``[B Hkv, Tc Q, G D]``
    (compute dtype, pre-scaled), kg / vg ``[B Hkv, Tc K, D*]`` (input dtype); bias
    ``[Tc, Q, 1, K]``: 0 or -inf. Returns ``[B, Hkv, Tc Q, G, Dv]`` in out_dtype."""
    acc = qg.dtype
    Tc, Q, _, K = bias.shape
    B, D = qg.shape[0] // Hkv, kg.shape[-1]
    G = qg.shape[-1] // D
    qg = qg.reshape(B, Hkv, Tc, Q * G, D)
    kg = kg.reshape(B, Hkv, Tc, K, D).to(acc)
    vg = vg.reshape(B, Hkv, Tc, K, -1).to(acc)
    s = qg @ kg.transpose(-1, -2)                                            # [B, Hkv, Tc, Q*G, K]
    s.view(B, Hkv, Tc, Q, G, K).add_(bias)
    p = torch.softmax(s, dim=-1)
    p = rounded(p, out_dtype)  # as a flash kernel does: P enters the PV product in the input dtype
    o = p @ vg                                                               # [B, Hkv, Tc, Q*G, Dv]
    return o.reshape(B, Hkv, Tc * Q, G, -1).to(out_dtype)


def neighborhood_attention(q: Tensor, k: Tensor, v: Tensor, kernel_size, stride=1, dilation=1,
                           is_causal=False, scale: Optional[float] = None, q_tile=None,
                           chunk_elements: int = 1 << 24) -> Tensor:
    """Neighborhood attention without the dense mask: the CPU path (differentiable by autograd).

    Block-sparse on the CPU: queries are cut into box tiles (``q_tile``, default
    ``query_tile_shape``; along a dilated dim a tile holds consecutive in-group queries of one
    dilation group); each tile attends to the box hull of its queries' windows (per dim at most
    about tile + k + s keys, padded to the widest hull) with one batched matmul, under the
    element mask of the exact windows. Memory is O(N prod(k)) (gathered keys per tile, scores per
    query), never O(N^2). Tiles are processed in chunks of at most about ``chunk_elements``
    score/gathered elements; with gradients and more than one chunk, each chunk is recomputed in
    the backward pass (activation checkpointing), so nothing of size O(N prod(k) D) is kept
    between the passes.

    Rounding mirrors a kernel: scores, softmax and the PV accumulation in fp32 (fp64 for fp64
    inputs); for fp16/bf16 inputs the probabilities are rounded to the input dtype before the PV
    product; the output is stored in the input dtype. Takes validated inputs (see
    ``subquad.neighborhood_attention`` for the checks).
    """
    nd, B, spatial, H, Hkv, D = _split(q, k)
    Dv = v.shape[-1]
    N = math.prod(spatial)
    ks, ss, ds, cs = (normalize_per_dim(x, nd) for x in (kernel_size, stride, dilation, is_causal))
    ks, ss, ds = (tuple(int(x) for x in t) for t in (ks, ss, ds))
    cs = tuple(bool(x) for x in cs)
    scale = D ** -0.5 if scale is None else float(scale)
    G = H // Hkv
    dt = q.dtype
    acc = torch.float64 if dt == torch.float64 else torch.float32
    if B == 0 or N == 0:
        return empty_output((B, *spatial, H, Dv), q.dtype, q, k, v)
    dev = q.device
    tq = query_tile_shape(spatial, ks) if q_tile is None else tuple(
        min(int(t), n) for t, n in zip(normalize_per_dim(q_tile, nd), spatial))
    dims = [_dim_tiles(spatial[a], ks[a], ss[a], ds[a], cs[a], tq[a], dev) for a in range(nd)]
    Ts = [x[0].shape[0] for x in dims]
    Ws = [x[1].shape[1] for x in dims]
    T, Q, K = math.prod(Ts), math.prod(tq), math.prod(Ws)
    zero = torch.zeros((), dtype=acc, device=dev)
    ninf = torch.full((), float("-inf"), dtype=acc, device=dev)
    biases = [torch.where(x[2], zero, ninf) for x in dims]                      # [T_a, tq_a, W_a]

    # where each query's output sits in the tiled output [T * Q]
    tile_flat = torch.zeros(1, dtype=torch.int64, device=dev)
    slot_flat = torch.zeros(1, dtype=torch.int64, device=dev)
    for a in range(nd):
        tile_flat = (tile_flat[:, None] * Ts[a] + dims[a][3][None, :]).reshape(-1)
        slot_flat = (slot_flat[:, None] * tq[a] + dims[a][4][None, :]).reshape(-1)
    inv = tile_flat * Q + slot_flat                                                  # [N]

    # head-major copies: every gather below copies whole rows of D elements
    qh = (q.reshape(B, N, Hkv, G, D).to(acc) * scale).permute(0, 2, 1, 3, 4).contiguous()
    kh = k.reshape(B, N, Hkv, D).transpose(1, 2).contiguous()
    vh = v.reshape(B, N, Hkv, Dv).transpose(1, 2).contiguous()
    per_tile = max(1, B * (K * Hkv * (D + Dv) + 3 * H * Q * K + Q * H * (D + Dv)))
    chunk = max(1, min(T, chunk_elements // per_tile))

    def chunk_of(c: int):
        tid = torch.arange(c * chunk, min(T, (c + 1) * chunk), dtype=torch.int64, device=dev)
        coords = []
        rem = tid
        for a in reversed(range(nd)):
            coords.append(rem % Ts[a])
            rem = rem // Ts[a]
        coords.reverse()
        qi = _combine([dims[a][0][coords[a]] for a in range(nd)], list(spatial))
        ki = _combine([dims[a][1][coords[a]] for a in range(nd)], list(spatial)).reshape(-1)
        bias = biases[0][coords[0]]
        for a in range(1, nd):
            ba = biases[a][coords[a]]
            bias = (bias[:, :, None, :, None] + ba[:, None, :, None, :]).reshape(
                bias.shape[0], bias.shape[1] * ba.shape[1], -1)
        return (qi.reshape(-1), ki, ki), (bias[:, :, None, :], Hkv, dt)                 # bias [Tc, Q, 1, K]

    # index_select along dim 1 of a 3-D view is a fast row copy (much faster than on a 4-D/5-D view)
    xs = (qh.reshape(B * Hkv, N, G * D), kh.reshape(B * Hkv, N, D), vh.reshape(B * Hkv, N, Dv))
    o = gathered_chunks(_tile_chunk, xs, (1, 1, 1), -(-T // chunk), chunk_of, 2)   # [B, Hkv, T*Q, G, Dv]
    o = o.reshape(B * Hkv, T * Q, G * Dv).index_select(1, inv)                      # [B*Hkv, N, G*Dv]
    return o.reshape(B, Hkv, N, G, Dv).permute(0, 2, 1, 3, 4).contiguous().reshape(B, *spatial, H, Dv)


# ---------------------------------------------------------------------------------------------
# Analytic speedup bound of a block-sparse kernel
# ---------------------------------------------------------------------------------------------

_DEFAULT_TILES = {1: (128,), 2: (16, 8), 3: (4, 4, 8)}


def default_tile_shape(nd: int) -> Tuple[int, ...]:
    """Default query and KV tile shapes: 128 tokens as a box (NATTEN's Hopper FNA shapes):
    1-D ``(128,)``, 2-D ``(16, 8)``, 3-D ``(4, 4, 8)`` (row-major; the last dim is contiguous)."""
    return _DEFAULT_TILES[nd]


@dataclass(frozen=True)
class SpeedupBound:
    """See ``neighborhood_speedup_bound``. Counts are (query tile, KV tile) pairs per (batch,
    head)."""

    shape: Tuple[int, ...]
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    dilation: Tuple[int, ...]
    is_causal: Tuple[bool, ...]
    q_tile: Tuple[int, ...]
    kv_tile: Tuple[int, ...]
    q_tiles: int                  # query tiles (tiles inside dilation groups)
    visited_tiles: int            # (q tile, KV tile) pairs the kernel visits
    dense_tiles: int              # visited pairs needing no element mask
    masked_tiles: int             # visited_tiles - dense_tiles
    self_attention_tiles: int     # pairs dense self-attention visits with the same tiles
    attended_pairs: int           # (query, key) pairs neighborhood attention computes
    self_attention_pairs: int     # (query, key) pairs dense self-attention computes
    flop_bound: float             # self_attention_pairs / attended_pairs
    tile_bound: float             # self_attention_tiles / visited_tiles


def _dim_counts(n: int, k: int, s: int, d: int, causal: bool, tq: int, tkv: int):
    """Per-dim counts: (q tiles, visited, dense, self-attention tiles, attended pairs,
    self-attention pairs)."""
    q_tiles = visited = dense = pairs = 0
    for g in range(min(d, n)):
        ng = (n - g + d - 1) // d
        ip = torch.arange(ng, dtype=torch.int64)
        st, en = ingroup_window(ip, ng, k, s, causal)
        pairs += int((en - st).sum())
        nt = -(-ng // tq)
        pad = nt * tq - ng
        big = torch.iinfo(torch.int64).max // 4
        def tiles(x, fill):
            return torch.cat([x, x.new_full((pad,), fill)]).reshape(nt, tq)
        min_start = tiles(st, big).min(1).values
        max_start = tiles(st, -1).max(1).values
        min_end = tiles(en, big).min(1).values
        max_end = tiles(en, -1).max(1).values
        lo = min_start // tkv
        hi = (max_end - 1) // tkv
        visited += int((hi - lo + 1).sum())
        # dense KV tiles: every key of the tile (those < ng) lies in every query's window,
        # i.e. inside the intersection [max_start, min_end) of the tile's windows
        first = (max_start + tkv - 1) // tkv
        last = torch.where(min_end >= ng, torch.full_like(min_end, -(-ng // tkv) - 1), min_end // tkv - 1)
        dense += int((last - first + 1).clamp(min=0).sum())
        q_tiles += nt
    ntq, ntk = -(-n // tq), -(-n // tkv)
    if causal:
        qt_end = torch.clamp(torch.arange(ntq) * tq + tq - 1, max=n - 1)
        self_tiles = int((qt_end // tkv + 1).sum())
        self_pairs = n * (n + 1) // 2
    else:
        self_tiles = ntq * ntk
        self_pairs = n * n
    return q_tiles, visited, dense, self_tiles, pairs, self_pairs


def neighborhood_speedup_bound(shape: Sequence[int], kernel_size, stride=1, dilation=1, is_causal=False,
                               q_tile=None, kv_tile=None) -> SpeedupBound:
    """How much less work a block-sparse neighborhood kernel does than dense self-attention.

    ``shape``: the spatial shape (1-3 dims). ``kernel_size``, ``stride``, ``dilation``,
    ``is_causal``: int/bool or one per dim. ``q_tile``, ``kv_tile``: tile shapes (int or one per
    dim), boxes in the spatial layout; default ``default_tile_shape(len(shape))``, i.e. 128,
    (16, 8), (4, 4, 8).

    Counting rules (everything is per (batch, head), and a product over dims because windows
    and tiles are boxes):

    - Tiles live inside dilation groups: along a dim with dilation d, each of the d groups
      (n_g tokens) is cut into ceil(n_g / tile) tiles of consecutive in-group tokens (the layout
      a kernel gets by strided addressing or by one permutation pass). With d = 1 these are the
      plain tiles of the original layout. The last tile of a group may be partial.
    - Visited: per dim, a query tile visits the KV tiles from the one holding the smallest window
      start of its queries to the one holding the largest window end (the issue's "first query's
      start to last query's end": windows are monotone in the in-group index, so these agree).
      The windows of a tile's queries overlap into one run, so every visited tile holds at least
      one attended pair: this is exactly the set of tiles a kernel must visit.
    - Fully dense: a visited pair in which every existing query of the query tile attends every
      existing key of the KV tile (positions past the end of the array do not count: the kernel
      masks those by bounds anyway), i.e. the KV tile lies inside the intersection of the query
      tile's windows, in every dim. ``masked_tiles`` = visited - dense need the element mask.
    - Self-attention tiles: the pairs a dense flash kernel visits with the same tile sizes on
      the original (unpermuted) layout: all ceil(n/tq) * ceil(n/tkv) pairs for a non-causal dim;
      for a causal dim the pairs at or below the diagonal (KV tile start <= query tile end),
      i.e. dense attention that is causal along that dim (for 1-D, SDPA's is_causal=True).
    - FLOP bound: (query, key) pairs of that dense attention / pairs neighborhood attention
      computes. Non-causal: prod(n) / prod(k) exactly. Causal dim: n (n + 1) / 2 over the sum of
      the truncated window sizes.
    - Tile bound: self-attention tiles / visited tiles.
    """
    shape = tuple(int(x) for x in shape)
    nd = len(shape)
    if nd not in (1, 2, 3):
        raise ValueError(f"shape must have 1, 2 or 3 spatial dims, got {shape}")
    ks, ss, ds = (tuple(int(x) for x in normalize_per_dim(v, nd)) for v in (kernel_size, stride, dilation))
    cs = tuple(bool(x) for x in normalize_per_dim(is_causal, nd))
    tq = tuple(int(x) for x in normalize_per_dim(default_tile_shape(nd) if q_tile is None else q_tile, nd))
    tkv = tuple(int(x) for x in normalize_per_dim(default_tile_shape(nd) if kv_tile is None else kv_tile, nd))
    for name, vals in (("kernel_size", ks), ("stride", ss), ("dilation", ds), ("q_tile", tq), ("kv_tile", tkv)):
        if len(vals) != nd:
            raise ValueError(f"{name} must be an int or a sequence of {nd} (one per spatial dim), got {vals}")
    for a in range(nd):
        if not (ks[a] >= 2 and 1 <= ss[a] <= ks[a] and ds[a] >= 1 and ks[a] * ds[a] <= shape[a]):
            raise ValueError(f"dim {a}: need 2 <= kernel_size, 1 <= stride <= kernel_size, 1 <= dilation, "
                             f"kernel_size * dilation <= size; got kernel_size={ks[a]}, stride={ss[a]}, "
                             f"dilation={ds[a]}, size={shape[a]}")
        if tq[a] < 1 or tkv[a] < 1:
            raise ValueError(f"dim {a}: tile sizes must be >= 1, got q_tile={tq[a]}, kv_tile={tkv[a]}")
    tot = [1] * 6
    for a in range(nd):
        c = _dim_counts(shape[a], ks[a], ss[a], ds[a], cs[a], tq[a], tkv[a])
        tot = [x * y for x, y in zip(tot, c)]
    q_tiles, visited, dense, self_tiles, pairs, self_pairs = tot
    return SpeedupBound(
        shape=shape, kernel_size=ks, stride=ss, dilation=ds, is_causal=cs, q_tile=tq, kv_tile=tkv,
        q_tiles=q_tiles, visited_tiles=visited, dense_tiles=dense, masked_tiles=visited - dense,
        self_attention_tiles=self_tiles, attended_pairs=pairs, self_attention_pairs=self_pairs,
        flop_bound=self_pairs / pairs, tile_bound=self_tiles / visited)
