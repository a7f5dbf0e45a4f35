"""Config spaces of every kernel, in one place.

Order matters: the first config valid for a shape bucket is the default (used under the
interpreter and when tuning is off), so each space starts with a config that compiles without
spills on sm_80 and sm_90 for 16-bit inputs; where that config spills for 4-byte inputs or at
D = 256, the tuner's ``first`` configs lead for those dtypes (``_first``, ``_wide``; checked by
``python -m subquad.autotune check --dtypes float32,tf32 --head-dims 32,64,128,256 --used-only``
and the same for float16,bfloat16). Buckets never contain the sequence length.
"""

from typing import Sequence

from .tuner import Config, Tuner


def next_pow2(n: int) -> int:
    """The next power of two >= n (n >= 1), in plain Python: ``triton.next_power_of_2`` is a
    constexpr function since triton 3.5 and costs ~5 us a call on the host."""
    return 1 << (int(n) - 1).bit_length()


def pow2(n: int) -> int:
    """Padded block size of a dimension: the next power of two, at least 16 (tl.dot's minimum)."""
    return max(16, next_pow2(n))


def _c(num_warps=4, num_stages=2, **kw) -> Config:
    return Config(kw, num_warps, num_stages)


def _first(*fp32: Config, tf32: Sequence[Config] = (), half: Sequence[Config] = ()) -> dict:
    """``Tuner(first=...)``: configs that lead the space for some dtypes, found clean (no spill in
    a loop, shared memory within sm_80's) on sm_80 and sm_90 with triton 3.6 where the space's
    default spills. They are the default untuned, and timed first (like any other) when tuning.
    ``fp32``: for fp32 and tf32 buckets, at head dims 32-128 (the space's defaults are chosen for
    16-bit inputs; IEEE fp32 dots are FMA loops holding both operands in registers, tf32 operands
    are twice fp16's size); ``tf32``: for tf32 alone, where an fp32 one spills for it (register
    allocation is not monotonic in the tile sizes); ``half``: for fp16 and bf16 (at D = 256, marked
    ``_wide``). The valid filter keeps each config to its class of buckets."""
    first = {"float32": list(fp32), "tf32": list(tf32) + list(fp32)}
    if half:
        first.update(float16=list(half), bfloat16=list(half))
    return first


def _wide(cfg: Config) -> Config:
    """``cfg`` for head dims above 128 only (the valid filters read the marker ``DMIN``; the
    launchers ignore it): at D = 256 tiles that fit at 128 can spill, and for 4-byte inputs
    overflow sm_80's shared memory (163 KB; FMA dots stage both operands there)."""
    return Config({**cfg.kw, "DMIN": 256}, cfg.num_warps, cfg.num_stages)


def _head_dim_fits(cfg: Config, D: int) -> bool:
    return pow2(D) >= cfg.kw.get("DMIN", 0)


def _state_fits(cfg: Config, bucket: tuple, per_thread: int) -> bool:
    """The fp32 state tile BK x BV lives in registers: keep it to ``per_thread`` floats a thread.
    BK, BV are clamped to the padded K, V by the launchers, so the clamped sizes count."""
    _, K, V = bucket[:3]
    bk = min(cfg.kw.get("BK", 1 << 30), pow2(K))
    bv = min(cfg.kw["BV"], pow2(V))
    return bk * bv <= per_thread * 32 * cfg.num_warps


# Lightning attention; bucket = (dtype name, K, V, has_decay). K is split into BK blocks (each
# program holds one BK x BV block of the fp32 state); the defaults were chosen with
# `python -m subquad.autotune check` so that they do not spill on sm_80 / sm_90.
LIGHTNING_FWD = Tuner(
    "lightning_fwd",
    [
        _c(4, 2, BT=64, BK=64, BV=32),
        _c(8, 2, BT=64, BK=64, BV=64),
        _c(4, 2, BT=64, BK=64, BV=64),
        _c(4, 2, BT=32, BK=64, BV=64),
        _c(8, 2, BT=64, BK=128, BV=32),
        _c(4, 3, BT=64, BK=64, BV=32),
        _c(8, 2, BT=32, BK=128, BV=32),
        _c(8, 2, BT=128, BK=64, BV=32),  # half the serial chunk steps, if it fits in registers
    ],
    lambda cfg, b: _state_fits(cfg, b, 64),
    first=_first(_c(8, 2, BT=32, BK=64, BV=32)),  # the default spills 6.4 KB at D = 64
)

