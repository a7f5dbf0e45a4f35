"""Public neighborhood attention op (NATTEN semantics, including GNA): input checks, backend
dispatch. The semantics are stated in ``subquad.reference.neighborhood``."""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import torch

from ._checks import (check_dim, check_same, check_scale, check_tensor, is_int, per_dim_bools, per_dim_ints, public_op,
                      resolve_backend)
from .reference import neighborhood as _ref
from .reference.common import empty_output

__all__ = ["neighborhood_attention", "na1d", "na2d", "na3d", "neighborhood_speedup_bound"]


IntOrSeq = Union[int, Sequence[int]]
BoolOrSeq = Union[bool, Sequence[bool]]


def check_window_args(spatial: Sequence[int], kernel_size, stride, dilation, is_causal):
    """Validate and normalise the per-dim window arguments against the spatial shape.

    Returns ``(kernel_size, stride, dilation, is_causal)`` as tuples of one per dim. Rules per dim:
    2 <= kernel_size, 1 <= stride <= kernel_size, 1 <= dilation, kernel_size * dilation <= size.
    """
    nd = len(spatial)
    ks = per_dim_ints("kernel_size", kernel_size, nd)
    ss = per_dim_ints("stride", stride, nd)
    ds = per_dim_ints("dilation", dilation, nd)
    cs = per_dim_bools("is_causal", is_causal, nd)
    for a in range(nd):
        k, s, d, n = ks[a], ss[a], ds[a], spatial[a]
        if k < 2:
            raise ValueError(f"kernel_size must be >= 2 in every dim, got kernel_size={k} in dim {a}")
        if not 1 <= s <= k:
            raise ValueError(f"stride must be in [1, kernel_size] in every dim, got stride={s} with "
                             f"kernel_size={k} in dim {a}")
        if d < 1:
            raise ValueError(f"dilation must be >= 1 in every dim, got dilation={d} in dim {a}")
        if k * d > n:
            raise ValueError(f"kernel_size * dilation must be <= the input size in every dim, got "
                             f"kernel_size={k} * dilation={d} = {k * d} > size={n} in dim {a}")
    return ks, ss, ds, cs


@functools.wraps(_ref.neighborhood_speedup_bound)
def neighborhood_speedup_bound(shape: Sequence[int], kernel_size: IntOrSeq, stride: IntOrSeq = 1,
                               dilation: IntOrSeq = 1, is_causal: BoolOrSeq = False, q_tile=None,
                               kv_tile=None) -> _ref.SpeedupBound:
    if not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 3 or not all(is_int(n) and n >= 1 for n in shape):
        raise ValueError(f"shape must be a sequence of 1, 2 or 3 positive ints (the spatial dims), got {shape!r}")
    shape = tuple(int(n) for n in shape)
    ks, ss, ds, cs = check_window_args(shape, kernel_size, stride, dilation, is_causal)
    tiles = []
    for name, t in (("q_tile", q_tile), ("kv_tile", kv_tile)):
        t = None if t is None else per_dim_ints(name, t, len(shape))
        if t is not None and min(t) < 1:
            raise ValueError(f"{name} must be >= 1 in every dim, got {t}")
        tiles.append(t)
    return _ref.neighborhood_speedup_bound(shape, ks, ss, ds, cs, *tiles)


def _check_qkv(q, k, v, rank: Optional[int], op: str):
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x)
    if rank is None:
        if q.dim() not in (4, 5, 6):
            raise ValueError(f"q must have 4, 5 or 6 dims ([B, *spatial, H, D] with 1, 2 or 3 spatial dims), "
                             f"got {q.dim()} (shape {tuple(q.shape)})")
    elif q.dim() != rank:
        raise ValueError(f"q must have {rank} dims for {op} ([B, {', '.join('XYZ'[:rank - 3])}, H, D]), "
                         f"got {q.dim()} (shape {tuple(q.shape)})")
    for name, x in (("k", k), ("v", v)):
        if x.dim() != q.dim():
            raise ValueError(f"{name} must have q's {q.dim()} dims, got {x.dim()} (shape {tuple(x.shape)})")
    check_same("q", q, k=k, v=v)
    if k.shape[:-2] != q.shape[:-2]:
        raise ValueError(f"k must have q's [B, *spatial] = {tuple(q.shape[:-2])}, got {tuple(k.shape[:-2])}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    H, D = q.shape[-2], q.shape[-1]
    Hkv = k.shape[-2]
    if k.shape[-1] != D:
        raise ValueError(f"k must have q's head dim D={D}, got {k.shape[-1]}")
    if D < 1:
        raise ValueError(f"head dim D must be >= 1, got {D}")
    if H < 1 or Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"q's heads H={H} must be a positive multiple of k's and v's heads H_kv={Hkv}")


