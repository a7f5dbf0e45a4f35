"""HiP attention (hierarchically pruned attention) in pure PyTorch: the executable spec and the
CPU path.

Layout: q ``[B, Tq, H, D]``, k and v ``[B, Tk, H_kv, D]`` with ``H % H_kv == 0`` (grouped-query:
query head ``h`` reads kv head ``h // (H // H_kv)``) and ``Tq <= Tk``. Query ``i`` (0-based in
Tq) sits at absolute position ``p_i = Tk - Tq + i`` (prefill when Tq == Tk, decoding when Tq is
small); causal: key ``j`` is visible to query ``i`` only if ``j <= p_i``.

Parameters: ``topk``, ``block_size_q`` (bq), ``block_size_k`` (bk), ``query_stride``,
``sink_tokens`` (S), ``window`` (W). Query block ``qb`` holds queries ``[qb bq, (qb+1) bq)``
(the last one may be partial); its first query sits at ``p_first = Tk - Tq + qb bq``.

1. Regions of query i of block qb (all clipped to [0, p_i]):
   sinks ``[0, S)``; local ``[p_first - W + 1, p_i]`` (anchored at the block's first query);
   search range ``[S, E)`` with ``E = p_first - W + 1``, cut into ``NB = ceil(max(E - S, 0) / bk)``
   key blocks; key block ``j`` covers tokens ``[S + j bk, S + (j+1) bk)`` intersected with the
   search range (the last block may be partial).
2. Selection (per batch, query head, query block). ``Kb = ceil(topk / bk)``. If ``NB <= Kb``
   every block is selected. Otherwise the NB blocks are split into Kb contiguous groups (group i
   starts at ``floor(i NB / Kb)``), and while some kept group has more than one block: every
   group of size ``g >= 2`` splits into a left child (its first ``floor(g/2)`` blocks) and a right
   child (the rest); a group of size 1 is its own single child. A child is scored by its
   representative block ``child_start + floor(child_size / 2)``: the max of ``q . k`` over the
   block's strided queries (the block's first query, then every ``query_stride``-th one that
   exists) and the representative block's tokens. The Kb best children are kept (ties: lower
   start first). When every kept group has size 1 those Kb blocks are the selection, sorted.
   The ranking uses the raw dot product ``q . k`` (a positive ``scale`` does not change it).
3. Attention: one softmax with ``scale`` (default ``D ** -0.5``) over the union of the sinks, the
   tokens of the selected blocks (all inside the search range) and the local region; every key
   counted once, never a future key. A query that sees no key at all (possible only with
   ``window == 0`` and ``sink_tokens == 0``) gets ``o = 0``.

A selection is an int32 tensor ``blocks [B, H, NQB, Kb]`` (``NQB = ceil(Tq / bq)``): per query
block the selected key-block indices, ascending, padded at the end with -1 (when ``NB <= Kb``:
``0 .. NB-1`` then -1s).

Consequences: when ``NB <= Kb`` for every query block (topk covers the whole search range) the
attention is dense causal attention. The tree search follows representative blocks, so a lone
short needle (one 2-token block scoring high among low-scoring neighbours) can be missed by
design; a span of high-scoring keys (real attention is locally smooth) is found.

Reusing a selection while a decoding cache grows (``Tk > Tk0``, the Tk it was made at, same Tq):
key blocks keep their absolute positions, and the local region is anchored where the selection
left off, so every key newer than the selection's search range is attended. That is exactly
the spec above with ``window + (Tk - Tk0)`` for ``window`` (the search range ``[S, E)`` is then
unchanged): pass the enlarged window to :func:`hip_attention_reference` (``subquad.hip`` does).

Functions: :func:`select_blocks` (the tree search, literal), :func:`hip_visible` (the dense
visibility mask, tests), :func:`hip_attention_reference` (the CPU path: per query block, gathers
only its sinks, selected tokens and local region, ``O(Tq (S + topk + W + bq) D)`` work and
memory, differentiable in q, k, v by autograd) and :func:`hip_attention_naive` (dense masked
attention in float64, tests only).
"""

