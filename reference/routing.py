"""Bi-level routing attention (BiFormer) in pure PyTorch: the executable spec and the CPU path.

Layout: q, k, v ``[B, *spatial, H, D]`` with 1 or 2 spatial dims (a sequence ``[B, T, H, D]`` is
handled as a ``1 x T`` image). Every op here takes validated inputs (see
``subquad.bilevel_routing_attention`` for the checks).

What it computes, with ``S_a`` regions along spatial dim ``a`` of length ``n_a``::

    1. regions:  the dims are padded to ``S_a * r_a`` with ``r_a = ceil(n_a / S_a)``; region
                 ``(s_1, s_2)`` (row-major id ``s_1 S_2 + s_2``) is the box of positions
                 ``[s_a r_a, (s_a + 1) r_a)`` per dim. Its real tokens are the positions inside
                 the unpadded dims (a region can have none when padding is large: n=9, S=4).
    2. pooling:  region query / key = the mean of q (resp. k) over the region's real tokens, per
                 head (0 for a region without real tokens).
    3. routing:  affinity ``A[r, r'] = sum_h qr[r, h] . kr[r', h]`` ("shared", BiFormer) or per
                 head ("per_head"); region r keeps the ``topk`` regions r' with the largest A,
                 ties to the lower index, in order of decreasing affinity. Not differentiable.
    4. attention: every real query token of region r attends, under one softmax with ``scale``,
                 to every real key token of its routed regions. Padded keys take part in no
                 softmax, padded queries are dropped. A query whose routed regions hold no real
                 key (only possible with empty regions) gets o = 0.

Ops: ``region_geometry``, ``region_means``, ``route`` (stable top-k), ``routing_mask`` and
``bilevel_routing_attention_naive`` (dense masked attention in float64, tests only),
``route_naive`` (loops), ``bilevel_routing_attention`` (the CPU path: region-major layout, the
routed regions' K/V gathered per chunk of query regions, optionally recomputed in the backward
pass, so memory stays bounded), ``gather_attention`` (BiFormer's approach: the whole gathered
``[B, H, R, topk * r_1 r_2, D]`` copy, plain autograd; the benchmark's baseline).
"""

from __future__ import annotations

import functools
import math
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch

from .common import gathered_chunks, rounded

Tensor = torch.Tensor

__all__ = [
    "RegionGeometry", "region_geometry", "region_tokens", "region_extents", "region_means", "route", "route_naive",
    "routing_mask", "bilevel_routing_attention_naive", "bilevel_routing_attention", "gather_attention",
    "to_regions", "from_regions",
]


class RegionGeometry(NamedTuple):
    """2-D view of the layout: n = (n1, n2) real sizes, S = (S1, S2) regions per dim, r = (r1, r2)
    region box; a 1-D input has n1 = S1 = r1 = 1."""

    n1: int
    n2: int
    S1: int
    S2: int
    r1: int
    r2: int

    @property
    def R(self) -> int:
        """Number of regions."""
        return self.S1 * self.S2

    @property
    def RT(self) -> int:
        """Tokens per region box (padding included)."""
        return self.r1 * self.r2

    @property
    def N(self) -> int:
        """Real tokens."""
        return self.n1 * self.n2

    @property
    def padded(self) -> bool:
        return self.S1 * self.r1 != self.n1 or self.S2 * self.r2 != self.n2


