"""The block-sparse attention core shared by neighborhood, HiP and routing attention.

A family's kernel owns the walk: which KV tiles a query tile visits (forward, dQ) and which
query tiles a KV tile is visited by (dK/dV), and the element mask of a tile. A query-tile walk
(forward, or dQ with the same code and ``BWD``) is ``q_walk_init``, then per KV tile: load it
(``load_rows``), form the raw scores with one ``tl.dot``, mask them (-inf) only when the tile
needs it, ``q_walk_step``; then ``q_walk_store``. A KV-tile walk (dK/dV) calls ``dkdv_update`` per
query tile. So the online softmax and the gradient algebra exist once. Loads stay at the top
level of the walk's loop so Triton can pipeline them. Tiles are row sets given by row offsets
(int64, in elements), so a tile can be a run of a sequence, a box of a 2-D/3-D layout, or rows
gathered from anywhere.

Conventions: the walks take raw scores ``s = q . k`` and ``qk_scale = scale * log2(e)`` and scale
inside the exponent, ``2^(s qk_scale - m)``: one FFMA per score where scaling the tile first costs
an FMUL and an FADD (the row max is taken on raw scores and scaled once per row: exact, as
qk_scale > 0). The softmax runs in the log2 domain: the forward writes ``lse = m + log2(l)`` next
to o, the dQ walk computes ``delta = rowsum(dO * O)`` per row and stores ``scale delta`` for the
dK/dV walk. dS carries the softmax scale before it is rounded to a 16-bit dot operand (the dQ walk
through its lse, the dK/dV walk by one FMA), so dQ and dK come out scaled and fp16 has 1/scale
more headroom for dO . v.

Counts per visited (query tile BM, KV tile BN) pair at head dim D: forward 4 BM BN D FLOPs
(QK^T, PV); backward 8 BM BN D for dK/dV (QK^T recompute, P^T dO, V dO^T, dS^T Q) + 6 BM BN D
for dQ (QK^T, dO V^T, dS K); K/V bytes per visit 2 BN D x itemsize.

A family plugs in as a ``Family`` (its launchers and how their arguments cross a custom op) and
calls ``block_sparse_attention``: eager, an autograd Function; under torch.compile, the custom ops
``subquad::block_sparse_fwd`` / ``subquad::block_sparse_bwd``, so a compiled model has no graph
break at the op and can be replayed from a CUDA graph.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Tuple

import torch
import triton
import triton.language as tl

from ..reference.common import save_with_rest, saved_with_rest
from .common import empty, first_order_only, fp32_dot_precision

__all__ = ["load_rows", "fwd_update", "fwd_finish", "dq_update", "dkdv_update", "q_walk_init", "q_walk_step",
           "q_walk_store", "Family", "register_family", "BlockSparseFunction", "block_sparse_attention",
           "bwd_delta_buffer", "precision", "LOG2E"]


@triton.jit
def load_rows(P, rows, ok, offs_d, d_ok):
    """A [len(rows), BD] tile of rows at int64 element offsets ``rows`` (masked rows read 0). The
    offsets are summed before the pointer: when ``rows`` is loop-invariant (a walk passing the tile's
    base in ``P``), so is the whole offset tile, and a step pays one add per vector."""
    return tl.load(P + (rows[:, None] + offs_d[None, :]), mask=ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def fwd_update(acc, m_i, l_i, s, qk_scale, v, PREC: tl.constexpr):
    """One KV tile of the online softmax: s [BM, BN] raw scores with masked entries at -inf,
    v [BN, BD]; m_i is in the log2 domain (scaled). Rows with nothing visible yet stay at
    m = -inf, l = 0."""
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s * qk_scale - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def fwd_finish(acc, m_i, l_i):
    """(o, lse) from the accumulators; a row that saw no key gets o = 0, lse = -inf."""
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
    return o, lse


@triton.jit
def dq_update(dq, p, do, k, v, delta, PREC: tl.constexpr):
    """dQ += dS K with dS = P (dO V^T - delta); p [BM, BN] recomputed from lse, masked entries 0.
    The dQ walk passes p already times the softmax scale (``q_walk_init`` folds log2(scale) into its
    lse), so dS is scaled before it is rounded to a 16-bit dot operand, at no cost: unscaled it
    overflows fp16 1/scale times sooner, e.g. |dO . v| past 65504 under a GradScaler."""
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC)


@triton.jit
def dkdv_update(dk, dv, pt, q, do, v, delta, scale, PREC: tl.constexpr):
    """dV += P^T dO, dK += dS^T Q for one query tile; pt [BN, BM] = P^T (masked entries 0, rows of
    invalid queries 0 via lse = +inf), delta [BM] times scale (as stored by ``q_walk_init``); dS
    scaled before its rounding as in ``dq_update`` (one FMA, as the unscaled difference was one
    add), so dK needs no scale at the end."""
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
    dst = pt * (dpt * scale - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def q_walk_init(Q, O, DO, LSE, DELTA, q_rows, stat_rows, q_ok, offs_d, d_ok, scale, BM: tl.constexpr,
                BD: tl.constexpr, BWD: tl.constexpr):
    """Start of a query tile's walk (forward, or dQ with BWD): the tile q and the walk state
    (do, lse, delta, acc, m_i, l_i). Forward: acc = o accumulator, m_i, l_i the online softmax
    (do, lse, delta unused). BWD: acc = dQ; rows that saw no key (lse = -inf) or are invalid get
    lse = +inf, so their P is 0; delta = rowsum(dO * O) is computed here and stored to DELTA for
    the dK/dV launch that follows (every family runs dQ first and each query row belongs to one
    dQ program: no separate pass over o and dO)."""
    q = load_rows(Q, q_rows, q_ok, offs_d, d_ok)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    m_i = tl.full([BM], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BM], dtype=tl.float32)
    if BWD:
        do = load_rows(DO, q_rows, q_ok, offs_d, d_ok)
        lse = tl.load(LSE + stat_rows, mask=q_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        o = load_rows(O, q_rows, q_ok, offs_d, d_ok)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + stat_rows, delta * scale, mask=q_ok)  # the dK/dV walks' form
        lse = lse - tl.math.log2(scale)  # the walk's P comes out times scale
    else:
        do = q
        lse = m_i
        delta = l_i
    return q, do, lse, delta, acc, m_i, l_i


@triton.jit
def q_walk_step(acc, m_i, l_i, s, qk_scale, lse, do, k, v, delta, PREC: tl.constexpr, BWD: tl.constexpr):
    """One KV tile of a query tile's walk: s [BM, BN] raw scores q . k, masked entries -inf.
    Forward: the online softmax update; BWD: dQ += dS K with scale P = 2^(s qk_scale - lse), lse
    as ``q_walk_init`` returns it."""
    if BWD:
        acc = dq_update(acc, tl.math.exp2(s * qk_scale - lse[:, None]), do, k, v, delta, PREC)
    else:
        acc, m_i, l_i = fwd_update(acc, m_i, l_i, s, qk_scale, v, PREC)
    return acc, m_i, l_i


@triton.jit
def q_walk_store(O, LSE, DQ, q_rows, stat_rows, q_ok, offs_d, d_ok, acc, m_i, l_i, BWD: tl.constexpr):
    """End of a query tile's walk: forward writes o and lse, BWD writes dQ (already scaled)."""
    mask = q_ok[:, None] & d_ok[None, :]
    if BWD:
        tl.store(DQ + q_rows[:, None] + offs_d[None, :], acc.to(DQ.dtype.element_ty), mask=mask)
    else:
        o, lse = fwd_finish(acc, m_i, l_i)
        tl.store(O + q_rows[:, None] + offs_d[None, :], o.to(O.dtype.element_ty), mask=mask)
        tl.store(LSE + stat_rows, lse, mask=q_ok)