from __future__ import annotations

from typing import Optional

import torch

from .common import gathered_chunks, rounded

Tensor = torch.Tensor

__all__ = [
    "num_key_blocks",
    "search_end",
    "select_blocks",
    "hip_visible",
    "hip_attention_reference",
    "hip_attention_naive",
    "initial_groups",
    "clip_params",
    "canonical_blocks",
]


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def search_end(Tq: int, Tk: int, qb, *, block_size_q: int, window: int):
    """E = p_first - window + 1: the exclusive end of query block ``qb``'s search range (int or
    tensor, like ``qb``)."""
    return Tk - Tq + qb * block_size_q - window + 1


def num_key_blocks(Tq: int, Tk: int, qb: int, *, block_size_q: int, block_size_k: int, sink_tokens: int,
                   window: int) -> int:
    """NB of query block ``qb``: the key blocks of its search range ``[sink_tokens, E)``."""
    E = search_end(Tq, Tk, qb, block_size_q=block_size_q, window=window)
    return _cdiv(max(E - sink_tokens, 0), block_size_k)


def clip_params(Tq: int, Tk: int, *, block_size_q: int, sink_tokens: int, window: int, query_stride: int = 1):
    """(block_size_q, query_stride, sink_tokens, window) no larger than the problem, selecting and
    attending exactly as the given ones: a query block longer than Tq is the one block (only its
    first query's position enters), a stride of at least the block samples only its first query,
    sinks or a window of at least Tk cover every key. Position arithmetic then stays within
    Tq + Tk (int32 in the kernels) and the reference's gathers within O(Tk)."""
    bq = min(block_size_q, max(Tq, 1))
    return bq, min(query_stride, bq), min(sink_tokens, Tk), min(window, Tk)


def canonical_blocks(blocks: Tensor, Tq: int, Tk: int, *, block_size_q: int, block_size_k: int, sink_tokens: int,
                     window: int) -> Tensor:
    """A selection ``[B, H, NQB, Kb]`` in the form the kernels read (int32): per query block its
    distinct key blocks of the search range (``0 <= j < NB``), ascending, then -1. What a
    hand-built selection means: entries outside the range (any negative one, ``j >= NB``) select
    nothing and a repeated block counts once. ``select_blocks`` returns this form already."""
    b = blocks.long()
    qb = torch.arange(b.shape[2], device=b.device)
    E = search_end(Tq, Tk, qb, block_size_q=block_size_q, window=window)
    NB = torch.div((E - sink_tokens).clamp(min=0) + block_size_k - 1, block_size_k, rounding_mode="floor")
    out = torch.iinfo(torch.int64).max  # sorts after every block
    b = torch.where((b >= 0) & (b < NB[:, None]), b, out).sort(-1).values
    rep = torch.zeros_like(b, dtype=torch.bool)
    rep[..., 1:] = b[..., 1:] == b[..., :-1]
    b = torch.where(rep, out, b).sort(-1).values
    return torch.where(b == out, -1, b).to(torch.int32)


def initial_groups(NB: int, Kb: int, device=None):
    """(starts, sizes) of the Kb initial groups of NB > Kb blocks: group i starts at floor(i NB / Kb)."""
    i = torch.arange(Kb + 1, device=device, dtype=torch.int64)
    bounds = (i * NB) // Kb
    return bounds[:-1], bounds[1:] - bounds[:-1]