@public_op("q", "k", "v")
def _neighborhood(q, k, v, kernel_size, stride, dilation, is_causal, scale, backend, rank, op):
    _check_qkv(q, k, v, rank, op)
    spatial = tuple(q.shape[1:-2])
    ks, ss, ds, cs = check_window_args(spatial, kernel_size, stride, dilation, is_causal)
    scale = check_scale(scale, positive=True)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backend = resolve_backend(backend, q)
    if backend == "triton":
        check_dim("q", q.shape[-1], 16, 256, "head dim D")
    if q.shape[0] == 0:  # an empty batch: no launch (and no autotuning on an empty grid)
        return empty_output(q.shape, q.dtype, q, k, v)
    if backend == "triton":
        from .kernels.block_sparse import block_sparse_attention
        from .kernels.neighborhood import NEIGHBORHOOD

        nd = len(spatial)
        pad = (1,) * (3 - nd)  # every layout runs as 3-D: leading dims of size 1, window 1
        n3 = pad + spatial
        geom = (n3, pad + ks, pad + ss, pad + ds, (False,) * (3 - nd) + cs)
        B, H, Hkv, D = q.shape[0], q.shape[-2], k.shape[-2], q.shape[-1]
        # grid axes 1 and 2 (dilation groups, batch x heads) are limited to 65535 programs
        if B * H > 65535:
            raise ValueError(f"q: batch x heads = {B} x {H} = {B * H} exceeds the Triton kernel's grid limit of "
                             "65535; split the batch")
        if math.prod(ds) > 65535:
            raise ValueError(f"dilation: the product of dilations {ds} exceeds the Triton kernel's limit of 65535")
        # geom: (n, kernel_size, stride, dilation, is_causal) as 3-tuples over the 3-D layout
        o = block_sparse_attention(
            q.reshape(B, *n3, H, D).contiguous(), k.reshape(B, *n3, Hkv, D).contiguous(),
            v.reshape(B, *n3, Hkv, D).contiguous(), NEIGHBORHOOD, geom, nd, scale)
        return o.reshape(q.shape)
    return _ref.neighborhood_attention(q, k, v, ks, ss, ds, cs, scale)


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kernel_size: IntOrSeq,
    *,
    stride: IntOrSeq = 1,
    dilation: IntOrSeq = 1,
    is_causal: BoolOrSeq = False,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Neighborhood attention in 1, 2 or 3 spatial dims (NATTEN semantics, including GNA's stride).

    Each query attends to a box of keys around it: per spatial dim of length n, window k,
    stride s, dilation d (see ``subquad.reference.neighborhood`` for the exact rules):

    - dilation: tokens split into d interleaved groups (i mod d); the rules run inside a group;
    - non-causal: the window of k keys is centred on the query's stride-group leader and shifted
      inward at borders, so every query sees exactly k keys per dim, and all queries of a stride
      group (s consecutive in-group tokens) share one window;
    - causal: keys from ``leader - k + 1`` (leader: the stride group's last query) up to the
      query itself, truncated at the left border.

    Args:
        q: ``[B, *spatial, H, D]`` with 1-3 spatial dims; k, v: ``[B, *spatial, H_kv, D]`` with
            ``H % H_kv == 0`` (grouped-query: query head h reads kv head ``h // (H // H_kv)``).
            Same dtype (float32, float16, bfloat16; under torch.autocast any of them, cast to its
            dtype as for SDPA) and device.
        kernel_size, stride, dilation: an int or one per spatial dim, with per dim
            ``2 <= kernel_size``, ``1 <= stride <= kernel_size``, ``1 <= dilation`` and
            ``kernel_size * dilation <= size``.
        is_causal: a bool or one per spatial dim.
        scale: > 0, default ``D ** -0.5``.
        backend: "auto" (Triton for CUDA tensors, reference for CPU), "triton", "reference".

    Returns:
        o: q's shape and dtype (stride does not subsample). Differentiable in q, k and v.
    """
    return _neighborhood(q, k, v, kernel_size, stride, dilation, is_causal, scale, backend, None,
                         "neighborhood_attention")


def na1d(q, k, v, kernel_size: IntOrSeq, *, stride: IntOrSeq = 1, dilation: IntOrSeq = 1,
         is_causal: BoolOrSeq = False, scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """``neighborhood_attention`` for ``[B, X, H, D]`` inputs (checks the rank)."""
    return _neighborhood(q, k, v, kernel_size, stride, dilation, is_causal, scale, backend, 4, "na1d")


def na2d(q, k, v, kernel_size: IntOrSeq, *, stride: IntOrSeq = 1, dilation: IntOrSeq = 1,
         is_causal: BoolOrSeq = False, scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """``neighborhood_attention`` for ``[B, X, Y, H, D]`` inputs (checks the rank)."""
    return _neighborhood(q, k, v, kernel_size, stride, dilation, is_causal, scale, backend, 5, "na2d")


def na3d(q, k, v, kernel_size: IntOrSeq, *, stride: IntOrSeq = 1, dilation: IntOrSeq = 1,
         is_causal: BoolOrSeq = False, scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """``neighborhood_attention`` for ``[B, X, Y, Z, H, D]`` inputs (checks the rank)."""
    return _neighborhood(q, k, v, kernel_size, stride, dilation, is_causal, scale, backend, 6, "na3d")
