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
to o, the dQ walk computes ``delta = rowsum(dO * O)`` per row and stores it for the dK/dV walk.
dQ and dK are returned unscaled: multiply by ``scale`` once.

Counts per visited (query tile BM, KV tile BN) pair at head dim D: forward 4 BM BN D FLOPs
(QK^T, PV); backward 8 BM BN D for dK/dV (QK^T recompute, P^T dO, V dO^T, dS^T Q) + 6 BM BN D
for dQ (QK^T, dO V^T, dS K); K/V bytes per visit 2 BN D x itemsize.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import empty

__all__ = ["load_rows", "fwd_update", "fwd_finish", "dq_update", "dkdv_update", "q_walk_init", "q_walk_step",
           "q_walk_store", "BlockSparseFunction", "block_sparse_attention", "bwd_delta_buffer", "precision", "LOG2E"]


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
    """dQ += dS K with dS = P (dO V^T - delta); p [BM, BN] recomputed from lse, masked entries 0."""
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC)


@triton.jit
def dkdv_update(dk, dv, pt, q, do, v, delta, PREC: tl.constexpr):
    """dV += P^T dO, dK += dS^T Q for one query tile; pt [BN, BM] = P^T (masked entries 0, rows of
    invalid queries 0 via lse = +inf), delta [BM]."""
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    return dk, dv


@triton.jit
def q_walk_init(Q, O, DO, LSE, DELTA, q_rows, stat_rows, q_ok, offs_d, d_ok, BM: tl.constexpr, BD: tl.constexpr,
                BWD: tl.constexpr):
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
        tl.store(DELTA + stat_rows, delta, mask=q_ok)
    else:
        do = q
        lse = m_i
        delta = l_i
    return q, do, lse, delta, acc, m_i, l_i


@triton.jit
def q_walk_step(acc, m_i, l_i, s, qk_scale, lse, do, k, v, delta, PREC: tl.constexpr, BWD: tl.constexpr):
    """One KV tile of a query tile's walk: s [BM, BN] raw scores q . k, masked entries -inf.
    Forward: the online softmax update; BWD: dQ += dS K with P = 2^(s qk_scale - lse)."""
    if BWD:
        acc = dq_update(acc, tl.math.exp2(s * qk_scale - lse[:, None]), do, k, v, delta, PREC)
    else:
        acc, m_i, l_i = fwd_update(acc, m_i, l_i, s, qk_scale, v, PREC)
    return acc, m_i, l_i


@triton.jit
def q_walk_store(O, LSE, DQ, q_rows, stat_rows, q_ok, offs_d, d_ok, acc, m_i, l_i, scale, BWD: tl.constexpr):
    """End of a query tile's walk: forward writes o and lse, BWD writes dQ (times ``scale``)."""
    mask = q_ok[:, None] & d_ok[None, :]
    if BWD:
        tl.store(DQ + q_rows[:, None] + offs_d[None, :], (acc * scale).to(DQ.dtype.element_ty), mask=mask)
    else:
        o, lse = fwd_finish(acc, m_i, l_i)
        tl.store(O + q_rows[:, None] + offs_d[None, :], o.to(O.dtype.element_ty), mask=mask)
        tl.store(LSE + stat_rows, lse, mask=q_ok)


_TABLE = object()  # marks where a saved tensor goes back into meta


class BlockSparseFunction(torch.autograd.Function):
    """The autograd op of every block-sparse family: ``apply(q, k, v, fwd, bwd, *meta) -> o`` with the
    family's launchers ``fwd(q, k, v, *meta) -> (o, lse)`` and ``bwd(q, k, v, o, lse, do, *meta) ->
    (dq, dk, dv)``. ``meta`` (tile tables, geometry, scale) is not differentiable; its tensors (index
    tables) are saved for the backward like q, k, v. Call it through ``block_sparse_attention``."""

    @staticmethod
    def forward(ctx, q, k, v, fwd, bwd, *meta):
        o, lse = fwd(q, k, v, *meta)
        ctx.save_for_backward(q, k, v, o, lse, *[m for m in meta if torch.is_tensor(m)])
        ctx.bwd = bwd
        ctx.meta = [_TABLE if torch.is_tensor(m) else m for m in meta]
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *tables = ctx.saved_tensors
        tables = iter(tables)
        meta = [next(tables) if m is _TABLE else m for m in ctx.meta]
        dq, dk, dv = ctx.bwd(q, k, v, o, lse, do.contiguous(), *meta)
        return (dq, dk, dv, None, None) + (None,) * len(meta)


def block_sparse_attention(q, k, v, fwd, bwd, *meta) -> torch.Tensor:
    """``BlockSparseFunction.apply`` when a gradient can flow, else the forward launcher alone:
    inference (decoding above all) is bound by host time, and autograd's bookkeeping is a good
    part of it (the kernels of a HiP decoding step take ~14 us on an H200)."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return BlockSparseFunction.apply(q, k, v, fwd, bwd, *meta)
    return fwd(q, k, v, *meta)[0]


def bwd_delta_buffer(lse: torch.Tensor) -> torch.Tensor:
    """The fp32 ``delta = rowsum(dO * O)`` buffer, laid out like the family's lse (the walks index
    both with the same ``stat_rows``): written by the dQ launch (``q_walk_init``), read by the dK/dV
    launch."""
    return empty(lse.shape, torch.float32, lse.device)


def precision(dtype: torch.dtype) -> str:
    """Dot input precision: IEEE fp32 for fp32 inputs (TF32 would cost ~3e-4 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


LOG2E = 1.4426950408889634