class Family(NamedTuple):
    """A family's launchers, ``fwd(q, k, v, *meta) -> (o, lse)`` and ``bwd(q, k, v, o, lse, do, *meta)
    -> (dq, dk, dv)``, and how its ``meta`` crosses a torch custom op under ``torch.compile``:
    ``encode(*meta) -> (tables, ints, scale)`` (index tensors, integers, the softmax scale),
    ``decode(tables, ints, scale) -> meta``; ``lse_shape(q, ints)`` is the shape of its fp32 lse."""

    name: str
    fwd: Callable
    bwd: Callable
    encode: Callable
    decode: Callable
    lse_shape: Callable


_FAMILIES: Dict[str, Family] = {}


def register_family(family: Family) -> Family:
    """Makes ``family`` callable through the ``subquad::block_sparse_*`` custom ops (by its name)."""
    _FAMILIES[family.name] = family
    return family


class BlockSparseFunction(torch.autograd.Function):
    """The eager autograd op of every block-sparse family: ``apply(q, k, v, family, *meta) -> o``.
    ``meta`` (tile tables, geometry, scale) is not differentiable; its tensors (index tables) are
    saved for the backward like q, k, v. Call it through ``block_sparse_attention``."""

    @staticmethod
    def forward(ctx, q, k, v, family, *meta):
        o, lse = family.fwd(q, k, v, *meta)
        save_with_rest(ctx, (q, k, v, o, lse), meta)
        ctx.bwd = family.bwd
        return o

    @staticmethod
    def backward(ctx, do):
        (q, k, v, o, lse), meta = saved_with_rest(ctx)
        dq, dk, dv = first_order_only(ctx.bwd(q, k, v, o, lse, do.contiguous(), *meta), q, k, v)
        return (dq, dk, dv, None) + (None,) * len(meta)


