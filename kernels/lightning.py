"""Lightning attention (causal linear attention with per-head decay) in Triton.

Math: see ``subquad.reference.lightning``. Tiling (Lightning Attention-2): a sequence is cut
into chunks of BT tokens; within a chunk the masked quadratic form with the decay mask
D[i, j] = lambda^(i-j) (i >= j) runs on tensor cores, across chunks an fp32 state S [K, V]
carries everything before. Every exponent of lambda is non-negative, so no decay overflows.

Decomposition: single-sweep kernels. One program per (sequence, head, V block, K block) walks
its sequence chunk by chunk, keeping its BK x BV block of S in registers, so the state never
touches memory. Backward: two sweeps, ``dq`` forward in time (recomputing S) and ``dk, dv, dS0``
backward in time (carrying dS = dLoss/dS). Everything a program computes is linear in its K and V
blocks, so splitting is exact: o and dv (sums over K) and dq and dk (sums over V) are written as
fp32 partials when split and summed afterwards. The split exists because a whole 128 x 128 (or
256 x 256) fp32 state plus the chunk tiles does not fit in registers (the compile check shows
spills); it costs traffic: NV reads of q, k and NK fp32 writes of o.

Counts per token and head (K = V = D, chunk C), useful FLOPs:
  forward   2CD (q k^T, half masked) + 2CD (P v) + 2D^2 (q S) + 2D^2 (S update)
  backward  dq sweep: 2CD (dO v^T) + 2CD (dP k) + 2D^2 (dO S^T) + 2D^2 (S)
            dkdv sweep: 4 x 2CD (k q^T, A dO, v dO^T, dP^T q) + 3 x 2D^2 (k dS, v dS^T, dS update)
Bytes per token and head (bf16): the floor is one read of q, k, v and one write of o, 8D; with the
split, 2D (NV + NV) for q, k + 2D NK for v + 4D NK x 2 for the o partials + 2D for o (at D = 128,
BK = 64, BV = 32: ~4.8 KB instead of 1 KB).
Measured (H100, bf16, B=4, H=32, D=128, T=64k): forward 22.9 ms, forward+backward 115 ms; the
floor of the forward's traffic as split is ~13 ms, the rest is the chunk chain's latency.

Decoding (short sequences, e.g. T == 1 with a state) uses ``_recurrent_fwd_kernel``: a token
loop of rank-1 updates on the register-resident state, no padding to a chunk of tokens.

Precision: fp32 inputs use IEEE fp32 dots (TF32 where torch's fp32 matmul setting allows it,
``common.fp32_dot_precision``). fp16/bf16 operands go to tensor cores with fp32
accumulation; the state enters its products as fp32 (tf32 dots) for fp16, whose range it can
exceed, and as bf16 for bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary

from .._checks import capturing
from ..autotune import bench_launch, spaces
from .common import cdiv, dtype_key, empty, first_order_only, fp32_dot_precision, pow2 as _pow2

__all__ = ["LightningAttentionFunction", "lightning_fwd", "lightning_bwd", "RECURRENT_MAX_T"]

# Sequences up to this length take the token-recurrent forward (decoding).
RECURRENT_MAX_T = 16


@triton.jit
def _seq_bounds(CU, i_n, T, IS_VARLEN: tl.constexpr):
    if IS_VARLEN:
        bos = tl.load(CU + i_n).to(tl.int64)
        eos = tl.load(CU + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    return bos, (eos - bos).to(tl.int32)


@triton.jit
def _program(DECAY, CU, T, H, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
             HAS_DECAY: tl.constexpr, IS_VARLEN: tl.constexpr):
    """What every kernel's program (sequence x head, V block, K block) starts from: its head, V
    and K blocks, the sequence's first row and length, its block's channels and masks, the decay
    rate s (lambda = e^-s; 0 without decay) and the offsets of its [BK, BV] block of a state."""
    i_nh = tl.program_id(0)
    i_v = tl.program_id(1)
    i_k = tl.program_id(2)
    i_h = i_nh % H
    bos, L = _seq_bounds(CU, i_nh // H, T, IS_VARLEN)
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    s = 0.0
    if HAS_DECAY:
        s = tl.load(DECAY + i_h).to(tl.float32)
    s_off = i_nh.to(tl.int64) * K * V + ok[:, None] * V + ov[None, :]
    return i_h, i_v, i_k, bos, L, ok, ov, ok < K, ov < V, s, s_off


@triton.jit
def _load_state(S, s_off, mk, mv, PRESENT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """This program's fp32 block of a state (or of its gradient); zeros when none was given."""
    if PRESENT:
        b = tl.load(S + s_off, mask=mk[:, None] & mv[None, :], other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BK, BV], dtype=tl.float32)
    return b