LIGHTNING_RECURRENT = Tuner(
    "lightning_recurrent",
    [
        _c(4, 1, BV=32),
        _c(4, 1, BV=16),
        _c(8, 1, BV=64),
        _c(2, 1, BV=16),
    ],
    lambda cfg, b: _state_fits(cfg, b, 64),
)

LIGHTNING_BWD_DQ = Tuner(
    "lightning_bwd_dq",
    [
        _c(4, 2, BT=32, BK=64, BV=32),
        _c(4, 2, BT=32, BK=64, BV=64),
        _c(8, 2, BT=64, BK=64, BV=64),
        _c(4, 2, BT=64, BK=64, BV=32),
        _c(4, 2, BT=32, BK=64, BV=32),
        _c(8, 2, BT=64, BK=128, BV=32),
        _c(4, 1, BT=64, BK=64, BV=32),
        _c(8, 2, BT=128, BK=64, BV=32),
    ],
    lambda cfg, b: _state_fits(cfg, b, 64),
    first=_first(_c(8, 2, BT=32, BK=64, BV=32)),
)

LIGHTNING_BWD_DKDV = Tuner(
    "lightning_bwd_dkdv",
    [
        _c(4, 2, BT=32, BK=64, BV=32),
        _c(8, 2, BT=64, BK=64, BV=32),
        _c(8, 2, BT=64, BK=64, BV=64),
        _c(4, 2, BT=64, BK=64, BV=32),
        _c(4, 1, BT=32, BK=64, BV=64),
        _c(8, 1, BT=32, BK=128, BV=32),
    ],
    lambda cfg, b: _state_fits(cfg, b, 32),
    first=_first(_c(8, 1, BT=32, BK=32, BV=32)),  # the default spills 5.7 KB at D = 64
)


# Neighborhood attention; bucket = (dtype name, head dim, spatial rank, strided). Tiles are boxes
# TQ0 x TQ1 x TQ2 (queries) and TK0 x TK1 x TK2 (keys); lower ranks use leading 1s.
def _na(w, st, tq, tk, tma=False, rank=None):
    if rank is None:  # R: the spatial rank the tile shape is made for (by default: from the query box)
        rank = 3 - sum(1 for x in tq[:2] if x == 1)
    kw = {"R": rank, **{f"TQ{i}": x for i, x in enumerate(tq)}, **{f"TK{i}": x for i, x in enumerate(tk)}}
    return Config({**kw, "TMA": 1} if tma else kw, w, st)


def _na_valid(cfg: Config, bucket: tuple, acc_tiles: int) -> bool:
    dtype, D, rank = bucket[:3]
    if cfg.kw["R"] != rank or not _head_dim_fits(cfg, D):
        return False
    if cfg.kw.get("TMA") and D * (4 if dtype in ("float32", "tf32") else 2) % 16:
        return False  # a TMA row must be a multiple of 16 bytes
    tq = [cfg.kw[f"TQ{i}"] for i in range(3)]
    tk = [cfg.kw[f"TK{i}"] for i in range(3)]
    bm, bn = tq[0] * tq[1] * tq[2], tk[0] * tk[1] * tk[2]
    # fp32 accumulators (acc_tiles of them, BM or BN rows x padded D) within ~128 registers a thread
    rows = bm if acc_tiles == 1 else bn
    return acc_tiles * rows * pow2(D) <= 128 * 32 * cfg.num_warps


