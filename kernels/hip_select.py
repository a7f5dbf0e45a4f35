"""HiP mask estimation in Triton: the tree search of ``subquad.reference.hip`` (step 2), one
program per (query block, batch x query head), every iteration scored with ``tl.dot``.

Per program (query block qb of batch b, query head h, kv head h // GROUP):

* ``p_first = Tk - Tq + qb bq``, search range ``[S, E)`` with ``E = p_first - W + 1``,
  ``NB = ceil(max(E - S, 0) / bk)`` key blocks, ``Kb = ceil(topk / bk)``. If ``NB <= Kb`` the row
  is ``0 .. NB-1`` then -1s and the program ends.
* Otherwise the strided queries (rows ``qb bq + t query_stride`` that exist, padded to NQS >= 16
  rows) are loaded once ``[NQS, D]``. The kept nodes of the tree live in a per-program scratch
  row as (start, end) pairs, in position order; round 0 holds the Kb initial groups
  ``[floor(i NB / Kb), floor((i+1) NB / Kb))`` (int32 arithmetic without overflow). A round:
  1. for chunks of CH kept nodes: both children of each (left = first ``floor(g/2)`` blocks,
     right = the rest, only when the node has ``g >= 2`` blocks; a single block is its own
     child), their representative blocks ``start + floor(size/2)``, the ``2 CH x BK`` tokens
     gathered as one key tile ``[NR = 2 CH BK, D]`` -> ``tl.dot`` with the strided queries -> max
     over the queries and over each block's tokens -> per child the fp32 score mapped to an
     order-preserving integer in ``[0, 2^32)`` (invalid children -1), stored with the child's
     (start, end) at position ``2 node + side``, i.e. in position order;
  2. the Kb-th largest score ``thr`` is found exactly by a radix search, 4 bits a step (8 steps
     of 16 candidate counts over the 2 KBP children); kept = score > thr, plus the first (lowest
     start) children with score == thr up to Kb in all (the reference's tie rule); a prefix sum
     compacts them, still in position order, into the kept-node row.
  Rounds: ``ceil(log2(ceil(NB / Kb)))`` (then every kept node is a single block, and the row is
  already sorted); the Kb starts are written.
* Scratch rows live in global memory (L2), one per program of a launch; the steps are separated
  by ``tl.debug_barrier`` (a CTA barrier, which orders the program's own global stores before its
  loads) and scratch loads bypass L1 (``.cg``). Launches cover at most ``SCRATCH_BYTES`` of
  scratch (40 KBP bytes a program); longer inputs run in several waves of query blocks.
* fp32 inputs: IEEE dots run on FMA units; the scores are summed over 16-column slices of D
  (``DC``) so the operands stay in registers (one [NQS, BD] x [BD, NR] FMA dot spills kilobytes).
* Counts of boolean masks are summed in fp32 (exact): LLVM turns an integer sum of an i1 tensor
  into a bit-packed popcount that goes through local memory (a stack frame in the compile check).

Exactness: fp32 inputs use IEEE dots, so a score differs from the reference's torch matmul only
by summation order (a few ulps); the selection is identical unless two children's scores are that
close (a near-tie flips). Integer-valued inputs make every dot exact: the tests use them to
check the selection and the tie rule exactly. -0.0 is mapped to +0.0 (torch ranks them equal).

Counts per program and round (D = head dim, s = itemsize): ``2 KBP BK`` gathered keys (padded;
useful ``<= 2 Kb bk``): ``2 NQS D x 2 KBP BK`` FLOPs of ``tl.dot`` (useful
``2 ceil(bq / query_stride) D x 2 Kb bk``), ``2 KBP BK D s`` bytes of K, ``40 KBP`` bytes of
scratch traffic, ``8 x 16 x 2 KBP`` integer compares for the threshold. At the defaults (topk 512,
bk 2, bq 64, stride 2: Kb = KBP = 256, NQS = 32) and D = 128, fp16: 8.4 MFLOP and 256 KiB of
gathered K per round; rounds = ceil(log2(NB / 256)), 8 for the last query blocks at T = 128k,
so about 67 MFLOP per (query block, head): 4.4 TFLOP for T = 128k, H = 32 (2048 query blocks).

Supported (checked in ``subquad.hip``): head dim 16..256, ``block_size_k <= 128``,
``ceil(block_size_q / query_stride) <= 128``, ``ceil(topk / block_size_k) <= 2048``; any
block_size_q, query_stride, sink_tokens, window.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..autotune import bench_launch, spaces
from .block_sparse import load_rows, precision
from .common import pow2

__all__ = ["hip_select_blocks", "select_meta", "compile_specs"]

SCRATCH_BYTES = 64 << 20  # per launch; more query blocks run in further launches


@triton.jit
def _hip_select_kernel(
    Q, K, BLK, SEL, CS, CST,
    Tq, Tk, H, GROUP, NQB, Kb, bq, bk, qstride, S, W, qb0,
    D: tl.constexpr, BD: tl.constexpr, NQS: tl.constexpr, BK: tl.constexpr, KBP: tl.constexpr,
    CH: tl.constexpr, DC: tl.constexpr, PREC: tl.constexpr,
):
    """Selection row of query block ``qb0 + program_id(0)`` for (batch, head) ``program_id(1)``."""
    NR: tl.constexpr = 2 * CH * BK
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    qb = qb0 + pid_q
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    Hkv = H // GROUP
    p_first = Tk - Tq + qb * bq
    E = p_first - W + 1
    NB = (tl.maximum(E - S, 0) + bk - 1) // bk
    lane = tl.arange(0, KBP)
    out_row = BLK + (pid_bh.to(tl.int64) * NQB + qb) * Kb
    if NB <= Kb:
        tl.store(out_row + lane, tl.where(lane < NB, lane, -1), mask=lane < Kb)
    else:
        slot = pid_q.to(tl.int64) * tl.num_programs(1) + pid_bh
        sel_row = SEL + slot * (2 * KBP)  # kept nodes: starts [KBP], ends [KBP]
        cs_row = CS + slot * (2 * KBP)  # children's scores (order-preserving ints)
        cst_row = CST + slot * (4 * KBP)  # children: starts [2 KBP], ends [2 KBP]
        offs_d = tl.arange(0, BD)
        d_ok = offs_d < D
        t = tl.arange(0, NQS)
        qi = qb * bq + t * qstride
        q_ok = (t * qstride < bq) & (qi < Tq)
        q_rows = ((b.to(tl.int64) * Tq + qi) * H + h) * D
        if DC == BD:
            q = load_rows(Q, q_rows, q_ok, offs_d, d_ok)  # [NQS, BD], held for the whole search
        k_head = b.to(tl.int64) * Tk * Hkv + hk
        # rounds until every kept node is one block: ceil(log2(ceil(NB / Kb)))
        gmax = (NB + Kb - 1) // Kb
        rounds = gmax * 0
        for _ in range(0, 31):
            rounds += ((1 << rounds) < gmax).to(tl.int32)
        # round 0: the initial groups [floor(i NB / Kb), floor((i+1) NB / Kb)), in int32 without
        # overflow: floor(i NB / Kb) = i (NB div Kb) + floor(i (NB mod Kb) / Kb)
        nq = NB // Kb
        nr = NB % Kb
        tl.store(sel_row + lane, lane * nq + (lane * nr) // Kb, mask=lane < Kb)
        tl.store(sel_row + KBP + lane, (lane + 1) * nq + ((lane + 1) * nr) // Kb, mask=lane < Kb)
        cc = tl.arange(0, 2 * CH)  # children of a chunk: (node c0 + cc % CH, side cc // CH)
        side = cc // CH  # 0: left child, 1: right child
        u = tl.arange(0, BK)  # token within the representative block
        c2 = tl.arange(0, 2 * KBP)
        dig = tl.arange(0, 16).to(tl.int64)
        for _ in range(0, rounds):
            tl.debug_barrier()
            for c0 in range(0, KBP, CH):
                cnode = c0 + cc % CH
                n_ok = cnode < Kb
                gs = tl.load(sel_row + cnode, mask=n_ok, other=0, cache_modifier=".cg")
                sz = tl.load(sel_row + KBP + cnode, mask=n_ok, other=1, cache_modifier=".cg") - gs
                half = sz // 2
                split = sz >= 2
                cstart = tl.where(side == 0, gs, gs + half)
                csize = tl.where(side == 0, tl.where(split, half, sz), sz - half)
                cvalid = n_ok & ((side == 0) | split)
                tok2 = S + (cstart + csize // 2)[:, None] * bk + u[None, :]  # [2 CH, BK]
                ok2 = cvalid[:, None] & (u[None, :] < bk) & (tok2 < E)
                tok = tl.reshape(tl.where(ok2, tok2, -1), (NR,))  # (a reshaped bool goes through local memory)
                k_ok = tok >= 0
                k_rows = (k_head + tok.to(tl.int64) * Hkv) * D
                if DC == BD:
                    kt = load_rows(K, k_rows, k_ok, offs_d, d_ok)  # [NR, BD]
                    sc = tl.dot(q, tl.trans(kt), input_precision=PREC)  # [NQS, NR]
                else:  # fp32 (FMA dots): DC columns at a time keeps the operands in registers
                    sc = tl.zeros([NQS, NR], dtype=tl.float32)
                    for d0 in tl.static_range(0, BD, DC):
                        offs_c = d0 + tl.arange(0, DC)
                        c_ok = offs_c < D
                        qc = load_rows(Q, q_rows, q_ok, offs_c, c_ok)
                        kc = load_rows(K, k_rows, k_ok, offs_c, c_ok)
                        sc += tl.dot(qc, tl.trans(kc), input_precision=PREC)
                sc = tl.where(q_ok[:, None], sc, float("-inf"))
                m = tl.where(k_ok, tl.max(sc, 0), float("-inf"))
                score = tl.max(tl.reshape(m, (2 * CH, BK)), 1)  # [2 CH] per child
                score = tl.where(score == 0.0, 0.0, score)  # -0.0 -> +0.0
                bits = score.to(tl.int32, bitcast=True)
                ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # int32, monotone in the float value
                uo = tl.where(cvalid, ordered.to(tl.int64) + 2147483648, -1)  # [0, 2^32); invalid -1
                # children in position order: (node, side) -> 2 node + side
                tl.store(cs_row + 2 * cnode + cc // CH, uo, mask=cnode < KBP)
                tl.store(cst_row + 2 * cnode + cc // CH, cstart, mask=cnode < KBP)
                tl.store(cst_row + 2 * KBP + 2 * cnode + cc // CH, cstart + csize, mask=cnode < KBP)
            tl.debug_barrier()
            uo = tl.load(cs_row + c2, cache_modifier=".cg")  # [2 KBP] in position order
            # thr = the Kb-th largest score, 4 bits at a time (counts are monotone in the digit)
            thr = tl.zeros([], tl.int64)
            for step in range(0, 8):
                cand = thr + (dig << (28 - 4 * step))  # [16]
                # counted in fp32 (exact up to 2^24): LLVM turns an integer sum of an i1 tensor into a
                # bit-packed popcount that goes through local memory
                cnt = tl.sum(tl.where(uo[None, :] >= cand[:, None], 1.0, 0.0), 1)
                thr += tl.max(tl.where(cnt >= Kb, dig, 0), 0) << (28 - 4 * step)
            # keep every score above thr and, among those equal to it, the lowest starts
            gt = uo > thr
            tie = uo == thr
            need = Kb - tl.sum(tl.where(gt, 1.0, 0.0), 0)  # counts in fp32, as above
            kept = gt | (tie & (tl.cumsum(tl.where(tie, 1.0, 0.0), 0) <= need))  # exactly Kb, position order
            pos = tl.cumsum(tl.where(kept, 1.0, 0.0), 0).to(tl.int32) - 1
            child_start = tl.load(cst_row + c2, cache_modifier=".cg")
            child_end = tl.load(cst_row + 2 * KBP + c2, cache_modifier=".cg")
            tl.debug_barrier()
            tl.store(sel_row + pos, child_start, mask=kept)
            tl.store(sel_row + KBP + pos, child_end, mask=kept)
        tl.debug_barrier()
        final = tl.load(sel_row + lane, mask=lane < Kb, other=0, cache_modifier=".cg")
        tl.store(out_row + lane, final, mask=lane < Kb)


# ----------------------------------------------------------------------------------------------
# launcher


def select_meta(D: int, topk: int, block_size_q: int, block_size_k: int, query_stride: int, NR: int,
                fp32: bool = False) -> dict:
    """The kernel's block constexprs for a problem and a config's keys-per-dot NR (fp32: the dots
    run on FMA units, DC = 16 columns at a time)."""
    kb = triton.cdiv(topk, block_size_k)
    kbp = max(16, triton.next_power_of_2(kb))
    bkp = triton.next_power_of_2(block_size_k)
    ch = max(1, min(kbp, NR // (2 * bkp)))
    bd = pow2(D)
    return dict(D=D, BD=bd, NQS=pow2(triton.cdiv(block_size_q, query_stride)), BK=bkp, KBP=kbp, CH=ch,
                DC=min(bd, 16) if fp32 else bd)


def _bucket(q, meta, nqb):
    """(dtype, D, KBP, BK, NQS, decoding): a single query block (decoding) runs few programs, each a
    long serial search, so it is tuned apart from prefill (wider dots may win there)."""
    return (str(q.dtype).replace("torch.", ""), q.shape[-1], meta["KBP"], meta["BK"], meta["NQS"], nqb == 1)


def hip_select_blocks(q, k, *, topk, block_size_q, block_size_k, query_stride, sink_tokens, window, scale=None):
    """The HiP selection on the GPU: ``blocks`` int32 ``[B, H, ceil(Tq / block_size_q), ceil(topk /
    block_size_k)]``, equal to ``subquad.reference.hip.select_blocks`` (see the module docstring for
    near-ties). q ``[B, Tq, H, D]``, k ``[B, Tk, H_kv, D]``; inputs are checked by ``subquad.hip``.
    ``scale`` does not enter the ranking."""
    del scale
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    q = q.contiguous()
    k = k.contiguous()
    kb = triton.cdiv(topk, block_size_k)
    nqb = triton.cdiv(Tq, block_size_q)
    blocks = torch.empty((B, H, nqb, kb), dtype=torch.int32, device=q.device)
    if os.environ.get("SUBQUAD_POISON", "0") not in ("", "0"):
        blocks.fill_(-7)  # never a valid entry: an unwritten slot fails the comparison
    prec = precision(q.dtype)
    meta0 = select_meta(D, topk, block_size_q, block_size_k, query_stride, 128)
    per_slot = 40 * meta0["KBP"]  # int32 [2, KBP] + int64 [2 KBP] + int32 [2, 2 KBP]
    wave = max(1, min(nqb, SCRATCH_BYTES // (per_slot * B * H)))
    sel = torch.empty(wave * B * H * 2 * meta0["KBP"], dtype=torch.int32, device=q.device)
    cs = torch.empty(wave * B * H * 2 * meta0["KBP"], dtype=torch.int64, device=q.device)
    cst = torch.empty(wave * B * H * 4 * meta0["KBP"], dtype=torch.int32, device=q.device)

    def launch(cfg, qb0=0, n=None):
        meta = select_meta(D, topk, block_size_q, block_size_k, query_stride, cfg.kw["NR"], q.dtype == torch.float32)
        n = min(wave, nqb - qb0) if n is None else n
        return _hip_select_kernel[(n, B * H)](
            q, k, blocks, sel, cs, cst, Tq, Tk, H, H // Hkv, nqb, kb, block_size_q, block_size_k, query_stride,
            sink_tokens, window, qb0, PREC=prec, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    cfg = spaces.HIP_SELECT.choose(_bucket(q, meta0, nqb), q.device,
                                   lambda c: bench_launch(lambda: launch(c, max(0, nqb - wave))))
    for qb0 in range(0, nqb, wave):
        launch(cfg, qb0)
    return blocks


def compile_specs(dtype: str, K: int, V: int):
    """Static compile check entries (see ``subquad.autotune.check``): the selection kernel at the
    defaults (topk 512, block_size_q 64, block_size_k 2, query_stride 2) and head dim K."""
    tdt = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]
    x = f"*{tdt}"
    ints = {n: "i32" for n in ["Tq", "Tk", "H", "GROUP", "NQB", "Kb", "bq", "bk", "qstride", "S", "W", "qb0"]}
    sig = dict(Q=x, K=x, BLK="*i32", SEL="*i32", CS="*i64", CST="*i32", **ints)
    prec = precision(getattr(torch, dtype))
    probe = select_meta(K, 512, 64, 2, 2, 128)
    buckets = [(dtype, K, probe["KBP"], probe["BK"], probe["NQS"], decoding) for decoding in (False, True)]
    yield (spaces.HIP_SELECT, _hip_select_kernel, sig,
           lambda c: dict(PREC=prec, **select_meta(K, 512, 64, 2, 2, c.kw["NR"], dtype == "float32")), buckets)