def select_blocks(q: Tensor, k: Tensor, *, topk: int, block_size_q: int, block_size_k: int, query_stride: int,
                  sink_tokens: int, window: int, scale: Optional[float] = None) -> Tensor:
    """The tree search of step 2, literally: ``blocks [B, H, NQB, Kb]`` int32 (see the module doc).

    q ``[B, Tq, H, D]``, k ``[B, Tk, H_kv, D]``. Scores are computed in float32 (float64 for float64
    inputs); ``scale`` does not enter the ranking (accepted for a uniform signature; it must be
    positive, which ``subquad.hip`` checks). One query block at a time, vectorised over batch and
    heads; memory ``O(B H topk D)`` beside the inputs. Not differentiable (integer output).
    """
    del scale
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    bq, query_stride, S, W = clip_params(Tq, Tk, block_size_q=block_size_q, query_stride=query_stride,
                                         sink_tokens=sink_tokens, window=window)
    bk = block_size_k
    Kb = _cdiv(topk, bk)
    NQB = _cdiv(Tq, bq)
    dev = q.device
    blocks = torch.full((B, H, NQB, Kb), -1, dtype=torch.int32, device=dev)
    cdt = torch.promote_types(q.dtype, torch.float32)
    with torch.no_grad():
        kflat = k.detach().reshape(B * Tk * Hkv, D)  # a view for contiguous k: no O(Tk) copy per call
        row0 = (torch.arange(B, device=dev)[:, None] * Tk * Hkv + torch.arange(H, device=dev)[None, :] // G)
        u = torch.arange(bk, device=dev)
        for qb in range(NQB):
            E = search_end(Tq, Tk, qb, block_size_q=bq, window=W)
            NB = _cdiv(max(E - S, 0), bk)
            if NB <= Kb:
                blocks[:, :, qb, :NB] = torch.arange(NB, device=dev, dtype=torch.int32)
                continue
            rows = torch.arange(qb * bq, min((qb + 1) * bq, Tq), query_stride, device=dev)
            qs = q.detach()[:, rows].to(cdt).permute(0, 2, 1, 3)  # [B, H, nq, D] strided queries
            st0, sz0 = initial_groups(NB, Kb, dev)
            starts = st0.expand(B, H, Kb)
            sizes = sz0.expand(B, H, Kb)
            while bool((sizes > 1).any()):  # extra rounds where a (b, h) is done change nothing
                half = sizes // 2
                split = sizes >= 2
                # children in position order: left, right of group 0, then of group 1, ...
                c_start = torch.stack([starts, starts + half], -1).reshape(B, H, 2 * Kb)
                c_size = torch.stack([torch.where(split, half, sizes), sizes - half], -1).reshape(B, H, 2 * Kb)
                c_valid = torch.stack([torch.ones_like(split), split], -1).reshape(B, H, 2 * Kb)
                rep = c_start + c_size // 2
                tok = S + rep[..., None] * bk + u  # [B, H, 2Kb, bk] tokens of the representative blocks
                tok_ok = (tok < E) & c_valid[..., None]
                rows = row0[:, :, None] + tok.clamp(max=Tk - 1).reshape(B, H, -1) * Hkv
                keys = kflat.index_select(0, rows.reshape(-1)).reshape(*rows.shape, D).to(cdt)  # [B, H, 2Kb bk, D]
                sc = torch.matmul(qs, keys.transpose(-1, -2)).amax(2)  # max over the strided queries
                sc = sc.reshape(B, H, 2 * Kb, bk).masked_fill(~tok_ok, float("-inf")).amax(-1)
                # rank: valid children first, then score descending, ties by position (stable sorts)
                order = torch.sort(sc, dim=-1, descending=True, stable=True).indices
                inval = (~c_valid).gather(-1, order).to(torch.int8)
                order = order.gather(-1, torch.sort(inval, dim=-1, stable=True).indices)
                keep = order[..., :Kb].sort(-1).values
                starts = c_start.gather(-1, keep)
                sizes = c_size.gather(-1, keep)
            blocks[:, :, qb] = starts.to(torch.int32)
    return blocks


def hip_visible(blocks: Tensor, Tq: int, Tk: int, *, block_size_q: int, block_size_k: int, sink_tokens: int,
                window: int) -> Tensor:
    """The dense visibility mask ``bool [B, H, Tq, Tk]`` of a selection (step 3; tests only)."""
    B, H, NQB, Kb = blocks.shape
    bq, bk, S, W = block_size_q, block_size_k, sink_tokens, window
    dev = blocks.device
    i = torch.arange(Tq, device=dev)
    p = Tk - Tq + i
    qb = i // bq
    E = search_end(Tq, Tk, qb, block_size_q=bq, window=W)  # [Tq]
    j = torch.arange(Tk, device=dev)
    causal = j[None, :] <= p[:, None]
    sink = (j < S)[None, :]
    local = j[None, :] >= E[:, None]
    in_range = (j[None, :] >= S) & (j[None, :] < E[:, None])
    nbk = _cdiv(Tk, bk) + 1
    b = blocks.long()
    table = torch.zeros(B, H, NQB, nbk + 1, dtype=torch.bool, device=dev)
    table.scatter_(-1, torch.where(b < 0, torch.full_like(b, nbk), b.clamp(max=nbk)), True)
    table[..., nbk] = False  # padding slot
    jb = ((j - S).clamp(min=0) // bk).clamp(max=nbk - 1)  # [Tk] block of each token
    selected = table[:, :, qb][..., jb]  # [B, H, Tq, Tk]
    return causal & (sink | local | (in_range & selected))


def _softmax_av(s: Tensor, ok: Tensor, v: Tensor, p_dtype: Optional[torch.dtype] = None) -> Tensor:
    """softmax over the last dim of ``s`` restricted to ``ok`` (rows with nothing visible -> 0), times
    v, all in v's dtype; ``p_dtype``: the unnormalised probabilities are rounded to it first (a
    flash kernel's P in the input dtype)."""
    s = s.masked_fill(~ok, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)
    l = p.sum(-1, keepdim=True)
    if p_dtype is not None:
        p = rounded(p, p_dtype)
    return torch.matmul(p, v) / torch.where(l == 0, torch.ones_like(l), l)


def hip_attention_naive(q: Tensor, k: Tensor, v: Tensor, blocks: Tensor, *, block_size_q: int, block_size_k: int,
                        sink_tokens: int, window: int, scale: Optional[float] = None) -> Tensor:
    """Dense masked attention in float64 over :func:`hip_visible` (tests only): ``[B, Tq, H, D]``
    in float64, differentiable."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    vis = hip_visible(blocks, Tq, Tk, block_size_q=block_size_q, block_size_k=block_size_k,
                      sink_tokens=sink_tokens, window=window)
    rep = H // Hkv
    q64 = q.double().permute(0, 2, 1, 3)
    k64 = k.double().repeat_interleave(rep, dim=2).permute(0, 2, 1, 3)
    v64 = v.double().repeat_interleave(rep, dim=2).permute(0, 2, 1, 3)
    s = torch.matmul(q64, k64.transpose(-1, -2)) * scale
    return _softmax_av(s, vis, v64).permute(0, 2, 1, 3)


def _chunk(qq: Tensor, kk: Tensor, vv: Tensor, ok: Tensor, scale: float, sdt: torch.dtype,
           out_dtype: torch.dtype) -> Tensor:
    """Attention of n query blocks from their gathered rows: qq ``[B, n bq, H, D]``, kk / vv
    ``[B H n L, D]`` (input dtype); ok ``[B, H, n, bq, L]``: which key each query sees. Returns
    ``[B, H, n bq, D]`` in the compute dtype ``sdt``."""
    B, H, n, bq, L = ok.shape
    qq = qq.reshape(B, n, bq, H, -1).permute(0, 3, 1, 2, 4)
    kk = kk.reshape(B, H, n, L, -1).to(sdt)
    vv = vv.reshape(B, H, n, L, -1).to(sdt)
    s = torch.matmul(qq.to(sdt), kk.transpose(-1, -2)) * scale  # [B, H, n, bq, L]
    o = _softmax_av(s, ok, vv, None if out_dtype == sdt else out_dtype)
    return o.reshape(B, H, n * bq, -1)


def hip_attention_reference(q: Tensor, k: Tensor, v: Tensor, blocks: Tensor, *, block_size_q: int,
                            block_size_k: int, sink_tokens: int, window: int, scale: Optional[float] = None,
                            max_elems: int = 1 << 23) -> Tensor:
    """HiP attention over a given selection (step 3), memory-light: ``o [B, Tq, H, D]`` in q's dtype.

    Per query block it gathers only its candidate keys: the ``S`` sinks, the ``Kb bk`` tokens of
    its selected blocks and the ``W + bq - 1`` tokens from ``max(E, S)`` on (the local region,
    cut where it meets the sinks so no key counts twice), then masks per query (causal; selected
    tokens inside the search range). Never builds a ``[Tq, Tk]`` tensor: work and memory are
    ``O(Tq (S + Kb bk + W + bq) D)``, independent of Tk (decoding at any cache length). Query
    blocks are processed in chunks of at most ``max_elems`` score entries; with gradients and more
    than one chunk, each chunk is recomputed in the backward pass, so only the output is kept. Rounding as a kernel
    does: scores, softmax and ``p @ v`` in float32 (float64 for float64 inputs), P rounded to the
    input dtype before ``p @ v`` for 16-bit inputs. Differentiable in q, k, v. ``blocks`` is
    read as :func:`canonical_blocks` reads it (a repeated block counts once).
    """
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    blk = canonical_blocks(blocks.to(q.device), Tq, Tk, block_size_q=block_size_q, block_size_k=block_size_k,
                           sink_tokens=sink_tokens, window=window)
    bq, _, S, W = clip_params(Tq, Tk, block_size_q=block_size_q, sink_tokens=sink_tokens, window=window)
    bk = block_size_k
    scale = D ** -0.5 if scale is None else scale
    NQB, Kb = blocks.shape[2], blocks.shape[3]
    dev = q.device
    sdt = torch.promote_types(q.dtype, torch.float32)
    kf = k.reshape(B * Tk * Hkv, D)  # views for contiguous k, v: no O(Tk) copy per call
    vf = v.reshape(B * Tk * Hkv, D)
    row0 = (torch.arange(B, device=dev)[:, None] * Tk * Hkv + torch.arange(H, device=dev)[None, :] // G)
    Lloc = W + bq - 1
    L = S + Kb * bk + Lloc
    u = torch.arange(bk, device=dev)
    chunk = max(1, max_elems // max(1, B * H * bq * max(L, D)))

    def chunk_of(c: int):
        qbs = torch.arange(c * chunk, min((c + 1) * chunk, NQB), device=dev)
        n = qbs.numel()
        E = search_end(Tq, Tk, qbs, block_size_q=bq, window=W)  # [n]
        sink_t = torch.arange(S, device=dev).expand(n, S)
        loc_t = torch.maximum(E, torch.full_like(E, S))[:, None] + torch.arange(Lloc, device=dev)  # [n, Lloc]
        b = blk[:, :, c * chunk:c * chunk + n]  # [B, H, n, Kb]
        sel_t = (S + b[..., None] * bk + u).reshape(B, H, n, Kb * bk)
        sel_ok = ((b >= 0)[..., None].expand(B, H, n, Kb, bk).reshape(B, H, n, Kb * bk)
                  & (sel_t < E[:, None]))
        tok = torch.cat([sink_t.expand(B, H, n, S), sel_t, loc_t.expand(B, H, n, Lloc)], -1)  # [B, H, n, L]
        static_ok = torch.cat([torch.ones(B, H, n, S, dtype=torch.bool, device=dev), sel_ok,
                               torch.ones(B, H, n, Lloc, dtype=torch.bool, device=dev)], -1)
        i = qbs[:, None] * bq + torch.arange(bq, device=dev)  # [n, bq]
        p = Tk - Tq + i
        ok = static_ok[..., None, :] & (tok[..., None, :] <= p[:, :, None])  # [B, H, n, bq, L]
        rows = (row0[:, :, None, None] + tok.clamp(0, Tk - 1) * Hkv).reshape(-1)
        return (i.clamp(max=Tq - 1).reshape(-1), rows, rows), (ok, scale, sdt, q.dtype)

    # index_select copies whole rows (several times faster than advanced indexing, as is its backward)
    o = gathered_chunks(_chunk, (q, kf, vf), (1, 0, 0), -(-NQB // chunk), chunk_of, 2)
    o = o[:, :, :Tq]
    return o.permute(0, 2, 1, 3).contiguous().to(q.dtype)  # contiguous, as the kernel's