_NA_Q_SPACE = [
    # 1-D
    _na(8, 2, (1, 1, 64), (1, 1, 64)),
    _na(4, 2, (1, 1, 64), (1, 1, 64)),
    _na(8, 2, (1, 1, 128), (1, 1, 64)),
    _na(8, 3, (1, 1, 128), (1, 1, 64)),
    _na(8, 2, (1, 1, 128), (1, 1, 128)),
    _na(4, 2, (1, 1, 64), (1, 1, 32)),
    _na(4, 3, (1, 1, 64), (1, 1, 64)),  # the H200's picks (w4 s2) with one more stage (254 regs, no spill)
    # 2-D
    _na(8, 2, (1, 8, 8), (1, 8, 8)),
    _na(4, 2, (1, 8, 8), (1, 8, 8)),
    _na(8, 2, (1, 16, 8), (1, 8, 8)),
    _na(8, 2, (1, 16, 8), (1, 16, 8)),
    _na(8, 2, (1, 8, 16), (1, 8, 8)),
    _na(4, 2, (1, 8, 8), (1, 4, 8)),
    _na(4, 3, (1, 8, 8), (1, 8, 8)),
    # 3-D
    _na(8, 2, (4, 4, 4), (4, 4, 4)),
    _na(4, 2, (4, 4, 4), (4, 4, 4)),
    _na(8, 2, (2, 8, 8), (2, 4, 8)),
    _na(8, 2, (4, 4, 8), (4, 4, 4)),
    _na(4, 2, (2, 4, 8), (2, 4, 4)),
    _na(4, 3, (4, 4, 4), (4, 4, 4)),
    # K/V tiles through TMA tensor descriptors (untimed: added without a GPU; static check: TMA
    # loads on sm_90, no spills at D=128): no row offsets in registers, the box in one copy
    _na(4, 2, (1, 1, 64), (1, 1, 64), tma=True),
    _na(8, 3, (1, 1, 128), (1, 1, 64), tma=True),
    _na(4, 3, (1, 1, 64), (1, 1, 64), tma=True),
    _na(4, 2, (1, 8, 8), (1, 8, 8), tma=True),
    _na(8, 2, (1, 16, 8), (1, 8, 8), tma=True),
    _na(4, 2, (4, 4, 4), (4, 4, 4), tma=True),
    # 128-wide KV tiles with TMA (64 query rows per warpgroup): twice a 64x64 step's work for 1.44x
    # its instructions (sm_90, D=128, fp16: 514-517 vs 358-369 a step; dQ 467 vs 315), no spills
    _na(4, 2, (1, 1, 64), (1, 1, 128), tma=True),
    _na(8, 2, (1, 1, 128), (1, 1, 128), tma=True),
    _na(4, 2, (1, 8, 8), (1, 8, 16), tma=True),
    _na(8, 2, (1, 16, 8), (1, 16, 8), tma=True),
    _na(4, 2, (4, 4, 4), (4, 4, 8), tma=True),
    _na(8, 2, (4, 4, 8), (4, 4, 8), tma=True),
    # 3-D TMA boxes that tile the s=(16,8,8) case's windows exactly: every visited tile dense and
    # a tile bound of 11.1 (= the FLOP bound), where the H200's pick at 22cfff5, 4x4x8 / 4x4x8,
    # has 10.7 and masks 10% of its tiles (untimed; sm_90, fp16, D=128, no spills: 2x8x8 / 2x4x8
    # 212 registers, 514 instructions a step; 2x8x8 / 2x8x8 251 and 825, the pick 733)
    _na(8, 2, (2, 8, 8), (2, 4, 8), tma=True),
    _na(8, 3, (2, 8, 8), (2, 4, 8), tma=True),
    _na(8, 2, (2, 8, 8), (2, 8, 8), tma=True),
]

# dQ: a narrower KV tile than the forward's keeps dS and the recomputed P within registers.
_NA_DQ_SPACE = [
    _na(4, 2, (1, 1, 64), (1, 1, 32)),
    _na(4, 2, (1, 8, 8), (1, 4, 8)),
    _na(4, 2, (2, 4, 8), (2, 4, 4)),
] + _NA_Q_SPACE