def region_geometry(spatial: Sequence[int], num_regions: Sequence[int]) -> RegionGeometry:
    """The region grid of a 1-D or 2-D layout (num_regions: one per spatial dim)."""
    spatial, num_regions = tuple(int(x) for x in spatial), tuple(int(x) for x in num_regions)
    if len(spatial) == 1:
        spatial, num_regions = (1,) + spatial, (1,) + num_regions
    (n1, n2), (S1, S2) = spatial, num_regions
    return RegionGeometry(n1, n2, S1, S2, -(-n1 // S1), -(-n2 // S2))


def region_tokens(g: RegionGeometry, device=None) -> Tuple[Tensor, Tensor]:
    """``(tok [R, RT] int64, valid [R, RT] bool)``: the flat (row-major) token index of slot l of
    region r (slot l = (l // r2, l % r2) inside the box; invalid slots hold 0) and whether it is a
    real token."""
    r = torch.arange(g.R, device=device)[:, None]
    slot = torch.arange(g.RT, device=device)[None, :]
    i = (r // g.S2) * g.r1 + slot // g.r2
    j = (r % g.S2) * g.r2 + slot % g.r2
    valid = (i < g.n1) & (j < g.n2)
    return torch.where(valid, i * g.n2 + j, torch.zeros_like(i)), valid


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def to_regions(x: Tensor, g: RegionGeometry) -> Tensor:
    """``[B, N, H, D]`` (N = n1 n2, row-major) -> region-major ``[B, H, R, RT, D]``, zero-padded."""
    B, _, H, D = x.shape
    x = x.reshape(B, g.n1, g.n2, H, D)
    x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, g.S2 * g.r2 - g.n2, 0, g.S1 * g.r1 - g.n1))
    x = x.reshape(B, g.S1, g.r1, g.S2, g.r2, H, D).permute(0, 5, 1, 3, 2, 4, 6)
    return x.reshape(B, H, g.R, g.RT, D)


def from_regions(x: Tensor, g: RegionGeometry) -> Tensor:
    """Inverse of ``to_regions``: ``[B, H, R, RT, D]`` -> ``[B, N, H, D]`` (padding dropped)."""
    B, H, _, _, D = x.shape
    x = x.reshape(B, H, g.S1, g.S2, g.r1, g.r2, D).permute(0, 2, 4, 3, 5, 1, 6)
    x = x.reshape(B, g.S1 * g.r1, g.S2 * g.r2, H, D)[:, :g.n1, :g.n2]
    return x.reshape(B, g.N, H, D).contiguous()  # contiguous as the kernel's (a view in 1-D)


def region_extents(g: RegionGeometry) -> List[Tuple[int, int, int]]:
    """Per region (row-major), in closed form: the flat token of its box's corner, and how many of
    its box rows and columns are real (fewer at a padded edge, 0 for a region of padding only)."""
    out = []
    for r in range(g.R):
        s1, s2 = divmod(r, g.S2)
        out.append((s1 * g.r1 * g.n2 + s2 * g.r2, max(0, min(g.r1, g.n1 - s1 * g.r1)),
                    max(0, min(g.r2, g.n2 - s2 * g.r2))))
    return out


@functools.lru_cache(maxsize=64)
def _region_counts(g: RegionGeometry, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Real tokens per region (row-major, at least 1): real rows times real columns. Cached per
    geometry and device: no host-to-device copy per call (a call inside a CUDA graph capture
    could not make one)."""
    return torch.tensor([max(1, rows * cols) for _, rows, cols in region_extents(g)], dtype=dtype, device=device)


def region_means(x: Tensor, g: RegionGeometry) -> Tensor:
    """``[B, N, H, D]`` -> ``[B, R, H, D]``: the mean over each region's real tokens, in fp32
    (fp64 for fp64 inputs); 0 for a region without real tokens. Deterministic (no atomics). Two
    kernels when the sizes divide (a reduction over a view, a scalar division): routing runs on
    every call, and at BiFormer's small stages its cost is host time per op."""
    B, _, H, D = x.shape
    x = x.reshape(B, g.n1, g.n2, H, D)
    if g.padded:  # zeros add nothing to the sums; the counts below are of real tokens
        x = torch.nn.functional.pad(x, (0, 0, 0, 0, 0, g.S2 * g.r2 - g.n2, 0, g.S1 * g.r1 - g.n1))
    # a reduction over the box dims of a view: one read of x, accumulated in fp32, no copy
    sums = x.reshape(B, g.S1, g.r1, g.S2, g.r2, H, D).sum(dim=(2, 4), dtype=_compute_dtype(x.dtype))
    sums = sums.reshape(B, g.R, H, D)
    if not g.padded:
        return sums / g.RT
    return sums / _region_counts(g, sums.dtype, sums.device)[:, None, None]


def _stable_topk(a: Tensor, topk: int) -> Tensor:
    """Indices of the ``topk`` largest entries along the last dim, largest first, ties to the
    lower index (a stable descending sort: torch.topk does not promise an order for ties)."""
    return torch.sort(a, dim=-1, descending=True, stable=True).indices[..., :topk].contiguous()


def route(q: Tensor, k: Tensor, g: RegionGeometry, topk: int, per_head: bool = False) -> Tensor:
    """Region routing (steps 2-3): int64 ``[B, R, topk]`` ("shared": affinity summed over heads)
    or ``[B, H, R, topk]`` (per_head). q, k ``[B, N, H, D]``. Computed without autograd."""
    with torch.no_grad():
        qr, kr = region_means(q, g), region_means(k, g)
        B, R, H, D = qr.shape
        if per_head:  # [B, H, R, D] @ [B, H, D, R]
            a = torch.matmul(qr.transpose(1, 2), kr.permute(0, 2, 3, 1))
        else:  # the sum over heads and channels is one contraction over H D
            a = torch.bmm(qr.reshape(B, R, H * D), kr.reshape(B, R, H * D).transpose(1, 2))
        return _stable_topk(a, topk)


def route_naive(q: Tensor, k: Tensor, spatial: Sequence[int], num_regions: Sequence[int], topk: int,
                per_head: bool = False) -> Tensor:
    """The routing restated with loops over regions and explicit masks, in float64 (tests only)."""
    g = region_geometry(spatial, num_regions)
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    qf = q.detach().double().reshape(B, g.n1, g.n2, H, D)
    kf = k.detach().double().reshape(B, g.n1, g.n2, H, D)
    qr = torch.zeros(B, g.R, H, D, dtype=torch.float64)
    kr = torch.zeros(B, g.R, H, D, dtype=torch.float64)
    for r in range(g.R):
        s1, s2 = divmod(r, g.S2)
        rows = slice(s1 * g.r1, min((s1 + 1) * g.r1, g.n1))
        cols = slice(s2 * g.r2, min((s2 + 1) * g.r2, g.n2))
        for x, out in ((qf, qr), (kf, kr)):
            box = x[:, rows, cols].reshape(B, -1, H, D).cpu()
            if box.shape[1]:
                out[:, r] = box.mean(1)
    out = torch.empty(B, *((H,) if per_head else ()), g.R, topk, dtype=torch.int64)
    for b in range(B):
        for h in range(H if per_head else 1):
            for r in range(g.R):
                if per_head:
                    aff = [float(qr[b, r, h] @ kr[b, s, h]) for s in range(g.R)]
                else:
                    aff = [float((qr[b, r] * kr[b, s]).sum()) for s in range(g.R)]
                best = sorted(range(g.R), key=lambda s: (-aff[s], s))[:topk]
                out[(b, h, r) if per_head else (b, r)] = torch.tensor(best)
    return out.to(q.device)


def routing_mask(idx: Tensor, spatial: Sequence[int], num_regions: Sequence[int]) -> Tensor:
    """The dense token mask of a routing: bool ``[B, HR, N, N]`` (HR = 1 for shared routing, else
    H), ``[.., i, j]`` True iff key j's region is among query i's region's routed regions."""
    g = region_geometry(spatial, num_regions)
    idx = idx if idx.dim() == 4 else idx[:, None]
    B, HR = idx.shape[:2]
    sel = torch.zeros(B, HR, g.R, g.R, dtype=torch.bool, device=idx.device)
    sel.scatter_(-1, idx, True)                                         # [B, HR, R, R']
    pos = torch.arange(g.N, device=idx.device)
    i, j = pos // g.n2, pos % g.n2
    reg = (i // g.r1) * g.S2 + j // g.r2                                # [N] region of each token
    return sel[:, :, reg][:, :, :, reg]


def bilevel_routing_attention_naive(q: Tensor, k: Tensor, v: Tensor, num_regions: Sequence[int], topk: int,
                                    scale: Optional[float] = None, routing="shared") -> Tuple[Tensor, Tensor]:
    """The definition: dense attention in float64 under ``routing_mask`` (tests only, O(N^2)).

    routing: "shared" / "per_head" (computed by ``route_naive``) or an index tensor. Returns
    (o float64 ``[B, *spatial, H, D]``, routing indices); differentiable in q, k, v."""
    spatial = tuple(q.shape[1:-2])
    nd = len(spatial)
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    N = math.prod(spatial)
    scale = D ** -0.5 if scale is None else float(scale)
    if isinstance(routing, str):
        idx = route_naive(q, k, spatial, num_regions, topk, routing == "per_head")
    else:
        idx = routing.to(torch.int64)
    mask = routing_mask(idx, spatial, num_regions)                      # [B, HR, N, N]
    qh = q.double().reshape(B, N, H, D).transpose(1, 2)
    kh = k.double().reshape(B, N, H, D).transpose(1, 2)
    vh = v.double().reshape(B, N, H, v.shape[-1]).transpose(1, 2)
    s = (qh @ kh.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    seen = mask.any(-1, keepdim=True)                                   # rows with at least one key
    p = torch.softmax(torch.where(seen, s, torch.zeros_like(s)), dim=-1) * seen
    o = p @ vh
    del nd
    return o.transpose(1, 2).reshape(B, *spatial, H, v.shape[-1]), idx


# ---------------------------------------------------------------------------------------------
# The CPU path: gathered routed regions, chunked over query regions
# ---------------------------------------------------------------------------------------------

def _chunk(qr: Tensor, kg: Tensor, vg: Tensor, idx: Tensor, kbias: Optional[Tensor], scale: float,
           out_dtype: torch.dtype) -> Tensor:
    """Attention of a chunk of query regions. qr ``[B, H, Rc, RT, D]`` (input dtype); kg / vg
    ``[B H Rc topk, RT D*]``: the rows of the routed regions, gathered from ``[B H R, RT D*]``;
    idx ``[B, HR, Rc, topk]`` int64; kbias ``[R, RT]`` (0 or -inf for padded keys; None when
    nothing is padded). Returns ``[B, H, Rc, RT, Dv]`` in out_dtype; rounding as a kernel does
    (fp32 scores and accumulation, P rounded to the input dtype before PV for 16-bit inputs)."""
    acc = _compute_dtype(qr.dtype)
    B, H, Rc, RT, D = qr.shape
    topk = idx.shape[-1]
    kg = kg.reshape(B, H, Rc, topk * RT, D).to(acc)
    vg = vg.reshape(B, H, Rc, topk * RT, -1).to(acc)
    s = (qr.to(acc) * scale) @ kg.transpose(-1, -2)                    # [B, H, Rc, RT, topk RT]
    if kbias is None:
        p = torch.softmax(s, dim=-1)
    else:
        bias = kbias[idx].reshape(B, idx.shape[1], Rc, 1, topk * RT)    # [B, HR, Rc, 1, topk RT]
        seen = torch.isfinite(bias).any(-1, keepdim=True)               # a query region with no real key
        p = torch.softmax(torch.where(seen, s + bias, torch.zeros_like(s)), dim=-1) * seen
    p = rounded(p, out_dtype)  # P in the input dtype, as the kernel's
    return (p @ vg).to(out_dtype)


def _key_bias(g, dtype: torch.dtype, device) -> Optional[Tensor]:
    """``[R, RT]``: 0 for a region's real keys, -inf for its padding; None when nothing is padded
    (every region then has RT real keys: no bias, no empty rows)."""
    if not g.padded:
        return None
    _, valid = region_tokens(g, device)
    return torch.zeros(valid.shape, dtype=dtype, device=device).masked_fill(~valid, float("-inf"))


def _routed_rows(idx: Tensor, H: int, R: int) -> Tensor:
    """Rows of region-major ``[B H R, RT D]`` K/V that the routing ``idx [B, HR, Rq, topk]``
    selects, flat in ``[B, H, Rq, topk]`` order (index_select copies whole rows)."""
    B, _, Rq, topk = idx.shape
    bh = torch.arange(B * H, device=idx.device).reshape(B, H, 1, 1) * R
    return (bh + idx.expand(B, H, Rq, topk)).reshape(-1)


def _as_routing(idx: Tensor) -> Tensor:
    """Routing indices as int64 ``[B, HR, R, topk]``."""
    idx = idx.to(torch.int64)
    return idx if idx.dim() == 4 else idx[:, None]


def _routed_regions(q: Tensor, k: Tensor, v: Tensor, num_regions: Sequence[int], topk: int,
                    scale: Optional[float], routing):
    """The steps both region-major paths share: the geometry, the scale, the routing (as returned, and
    as int64 ``[B, HR, R, topk]``) and q, k, v laid out region-major ``[B, H, R, RT, D]``."""
    B, H = q.shape[0], q.shape[-2]
    g = region_geometry(tuple(q.shape[1:-2]), num_regions)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q3, k3, v3 = (x.reshape(B, g.N, H, x.shape[-1]) for x in (q, k, v))
    if isinstance(routing, str):
        out_idx = route(q3, k3, g, topk, routing == "per_head")
    else:
        out_idx = routing.to(torch.int64)
    return g, scale, out_idx, _as_routing(out_idx), to_regions(q3, g), to_regions(k3, g), to_regions(v3, g)


def bilevel_routing_attention(q: Tensor, k: Tensor, v: Tensor, num_regions: Sequence[int], topk: int,
                              scale: Optional[float] = None, routing="shared",
                              chunk_elements: Optional[int] = 1 << 24) -> Tuple[Tensor, Tensor]:
    """Bi-level routing attention without the dense mask: the CPU path (differentiable by autograd).

    q, k, v ``[B, *spatial, H, D]`` (1 or 2 spatial dims), num_regions one int per spatial dim,
    routing "shared" / "per_head" / an index tensor ``[B, R, topk]`` or ``[B, H, R, topk]``.
    Returns (o ``[B, *spatial, H, D]`` in q's dtype, routing int64 ``[B, R, topk]`` or
    ``[B, H, R, topk]``).

    q, k, v are laid out region-major (``[B, H, R, r1 r2, D]``, zero-padded); query regions are
    processed in chunks of about ``chunk_elements`` gathered/score elements, each attending to the
    gathered K/V of its routed regions with padded keys masked. With gradients and more than one
    chunk, each chunk is recomputed in the backward pass. ``chunk_elements=None``: one chunk.
    """
    spatial = tuple(q.shape[1:-2])
    B, H, D, Dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    g, scale, out_idx, idx, qr, kr, vr = _routed_regions(q, k, v, num_regions, topk, scale, routing)
    acc = _compute_dtype(q.dtype)
    kbias = _key_bias(g, acc, q.device)
    per_region = max(1, B * H * topk * g.RT * (3 * g.RT + D + Dv))
    chunk = g.R if chunk_elements is None else max(1, min(g.R, chunk_elements // per_region))

    def chunk_of(c: int):
        sl = slice(c * chunk, min(g.R, (c + 1) * chunk))
        ic = idx[:, :, sl]
        ix = _routed_rows(ic, H, g.R)
        return (torch.arange(sl.start, sl.stop, device=q.device), ix, ix), (ic, kbias, scale, q.dtype)

    xs = (qr, kr.reshape(B * H * g.R, -1), vr.reshape(B * H * g.R, -1))
    o = gathered_chunks(_chunk, xs, (2, 0, 0), -(-g.R // chunk), chunk_of, 2)
    return from_regions(o, g).reshape(B, *spatial, H, Dv), out_idx


def gather_attention(q: Tensor, k: Tensor, v: Tensor, num_regions: Sequence[int], topk: int,
                     scale: Optional[float] = None, routing="shared") -> Tensor:
    """BiFormer's approach, as the benchmark's baseline (plain autograd, no chunking): route, lay
    q, k, v out region-major (a copy), gather the routed regions' K/V into one
    ``[B, H, R, topk r1 r2, D]`` copy (topk times K/V; its backward is an index_add), then batched
    matmuls in the input dtype with the softmax in fp32, as BiFormer's block runs under autocast.
    Padded keys are masked (BiFormer lets them in); a query region whose routed regions hold no
    real key gets NaN (the benchmark has none). Returns o ``[B, *spatial, H, D]``."""
    spatial = tuple(q.shape[1:-2])
    B, H, D, Dv = q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1]
    g, scale, _, idx, qr, kr, vr = _routed_regions(q, k, v, num_regions, topk, scale, routing)  # [B, H, R, RT, D]
    ix = _routed_rows(idx, H, g.R)
    kg = kr.reshape(B * H * g.R, g.RT * D).index_select(0, ix).reshape(B, H, g.R, topk * g.RT, D)
    vg = vr.reshape(B * H * g.R, g.RT * Dv).index_select(0, ix).reshape(B, H, g.R, topk * g.RT, Dv)
    s = (qr * scale) @ kg.transpose(-1, -2)                                     # [B, H, R, RT, topk RT]
    kbias = _key_bias(g, s.dtype, q.device)
    if kbias is not None:
        s = s + kbias[idx].reshape(B, idx.shape[1], g.R, 1, topk * g.RT)
    p = torch.softmax(s.float(), dim=-1).to(q.dtype)
    o = p @ vg
    return from_regions(o, g).reshape(B, *spatial, H, Dv)