@triton.jit
def _chunk(i_t, L, BT: tl.constexpr):
    """Chunk i_t of a sequence of L tokens: its valid token count, its rows (int64) and their mask."""
    ot = i_t * BT + tl.arange(0, BT)
    return tl.minimum(L - i_t * BT, BT), ot.to(tl.int64), ot < L


@triton.jit
def _load_tile(base, rows, row_ok, cols, col_ok, width):
    """A [rows, cols] tile (0 where masked) of a tensor of ``width`` elements per row from ``base`` (the
    program's first row and head). Loads and stores spell their offsets out at each call: offsets
    shared between the loads of a chunk lengthened the compiled dK/dV step (SASS count: up to 8%)."""
    return tl.load(base + rows[:, None] * width + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def _store_tile(base, rows, row_ok, cols, col_ok, width, x):
    tl.store(base + rows[:, None] * width + cols[None, :], x, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _chunk_decays(s, n, scale, BT: tl.constexpr, HAS_DECAY: tl.constexpr):
    """For a chunk of n valid tokens: the causal decay mask times the softmax-free scale,
    D[i, j] = scale lambda^(i-j) (i >= j), q-side lambda^(i+1), k-side lambda^(n-1-j) (0 past n) and
    the whole-chunk lambda^n. The scale rides on D so that the intra-chunk products (q.k, dO.v) are
    scaled before they are rounded to a 16-bit dot operand: unscaled they overflow fp16 1/scale
    times sooner (e.g. at 65504 / sqrt(128) = 5.8e3 per entry at K = 128)."""
    i = tl.arange(0, BT)
    diff = i[:, None] - i[None, :]
    if HAS_DECAY:
        dmask = tl.where(diff >= 0, scale * tl.exp(-s * tl.maximum(diff, 0).to(tl.float32)), 0.0)
        qdec = tl.exp(-s * (i + 1).to(tl.float32))
        kdec = tl.where(i < n, tl.exp(-s * tl.maximum(n - 1 - i, 0).to(tl.float32)), 0.0)
        cdec = tl.exp(-s * n.to(tl.float32))
    else:
        dmask = tl.where(diff >= 0, scale, 0.0)
        qdec = tl.full([BT], 1.0, tl.float32)
        kdec = tl.where(i < n, 1.0, 0.0)
        cdec = s * 0.0 + 1.0
    return dmask, qdec, kdec, cdec


@triton.jit(do_not_specialize=["T"])
def _fwd_kernel(
    Q, Kt, Vt, O, DECAY, S0, ST, CU, T, B, H, scale,
    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, STORE_ST: tl.constexpr, IS_VARLEN: tl.constexpr,
    STATE_DT: tl.constexpr, PREC: tl.constexpr,
):
    i_h, i_v, i_k, bos, L, ok, ov, mk, mv, s, s_off = _program(DECAY, CU, T, H, K, V, BK, BV, HAS_DECAY, IS_VARLEN)
    b_S = _load_state(S0, s_off, mk, mv, HAS_S0, BK, BV)
    q_base = Q + (bos * H + i_h) * K
    k_base = Kt + (bos * H + i_h) * K
    v_base = Vt + (bos * H + i_h) * V
    o_base = O + i_k.to(tl.int64) * B * T * H * V + (bos * H + i_h) * V  # NK > 1: fp32 partials
    for i_t in range(0, tl.cdiv(L, BT)):
        n, ot64, mt = _chunk(i_t, L, BT)
        b_q = _load_tile(q_base, ot64, mt, ok, mk, H * K)
        b_k = _load_tile(k_base, ot64, mt, ok, mk, H * K)
        b_v = _load_tile(v_base, ot64, mt, ov, mv, H * V)
        dmask, qdec, kdec, cdec = _chunk_decays(s, n, scale, BT, HAS_DECAY)
        b_a = tl.dot(b_q, tl.trans(b_k), input_precision=PREC) * dmask
        b_o = tl.dot(b_a.to(b_v.dtype), b_v, input_precision=PREC)
        b_o += tl.dot(b_q.to(STATE_DT), b_S.to(STATE_DT), input_precision=PREC) * (qdec * scale)[:, None]
        _store_tile(o_base, ot64, mt, ov, mv, H * V, b_o.to(O.dtype.element_ty))
        b_kw = (b_k * kdec[:, None]).to(b_k.dtype)
        b_S = b_S * cdec + tl.dot(tl.trans(b_kw), b_v, input_precision=PREC)
    if STORE_ST:
        tl.store(ST + s_off, b_S, mask=mk[:, None] & mv[None, :])


@triton.jit(do_not_specialize=["T"])
def _recurrent_fwd_kernel(
    Q, Kt, Vt, O, DECAY, S0, ST, CU, T, H, scale,
    K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, STORE_ST: tl.constexpr, IS_VARLEN: tl.constexpr,
):
    i_h, i_v, i_k, bos, L, ok, ov, mk, mv, s, s_off = _program(DECAY, CU, T, H, K, V, BK, BV, HAS_DECAY, IS_VARLEN)
    b_S = _load_state(S0, s_off, mk, mv, HAS_S0, BK, BV)
    lam = 1.0
    if HAS_DECAY:
        lam = tl.exp(-s)
    for t in range(0, L):
        row = bos + t
        b_q = tl.load(Q + (row * H + i_h) * K + ok, mask=mk, other=0.0).to(tl.float32)
        b_k = tl.load(Kt + (row * H + i_h) * K + ok, mask=mk, other=0.0).to(tl.float32)
        b_v = tl.load(Vt + (row * H + i_h) * V + ov, mask=mv, other=0.0).to(tl.float32)
        b_S = b_S * lam + b_k[:, None] * b_v[None, :]
        b_o = tl.sum(b_S * b_q[:, None], axis=0) * scale
        tl.store(O + (row * H + i_h) * V + ov, b_o.to(O.dtype.element_ty), mask=mv)
    if STORE_ST:
        tl.store(ST + s_off, b_S, mask=mk[:, None] & mv[None, :])


@triton.jit(do_not_specialize=["T"])
def _bwd_dq_kernel(
    Kt, Vt, DO, DQ, DECAY, S0, CU, T, B, H, scale,
    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, IS_VARLEN: tl.constexpr,
    STATE_DT: tl.constexpr, PREC: tl.constexpr,
):
    """dq_i = scale (sum_{j<=i} D_ij (dO_i . v_j) k_j + lambda^(i+1) S dO_i), S recomputed forward.
    Writes this V block's fp32 partial into DQ[i_v]."""
    i_h, i_v, i_k, bos, L, ok, ov, mk, mv, s, s_off = _program(DECAY, CU, T, H, K, V, BK, BV, HAS_DECAY, IS_VARLEN)
    b_S = _load_state(S0, s_off, mk, mv, HAS_S0, BK, BV)
    k_base = Kt + (bos * H + i_h) * K
    v_base = Vt + (bos * H + i_h) * V
    do_base = DO + (bos * H + i_h) * V
    dq_base = DQ + i_v.to(tl.int64) * B * T * H * K + (bos * H + i_h) * K
    for i_t in range(0, tl.cdiv(L, BT)):
        n, ot64, mt = _chunk(i_t, L, BT)
        b_k = _load_tile(k_base, ot64, mt, ok, mk, H * K)
        b_v = _load_tile(v_base, ot64, mt, ov, mv, H * V)
        b_do = _load_tile(do_base, ot64, mt, ov, mv, H * V)
        dmask, qdec, kdec, cdec = _chunk_decays(s, n, scale, BT, HAS_DECAY)
        b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=PREC) * dmask
        b_dq = tl.dot(b_dp.to(b_k.dtype), b_k, input_precision=PREC)
        b_dq += tl.dot(b_do.to(STATE_DT), tl.trans(b_S.to(STATE_DT)), input_precision=PREC) * (qdec * scale)[:, None]
        _store_tile(dq_base, ot64, mt, ok, mk, H * K, b_dq)
        b_kw = (b_k * kdec[:, None]).to(b_k.dtype)
        b_S = b_S * cdec + tl.dot(tl.trans(b_kw), b_v, input_precision=PREC)


@triton.jit(do_not_specialize=["T"])
def _bwd_dkdv_kernel(
    Q, Kt, Vt, DO, DK, DV, DECAY, DST, DS0, CU, T, B, H, scale,
    K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    HAS_DECAY: tl.constexpr, HAS_DST: tl.constexpr, STORE_DS0: tl.constexpr, IS_VARLEN: tl.constexpr,
    STATE_DT: tl.constexpr, PREC: tl.constexpr,
):
    """Backward in time, carrying dS = dLoss/dS (the state entering the current chunk's successor):
    dk_j = scale sum_{i>=j} D_ij (dO_i . v_j) q_i + lambda^(n-1-j) dS v_j   (fp32 partial of this V block)
    dv_j = scale sum_{i>=j} D_ij (q_i . k_j) dO_i + lambda^(n-1-j) dS^T k_j
    dS  <- lambda^n dS + scale sum_i lambda^(i+1) q_i dO_i^T;  after the first chunk, dS = dS0."""
    i_h, i_v, i_k, bos, L, ok, ov, mk, mv, s, s_off = _program(DECAY, CU, T, H, K, V, BK, BV, HAS_DECAY, IS_VARLEN)
    b_dS = _load_state(DST, s_off, mk, mv, HAS_DST, BK, BV)
    q_base = Q + (bos * H + i_h) * K
    k_base = Kt + (bos * H + i_h) * K
    v_base = Vt + (bos * H + i_h) * V
    do_base = DO + (bos * H + i_h) * V
    dk_base = DK + i_v.to(tl.int64) * B * T * H * K + (bos * H + i_h) * K
    dv_base = DV + i_k.to(tl.int64) * B * T * H * V + (bos * H + i_h) * V  # NK > 1: fp32 partials
    NT = tl.cdiv(L, BT)
    for j in range(0, NT):
        i_t = NT - 1 - j
        n, ot64, mt = _chunk(i_t, L, BT)
        b_q = _load_tile(q_base, ot64, mt, ok, mk, H * K)
        b_k = _load_tile(k_base, ot64, mt, ok, mk, H * K)
        b_v = _load_tile(v_base, ot64, mt, ov, mv, H * V)
        b_do = _load_tile(do_base, ot64, mt, ov, mv, H * V)
        dmask, qdec, kdec, cdec = _chunk_decays(s, n, scale, BT, HAS_DECAY)
        dmask_t = tl.trans(dmask)  # [j, i]
        b_at = tl.dot(b_k, tl.trans(b_q), input_precision=PREC) * dmask_t
        b_dv = tl.dot(b_at.to(b_do.dtype), b_do, input_precision=PREC)
        b_dv += tl.dot(b_k.to(STATE_DT), b_dS.to(STATE_DT), input_precision=PREC) * kdec[:, None]
        _store_tile(dv_base, ot64, mt, ov, mv, H * V, b_dv.to(DV.dtype.element_ty))
        b_dpt = tl.dot(b_v, tl.trans(b_do), input_precision=PREC) * dmask_t
        b_dk = tl.dot(b_dpt.to(b_q.dtype), b_q, input_precision=PREC)
        b_dk += tl.dot(b_v.to(STATE_DT), tl.trans(b_dS.to(STATE_DT)), input_precision=PREC) * kdec[:, None]
        _store_tile(dk_base, ot64, mt, ok, mk, H * K, b_dk)
        b_qw = (b_q * (qdec * scale)[:, None]).to(b_q.dtype)
        b_dS = b_dS * cdec + tl.dot(tl.trans(b_qw), b_do, input_precision=PREC)
    if STORE_DS0:
        tl.store(DS0 + s_off, b_dS, mask=mk[:, None] & mv[None, :])


# ----------------------------------------------------------------------------------------------
# launchers


_TL_DTYPE = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _precision(dtype):
    """(state operand dtype, dot input precision) for an input dtype; see the module docstring."""
    if dtype == torch.float32:
        return tl.float32, fp32_dot_precision()
    if dtype == torch.float16:
        return tl.float32, "tf32"
    return tl.bfloat16, "tf32"


def _geometry(q, v, cu_seqlens):
    """(N programs along sequences, length argument T, batch rows B) for the kernels."""
    B, T, H, K = q.shape
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    return N, T, B, H, K, v.shape[-1]


_MAX_LENS = WeakIdKeyDictionary()  # cu_seqlens tensor -> its longest sequence, as last read


def _max_len(T, cu_seqlens) -> int:
    """The longest sequence, which picks the recurrent or the chunked forward (both exact for any
    length). Reading it from cu_seqlens is a host sync, which a CUDA graph capture forbids: there the
    length read from the same tensor by the warm-up call is used, else T (an upper bound)."""
    if cu_seqlens is None:
        return T
    if capturing(cu_seqlens):
        return _MAX_LENS.get(cu_seqlens, T)
    n = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    _MAX_LENS[cu_seqlens] = n
    return n


def _bucket(q, K, V, decay):
    return (dtype_key(q.dtype), int(K), int(V), decay is not None)


def _dummy(t):
    return t.new_empty(1)


def _blocks(cfg, K, V):
    """(BK, BV, NK, NV) of a config: blocks clamped to the padded head dims."""
    BK = min(cfg.kw.get("BK", 1 << 30), _pow2(K))
    BV = min(cfg.kw["BV"], _pow2(V))
    return BK, BV, cdiv(K, BK), cdiv(V, BV)


def _launch_opts(cfg):
    """The config's constexprs other than the block sizes, plus its launch options."""
    kw = {k_: v_ for k_, v_ in cfg.kw.items() if k_ not in ("BK", "BV")}
    return dict(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _sum_partials(part, dtype):
    return (part.sum(0) if part.shape[0] > 1 else part[0]).to(dtype)


def lightning_fwd(q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens):
    """Forward launch. Inputs contiguous and validated. Returns (o, final state fp32 or None).

    Grid (N*H, NV, NK). With K split into NK blocks every program adds its block's share of o
    (q_K k_K^T and q_K S_K are sums over K), so o goes through an fp32 [NK, ...] buffer."""
    N, T, B, H, K, V = _geometry(q, v, cu_seqlens)
    final = empty((N, H, K, V), torch.float32, q.device) if output_final_state else None
    cu = cu_seqlens if cu_seqlens is not None else _dummy(q).int()
    fdummy = _dummy(q).float()
    common = dict(
        HAS_DECAY=decay is not None, HAS_S0=initial_state is not None, STORE_ST=final is not None,
        IS_VARLEN=cu_seqlens is not None,
    )
    tail = (decay if decay is not None else fdummy, initial_state if initial_state is not None else fdummy,
            final if final is not None else fdummy, cu, T)
    bucket = _bucket(q, K, V, decay)
    recurrent = _max_len(T, cu_seqlens) <= RECURRENT_MAX_T
    sdt, prec = _precision(q.dtype)

    def out_for(cfg):
        NK = _blocks(cfg, K, V)[2]
        if NK == 1:
            return empty(q.shape[:-1] + (V,), v.dtype, q.device)
        return empty((NK,) + q.shape[:-1] + (V,), torch.float32, q.device)

    def launch(cfg, out):
        BK, BV, NK, NV = _blocks(cfg, K, V)
        grid = (N * H, NV, NK)
        if recurrent:
            return _recurrent_fwd_kernel[grid](q, k, v, out, *tail, H, scale, K=K, V=V, BK=BK, BV=BV,
                                               **common, **_launch_opts(cfg))
        return _fwd_kernel[grid](q, k, v, out, *tail, B, H, scale, K=K, V=V, BK=BK, BV=BV, **common,
                                 STATE_DT=sdt, PREC=prec, **_launch_opts(cfg))

    tuner = spaces.LIGHTNING_RECURRENT if recurrent else spaces.LIGHTNING_FWD
    cfg = tuner.choose(bucket, q.device, lambda c: bench_launch(lambda: launch(c, out_for(c))))
    o = out_for(cfg)
    launch(cfg, o)
    if o.dim() == q.dim() + 1:
        o = _sum_partials(o, v.dtype)
    return o, final


def lightning_bwd(q, k, v, decay, scale, initial_state, cu_seqlens, do, dfinal, need_ds0):
    """Backward launches. Returns (dq, dk, dv, d initial_state or None).

    Grids (N*H, NV, NK). dq and dk sum over V, so each V block writes an fp32 partial [NV, ...];
    dv sums over K, so with NK > 1 each K block writes an fp32 partial [NK, ...]."""
    N, T, B, H, K, V = _geometry(q, v, cu_seqlens)
    sdt, prec = _precision(q.dtype)
    bucket = _bucket(q, K, V, decay)
    cu = cu_seqlens if cu_seqlens is not None else _dummy(q).int()
    fdummy = _dummy(q).float()
    decay_arg = decay if decay is not None else fdummy
    common = dict(IS_VARLEN=cu_seqlens is not None, HAS_DECAY=decay is not None, STATE_DT=sdt, PREC=prec)

    def v_partials(cfg):
        return empty((_blocks(cfg, K, V)[3],) + q.shape, torch.float32, q.device)

    def launch_dq(cfg, out):
        BK, BV, NK, NV = _blocks(cfg, K, V)
        return _bwd_dq_kernel[(N * H, NV, NK)](
            k, v, do, out, decay_arg, initial_state if initial_state is not None else fdummy, cu,
            T, B, H, scale, K=K, V=V, BK=BK, BV=BV, HAS_S0=initial_state is not None, **common,
            **_launch_opts(cfg))

    cfg = spaces.LIGHTNING_BWD_DQ.choose(bucket, q.device, lambda c: bench_launch(lambda: launch_dq(c, v_partials(c))))
    dq_part = v_partials(cfg)
    launch_dq(cfg, dq_part)

    ds0 = empty((N, H, K, V), torch.float32, q.device) if need_ds0 else None

    def dv_out(cfg):
        NK = _blocks(cfg, K, V)[2]
        if NK == 1:
            return empty(v.shape, v.dtype, v.device)
        return empty((NK,) + v.shape, torch.float32, v.device)

    def launch_dkdv(cfg, dk_out, dv_buf):
        BK, BV, NK, NV = _blocks(cfg, K, V)
        return _bwd_dkdv_kernel[(N * H, NV, NK)](
            q, k, v, do, dk_out, dv_buf, decay_arg, dfinal if dfinal is not None else fdummy,
            ds0 if ds0 is not None else fdummy, cu, T, B, H, scale,
            K=K, V=V, BK=BK, BV=BV, HAS_DST=dfinal is not None, STORE_DS0=ds0 is not None,
            **common, **_launch_opts(cfg))

    cfg = spaces.LIGHTNING_BWD_DKDV.choose(
        bucket, q.device, lambda c: bench_launch(lambda: launch_dkdv(c, v_partials(c), dv_out(c))))
    dk_part, dv = v_partials(cfg), dv_out(cfg)
    launch_dkdv(cfg, dk_part, dv)
    if dv.dim() == v.dim() + 1:
        dv = _sum_partials(dv, v.dtype)
    return _sum_partials(dq_part, q.dtype), _sum_partials(dk_part, k.dtype), dv, ds0


class LightningAttentionFunction(torch.autograd.Function):
    """(q, k, v, decay, initial_state, cu_seqlens, scale, output_final_state) -> (o, final_state).

    Inputs must already be validated and contiguous (``subquad.lightning_attention`` does it).
    decay and cu_seqlens are not differentiable; final_state is None unless requested.
    """

    @staticmethod
    def forward(ctx, q, k, v, decay, initial_state, cu_seqlens, scale, output_final_state):
        o, final = lightning_fwd(q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens)
        ctx.save_for_backward(q, k, v, decay, initial_state, cu_seqlens)
        ctx.scale = scale
        return o, final

    @staticmethod
    def backward(ctx, do, dfinal):
        q, k, v, decay, initial_state, cu_seqlens = ctx.saved_tensors
        need_ds0 = initial_state is not None and ctx.needs_input_grad[4]
        dq, dk, dv, ds0 = lightning_bwd(
            q, k, v, decay, ctx.scale, initial_state, cu_seqlens, do.contiguous(),
            None if dfinal is None else dfinal.contiguous().float(), need_ds0)
        dq, dk, dv, ds0 = first_order_only((dq, dk, dv, ds0), q, k, v, initial_state)
        return dq, dk, dv, None, ds0, None, None, None


# ----------------------------------------------------------------------------------------------
# static compile check (python -m subquad.autotune check)


def compile_specs(dtype: str, K: int, V: int):
    """What the static compile check builds: one entry per kernel, for inputs of ``dtype``
    ("float16" / "bfloat16" / "float32") and head dims K, V, with decay, states and varlen on.

    Yields (tuner, jit function, signature {arg: type}, constexprs(cfg) -> {arg: value}).
    """
    tdt = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]
    sdt, prec = _precision(getattr(torch, dtype))
    x, f32, i32 = f"*{tdt}", "*fp32", "*i32"

    def blocks(c):
        BK, BV, NK, _ = _blocks(c, K, V)
        return dict(K=K, V=V, BK=BK, BV=BV, **{k_: v_ for k_, v_ in c.kw.items() if k_ not in ("BK", "BV")}), NK

    flags = dict(HAS_DECAY=True, IS_VARLEN=True)
    fwd_sig = dict(Q=x, Kt=x, Vt=x, O=x, DECAY=f32, S0=f32, ST=f32, CU=i32, T="i32", B="i32", H="i32", scale="fp32")
    rec_sig = {a: t for a, t in fwd_sig.items() if a != "B"}
    yield (spaces.LIGHTNING_FWD, _fwd_kernel, fwd_sig,
           lambda c: dict(blocks(c)[0], HAS_S0=True, STORE_ST=True, STATE_DT=sdt, PREC=prec, **flags))
    yield (spaces.LIGHTNING_RECURRENT, _recurrent_fwd_kernel, rec_sig,
           lambda c: dict(blocks(c)[0], HAS_S0=True, STORE_ST=True, **flags))
    yield (spaces.LIGHTNING_BWD_DQ, _bwd_dq_kernel,
           dict(Kt=x, Vt=x, DO=x, DQ=f32, DECAY=f32, S0=f32, CU=i32, T="i32", B="i32", H="i32", scale="fp32"),
           lambda c: dict(blocks(c)[0], HAS_S0=True, STATE_DT=sdt, PREC=prec, **flags))
    yield (spaces.LIGHTNING_BWD_DKDV, _bwd_dkdv_kernel,
           dict(Q=x, Kt=x, Vt=x, DO=x, DK=f32, DV=x, DECAY=f32, DST=f32, DS0=f32, CU=i32, T="i32", B="i32",
                H="i32", scale="fp32"),
           lambda c: dict(blocks(c)[0], HAS_DST=True, STORE_DS0=True, STATE_DT=sdt, PREC=prec, **flags))