# dK/dV holds two fp32 accumulators per KV tile: small tiles, and no software pipelining by
# default (num_stages=1: it spills less on sm_80; triton 3.6 failed to compile the pipelined 1-D
# 32-row-KV variant for sm_90 in its TritonGPUCoalesceAsyncCopy pass). On the H200 the best
# configs run at 37-41% of the forward's FLOP rate (4 products per pair to the forward's 2).
_NA_KV_SPACE = [
    _na(8, 1, (1, 1, 32), (1, 1, 32)),
    _na(4, 1, (1, 4, 8), (1, 4, 8)),
    _na(4, 1, (2, 4, 4), (2, 4, 4)),
    _na(4, 1, (1, 1, 16), (1, 1, 32)),
    _na(4, 1, (1, 1, 32), (1, 1, 16)),
    _na(4, 1, (1, 1, 32), (1, 1, 32)),
    _na(8, 1, (1, 8, 8), (1, 4, 8)),
    _na(8, 2, (1, 8, 8), (1, 4, 8)),
    _na(8, 1, (4, 4, 4), (2, 4, 4)),
    # 64-row KV tiles: the dK/dV products get M = 64, which sm_90's wgmma needs (HGMMA in the
    # static check, no spills at D=128 with 8 warps; 4 warps spill)
    _na(8, 1, (1, 1, 32), (1, 1, 64)),
    _na(8, 1, (1, 1, 64), (1, 1, 64)),
    _na(8, 1, (1, 4, 8), (1, 8, 8)),
    _na(8, 1, (2, 4, 4), (4, 4, 4)),
    # ... and 64 x 64 pipelined ones (the next query tile's q / dO / lse / delta loaded by cp.async
    # during this one's products), the H200's picks at 22cfff5 for 2-D (56.2 ms vs 60.7) and 3-D
    # (193 vs 199). Pipelining did not pay in 1-D (64 x 64: 9.3 ms vs 8.3 unpipelined; 32-row query
    # tiles at 2 or 3 stages 11.2-11.6 vs 10.3), nor for 32-row query tiles in 2-D / 3-D: dropped.
    _na(8, 2, (1, 8, 8), (1, 8, 8)),
    _na(8, 2, (4, 4, 4), (4, 4, 4)),
    # 128-row KV tiles (each warpgroup's products M = 64) with 32-row query tiles, the shape of
    # FA2's and Triton's tutorial dK/dV (untimed). sm_90, fp16, D=128: SASS instructions of a step
    # x visited tile pairs on the issue's strided cases, against the H200's picks at 22cfff5:
    # 1-D 321 x 16384 (no spill) vs 472 x 16384; 2-D 405 x 102400 (s2, no spill) vs 668 x 102400;
    # 3-D 366 x 291600 (2x4x4 queries) and 350 x 204800 (1x4x8: a one-plane query box, rank 3
    # given) vs 680 x 345600
    _na(8, 1, (1, 1, 32), (1, 1, 128)),
    _na(8, 2, (1, 1, 32), (1, 1, 128)),
    _na(8, 2, (1, 4, 8), (1, 16, 8)),
    _na(8, 1, (1, 4, 8), (1, 16, 8)),
    _na(8, 1, (2, 4, 4), (2, 8, 8)),
    _na(8, 1, (1, 4, 8), (2, 8, 8), rank=3),
    _na(8, 2, (1, 4, 8), (2, 8, 8), rank=3),
]

