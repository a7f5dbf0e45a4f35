"""Lightning attention in pure PyTorch: the executable spec and the CPU path.

Per head h with per-step decay lambda = exp(-s_h) (lambda = 1 without decay)::

    S_t = lambda * S_{t-1} + k_t v_t^T          (S_{-1} = S_0, the initial state, [K, V])
    o_t = scale * q_t S_t
        = scale * sum_{u<=t} lambda^(t-u) (q_t . k_u) v_u + scale * lambda^(t+1) q_t S_0
    final state = S_{T-1} = sum_u lambda^(T-1-u) k_u v_u^T + lambda^T S_0

``lightning_attention_naive`` states this literally in O(T^2) (tests only); ``lightning_attention``
computes it in chunks of C tokens (intra-chunk masked quadratic form + inter-chunk state),
O(T) memory, with every exponent of lambda non-negative so large decays cannot overflow.
Both take validated inputs (see ``subquad.lightning_attention`` for the checks).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from .common import rounded

Tensor = torch.Tensor

__all__ = ["lightning_attention", "lightning_attention_naive", "lightning_slopes"]


def lightning_slopes(num_heads: int) -> Tensor:
    """ALiBi-style decay rates of the Lightning Attention-2 code: s_i = 2^(-8 (i+1) / H), fp32 [H]."""
    i = torch.arange(num_heads, dtype=torch.float64)
    return torch.pow(2.0, -8.0 * (i + 1) / num_heads).to(torch.float32)


def _seq_slices(T: int, cu_seqlens: Optional[Tensor]) -> List[Tuple[int, int]]:
    if cu_seqlens is None:
        return [(0, T)]
    cu = [int(x) for x in cu_seqlens.tolist()]
    return list(zip(cu[:-1], cu[1:]))


def lightning_attention_naive(q, k, v, decay=None, scale=None, initial_state=None, cu_seqlens=None):
    """The O(T^2) definition in float64. Returns (o [B,T,H,V] float64, final state [N,H,K,V] float64)."""
    q, k, v = (x.double() for x in (q, k, v))
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    s = torch.zeros(H, dtype=torch.float64) if decay is None else decay.double().cpu()
    s = s.to(q.device)
    outs, finals = [], []
    for n, (bos, eos) in enumerate(_seq_slices(T, cu_seqlens)):
        qs, ks, vs = (x[:, bos:eos].transpose(1, 2) for x in (q, k, v))  # [B, H, L, *]
        L = eos - bos
        Bn = qs.shape[0]
        if initial_state is None:
            S0 = q.new_zeros(Bn, H, K, V)
        else:
            S0 = initial_state.double()[n : n + 1] if cu_seqlens is not None else initial_state.double()
        t = torch.arange(L, dtype=torch.float64, device=q.device)
        diff = t[:, None] - t[None, :]
        M = torch.where(diff >= 0, torch.exp(-s[:, None, None] * diff.clamp(min=0)), torch.zeros((), dtype=torch.float64, device=q.device))
        o = (qs @ ks.transpose(-1, -2)) * M @ vs
        o = o + torch.exp(-s[:, None, None] * (t[:, None] + 1)) * (qs @ S0)
        outs.append((scale * o).transpose(1, 2))
        w = torch.exp(-s[:, None, None] * (L - 1 - t)[:, None])  # [H, L, 1]
        finals.append((ks * w).transpose(-1, -2) @ vs + torch.exp(-s * L)[:, None, None] * S0)
    return torch.cat(outs, 1), torch.cat(finals, 0)


def _chunked(q, k, v, s, scale, S0, chunk_size):
    """One batch of equal-length sequences. q,k: [B,T,H,K], v: [B,T,H,V]; S0 [B,H,K,V] or None.

    Rounding mirrors the kernel: matrix products take operands rounded to the input dtype and
    accumulate in fp32 (fp64 for fp64 inputs); the intra-chunk scores are scaled (scale rides on
    the decay mask) before they are rounded for the product with v; the state stays fp32, and
    enters products as fp32 except for bf16 inputs, where it is rounded to bf16 (fp16 inputs keep
    it fp32: it can exceed fp16's range). Roundings pass gradients through in fp32 (``rounded``).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = q.dtype
    acc = torch.float64 if dt == torch.float64 else torch.float32
    sdt = torch.bfloat16 if dt == torch.bfloat16 else acc
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))  # [B, H, T, *]
    S = q.new_zeros(B, H, K, V, dtype=acc) if S0 is None else S0.to(acc)
    s = None if s is None else s.to(device=q.device, dtype=acc)[:, None, None]  # [H, 1, 1]
    masks = {}  # per chunk length (all but the last chunk share one): built once, saved once

    def decays(n):
        i = torch.arange(n, device=q.device, dtype=acc)
        diff = i[:, None] - i[None, :]
        if s is None:
            return (diff >= 0).to(acc) * scale, scale, None, None
        dmask = torch.where(diff >= 0, scale * torch.exp(-s * diff.clamp(min=0)),
                            torch.zeros((), dtype=acc, device=q.device))
        # [H, n, n]; scale qdec, kdec [H, n, 1]; cdec [H, 1, 1]
        return dmask, scale * torch.exp(-s * (i + 1)[:, None]), torch.exp(-s * (n - 1 - i)[:, None]), torch.exp(-s * n)

    outs = []
    # split, not slices: a slice's backward zero-fills a full-size gradient per chunk (quadratic in T)
    for qc, kc, vc in zip(*(x.split(chunk_size, 2) for x in (qh, kh, vh))):
        n = qc.shape[2]
        if n not in masks:
            masks[n] = decays(n)
        dmask, qscale, kdec, cdec = masks[n]
        qa, ka, va = qc.to(acc), kc.to(acc), vc.to(acc)  # exact: the products accumulate in acc
        intra = rounded(qa @ ka.transpose(-1, -2) * dmask, dt) @ va
        inter = qa @ rounded(S, sdt) * qscale
        outs.append((intra + inter).to(dt))
        kw = ka if kdec is None else rounded(ka * kdec, dt)
        S = kw.transpose(-1, -2) @ va + (S if cdec is None else S * cdec)
    o = torch.cat(outs, 2).transpose(1, 2).contiguous() if outs else q.new_zeros(B, 0, H, V)
    return o, S


def lightning_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Optional[Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[Tensor] = None,
    chunk_size: int = 64,
):
    """Chunked lightning attention (differentiable through autograd).

    q, k: [B, T, H, K]; v: [B, T, H, V]; decay: [H] rates or None; initial_state: [N, H, K, V]
    (N = B, or the number of sequences with cu_seqlens); cu_seqlens: [N+1] with B == 1.
    Returns (o [B, T, H, V] in v's dtype, final state [N, H, K, V] fp32 or None).
    """
    K = q.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    if cu_seqlens is None:
        o, S = _chunked(q, k, v, decay, scale, initial_state, chunk_size)
    else:
        outs, finals = [], []
        for n, (bos, eos) in enumerate(_seq_slices(q.shape[1], cu_seqlens)):
            s0 = None if initial_state is None else initial_state[n : n + 1]
            o_n, S_n = _chunked(q[:, bos:eos], k[:, bos:eos], v[:, bos:eos], decay, scale, s0, chunk_size)
            outs.append(o_n)
            finals.append(S_n)
        o, S = torch.cat(outs, 1), torch.cat(finals, 0)
    final = None
    if output_final_state:
        final = S if S.dtype == torch.float64 else S.float()
    return o.to(v.dtype), final
