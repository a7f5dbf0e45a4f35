"""The block-sparse attention core shared by neighborhood, HiP and routing attention.

A family's kernel owns the walk: which KV tiles a query tile visits (forward, dQ) and which
query tiles a KV tile is visited by (dK/dV), and the element mask of a tile. Each step of the
walk calls one of the three steps below, so the online softmax and the gradient algebra exist
once. Tiles are row sets given by row offsets (int64, in elements), so a tile can be a run of a
sequence, a box of a 2-D/3-D layout, or rows gathered from anywhere.

Conventions: scores are kept in the log2 domain (``qk_scale = scale * log2(e)``), the forward
writes ``lse = m + log2(l)`` (log2 domain) next to o, the backward takes
``delta = rowsum(dO * O)``. dQ and dK are returned unscaled: multiply by ``scale`` once.

Counts per visited (query tile BM, KV tile BN) pair at head dim D: forward 4 BM BN D FLOPs
(QK^T, PV); backward 8 BM BN D for dK/dV (QK^T recompute, P^T dO, V dO^T, dS^T Q) + 6 BM BN D
for dQ (QK^T, dO V^T, dS K); K/V bytes per visit 2 BN D x itemsize.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["fwd_step", "dq_step", "dkdv_step", "fwd_finish", "bwd_delta"]


@triton.jit
def fwd_step(acc, m_i, l_i, q, K, V, k_rows, k_ok, offs_d, d_ok, mask, qk_scale,
             USE_MASK: tl.constexpr, PREC: tl.constexpr):
    """One KV tile of the online softmax. q [BM, BD] (already in the input dtype); k_rows [BN]
    int64 row offsets into K and V; mask [BM, BN] bool, applied only when USE_MASK."""
    k = tl.load(K + k_rows[:, None] + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + k_rows[:, None] + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if USE_MASK:
        s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = tl.math.exp2(s - m_safe[:, None])
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
def dq_step(dq, q, do, lse, delta, K, V, k_rows, k_ok, offs_d, d_ok, mask, qk_scale,
            USE_MASK: tl.constexpr, PREC: tl.constexpr):
    """dQ += dS K for one KV tile, with P recomputed from lse; dS = P (dO V^T - delta)."""
    k = tl.load(K + k_rows[:, None] + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + k_rows[:, None] + offs_d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if USE_MASK:
        p = tl.where(mask, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PREC)


@triton.jit
def dkdv_step(dk, dv, k, v, Q, DO, LSE, DELTA, q_rows, q_ok, stat_rows, offs_d, d_ok, mask_t, qk_scale,
              USE_MASK: tl.constexpr, PREC: tl.constexpr):
    """dV += P^T dO, dK += dS^T Q for one query tile visiting this KV tile. q_rows [BM] row offsets
    into Q / DO, stat_rows [BM] offsets into LSE / DELTA; mask_t [BN, BM]. Rows with q_ok False
    get lse = +inf, so they contribute nothing."""
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + q_rows[:, None] + offs_d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(LSE + stat_rows, mask=q_ok, other=float("inf"))
    delta = tl.load(DELTA + stat_rows, mask=q_ok, other=0.0)
    st = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
    pt = tl.math.exp2(st - lse[None, :])
    if USE_MASK:
        pt = tl.where(mask_t, pt, 0.0)
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
    dpt = tl.dot(v, tl.trans(do), input_precision=PREC)
    dst = pt * (dpt - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
    return dk, dv


def bwd_delta(o: torch.Tensor, do: torch.Tensor) -> torch.Tensor:
    """rowsum(dO * O) in fp32, laid out like lse: [B, *spatial, H]."""
    return (o.float() * do.float()).sum(-1)


def precision(dtype: torch.dtype) -> str:
    """Dot input precision: IEEE fp32 for fp32 inputs (TF32 would cost ~3e-4 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


LOG2E = 1.4426950408889634