# D = 256 (fp32 and tf32, sm_80 and sm_90, triton 3.6): the 16-bit forward default needs 213 KB of
# shared memory for 4-byte inputs (sm_80 has 163 KB) and spills; 64 x 32 tiles at 2 stages fit
# (140 KB on sm_80, no spill in a loop). dQ: 32 x 32 tiles (tf32 at 1 stage: 2 stages come within
# 3 KB of sm_80's limit). dK/dV: 8 warps where 4 spill.
NEIGHBORHOOD_FWD = Tuner("neighborhood_fwd", _NA_Q_SPACE, lambda c, b: _na_valid(c, b, 1),
                         first=_first(*(_wide(_na(8, 2, tq, tk)) for tq, tk in (
                             ((1, 1, 64), (1, 1, 32)), ((1, 8, 8), (1, 4, 8)), ((4, 4, 4), (2, 4, 4))))))
NEIGHBORHOOD_BWD_DQ = Tuner("neighborhood_bwd_dq", _NA_DQ_SPACE, lambda c, b: _na_valid(c, b, 1),
                            first=_first(
                                *(_wide(_na(8, 2, t, t)) for t in ((1, 1, 32), (1, 4, 8), (2, 4, 4))),
                                _na(8, 2, (1, 1, 64), (1, 1, 32)), _na(8, 2, (1, 8, 8), (1, 4, 8)),
                                _na(8, 2, (4, 4, 4), (2, 4, 4)),
                                tf32=[_wide(_na(8, 1, t, t)) for t in ((1, 1, 32), (1, 4, 8), (2, 4, 4))],
                                half=[_wide(_na(8, 2, (2, 4, 4), (2, 4, 4)))]))  # 4 warps spill on sm_80
NEIGHBORHOOD_BWD_DKDV = Tuner("neighborhood_bwd_dkdv", _NA_KV_SPACE, lambda c, b: _na_valid(c, b, 2),
                              first=_first(_wide(_na(8, 1, (1, 1, 16), (1, 1, 32))),
                                           _wide(_na(8, 1, (1, 4, 4), (1, 4, 8))),
                                           _na(4, 1, (1, 1, 16), (1, 1, 32)), _na(4, 1, (1, 4, 4), (1, 4, 8)),
                                           _na(8, 1, (2, 2, 4), (2, 4, 4)),
                                           # tf32 3-D: the (2,2,4) query box spills 64 B at D = 128, sm_90
                                           tf32=[_na(8, 1, (2, 4, 4), (2, 4, 4))],
                                           half=[_wide(_na(8, 1, (1, 4, 8), (1, 4, 8)))]))  # 4 warps spill, sm_80

LIGHTNING = [LIGHTNING_FWD, LIGHTNING_RECURRENT, LIGHTNING_BWD_DQ, LIGHTNING_BWD_DKDV]
NEIGHBORHOOD = [NEIGHBORHOOD_FWD, NEIGHBORHOOD_BWD_DQ, NEIGHBORHOOD_BWD_DKDV]
ALL = LIGHTNING + NEIGHBORHOOD


# HiP sparse attention (kernels/hip.py); bucket = (dtype name, head dim, decoding). BM: query rows per
# program (clamped by the launcher to the padded query block / Tq), BN: keys per KV tile (the
# gathered list packs BN / block_size_k selected key blocks into one tile).
def _hip_valid(cfg: Config, bucket: tuple, acc_tiles: int, small_above_128: bool = False) -> bool:
    """fp32 accumulators within ~128 registers a thread; ``small_above_128``: at D > 128 only
    32 x 32 tiles (dQ spills with larger ones at D = 256; the gathered dK/dV kernel needs 8 warps,
    one stage, BM <= 64 and BN = 32 there)."""
    D = bucket[1]
    if not _head_dim_fits(cfg, D):
        return False
    if small_above_128 and pow2(D) > 128 and cfg.kw["BM"] * cfg.kw["BN"] > 32 * 32:
        return False
    rows = cfg.kw["BM"] if acc_tiles == 1 else cfg.kw["BN"]
    return acc_tiles * rows * pow2(D) <= 128 * 32 * cfg.num_warps


