"""Public HiP attention ops: ``hip_attention``, ``hip_mask`` and the reusable ``HipMask``; input
checks, backend dispatch. The semantics are stated in ``subquad.reference.hip``."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from ._checks import (check_dim, check_int, check_same, check_scale, check_tensor, public_op, resolve_backend,
                      tensor_version)
from .reference import hip as _ref
from .reference.common import empty_output

__all__ = ["hip_attention", "hip_mask", "HipMask", "TRITON_LIMITS"]

DEFAULTS = dict(topk=512, block_size_q=64, block_size_k=2, query_stride=2, sink_tokens=16, window=256)
_PARAMS = tuple(DEFAULTS)

# What the Triton mask-estimation kernel supports (the reference backend takes any value >= 1):
# block_size_k up to 128 keys per block; up to 128 strided queries per query block
# (ceil(block_size_q / query_stride)); up to 2048 selected blocks (ceil(topk / block_size_k)).
TRITON_LIMITS = dict(block_size_k=128, strided_queries=128, selected_blocks=2048)


class HipMask:
    """A HiP selection and everything it was made with, reusable as ``mask=`` (not differentiable).

    Attributes:
        blocks: int32 ``[B, H, NQB, Kb]``, ``NQB = ceil(Tq / block_size_q)``,
            ``Kb = ceil(topk / block_size_k)``: per (batch, query head, query block) the selected
            key blocks of its search range, ascending, padded at the end with -1 (see
            ``subquad.reference.hip``; key block j covers tokens
            ``sink_tokens + j block_size_k + [0, block_size_k)``, absolute positions).
        topk, block_size_q, block_size_k, query_stride, sink_tokens, window: the parameters.
        B, Tq, Tk, H, H_kv: the shapes it was made for (Tk: the key count at estimation).

    Reuse rule: a mask is valid for inputs with the same B, Tq, H, H_kv, the same parameters and
    ``Tk >= mask.Tk`` (a decoding cache that grew by ``d = Tk - mask.Tk`` tokens). The selected
    blocks keep their absolute positions and the local region is anchored where the mask's
    search range ended, so the ``d`` new keys are all attended: the result is exactly HiP with
    ``window + d`` over this selection. The cost grows by ``d`` keys per query, so refresh the
    mask (``hip_mask`` on the current cache: a tree search, no pass over all keys) every few
    steps. Anything else (other shapes, parameters, a shorter cache) is a ValueError naming mask.

    A hand-built ``blocks`` may hold repeats, -1 anywhere and blocks outside a query block's search
    range: they select nothing more (``subquad.reference.hip.canonical_blocks``, computed once per
    blocks tensor and in-place change; in-place changes of a tensor made under
    ``torch.inference_mode`` are not seen: assign a new tensor).
    """

    __slots__ = ("blocks", "topk", "block_size_q", "block_size_k", "query_stride", "sink_tokens", "window",
                 "B", "Tq", "Tk", "H", "H_kv", "_kernel_form")

    def __init__(self, blocks: torch.Tensor, *, topk: int, block_size_q: int, block_size_k: int, query_stride: int,
                 sink_tokens: int, window: int, B: int, Tq: int, Tk: int, H: int, H_kv: int):
        self.blocks = blocks
        self.topk, self.block_size_q, self.block_size_k = topk, block_size_q, block_size_k
        self.query_stride, self.sink_tokens, self.window = query_stride, sink_tokens, window
        self.B, self.Tq, self.Tk, self.H, self.H_kv = B, Tq, Tk, H, H_kv
        self._kernel_form = None  # (blocks, its version, blocks in canonical form)

    def params(self) -> dict:
        return {n: getattr(self, n) for n in _PARAMS}

    def shapes(self) -> dict:
        return dict(B=self.B, Tq=self.Tq, Tk=self.Tk, H=self.H, H_kv=self.H_kv)

    def __repr__(self) -> str:
        p = ", ".join(f"{k}={v}" for k, v in {**self.params(), **self.shapes()}.items())
        return f"HipMask({p}, blocks={tuple(self.blocks.shape)} on {self.blocks.device})"

    def window_at(self, Tk: int) -> int:
        """The window that reproduces this mask's visible set at ``Tk >= self.Tk`` keys."""
        return self.window + (Tk - self.Tk)


