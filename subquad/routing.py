"""Public bi-level routing attention op (BiFormer): input checks, routing, backend dispatch. The
semantics are stated in ``subquad.reference.routing``."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from ._checks import (capturing, check_dim, check_same, check_scale, check_tensor, is_int, per_dim_ints, public_op,
                      resolve_backend)
from .reference import routing as _ref
from .reference.common import empty_output

__all__ = ["bilevel_routing_attention"]

ROUTING_MODES = ("shared", "per_head")


def _check_qkv(q, k, v):
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x)
    if q.dim() not in (4, 5):
        raise ValueError(f"q must have 4 or 5 dims ([B, *spatial, H, D] with 1 or 2 spatial dims), "
                         f"got {q.dim()} (shape {tuple(q.shape)})")
    check_same("q", q, k=k, v=v)
    for name, x in (("k", k), ("v", v)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(x.shape)}")
    if q.shape[-1] < 1 or q.shape[-2] < 1:
        raise ValueError(f"q must have at least one head and head dim >= 1, got shape {tuple(q.shape)}")
    if any(n < 1 for n in q.shape[1:-2]):
        raise ValueError(f"q must have non-empty spatial dims, got shape {tuple(q.shape)}")


def check_region_args(spatial: Sequence[int], num_regions, topk) -> Tuple[Tuple[int, ...], int]:
    """Validate num_regions (an int or one per spatial dim, 1 <= S <= size) and topk
    (1 <= topk <= number of regions). Returns (num_regions as a tuple, topk)."""
    ss = per_dim_ints("num_regions", num_regions, len(spatial))
    for a, (s, n) in enumerate(zip(ss, spatial)):
        if s < 1:
            raise ValueError(f"num_regions must be >= 1 in every dim, got {s} in dim {a}")
        if s > n:
            raise ValueError(f"num_regions must be <= the input size in every dim, got num_regions={s} > "
                             f"size={n} in dim {a}")
    R = 1
    for s in ss:
        R *= s
    if not is_int(topk):
        raise TypeError(f"topk must be an int, got {type(topk).__name__}")
    if not 1 <= topk <= R:
        raise ValueError(f"topk must be in [1, number of regions = {R}], got {topk}")
    return ss, int(topk)


def check_routing_tensor(routing: torch.Tensor, q: torch.Tensor, R: int, topk: int, values: bool = True) -> None:
    """A caller-supplied routing: int32/int64 ``[B, R, topk]`` or ``[B, H, R, topk]`` on q's device,
    values in [0, R), no region twice in one row (``values``: read them, a host sync)."""
    if routing.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"routing must be an int32 or int64 tensor of region indices, got "
                        f"{str(routing.dtype).replace('torch.', '')}")
    if routing.device != q.device:
        raise ValueError(f"routing must be on the device of q ({q.device}), got {routing.device}")
    B, H = q.shape[0], q.shape[-2]
    shapes = [(B, R, topk), (B, H, R, topk)]
    if tuple(routing.shape) not in shapes:
        raise ValueError(f"routing must have shape [B, R, topk] = {shapes[0]} or [B, H, R, topk] = {shapes[1]}, "
                         f"got {tuple(routing.shape)}")
    if values:
        _check_routing_values(routing, R)


def _check_routing_values(routing: torch.Tensor, R: int) -> None:
    if routing.numel() == 0 or capturing(routing):  # a capture cannot read values: its warm-up checked them
        return
    lo, hi = int(routing.min()), int(routing.max())
    if lo < 0 or hi >= R:
        raise ValueError(f"routing holds region indices outside [0, {R}): min {lo}, max {hi}")
    if routing.shape[-1] > 1:
        srt = torch.sort(routing, dim=-1).values
        if bool((srt[..., 1:] == srt[..., :-1]).any()):
            raise ValueError("routing must not list a region twice for one query region (duplicate indices)")


@public_op("q", "k", "v")
def bilevel_routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    num_regions: Union[int, Sequence[int]],
    topk: int,
    scale: Optional[float] = None,
    routing: Union[str, torch.Tensor] = "shared",
    backend: str = "auto",
    return_routing: bool = False,
):
    """Bi-level routing attention (BiFormer) in 1 or 2 spatial dims.

    The spatial dims are cut into an even grid of regions (padded to a multiple of num_regions);
    each region is routed to the ``topk`` regions whose mean key best matches its mean query, and
    each query token attends, under one softmax, to the real key tokens of its region's routed
    regions (see ``subquad.reference.routing`` for the exact rules).

    Args:
        q, k, v: ``[B, *spatial, H, D]`` with 1 spatial dim (``[B, T, H, D]``) or 2
            (``[B, Hi, Wi, H, D]``), same shape, dtype (float32, float16, bfloat16; under
            torch.autocast any of them, cast to its dtype as for SDPA) and device. The Triton
            backend takes head dims D in [16, 128].
        num_regions: regions per spatial dim (BiFormer's n_win): an int or one per dim, each in
            [1, size of the dim]. R = the product.
        topk: regions routed per region, 1 <= topk <= R (topk = R is full attention).
        scale: > 0, default ``D ** -0.5``.
        routing: "shared" (one routing for all heads, affinity summed over heads, BiFormer),
            "per_head" (each head routes on its own), or an int32/int64 tensor ``[B, R, topk]`` /
            ``[B, H, R, topk]`` of region indices (row-major region ids, no repeats in a row).
            Routing is not differentiable.
        backend: "auto" (Triton for CUDA tensors, reference for CPU), "triton", "reference".
        return_routing: also return the routing indices used (int64 ``[B, R, topk]`` or
            ``[B, H, R, topk]``; regions in order of decreasing affinity, ties to the lower index).

    Returns:
        o (q's shape and dtype; differentiable in q, k and v), or (o, routing indices).

    Sizes not divisible by num_regions are padded internally: padded keys take part in no
    softmax and padded queries are dropped (BiFormer lets zero-padded keys into the softmax).
    A query whose routed regions hold no real token (possible only when padding leaves a region
    empty, e.g. 9 tokens in 4 regions of 3) gets a zero output.
    """
    _check_qkv(q, k, v)
    spatial = tuple(q.shape[1:-2])
    ss, topk = check_region_args(spatial, num_regions, topk)
    R = 1
    for s in ss:
        R *= s
    if isinstance(routing, str):
        if routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES} or an index tensor, got {routing!r}")
    elif isinstance(routing, torch.Tensor):
        compiling = torch.compiler.is_compiling()
        check_routing_tensor(routing, q, R, topk, values=not compiling)
        if compiling:  # traced code cannot read the values: the op checks them when it runs
            routing = _check_routing_op(routing, R)
    else:
        raise TypeError(f"routing must be a str or a torch.Tensor, got {type(routing).__name__}")
    if not isinstance(return_routing, bool):
        raise TypeError(f"return_routing must be a bool, got {type(return_routing).__name__}")
    scale = check_scale(scale, positive=True)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    backend = resolve_backend(backend, q)
    B, H = q.shape[0], q.shape[-2]
    if backend == "triton":
        check_dim("q", q.shape[-1], 16, 128, "head dim D")
        if B * H > 65535:
            raise ValueError(f"q: batch x heads = {B} x {H} = {B * H} exceeds the Triton kernel's grid limit of "
                             "65535; split the batch")
    if B == 0:  # an empty batch: nothing to route or launch
        o = empty_output(q.shape, q.dtype, q, k, v)
        idx = routing if isinstance(routing, torch.Tensor) else q.new_zeros(
            (0, R, topk) if routing == "shared" else (0, H, R, topk), dtype=torch.int64)
    elif backend == "triton":
        from .kernels.routing import routing_attention

        o, idx = routing_attention(q, k, v, ss, topk, scale, routing)
    else:
        o, idx = _ref.bilevel_routing_attention(q, k, v, ss, topk, scale, routing)
    return (o, idx.to(torch.int64)) if return_routing else o


@torch.library.custom_op("subquad::check_routing", mutates_args=())
def _check_routing_op(routing: torch.Tensor, num_regions: int) -> torch.Tensor:
    """A supplied routing under torch.compile: its values checked when the compiled code runs
    (raising ValueError as in eager), returned as a copy that the attention then reads."""
    _check_routing_values(routing, num_regions)
    return routing.clone()


@_check_routing_op.register_fake
def _check_routing_fake(routing, num_regions):
    return torch.empty_like(routing)