# Defaults (the first valid config of each bucket) compile without spills for sm_80 and sm_90 at
# D = 64, 128, 256 on triton 3.6 and 3.9 (checked; the forward spills on 3.6 at D=128 with 4
# warps, or with BN=64 and 8 warps).
HIP_FWD = Tuner("hip_fwd", [
    _c(8, 2, BM=64, BN=32),
    _c(8, 2, BM=64, BN=64),
    _c(4, 2, BM=64, BN=64),
    _c(4, 3, BM=64, BN=64),
    _c(4, 2, BM=64, BN=32),
    _c(8, 2, BM=128, BN=64),
    _c(8, 3, BM=64, BN=128),
    _c(8, 1, BM=64, BN=64),
    _c(4, 2, BM=32, BN=64),
    _c(8, 2, BM=32, BN=64),
], lambda c, b: _hip_valid(c, b, 1) and (not b[2] or c.num_warps == 4),  # decoding: 16-row tiles, 4 warps
    # D = 256: BM=32, BN=64 needs 172 KB of shared memory on sm_80 (163 KB) and spills; decoding's
    # 4-warp default (BM=64, BN=64 clamped to 16 rows) spills 700 B
    first=_first(_wide(_c(8, 2, BM=32, BN=16)), _wide(_c(4, 2, BM=64, BN=16)), _c(8, 2, BM=32, BN=64),
                 tf32=[_wide(_c(8, 2, BM=32, BN=32)), _wide(_c(4, 2, BM=64, BN=32))]))
HIP_BWD_DQ = Tuner("hip_bwd_dq", [
    _c(8, 2, BM=64, BN=32),
    _c(4, 2, BM=64, BN=32),
    _c(8, 2, BM=64, BN=64),
    _c(4, 2, BM=32, BN=32),
    _c(4, 1, BM=64, BN=32),
    _c(8, 2, BM=128, BN=32),
    _c(8, 1, BM=64, BN=32),
    _c(4, 1, BM=32, BN=32),
    _c(8, 2, BM=32, BN=32),
], lambda c, b: _hip_valid(c, b, 1, True),  # fp32 D = 256: 4 warps spill 6.4 KB
    # fp32 up to D = 128: 32-row tiles, 8 warps: no spill in the loop at D 32-128 on sm_80/90 with
    # triton 3.6 and 3.9 (64-row tiles spill on triton 3.9 at D 96/128, and on 3.6 at sm_90 D = 128
    # once the kernel takes K/V strides; 4 warps spill on sm_90 at D = 128 since dS is scaled)
    first=_first(_wide(_c(8, 2, BM=32, BN=16)), _c(8, 2, BM=32, BN=32), tf32=[_c(4, 2, BM=32, BN=32)]))
HIP_BWD_DKDV_GATHER = Tuner("hip_bwd_dkdv_gather", [
    _c(4, 1, BM=64, BN=32),
    _c(8, 2, BM=64, BN=32),
    _c(8, 2, BM=64, BN=64),
    _c(4, 1, BM=32, BN=32),
    _c(8, 1, BM=128, BN=32),
    _c(8, 1, BM=64, BN=32),
    _c(8, 1, BM=32, BN=32),
], lambda c, b: _hip_valid(c, b, 2) and (pow2(b[1]) <= 128 or (c.num_warps, c.num_stages) == (8, 1)
                                          and c.kw["BM"] <= 64 and c.kw["BN"] <= 32),
    first=_first(_c(8, 1, BM=32, BN=16)))
HIP_BWD_DKDV_LOCAL = Tuner("hip_bwd_dkdv_local", [
    _c(8, 1, BM=32, BN=32),
    _c(4, 1, BM=32, BN=32),
    _c(8, 2, BM=64, BN=32),
    _c(8, 1, BM=64, BN=64),
    _c(4, 1, BM=16, BN=32),
], lambda c, b: _hip_valid(c, b, 2), first=_first(_wide(_c(8, 1, BM=16, BN=32)), _c(4, 1, BM=16, BN=32)))
# split-K decoding: the combine of the parts (elementwise, BR rows a program; no tuning)
HIP_COMBINE = Tuner("hip_combine", [_c(4, 1, BR=16)])
HIP_ATTENTION = [HIP_FWD, HIP_BWD_DQ, HIP_BWD_DKDV_GATHER, HIP_BWD_DKDV_LOCAL, HIP_COMBINE]
ALL = ALL + HIP_ATTENTION