# Under torch.compile the op is two custom ops, opaque to the compiler (it would otherwise trace
# the launchers' Python: tuner, caches, Triton launches) and free of graph breaks, so a compiled
# model keeps one graph and mode="reduce-overhead" can replay it from a CUDA graph (the small
# routing stages are bound by eager host time). Eager calls keep BlockSparseFunction: a custom op's
# dispatch costs more host time per call.
@torch.library.custom_op("subquad::block_sparse_fwd", mutates_args=())
def _fwd_op(family: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tables: List[torch.Tensor],
            ints: List[int], scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    fam = _FAMILIES[family]
    return fam.fwd(q, k, v, *fam.decode(tables, ints, scale))


@_fwd_op.register_fake
def _fwd_fake(family, q, k, v, tables, ints, scale):
    return q.new_empty(q.shape), q.new_empty(_FAMILIES[family].lse_shape(q, ints), dtype=torch.float32)


@torch.library.custom_op("subquad::block_sparse_bwd", mutates_args=())
def _bwd_op(family: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
            do: torch.Tensor, tables: List[torch.Tensor], ints: List[int],
            scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fam = _FAMILIES[family]
    return fam.bwd(q, k, v, o, lse, do.contiguous(), *fam.decode(tables, ints, scale))


@_bwd_op.register_fake
def _bwd_fake(family, q, k, v, o, lse, do, tables, ints, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _op_setup(ctx, inputs, output):
    family, q, k, v, tables, ints, scale = inputs
    ctx.save_for_backward(q, k, v, *output, *tables)
    ctx.args = (family, ints, scale)
    ctx.mark_non_differentiable(output[1])


def _op_backward(ctx, do, _dlse):
    q, k, v, o, lse, *tables = ctx.saved_tensors
    family, ints, scale = ctx.args
    dq, dk, dv = _bwd_op(family, q, k, v, o, lse, do, tables, ints, scale)
    return None, dq, dk, dv, [None] * len(tables), None, None


_fwd_op.register_autograd(_op_backward, setup_context=_op_setup)


def block_sparse_attention(q, k, v, family: Family, *meta) -> torch.Tensor:
    """The attention of a registered family. Eager: ``BlockSparseFunction.apply`` when a gradient
    can flow, else the forward launcher alone (inference, decoding above all, is bound by host
    time, and autograd's bookkeeping is a good part of it: the kernels of a HiP decoding step take
    ~14 us on an H200). Under torch.compile: the ``subquad::block_sparse_fwd`` custom op."""
    if torch.compiler.is_compiling():
        tables, ints, scale = family.encode(*meta)
        return _fwd_op(family.name, q, k, v, list(tables), list(ints), float(scale))[0]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return BlockSparseFunction.apply(q, k, v, family, *meta)
    return family.fwd(q, k, v, *meta)[0]


def bwd_delta_buffer(lse: torch.Tensor) -> torch.Tensor:
    """The fp32 ``delta = rowsum(dO * O)`` buffer, laid out like the family's lse (the walks index
    both with the same ``stat_rows``): written by the dQ launch (``q_walk_init``), read by the dK/dV
    launch."""
    return empty(lse.shape, torch.float32, lse.device)


def precision(dtype: torch.dtype, follow_torch: bool = True) -> str:
    """Dot input precision ("tf32" is moot for 16-bit operands). fp32 inputs: IEEE fp32 by default,
    TF32 where torch's fp32 matmul setting allows it (``common.fp32_dot_precision``), unless
    ``follow_torch=False`` (selections, whose ranking must match the reference's)."""
    if dtype != torch.float32:
        return "tf32"
    return fp32_dot_precision() if follow_torch else "ieee"


LOG2E = 1.4426950408889634