def _check_params(topk, block_size_q, block_size_k, query_stride, sink_tokens, window) -> dict:
    return dict(
        topk=check_int("topk", topk, 1),
        block_size_q=check_int("block_size_q", block_size_q, 1),
        block_size_k=check_int("block_size_k", block_size_k, 1),
        query_stride=check_int("query_stride", query_stride, 1),
        sink_tokens=check_int("sink_tokens", sink_tokens, 0),
        window=check_int("window", window, 0),
    )


def _check_qk(q, k, v=None) -> Tuple[int, int, int, int, int, int]:
    """(B, Tq, Tk, H, H_kv, D) after checking q [B, Tq, H, D], k (and v) [B, Tk, H_kv, D]."""
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    if v is not None:
        check_tensor("v", v, 4)
        check_same("q", q, k=k, v=v)
    else:
        check_same("q", q, k=k)
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    if k.shape[0] != B:
        raise ValueError(f"k must have q's batch size B={B}, got {k.shape[0]} (shape {tuple(k.shape)})")
    if k.shape[3] != D:
        raise ValueError(f"k must have q's head dim D={D}, got {k.shape[3]}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if D < 1:
        raise ValueError(f"head dim D must be >= 1, got {D}")
    if Tq < 1:
        raise ValueError(f"q must hold at least one query (Tq >= 1), got shape {tuple(q.shape)}")
    if Tq > Tk:
        raise ValueError(f"q's length Tq={Tq} must be <= k's length Tk={Tk} (queries are the last Tq positions)")
    if H < 1 or Hkv < 1 or H % Hkv != 0:
        raise ValueError(f"q's heads H={H} must be a positive multiple of k's heads H_kv={Hkv}")
    return B, Tq, Tk, H, Hkv, D


def _resolve_scale(scale, D: int) -> float:
    # > 0 also because the tree search ranks keys by the raw q . k
    scale = check_scale(scale, positive=True)
    return D ** -0.5 if scale is None else scale


def _check_triton(B: int, H: int, D: int, p: dict) -> None:
    check_dim("q", D, 16, 256, "head dim D")
    if p["block_size_k"] > TRITON_LIMITS["block_size_k"]:
        raise ValueError(f"block_size_k must be <= {TRITON_LIMITS['block_size_k']} for the Triton backend, "
                         f"got {p['block_size_k']}")
    nqs = -(-p["block_size_q"] // p["query_stride"])
    if nqs > TRITON_LIMITS["strided_queries"]:
        raise ValueError(f"block_size_q / query_stride: a query block may have at most "
                         f"{TRITON_LIMITS['strided_queries']} strided queries for the Triton backend, got "
                         f"ceil({p['block_size_q']} / {p['query_stride']}) = {nqs}")
    kb = -(-p["topk"] // p["block_size_k"])
    if kb > TRITON_LIMITS["selected_blocks"]:
        raise ValueError(f"topk / block_size_k: at most {TRITON_LIMITS['selected_blocks']} selected blocks for "
                         f"the Triton backend, got ceil({p['topk']} / {p['block_size_k']}) = {kb}")
    if B * H > 65535:
        raise ValueError(f"q: batch x heads = {B} x {H} = {B * H} exceeds the Triton kernel's grid limit of "
                         "65535; split the batch")


def _select(q, k, p: dict, backend: str) -> torch.Tensor:
    with torch.no_grad():
        if backend == "triton":
            from .kernels.hip import hip_select_blocks, select_op
            if torch.compiler.is_compiling():
                args = [p[n] for n in ("topk", "block_size_q", "block_size_k", "query_stride", "sink_tokens", "window")]
                return select_op(q.detach(), k.detach(), *args)
            return hip_select_blocks(q.detach(), k.detach(), **p)
        return _ref.select_blocks(q.detach(), k.detach(), **p)


def _make_mask(q, k, p: dict, backend: str, shapes) -> HipMask:
    B, Tq, Tk, H, Hkv, _ = shapes
    blocks = _select(q, k, p, backend)
    mask = HipMask(blocks, **p, B=B, Tq=Tq, Tk=Tk, H=H, H_kv=Hkv)
    mask._kernel_form = (blocks, tensor_version(blocks), blocks)  # a selection is in canonical form
    return mask


def _mask_blocks(mask: HipMask) -> torch.Tensor:
    """The mask's blocks in the canonical form the kernels read (see HipMask), once per tensor."""
    b, known, version = mask.blocks, mask._kernel_form, tensor_version(mask.blocks)
    if known is not None and known[0] is b and known[1] == version:
        return known[2]
    canon = _ref.canonical_blocks(b, mask.Tq, mask.Tk, block_size_q=mask.block_size_q,
                                  block_size_k=mask.block_size_k, sink_tokens=mask.sink_tokens, window=mask.window)
    if not torch.compiler.is_compiling():  # traced code recomputes it in its graph (a few small ops)
        mask._kernel_form = (b, version, canon)
    return canon


def _check_mask(mask, p: dict, shapes, device) -> int:
    """Validates a reused mask; returns the window to attend with (``mask.window_at(Tk)``)."""
    if not isinstance(mask, HipMask):
        raise TypeError(f"mask must be a HipMask (from hip_mask or return_mask=True) or None, "
                        f"got {type(mask).__name__}")
    B, Tq, Tk, H, Hkv, _ = shapes
    for name in _PARAMS:
        if getattr(mask, name) != p[name]:
            raise ValueError(f"mask was made with {name}={getattr(mask, name)}, but this call has {name}={p[name]}")
    for name, want in (("B", B), ("Tq", Tq), ("H", H), ("H_kv", Hkv)):
        if getattr(mask, name) != want:
            raise ValueError(f"mask was made for {name}={getattr(mask, name)}, but the inputs have {name}={want}")
    if Tk < mask.Tk:
        raise ValueError(f"mask was made at Tk={mask.Tk} keys; it can be reused only at Tk >= {mask.Tk} "
                         f"(a grown cache), got Tk={Tk}")
    NQB, Kb = -(-Tq // p["block_size_q"]), -(-p["topk"] // p["block_size_k"])
    b = mask.blocks
    if not isinstance(b, torch.Tensor) or b.dtype != torch.int32 or tuple(b.shape) != (B, H, NQB, Kb):
        raise ValueError(f"mask.blocks must be an int32 tensor of shape {(B, H, NQB, Kb)}, got "
                         f"{getattr(b, 'dtype', type(b).__name__)} {tuple(getattr(b, 'shape', ()))}")
    if b.device != device:
        raise ValueError(f"mask.blocks must be on the inputs' device {device}, got {b.device}")
    return mask.window_at(Tk)


@public_op("q", "k")
def hip_mask(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    topk: int = 512,
    block_size_q: int = 64,
    block_size_k: int = 2,
    query_stride: int = 2,
    sink_tokens: int = 16,
    window: int = 256,
    scale: Optional[float] = None,
    backend: str = "auto",
) -> HipMask:
    """Estimate the HiP selection (the tree search, step 2 of ``subquad.reference.hip``).

    Args: as :func:`hip_attention` (no v). ``scale`` is checked (> 0) but does not change the
    ranking. Returns a :class:`HipMask` (no gradient flows through it). Work per (batch, head,
    query block): ``O(topk D log(NB / Kb))``, never a pass over all keys.
    """
    shapes = _check_qk(q, k)
    p = _check_params(topk, block_size_q, block_size_k, query_stride, sink_tokens, window)
    _resolve_scale(scale, shapes[5])
    backend = resolve_backend(backend, q)
    if backend == "triton":
        _check_triton(shapes[0], shapes[3], shapes[5], p)
    return _make_mask(q, k, p, backend, shapes)


@public_op("q", "k", "v")
def hip_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    topk: int = 512,
    block_size_q: int = 64,
    block_size_k: int = 2,
    query_stride: int = 2,
    sink_tokens: int = 16,
    window: int = 256,
    scale: Optional[float] = None,
    mask: Optional[HipMask] = None,
    return_mask: bool = False,
    backend: str = "auto",
) -> Union[torch.Tensor, Tuple[torch.Tensor, HipMask]]:
    """HiP attention: per query block a tree search picks ``topk`` keys' worth of key blocks;
    each query attends to the sinks, the picked blocks and a sliding window (causal).

    Query block qb (``block_size_q`` queries, the first at ``p_first = Tk - Tq + qb block_size_q``)
    sees: the sinks ``[0, sink_tokens)``; its local region ``[p_first - window + 1, p_i]``; and the
    selected blocks of its search range ``[sink_tokens, p_first - window + 1)`` (cut into blocks of
    ``block_size_k``; ``ceil(topk / block_size_k)`` of them are picked by the tree search, scored
    by ``q . k`` of every ``query_stride``-th query of the block against a representative block).
    All clipped to ``[0, p_i]``, one softmax. With topk covering the search range this is dense
    causal attention. A lone short needle can be missed by the tree search by design (it follows
    representative blocks); a span of high-scoring keys is found. The exact rules:
    ``subquad.reference.hip``.

    Args:
        q: ``[B, Tq, H, D]``; k, v: ``[B, Tk, H_kv, D]`` with ``H % H_kv == 0`` and ``1 <= Tq <= Tk``;
            query i sits at position ``Tk - Tq + i`` (prefill Tq == Tk, decoding Tq small). Same
            dtype (float32, float16, bfloat16; under torch.autocast any of them, cast to its dtype
            as for SDPA) and device. Triton: D in 16..256.
        topk (>= 1), block_size_q (>= 1), block_size_k (>= 1), query_stride (>= 1),
            sink_tokens (>= 0), window (>= 0). The Triton mask estimation supports
            block_size_k <= 128, ceil(block_size_q / query_stride) <= 128 and
            ceil(topk / block_size_k) <= 2048 (``TRITON_LIMITS``); the reference any value.
        scale: > 0, default ``D ** -0.5``.
        mask: a :class:`HipMask` to reuse instead of estimating (same parameters and shapes,
            ``Tk >= mask.Tk``; see HipMask for decoding reuse).
        return_mask: also return the mask used.
        backend: "auto" (Triton for CUDA tensors, reference for CPU), "triton", "reference".

    Returns:
        o ``[B, Tq, H, D]`` in q's dtype (or ``(o, mask)``). Differentiable in q, k and v with
        the mask held fixed (the selection itself has no gradient). A query that sees no key
        (only with ``window == 0`` and ``sink_tokens == 0``) gets zeros.
    """
    shapes = _check_qk(q, k, v)
    B, Tq, Tk, H, Hkv, D = shapes
    p = _check_params(topk, block_size_q, block_size_k, query_stride, sink_tokens, window)
    scale = _resolve_scale(scale, D)
    if not isinstance(return_mask, bool):
        raise TypeError(f"return_mask must be a bool, got {type(return_mask).__name__}")
    backend = resolve_backend(backend, q)
    if mask is None:
        if backend == "triton":
            _check_triton(B, H, D, p)
        mask = _make_mask(q, k, p, backend, shapes)
        win = p["window"]
    else:
        win = _check_mask(mask, p, shapes, q.device)
        if backend == "triton":
            check_dim("q", D, 16, 256, "head dim D")
            if B * Hkv > 65535:
                raise ValueError(f"k: batch x kv heads = {B} x {Hkv} = {B * Hkv} exceeds the Triton kernel's grid "
                                 "limit of 65535; split the batch")
    akw = dict(block_size_q=p["block_size_q"], block_size_k=p["block_size_k"], sink_tokens=p["sink_tokens"],
               window=win, scale=scale)
    if B == 0:  # an empty batch: no launch (and no autotuning on an empty grid)
        o = empty_output(q.shape, q.dtype, q, k, v)
    elif backend == "triton":
        from .kernels.hip import hip_sparse_attention

        o = hip_sparse_attention(q, k, v, _mask_blocks(mask), **akw)
    else:
        o = _ref.hip_attention_reference(q, k, v, mask.blocks, **akw)  # reads blocks in canonical form itself
    return (o, mask) if return_mask else o