# Bi-level routing attention; bucket = (dtype name, head dim, region class RS in {16, 32, 64}:
# pow2 of the tokens per region, clamped to [16, 64]; walk class: pow2 of topk x tokens per
# region, clamped to [64, 512], timed apart because short and long walks want other tile widths). The region side of a tile (forward / dQ:
# the query tile BM; dK/dV: the KV tile BN) must equal RS for RS 16 / 32 and be >= 64 for RS 64;
# the other side packs several routed (or routing) regions.
def _rt(w, st, rs, **kw) -> Config:
    return Config({"RS": rs, **kw}, w, st)


def _rt_valid(cfg: Config, bucket: tuple, region_side: str, acc_tiles: int) -> bool:
    _, D, rs = bucket[:3]
    side = cfg.kw[region_side]
    if cfg.kw["RS"] != rs or (side != rs if rs < 64 else side < 64):
        return False
    rows = cfg.kw["BM"] if acc_tiles == 1 else cfg.kw["BN"]
    return acc_tiles * rows * pow2(D) <= 128 * 32 * cfg.num_warps


# (defaults: the first config of each class; 8-warp 64x64 and 4-warp 32x32 spill 8 B on triton 3.6)
ROUTING_FWD = Tuner("routing_fwd", [
    _rt(4, 2, 64, BM=64, BN=32),
    _rt(8, 2, 64, BM=64, BN=64),
    _rt(4, 2, 64, BM=64, BN=64),
    _rt(4, 3, 64, BM=64, BN=64),
    _rt(8, 2, 64, BM=128, BN=64),
    _rt(4, 2, 64, BM=64, BN=128),
    _rt(4, 2, 32, BM=32, BN=128),
    _rt(4, 2, 32, BM=32, BN=32),
    _rt(4, 2, 32, BM=32, BN=64),
    _rt(8, 2, 32, BM=32, BN=64),
    _rt(2, 2, 32, BM=32, BN=64),
    _rt(4, 2, 16, BM=16, BN=64),
    _rt(4, 2, 16, BM=16, BN=128),
    _rt(2, 2, 16, BM=16, BN=64),
    _rt(4, 2, 16, BM=16, BN=32),
], lambda c, b: _rt_valid(c, b, "BM", 1),
    # fp32 at D = 128 on sm_90: every 8-warp 64-row region tile spills (BN = 16 least, 224 B)
    first=_first(_rt(16, 1, 64, BM=64, BN=16), _rt(8, 2, 32, BM=32, BN=16), _rt(8, 2, 16, BM=16, BN=32)))
ROUTING_BWD_DQ = Tuner("routing_bwd_dq", [
    _rt(4, 2, 64, BM=64, BN=32),
    _rt(4, 2, 64, BM=64, BN=64),
    _rt(8, 2, 64, BM=128, BN=32),
    _rt(8, 2, 64, BM=128, BN=64),
    _rt(4, 2, 32, BM=32, BN=32),
    _rt(4, 2, 32, BM=32, BN=64),
    _rt(4, 2, 16, BM=16, BN=32),
    _rt(4, 2, 16, BM=16, BN=64),
    _rt(2, 2, 16, BM=16, BN=32),
], lambda c, b: _rt_valid(c, b, "BM", 1),
    first=_first(_rt(8, 2, 64, BM=64, BN=32), _rt(4, 2, 32, BM=32, BN=32), _rt(4, 2, 16, BM=16, BN=16)))
# dK/dV: BN = the KV tile (one region's slots), BM = the packed query tile of the inverse routing.
ROUTING_BWD_DKDV = Tuner("routing_bwd_dkdv", [
    _rt(4, 1, 64, BM=32, BN=64),
    _rt(8, 1, 64, BM=64, BN=64),
    _rt(4, 2, 64, BM=32, BN=64),
    _rt(8, 1, 64, BM=32, BN=128),
    _rt(4, 1, 32, BM=32, BN=32),
    _rt(4, 1, 32, BM=64, BN=32),
    _rt(4, 1, 16, BM=32, BN=16),
    _rt(4, 1, 16, BM=64, BN=16),
    _rt(2, 1, 16, BM=32, BN=16),
], lambda c, b: _rt_valid(c, b, "BN", 2),
    first=_first(_rt(8, 1, 64, BM=16, BN=64), _rt(4, 1, 32, BM=16, BN=32), _rt(8, 1, 16, BM=32, BN=16),
                      # tf32: 8 warps spill 160 B at D = 128 on sm_90; 4 only outside the loop
                      tf32=[_rt(4, 1, 64, BM=16, BN=64)]))
# the inverse routing of the backward (a prefix-sum compaction, no dots; no tuning)
ROUTING_INVERSE = Tuner("routing_inverse", [_c(4, 1)])
# routing itself: region means (a reduction) and affinity + top-k (tiny dots, a selection loop)
# pooling (POOL_* in kernels/routing.py: 32 tokens x 64 channels a step): 8 warps hold it in 76-80
# registers (4 warps: 116-142; 128 channels: 228-255 with spills), no spill on sm_80 / sm_90
ROUTING_POOL = Tuner("routing_pool", [_c(8, 1)])
# bucket = (the affinity block's width, pow2 of the region count): 8 warps past 64 (at 256, 4 warps
# hold 254 registers a thread)
ROUTING_SELECT = Tuner("routing_select", [_c(4, 1, BKMAX=64), _c(8, 1, BKMAX=256)],
                       lambda c, b: b[0] <= c.kw["BKMAX"])
ROUTING = [ROUTING_FWD, ROUTING_BWD_DQ, ROUTING_BWD_DKDV]
ALL = ALL + ROUTING + [ROUTING_INVERSE, ROUTING_POOL, ROUTING_SELECT]


# HiP mask estimation (kernels/hip.py, hip_select_blocks); bucket = (dtype name, head dim, KBP, BK, NQS, decoding):
# the padded selected-block count, block_size_k, strided-query count, and one query block or more.
# NR: gathered keys per tl.dot (2 x CH nodes' children x BK tokens; at least 2 BK). Default: the one
# config found clean (no spills) for fp16/bf16 on sm_80 and sm_90 at D = 64, 128, 256 on both triton
# 3.6 and 3.9 (wider dots spill somewhere: 4 warps at D=64 on sm_80 with 3.6, 8 warps at D=256 on
# sm_90 with 3.6, 8 warps at D=64 on sm_80 with 3.9); the tuner tries the wider ones. fp32 (FMA dots
# in 16-column slices; F32=0 marks configs not offered for it) defaults to NR=64 with 8 warps (NR=32
# spills 24-32 B on triton 3.6). So does a decoding step (bucket[5]; NQS = 16 rows as block_size_q
# is clipped to Tq), where the F32=0 config spills 24 B at D=64 on sm_80 with 3.9 and NR64_w8 is
# clean at D = 32-128 on both (NR32 with 4 warps spills on sm_90 with 3.6).
HIP_SELECT = Tuner("hip_select", [
    _c(8, 1, NR=32, F32=0),
    _c(8, 1, NR=64),
    _c(4, 1, NR=64),
    _c(8, 1, NR=128),
    _c(4, 1, NR=128),
    _c(8, 1, NR=256),
    _c(4, 1, NR=32),
], lambda c, b: (b[0] != "float32" and not b[5]) or c.kw.get("F32", 1) == 1,
    keys_tf32=False)  # IEEE dots whatever torch's setting: the ranking must match the reference's
ALL = ALL + [HIP_SELECT]
