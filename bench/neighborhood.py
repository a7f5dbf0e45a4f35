"""Neighborhood attention benchmark: subquad's block-sparse Triton kernel vs dense attention and peers.

    python bench/neighborhood.py [--quick] [--out DIR] [--device auto|cuda|cpu] [--budget SECONDS]
                                 [--case NAME ...] [--dtype float16|bfloat16 ...] [--mode fwd|fwdbwd ...]

GPU (when CUDA is available): head dim 128, B=1, H=24, fp16 and bf16 (--quick: fp16), forward and
forward+backward (--quick: forward) on the issue's seven cases, in this order (NATTEN's published
H100 fp16 forward speedups over cuDNN in brackets):

    1-D n=32768, k=2048, stride 1 / 256 / 2048                   [8.3, 12.6, 13.3]
    2-D 256x256, k=80x80, stride 1 / 16x16                       [6.0, 12.3]
    3-D 30x48x80, k=(18,24,24), stride 1 / (16,8,8)              [3.6, 12.1]

(--quick: 1-D stride 256 and 2-D stride 16x16). Baselines on the same problem: SDPA full
self-attention on the cuDNN and flash backends (each when available), FlexAttention compiled with
``torch.compile`` under a block mask built from the same neighborhood rule (``flex_mask_mod``),
and NATTEN's ``na1d/na2d/na3d`` when natten is importable with its compiled library. For every
case: the achieved forward speedup over SDPA next to the analytic tile bound
(``subquad.neighborhood_speedup_bound`` with the tile shapes the kernel actually ran), the ratio
achieved / bound, the ratio vs compiled Flex, and NATTEN's published numbers side by side.

CPU: ``subquad.neighborhood_attention`` on CPU tensors (the pure-PyTorch reference path) vs dense
SDPA on CPU and vs NATTEN's CPU path (``backend="flex-fna"``, when natten is importable), 2-D
k=7, H=4, D=32, fp32, forward without autograd, at 32x32, 64x64, 128x128 (--quick: 32x32 and
64x64); each case in a fresh process (time and peak memory, see ``bench.common.CPU_MEMORY_METHOD``).

Writes ``neighborhood_<cuda|cpu>.json`` / ``.md`` / ``.png`` (matplotlib) to --out; --quick writes
one file, ``neighborhood_<cuda|cpu>.md``, with the JSON embedded at its end (the GPU check script
may bring back only 8 files). ``check()`` is the kernel-vs-reference correctness check (and the
Flex mask check) that ``python -m bench`` runs.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

import subquad
from bench import common
from bench.common import fmt, ratio

NAME = "neighborhood"

# ----------------------------------------------------------------------------------------------
# problem sizes

GPU_DEVICE = "cuda"
# B=1, H=24 (FLUX's and HunyuanVideo's heads, the 2-D setting) for every case, D=128: SDPA's
# largest run (3-D, 115200 tokens) then needs ~0.7 GiB per input tensor and ~1-2 s per fwd+bwd.
GPU_SHAPE = dict(B=1, H=24, D=128)
GPU_DTYPES = [torch.float16, torch.bfloat16]
GPU_DTYPES_QUICK = [torch.float16]
MODES = ("fwd", "fwdbwd")
MODES_QUICK = ("fwd",)

# name, spatial shape, window, stride, NATTEN's published H100 fp16 D=128 forward speedup over cuDNN
CASES = [
    dict(name="1d-s1", shape=(32768,), kernel_size=(2048,), stride=(1,), natten_published=8.3),
    dict(name="1d-s256", shape=(32768,), kernel_size=(2048,), stride=(256,), natten_published=12.6),
    dict(name="1d-s2048", shape=(32768,), kernel_size=(2048,), stride=(2048,), natten_published=13.3),
    dict(name="2d-s1", shape=(256, 256), kernel_size=(80, 80), stride=(1, 1), natten_published=6.0),
    dict(name="2d-s16", shape=(256, 256), kernel_size=(80, 80), stride=(16, 16), natten_published=12.3),
    dict(name="3d-s1", shape=(30, 48, 80), kernel_size=(18, 24, 24), stride=(1, 1, 1), natten_published=3.6),
    dict(name="3d-s16x8x8", shape=(30, 48, 80), kernel_size=(18, 24, 24), stride=(16, 8, 8), natten_published=12.1),
]
CASE_NAMES = [c["name"] for c in CASES]
QUICK_CASES = ["1d-s256", "2d-s16"]
# A (case, dtype) stops starting new measurements after this many seconds (quick / full).
CASE_SECONDS = {True: 60.0, False: 300.0}

IMPLS = ["subquad", "sdpa_cudnn", "sdpa_flash", "flex", "natten"]
LABELS = {"subquad": "subquad (Triton)", "sdpa_cudnn": "SDPA full (cuDNN)", "sdpa_flash": "SDPA full (flash)",
          "flex": "FlexAttention (compiled)", "natten": "NATTEN"}
SDPA_IMPLS = ("sdpa_cudnn", "sdpa_flash")

CPU_SHAPE = dict(B=1, H=4, D=32)
CPU_KERNEL = 7
CPU_SIZES = [32, 64, 128]      # 2-D n x n
CPU_SIZES_QUICK = [32, 64]
CPU_TARGET_SIZE = 128
CPU_LABELS = {"subquad": "subquad reference", "sdpa": "SDPA full (CPU)", "natten": "NATTEN flex-fna (CPU)"}
# NATTEN's CPU path materialises every score (eager flex attention): ~110 s and ~14 GiB per call at
# 128x128 on 2 cores, so it gets one timed call there.
NATTEN_CPU_REPS_AT = {128: 1}


def case_by_name(name: str) -> dict:
    return next(c for c in CASES if c["name"] == name)


def _norm(case: dict) -> dict:
    """A case with every window argument as a tuple of one per dim (dilation 1, non-causal default)."""
    nd = len(case["shape"])

    def per_dim(v, default):
        v = default if v is None else v
        return tuple(v) if isinstance(v, (list, tuple)) else (v,) * nd

    return dict(case, shape=tuple(case["shape"]), kernel_size=per_dim(case.get("kernel_size"), None),
                stride=per_dim(case.get("stride"), 1), dilation=per_dim(case.get("dilation"), 1),
                is_causal=per_dim(case.get("is_causal"), False))


def _window_kw(case: dict) -> dict:
    c = _norm(case)
    return dict(stride=c["stride"], dilation=c["dilation"], is_causal=c["is_causal"])


def describe(case: dict) -> str:
    c = _norm(case)
    x = "x".join

    def tup(t):
        return x(map(str, t))

    out = f"{len(c['shape'])}-D {tup(c['shape'])} k={tup(c['kernel_size'])} s={tup(c['stride'])}"
    if any(d > 1 for d in c["dilation"]):
        out += f" d={tup(c['dilation'])}"
    if any(c["is_causal"]):
        out += f" causal={tup(str(int(b)) for b in c['is_causal'])}"
    return out


# ----------------------------------------------------------------------------------------------
# FlexAttention's mask: NATTEN's window rule on flattened (row-major) token indices


def _tmin(x, y):
    return torch.minimum(x, y) if isinstance(y, torch.Tensor) else torch.clamp(x, max=y)


def flex_mask_mod(shape: Sequence[int], kernel_size, stride=1, dilation=1, is_causal=False):
    """A FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` for neighborhood attention on the
    row-major flattening of ``shape``: True where key ``kv_idx`` lies in query ``q_idx``'s window in
    every dim (the rules of ``subquad.reference.neighborhood``: dilation groups, windows shifted
    inward at borders, stride groups sharing a window, causal windows ending at the query).

    Pure torch ops on the index tensors (traceable by vmap and torch.compile); kernel_size, stride,
    dilation, is_causal: an int/bool or one per dim."""
    from subquad.reference.neighborhood import normalize_per_dim

    shape = tuple(int(n) for n in shape)
    nd = len(shape)
    ks, ss, ds = (tuple(int(x) for x in normalize_per_dim(v, nd)) for v in (kernel_size, stride, dilation))
    cs = tuple(bool(x) for x in normalize_per_dim(is_causal, nd))
    steps = [math.prod(shape[a + 1:]) for a in range(nd)]

    def dim_ok(i, j, n, k, s, d, causal):
        if d > 1:
            g = i % d
            ip, jp = i // d, j // d
            ng = (n - g + (d - 1)) // d           # tokens in query i's dilation group
            same = (j % d) == g
        else:
            ip, jp, ng, same = i, j, n, None
        if causal:
            lead = _tmin((ip // s) * s + (s - 1), ng - 1)
            start = torch.clamp(lead - (k - 1), min=0)
            ok = (jp >= start) & (jp <= ip)
        else:
            lead = _tmin((ip // s) * s + s // 2, ng - 1)
            start = _tmin(torch.clamp(lead - k // 2, min=0), ng - k)
            ok = (jp >= start) & (jp < start + k)
        return ok if same is None else ok & same

    def mask_mod(b, h, q_idx, kv_idx):
        ok = None
        for a in range(nd):
            i = (q_idx // steps[a]) % shape[a]
            j = (kv_idx // steps[a]) % shape[a]
            m = dim_ok(i, j, shape[a], ks[a], ss[a], ds[a], cs[a])
            ok = m if ok is None else ok & m
        return ok

    return mask_mod


def flex_mask_dense(shape, kernel_size, stride=1, dilation=1, is_causal=False) -> torch.Tensor:
    """``flex_mask_mod`` evaluated on the full [N, N] index grid (CPU; small shapes only)."""
    n = math.prod(shape)
    idx = torch.arange(n, dtype=torch.int64)
    zero = torch.zeros((), dtype=torch.int64)
    return flex_mask_mod(shape, kernel_size, stride, dilation, is_causal)(zero, zero, idx[:, None], idx[None, :])


_BLOCK_MASKS: Dict[tuple, object] = {}
_FLEX = {}


def _allow_recompiles() -> None:
    """Every case (shape, mask, dtype, fwd or fwd+bwd) is a new graph of the same compiled
    function; past dynamo's recompile limit (8) it would silently run flex eagerly (materialising
    N x N scores). Raise the limit, and make hitting it an error instead of a silent fallback."""
    import torch._dynamo.config as cfg

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 128))
    for name in ("accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), 1024))
    if hasattr(cfg, "fail_on_recompile_limit_hit"):
        cfg.fail_on_recompile_limit_hit = True


def flex_block_mask(case: dict, device):
    """The BlockMask of ``case`` (cached): ``create_block_mask`` over the flattened tokens with
    flex's default 128 x 128 blocks; compiled on CUDA (the eager path materialises N x N)."""
    from torch.nn.attention.flex_attention import create_block_mask

    c = _norm(case)
    key = (c["shape"], c["kernel_size"], c["stride"], c["dilation"], c["is_causal"], str(device))
    if key not in _BLOCK_MASKS:
        n = math.prod(c["shape"])
        mod = flex_mask_mod(c["shape"], c["kernel_size"], c["stride"], c["dilation"], c["is_causal"])
        make = create_block_mask
        if torch.device(device).type == "cuda":
            _allow_recompiles()
            make = _FLEX.setdefault("create_block_mask", torch.compile(create_block_mask))
        _BLOCK_MASKS[key] = make(mod, None, None, n, n, device=device)
    return _BLOCK_MASKS[key]


def flex_fn(compiled: bool):
    from torch.nn.attention.flex_attention import flex_attention

    if not compiled:
        return flex_attention
    _allow_recompiles()
    return _FLEX.setdefault("flex_attention", torch.compile(flex_attention, dynamic=False))


# ----------------------------------------------------------------------------------------------
# peers


def natten_module():
    """natten when importable with the generic ``na1d/na2d/na3d`` API (natten >= 0.20), else None."""
    if importlib.util.find_spec("natten") is None:
        return None
    try:
        import natten
    except Exception:  # a build that does not import with this torch
        return None
    return natten if hasattr(natten, "na1d") else None


def natten_info(natten) -> Optional[dict]:
    if natten is None:
        return None
    from importlib import metadata

    try:
        version = metadata.version("natten")
    except metadata.PackageNotFoundError:
        version = getattr(natten, "__version__", "?")
    return {"version": version, "has_libnatten": bool(getattr(natten, "HAS_LIBNATTEN", False))}


def natten_gpu_usable(natten) -> bool:
    """On a GPU NATTEN is worth timing only with its compiled library (Hopper/Ampere FNA kernels);
    without it natten falls back to Flex, which the Flex baseline already measures."""
    return natten is not None and bool(getattr(natten, "HAS_LIBNATTEN", False))


# ----------------------------------------------------------------------------------------------
# the implementations compared


def attention_fn(impl: str, case: dict, device, compiled_flex: Optional[bool] = None):
    """(layout, fn(q, k, v) -> o). Layout "spatial" = [B, *spatial, H, D] (subquad, NATTEN),
    "bhnd" = [B, H, N, D] with N the row-major flattening (SDPA, Flex: their native layout)."""
    c = _norm(case)
    ks, kw = c["kernel_size"], _window_kw(c)
    cuda = torch.device(device).type == "cuda"
    if impl == "subquad":
        return "spatial", lambda q, k, v: subquad.neighborhood_attention(q, k, v, ks, **kw)
    if impl in SDPA_IMPLS:
        def sdpa(q, k, v):
            if q.is_cuda:
                from torch.nn.attention import SDPBackend, sdpa_kernel

                backend = SDPBackend.CUDNN_ATTENTION if impl == "sdpa_cudnn" else SDPBackend.FLASH_ATTENTION
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v)
            return F.scaled_dot_product_attention(q, k, v)
        return "bhnd", sdpa
    if impl == "flex":
        block_mask = flex_block_mask(c, device)
        flex = flex_fn(cuda if compiled_flex is None else compiled_flex)
        return "bhnd", lambda q, k, v: flex(q, k, v, block_mask=block_mask)
    if impl == "natten":
        natten = natten_module()
        if natten is None:
            raise RuntimeError("natten is not importable")
        op = getattr(natten, f"na{len(c['shape'])}d")
        extra = {} if cuda else {"backend": "flex-fna"}  # natten's CPU path
        return "spatial", lambda q, k, v: op(q, k, v, kernel_size=ks, **kw, **extra)
    raise ValueError(f"unknown implementation {impl!r}")


def make_inputs(case: dict, B: int, H: int, D: int, dtype, device, seed: int = 0):
    """q, k, v, do in the spatial layout [B, *spatial, H, D]: random normal (never zeros)."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (B, *_norm(case)["shape"], H, D)
    return [torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4)]


def from_layout(o: torch.Tensor, layout: str, like: torch.Tensor) -> torch.Tensor:
    if layout == "spatial":
        return o
    return o.transpose(1, 2).reshape(like.shape)


def make_case(impl: str, mode: str, case: dict, B: int, H: int, D: int, dtype=torch.float16, device="cuda",
              requires_grad: bool = True, seed: int = 0, compiled_flex: Optional[bool] = None):
    """Inputs in the implementation's layout and a zero-argument callable for one measurement.

    mode: "fwd", "bwd" (backward of one retained forward graph) or "fwdbwd". Every implementation
    gets the same values (same seed; SDPA and Flex a [B, H, N, D] copy made outside the timing).
    Returns (fn, leaves): leaves are the tensors whose .grad must be reset between calls.
    """
    layout, attn = attention_fn(impl, case, device, compiled_flex)
    q, k, v, do = (common.to_layout(x, layout) for x in make_inputs(case, B, H, D, dtype, device, seed))
    return common.timed_call(attn, q, k, v, do, mode, requires_grad)


def flops(impl: str, mode: str, case: dict, B: int, H: int, D: int) -> float:
    """Useful FLOPs: forward 4 * B * H * D * (attended (query, key) pairs): prod(k) pairs per query
    for neighborhood attention (subquad, Flex, NATTEN; exact count from the bound), N^2 for SDPA's
    full attention. Backward = 2.5 x forward (no recomputation counted), fwd+bwd = 3.5 x forward."""
    c = _norm(case)
    if impl in SDPA_IMPLS:
        pairs = math.prod(c["shape"]) ** 2
    else:
        pairs = subquad.neighborhood_speedup_bound(c["shape"], c["kernel_size"], c["stride"], c["dilation"],
                                                   c["is_causal"]).attended_pairs
    fwd = 4.0 * B * H * D * pairs
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwdbwd": 3.5 * fwd}[mode]


def kernel_tiles(dtype, D: int, case: dict, device=None) -> dict:
    """The (query tile, KV tile) shapes subquad's kernels use for this case's tuner bucket (dtype,
    head dim, rank, strided), from the autotuner: {"fwd" | "dq" | "dkdv": {"q_tile", "kv_tile",
    "config", "source"}}. source is "chosen" when the kernel already ran in this process (the config
    it ran on ``device``, default the current CUDA device), else "default"."""
    from subquad.autotune import spaces

    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    from subquad.kernels.neighborhood import tuner_bucket

    c = _norm(case)
    nd = len(c["shape"])
    bucket = tuner_bucket(dtype, D, nd, c["stride"])
    out = {}
    for key, tuner in (("fwd", spaces.NEIGHBORHOOD_FWD), ("dq", spaces.NEIGHBORHOOD_BWD_DQ),
                       ("dkdv", spaces.NEIGHBORHOOD_BWD_DKDV)):
        cfg = tuner.chosen(bucket, device)
        cfg, source = (cfg, "chosen") if cfg is not None else (tuner.default(bucket), "default")
        out[key] = {"q_tile": [cfg.kw[f"TQ{i}"] for i in range(3)][3 - nd:],
                    "kv_tile": [cfg.kw[f"TK{i}"] for i in range(3)][3 - nd:],
                    "config": cfg.name(), "source": source}
    return out


def speedup_bound(case: dict, q_tile=None, kv_tile=None) -> dict:
    c = _norm(case)
    b = subquad.neighborhood_speedup_bound(c["shape"], c["kernel_size"], c["stride"], c["dilation"], c["is_causal"],
                                           q_tile=q_tile, kv_tile=kv_tile)
    return {"q_tile": list(b.q_tile), "kv_tile": list(b.kv_tile), "tile_bound": b.tile_bound,
            "flop_bound": b.flop_bound, "visited_tiles": b.visited_tiles, "dense_tiles": b.dense_tiles,
            "masked_tiles": b.masked_tiles, "self_attention_tiles": b.self_attention_tiles,
            "attended_pairs": b.attended_pairs}


# ----------------------------------------------------------------------------------------------
# correctness check (python -m bench)

# fp16 at the benchmark's head dim, 1-D and 2-D: the autotune buckets the quick benchmark then uses.
GPU_CHECKS = [
    dict(name="fp16 1-D n=2000 k=257 s=64 GQA", B=1, shape=(2000,), H=4, Hkv=2, D=128, kernel_size=257, stride=64,
         dilation=1, is_causal=False, dtype=torch.float16),
    dict(name="fp16 2-D 48x40 k=13x11 s=4x1 d=1x2", B=1, shape=(48, 40), H=4, Hkv=4, D=128, kernel_size=(13, 11),
         stride=(4, 1), dilation=(1, 2), is_causal=False, dtype=torch.float16),
]
# Interpreter sizes (a few seconds): partial tiles, stride, dilation, a causal dim, GQA.
CPU_CHECKS = [
    dict(name="fp32 1-D n=67 k=7 s=3 GQA", B=1, shape=(67,), H=2, Hkv=1, D=16, kernel_size=7, stride=3,
         dilation=1, is_causal=False, dtype=torch.float32),
    dict(name="fp32 2-D 11x13 k=3x4 s=1x2 d=2x1 causal=0x1", B=1, shape=(11, 13), H=1, Hkv=1, D=16,
         kernel_size=(3, 4), stride=(1, 2), dilation=(2, 1), is_causal=(False, True), dtype=torch.float32),
]
# FlexAttention baseline's mask_mod vs the reference's dense neighborhood mask.
FLEX_MASK_CHECKS = [
    dict(shape=(37,), kernel_size=5, stride=1, dilation=1, is_causal=False),
    dict(shape=(70,), kernel_size=6, stride=3, dilation=2, is_causal=False),
    dict(shape=(65,), kernel_size=9, stride=2, dilation=3, is_causal=True),
    dict(shape=(11, 13), kernel_size=(3, 4), stride=(1, 2), dilation=(2, 1), is_causal=(False, True)),
    dict(shape=(16, 16), kernel_size=(8, 8), stride=(4, 8), dilation=1, is_causal=False),
    dict(shape=(5, 6, 7), kernel_size=(2, 3, 3), stride=(1, 2, 3), dilation=(2, 1, 2), is_causal=(True, False, False)),
    dict(shape=(6, 8, 10), kernel_size=(3, 4, 5), stride=(3, 2, 5), dilation=1, is_causal=(False, False, True)),
]


def _check_case(name: str, B: int, shape, H: int, Hkv: int, D: int, kernel_size, stride, dilation, is_causal,
                dtype: torch.dtype, device: str) -> List[dict]:
    """Kernel vs the float64 dense-mask definition for o, dq, dk, dv. Pass rule (the tests'):
    error <= 2 x (error of the reference path run in the kernel's dtype) + atol x max(1, |reference|)."""
    from subquad.reference import neighborhood as ref

    gen = torch.Generator().manual_seed(1234)

    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64)

    q, k, v = randn(B, *shape, H, D), randn(B, *shape, Hkv, D), randn(B, *shape, Hkv, D)
    do = randn(B, *shape, H, D)
    kw = dict(stride=stride, dilation=dilation, is_causal=is_causal)

    def run(fn, dt):
        leaves = [x.to(device=device, dtype=dt).requires_grad_() for x in (q, k, v)]
        o = fn(*leaves)
        grads = torch.autograd.grad(o, leaves, do.to(device, o.dtype))
        return dict(zip(["o", "dq", "dk", "dv"], [o, *grads]))

    def op(backend):
        return lambda q_, k_, v_: subquad.neighborhood_attention(q_, k_, v_, kernel_size, backend=backend, **kw)

    kernel = run(op("triton"), dtype)
    lowp = run(op("reference"), dtype)
    exact = run(lambda q_, k_, v_: ref.neighborhood_attention_naive(q_, k_, v_, kernel_size, stride, dilation,
                                                                    is_causal), torch.float64)
    return common.tolerance_rows(NAME, name, kernel, lowp, exact, dtype)


def check_flex_mask(shape, kernel_size, stride=1, dilation=1, is_causal=False) -> dict:
    """One check row: positions where ``flex_mask_mod`` disagrees with ``neighborhood_mask``."""
    from subquad.reference.neighborhood import neighborhood_mask

    want = neighborhood_mask(tuple(shape), kernel_size, stride, dilation, is_causal)
    got = flex_mask_dense(shape, kernel_size, stride, dilation, is_causal)
    bad = int((got != want).sum())
    name = "Flex mask_mod " + describe(dict(shape=shape, kernel_size=kernel_size, stride=stride, dilation=dilation,
                                            is_causal=is_causal))
    return dict(family=NAME, case=name, tensor="mask (mismatches)", err=bad, ref_err=0, bound=0, ok=bad == 0)


def check() -> List[dict]:
    """Triton kernel vs reference, forward and backward: natively on a GPU at moderate sizes
    (fp16, D=128), else through the Triton interpreter at small sizes (TRITON_INTERPRET=1 must have
    been set before triton was imported; ``python -m bench`` does it). Then the Flex baseline's
    mask_mod vs the reference's neighborhood_mask on small 1-D/2-D/3-D cases (CPU, exact)."""
    cuda = common.require_kernels()
    rows = []
    for case in GPU_CHECKS if cuda else CPU_CHECKS:
        rows += _check_case(device="cuda" if cuda else "cpu", **case)
    rows += [check_flex_mask(**c) for c in FLEX_MASK_CHECKS]
    return rows


# ----------------------------------------------------------------------------------------------
# output helpers


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# GPU benchmark


def measure_gpu(impl: str, case: dict, dtype, B: int, H: int, D: int, modes: Sequence[str],
                deadline: common.Deadline) -> dict:
    """Median ms and peak memory of each mode of one implementation on one case (modes whose start
    would be past ``deadline`` are skipped)."""
    return common.measure_modes(f"{impl} {case['name']} {_dt(dtype)}", modes, deadline,
                                lambda mode: make_case(impl, mode, case, B, H, D, dtype, GPU_DEVICE),
                                lambda mode: flops(impl, mode, case, B, H, D))


def agreement(impl: str, case: dict, dtype, B: int, H: int, D: int) -> Optional[float]:
    """max |o_impl - o_subquad| on the benchmark's own inputs: a forward as the timed calls made it
    (inputs that require grad, grad mode on), so compiled Flex reuses its graph instead of
    compiling an inference one (no_grad fails dynamo's grad-mode guard)."""
    outs = []
    for name in ("subquad", impl):
        layout, attn = attention_fn(name, case, GPU_DEVICE)
        q, k, v, _ = make_inputs(case, B, H, D, dtype, GPU_DEVICE)
        xs = [common.to_layout(x, layout).detach().requires_grad_() for x in (q, k, v)]
        outs.append(from_layout(attn(*xs), layout, q).detach().float())
        del q, k, v, xs
    diff = (outs[0] - outs[1]).abs().max().item()
    del outs
    torch.cuda.empty_cache()
    return diff


def summarize_gpu(payload: dict) -> dict:
    rows, bounds = payload["rows"], payload["bounds"]
    by = {(r["case"], r["dtype"], r["impl"]): r for r in rows}

    def get(cn, dt, impl, key):
        return by.get((cn, dt, impl), {}).get(key)

    per_case = []
    for cn in payload["config"]["cases"]:
        case = case_by_name(cn)
        for dt in payload["config"]["dtypes"]:
            if (cn, dt, "subquad") not in by:
                continue
            b = bounds.get(f"{cn}/{dt}") or {}
            ours = {m: get(cn, dt, "subquad", f"{m}_ms") for m in ("fwd", "fwdbwd")}
            sd = {m: [get(cn, dt, i, f"{m}_ms") for i in SDPA_IMPLS] for m in ("fwd", "fwdbwd")}
            best = {m: min([x for x in sd[m] if x], default=None) for m in sd}
            vs_best_fwd = ratio(best["fwd"], ours["fwd"])
            vs_cudnn_fwd = ratio(get(cn, dt, "sdpa_cudnn", "fwd_ms"), ours["fwd"])
            published = case["natten_published"] if dt == "float16" else None
            per_case.append({
                "case": cn, "dtype": dt, "strided": any(s > 1 for s in _norm(case)["stride"]),
                "q_tile": b.get("q_tile"), "kv_tile": b.get("kv_tile"), "tiles_source": b.get("tiles_source"),
                "tile_bound": b.get("tile_bound"), "flop_bound": b.get("flop_bound"),
                "visited_tiles": b.get("visited_tiles"), "masked_tiles": b.get("masked_tiles"),
                "fwd_vs_cudnn": vs_cudnn_fwd, "fwd_vs_flash": ratio(get(cn, dt, "sdpa_flash", "fwd_ms"), ours["fwd"]),
                "fwd_vs_sdpa": vs_best_fwd,
                "fwd_achieved_over_bound": ratio(vs_best_fwd, b.get("tile_bound")),
                "fwdbwd_vs_sdpa": ratio(best["fwdbwd"], ours["fwdbwd"]),
                "fwd_vs_flex": ratio(get(cn, dt, "flex", "fwd_ms"), ours["fwd"]),
                "fwdbwd_vs_flex": ratio(get(cn, dt, "flex", "fwdbwd_ms"), ours["fwdbwd"]),
                "natten_fwd_vs_cudnn": ratio(get(cn, dt, "sdpa_cudnn", "fwd_ms"), get(cn, dt, "natten", "fwd_ms")),
                "fwd_vs_natten": ratio(get(cn, dt, "natten", "fwd_ms"), ours["fwd"]),
                "natten_published_fwd_vs_cudnn": published,
                "fwd_vs_cudnn_over_published": ratio(vs_cudnn_fwd, published),
            })

    def worst(key, pred=lambda p: True):
        vals = [p[key] for p in per_case if pred(p) and p[key] is not None]
        return min(vals) if vals else None

    frac = worst("fwd_achieved_over_bound", lambda p: p["strided"])
    flex_fwd, flex_fb = worst("fwd_vs_flex"), worst("fwdbwd_vs_flex")
    targets = [
        common.target_line("forward speedup over SDPA >= 0.75 x the tile bound on the strided (block-sparse) "
                           "cases (worst achieved / bound)", frac, None if frac is None else frac >= 0.75),
        common.target_line("forward >= 2x faster than compiled FlexAttention on every case (worst x)", flex_fwd,
                           None if flex_fwd is None else flex_fwd >= 2.0),
        common.target_line("fwd+bwd >= 2x faster than compiled FlexAttention on every case (worst x)", flex_fb,
                           None if flex_fb is None else flex_fb >= 2.0),
    ]
    pub = [p["fwd_vs_cudnn_over_published"] for p in per_case if p["fwd_vs_cudnn_over_published"]]
    geo = math.exp(sum(map(math.log, pub)) / len(pub)) if pub else None
    return {"per_case": per_case, "targets": targets, "vs_natten_published_geomean": geo}


def gpu_markdown(payload: dict) -> str:
    cfg, info, s = payload["config"], payload["env"], payload["summary"]
    nat = payload.get("natten")
    nat_txt = ("natten not installed" if nat is None else
               f"natten {nat['version']}" + ("" if nat["has_libnatten"] else " without libnatten (not timed: "
                                                                            "it would only run Flex)"))
    out = [f"## Neighborhood attention on {info['gpu']}",
           f"commit {info['commit']}, torch {info['torch']}, triton {info['triton']}, {nat_txt}; B={cfg['B']}, "
           f"H={cfg['H']}, D={cfg['D']}; do_bench medians (ms; calls over 250 ms: median of 3); peak = "
           "max_memory_allocated minus the inputs; TFLOP/s count useful FLOPs (neighborhood pairs for "
           "subquad/Flex/NATTEN, all N^2 pairs for SDPA; fwd+bwd = 3.5 x fwd). Flex: "
           "torch.compile(flex_attention) with a 128x128-block BlockMask of the same neighborhood rule on "
           "the row-major token order.", ""]
    table = []
    order = {n: i for i, n in enumerate(CASE_NAMES)}
    for r in sorted(payload["rows"], key=lambda r: (order[r["case"]], r["dtype"], IMPLS.index(r["impl"]))):
        table.append([describe(case_by_name(r["case"])), r["dtype"], LABELS[r["impl"]], fmt(r.get("fwd_ms")),
                      fmt(r.get("fwdbwd_ms")), fmt(r.get("fwd_tflops")), fmt(r.get("fwdbwd_tflops")),
                      fmt(r.get("fwd_peak_mib"), ".0f"), fmt(r.get("fwdbwd_peak_mib"), ".0f"),
                      fmt(r.get("max_abs_diff_vs_subquad")), r.get("note", "")])
    out.append(common.markdown_table(["case", "dtype", "impl", "fwd ms", "fwd+bwd ms", "fwd TFLOP/s",
                                      "fwd+bwd TFLOP/s", "peak fwd MiB", "peak fwd+bwd MiB",
                                      "max abs diff of o vs subquad", "note"], table))
    out += ["", "Speed-ups of subquad (other's time / subquad's time). SDPA = the faster of its cuDNN and flash "
                "backends. Tile bound: neighborhood_speedup_bound with the forward kernel's tile shapes "
                "(query / KV, from the autotuner; 'default' = its first config, the kernel did not run). "
                "NATTEN published: H100, fp16, D=128, forward, over cuDNN.", ""]
    out.append(common.markdown_table(
        ["case", "dtype", "tiles q / kv", "tile bound", "FLOP bound", "masked / visited tiles", "fwd vs cuDNN",
         "fwd vs flash", "achieved / bound", "fwd+bwd vs SDPA", "vs Flex fwd", "vs Flex fwd+bwd",
         "NATTEN measured fwd vs cuDNN", "NATTEN published", "ours / published"],
        [[describe(case_by_name(p["case"])), p["dtype"],
          (f"{'x'.join(map(str, p['q_tile']))} / {'x'.join(map(str, p['kv_tile']))}"
           + (" (default)" if p["tiles_source"] == "default" else "")) if p["q_tile"] else "—",
          fmt(p["tile_bound"], ".2f"), fmt(p["flop_bound"], ".2f"),
          f"{fmt(p['masked_tiles'])} / {fmt(p['visited_tiles'])}",
          fmt(p["fwd_vs_cudnn"], ".2f"), fmt(p["fwd_vs_flash"], ".2f"), fmt(p["fwd_achieved_over_bound"], ".2f"),
          fmt(p["fwdbwd_vs_sdpa"], ".2f"), fmt(p["fwd_vs_flex"], ".2f"), fmt(p["fwdbwd_vs_flex"], ".2f"),
          fmt(p["natten_fwd_vs_cudnn"], ".2f"), fmt(p["natten_published_fwd_vs_cudnn"], ".1f"),
          fmt(p["fwd_vs_cudnn_over_published"], ".2f")] for p in s["per_case"]]))
    out += ["", "Targets:", ""] + [f"- {t['text']}" for t in s["targets"]]
    if s.get("vs_natten_published_geomean") is not None:
        out.append(f"- info: forward speedup over cuDNN / NATTEN's published one, geometric mean over the fp16 "
                   f"cases measured: {s['vs_natten_published_geomean']:.2f} (1 = on par)")
    return "\n".join(out)


def plot_gpu(payload: dict, path: str) -> Optional[str]:
    """Achieved speedup over SDPA against the tile bound, one point per (case, dtype)."""
    per = sorted((p for p in payload["summary"]["per_case"] if p["tile_bound"]), key=lambda p: p["tile_bound"])
    xs = [p["tile_bound"] for p in per]
    fp16 = [p if p["dtype"] == "float16" else {} for p in per]
    cfg = payload["config"]
    panels = [
        {"title": "forward: speedup over SDPA vs tile bound", "xlabel": "tile bound (x)", "ylabel": "speedup (x)",
         "series": {"tile bound": (xs, xs), "subquad": (xs, [p["fwd_vs_sdpa"] for p in per]),
                    "0.75 x bound": (xs, [0.75 * x for x in xs]),
                    "NATTEN published (fp16, vs cuDNN)": (xs, [p.get("natten_published_fwd_vs_cudnn") for p in fp16]),
                    "NATTEN measured (vs cuDNN)": (xs, [p["natten_fwd_vs_cudnn"] for p in per])}},
        {"title": "subquad vs compiled Flex", "xlabel": "tile bound (x)", "ylabel": "Flex time / subquad time",
         "series": {"forward": (xs, [p["fwd_vs_flex"] for p in per]),
                    "fwd+bwd": (xs, [p["fwdbwd_vs_flex"] for p in per]), "target 2x": (xs, [2.0] * len(xs))}},
    ]
    return common.plot(path, f"Neighborhood attention, {payload['env']['gpu']}, B={cfg['B']} H={cfg['H']} "
                             f"D={cfg['D']}", panels)


def run_gpu(quick: bool, out_dir: str, budget: Optional[float] = None, cases: Optional[List[str]] = None,
            dtypes: Optional[List[torch.dtype]] = None, modes: Optional[Sequence[str]] = None,
            impls: Optional[Sequence[str]] = None) -> dict:
    B, H, D = GPU_SHAPE["B"], GPU_SHAPE["H"], GPU_SHAPE["D"]
    names = cases or (QUICK_CASES if quick else CASE_NAMES)
    dtypes = dtypes or (GPU_DTYPES_QUICK if quick else GPU_DTYPES)
    modes = tuple(modes or (MODES_QUICK if quick else MODES))
    natten = natten_module()
    deadline = common.Deadline(budget)
    payload = {"family": NAME, "device": "cuda", "quick": quick, "env": common.env_info(),
               "natten": natten_info(natten),
               "config": {"B": B, "H": H, "D": D, "cases": names, "dtypes": [_dt(d) for d in dtypes],
                          "modes": list(modes), "case_seconds": CASE_SECONDS[quick],
                          "case_defs": {n: _norm(case_by_name(n)) for n in names},
                          "flops": " ".join(flops.__doc__.split())},
               "rows": [], "bounds": {}}
    stem = f"{NAME}_cuda"
    spent: Dict[tuple, float] = {}

    def write():
        payload["summary"] = summarize_gpu(payload)
        md = gpu_markdown(payload)
        return md, common.write_results(out_dir, stem, payload, md, quick, plot_gpu)  # after every row: a run cut short keeps it

    def measure(impl, cn, dtype):
        case = case_by_name(cn)
        key = (cn, _dt(dtype))
        row = {"case": cn, "dtype": _dt(dtype), "impl": impl}
        left = CASE_SECONDS[quick] - spent.get(key, 0.0)
        if deadline.expired():
            row["note"] = "skipped: time budget"
        elif left <= 0:
            row["note"] = f"skipped: case deadline ({CASE_SECONDS[quick]:.0f} s)"
        else:
            t0 = time.perf_counter()
            case_deadline = common.Deadline(min(left, deadline.remaining(left)))
            row.update(measure_gpu(impl, case, dtype, B, H, D, modes, case_deadline))
            if impl == "subquad":
                tiles = kernel_tiles(dtype, D, case)
                fwd = tiles["fwd"]
                bound = speedup_bound(case, fwd["q_tile"], fwd["kv_tile"])
                bound.update(tiles_source=fwd["source"], kernel_tiles=tiles,
                             default_tiles_bound=speedup_bound(case)["tile_bound"])
                payload["bounds"][f"{cn}/{_dt(dtype)}"] = bound
            elif impl in ("flex", "natten") and row.get("fwd_ms") and not deadline.expired():
                row["max_abs_diff_vs_subquad"] = common.attempt(
                    f"{impl} agreement {cn}", lambda: agreement(impl, case, dtype, B, H, D))[0]
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - t0
            print(f"[bench] {impl:10s} {cn:11s} {_dt(dtype):8s}: fwd {fmt(row.get('fwd_ms'))} ms, fwd+bwd "
                  f"{fmt(row.get('fwdbwd_ms'))} ms {row.get('note', '')} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
        payload["rows"].append(row)
        write()

    # Order: subquad and SDPA on every case first (cheap, and what the targets need most), then
    # Flex (each case compiles its kernels and block mask) and NATTEN, so that a run cut short by
    # the budget still has the main comparison.
    for group in (("subquad", "sdpa_cudnn", "sdpa_flash"), ("flex", "natten")):
        for cn in names:
            for dtype in dtypes:
                for impl in group:
                    if (impl == "natten" and not natten_gpu_usable(natten)) or (impls and impl not in impls):
                        continue
                    measure(impl, cn, dtype)
    md, where = write()
    print(md)
    print(f"\n[bench] wrote {where}; results to keep go to bench/results/{common.device_slug(payload['env'])}/")
    return payload


# ----------------------------------------------------------------------------------------------
# CPU benchmark


def cpu_forward_case(impl: str, n: int, kernel_size: int, B: int, H: int, D: int, threads: Optional[int] = None):
    """Target of ``common.cpu_case`` (runs in the child process): a 2-D n x n forward, no autograd."""
    if threads:
        torch.set_num_threads(threads)
    case = dict(name=f"cpu-{n}", shape=(n, n), kernel_size=kernel_size)
    impl_ = {"subquad": "subquad", "sdpa": "sdpa_flash", "natten": "natten"}[impl]  # on CPU: plain SDPA
    fn, _ = make_case(impl_, "fwd", case, B, H, D, torch.float32, "cpu", requires_grad=False)
    if impl == "natten":
        import warnings

        warnings.filterwarnings("ignore")  # flex's "called without torch.compile" warning, once per call

    def call():
        with torch.no_grad():
            return fn()

    return call


def summarize_cpu(rows: List[dict], sizes: List[int]) -> dict:
    by = {(r["impl"], r["n"]): r for r in rows}
    per_n = [{"n": n,
              "speedup_vs_sdpa": ratio(by.get(("sdpa", n), {}).get("ms"), by.get(("subquad", n), {}).get("ms")),
              "speedup_vs_natten": ratio(by.get(("natten", n), {}).get("ms"), by.get(("subquad", n), {}).get("ms"))}
             for n in sizes]
    at = next((p["speedup_vs_sdpa"] for p in per_n if p["n"] == CPU_TARGET_SIZE), None)
    mem = common.growth_exponent([n * n for n in sizes], [by.get(("subquad", n), {}).get("peak_mib") for n in sizes])
    targets = [
        common.target_line(f"reference forward at {CPU_TARGET_SIZE}x{CPU_TARGET_SIZE}, k={CPU_KERNEL} >= 10x faster "
                           "than dense SDPA on CPU (x)", at, None if at is None else at >= 10),
        common.target_line("reference memory linear in tokens: growth exponent of the peak between the two largest "
                           "sizes (1 = linear, 2 = quadratic) <= 1.1", mem, None if mem is None else mem <= 1.1),
    ]
    return {"per_n": per_n, "targets": targets}


def cpu_markdown(payload: dict) -> str:
    cfg, info, s = payload["config"], payload["env"], payload["summary"]
    by = {(r["impl"], r["n"]): r for r in payload["rows"]}
    nat = payload.get("natten")
    out = [f"## Neighborhood attention on CPU ({info['cpu']}, {info['cpu_threads']} threads): reference path vs "
           "dense SDPA" + (" and NATTEN" if nat else ""),
           f"commit {info['commit']}, torch {info['torch']}, "
           f"{'natten ' + nat['version'] + ' (backend flex-fna)' if nat else 'natten not installed'}; 2-D n x n, "
           f"k={cfg['kernel_size']}, fp32, B={cfg['B']}, H={cfg['H']}, D={cfg['D']}; forward without autograd; "
           f"median ms of {cfg['reps']} calls after a warm-up (NATTEN at 128x128: 1 call).", ""]
    table = []
    for p in s["per_n"]:
        n = p["n"]
        r, d, t = by.get(("subquad", n), {}), by.get(("sdpa", n), {}), by.get(("natten", n), {})
        table.append([f"{n}x{n}", fmt(r.get("ms")), fmt(d.get("ms")), fmt(t.get("ms")),
                      fmt(p["speedup_vs_sdpa"], ".2f"), fmt(p["speedup_vs_natten"], ".2f"),
                      fmt(r.get("peak_mib"), ".1f"), fmt(d.get("peak_mib"), ".1f"), fmt(t.get("peak_mib"), ".1f"),
                      " ".join(dict.fromkeys(x["error"] for x in (r, d, t) if x.get("error")))])
    out.append(common.markdown_table(["size", "reference ms", "SDPA ms", "NATTEN ms", "reference vs SDPA (x)",
                                      "reference vs NATTEN (x)", "reference peak MiB", "SDPA peak MiB",
                                      "NATTEN peak MiB", "note"], table))
    out += ["", "Targets:", ""] + [f"- {t['text']}" for t in s["targets"]]
    if payload["quick"]:
        out.append(f"- (quick run: the {CPU_TARGET_SIZE}x{CPU_TARGET_SIZE} target is measured by the full run, "
                   "python bench/neighborhood.py --device cpu)")
    out += ["", f"Memory: {common.CPU_MEMORY_METHOD}."]
    out += common.load_warning(info)
    return "\n".join(out)


def plot_cpu(payload: dict, path: str) -> Optional[str]:
    cfg = payload["config"]
    sizes = cfg["sizes"]
    xs = [n * n for n in sizes]
    by = {(r["impl"], r["n"]): r for r in payload["rows"]}

    def series(key):
        impls = [i for i in ("subquad", "sdpa", "natten") if any((i, n) in by for n in sizes)]
        return {CPU_LABELS[i]: (xs, [by.get((i, n), {}).get(key) for n in sizes]) for i in impls}

    return common.plot(path, f"Neighborhood attention on CPU, 2-D k={cfg['kernel_size']}, fp32 B={cfg['B']} "
                             f"H={cfg['H']} D={cfg['D']}, forward", [
        {"title": "forward time", "xlabel": "tokens (n x n)", "ylabel": "ms (median)", "series": series("ms")},
        {"title": "peak memory", "xlabel": "tokens (n x n)", "ylabel": "MiB above inputs",
         "series": series("peak_mib")}])


def run_cpu(quick: bool, out_dir: str, budget: Optional[float] = None, threads: Optional[int] = None) -> dict:
    B, H, D = CPU_SHAPE["B"], CPU_SHAPE["H"], CPU_SHAPE["D"]
    sizes = CPU_SIZES_QUICK if quick else CPU_SIZES
    reps = 2 if quick else 5
    deadline = common.Deadline(budget)
    natten = natten_module()
    impls = ["subquad", "sdpa"] + (["natten"] if natten is not None else [])
    payload = {"family": NAME, "device": "cpu", "quick": quick, "env": common.env_info(), "natten": natten_info(natten),
               "config": {"B": B, "H": H, "D": D, "kernel_size": CPU_KERNEL, "dtype": "float32", "sizes": sizes,
                          "reps": reps, "natten_reps": {str(k): v for k, v in NATTEN_CPU_REPS_AT.items()},
                          "memory_method": common.CPU_MEMORY_METHOD}, "rows": []}
    for n in sizes:
        for impl in impls:
            row = {"n": n, "impl": impl}
            if deadline.expired():
                row.update(ms=None, peak_mib=None, error="skipped: time budget")
            else:
                r = NATTEN_CPU_REPS_AT.get(n, reps) if impl == "natten" else reps
                case = dict(impl=impl, n=n, kernel_size=CPU_KERNEL, B=B, H=H, D=D, threads=threads)
                row.update(common.cpu_case(f"bench.{NAME}:cpu_forward_case", case, reps=r,
                                           timeout=deadline.remaining(1800) + 30))
                print(f"[bench] cpu {impl:8s} {n}x{n}: {fmt(row.get('ms'))} ms, peak {fmt(row.get('peak_mib'), '.1f')} "
                      "MiB", flush=True)
            payload["rows"].append(row)
    if threads:
        payload["env"]["cpu_threads"] = threads
    payload["env"]["loadavg_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    payload["summary"] = summarize_cpu(payload["rows"], sizes)
    md = cpu_markdown(payload)
    where = common.write_results(out_dir, f"{NAME}_cpu", payload, md, quick, plot_cpu)
    print(md)
    print(f"\n[bench] wrote {where}")
    return payload


def run(quick: bool = True, out_dir: str = common.DEFAULT_OUT, budget: Optional[float] = None, device: str = "auto",
        threads: Optional[int] = None, cases: Optional[List[str]] = None, dtypes: Optional[List[torch.dtype]] = None,
        modes: Optional[Sequence[str]] = None, impls: Optional[Sequence[str]] = None) -> dict:
    """The benchmark on the GPU when there is one (or device="cuda"), else on the CPU."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return run_gpu(quick, out_dir, budget, cases, dtypes, modes, impls)
    return run_cpu(quick, out_dir, budget, threads)


def main(argv=None) -> int:
    p = common.base_parser(__doc__, quick_help="GPU: fp16, forward, 2 cases; CPU: 32x32 and 64x64")
    p.add_argument("--case", action="append", choices=CASE_NAMES, help="GPU: only this case (repeatable)")
    p.add_argument("--dtype", action="append", choices=["float16", "bfloat16"],
                   help="GPU: only this dtype (repeatable)")
    p.add_argument("--mode", action="append", choices=list(MODES), help="GPU: only this mode (repeatable)")
    p.add_argument("--impl", action="append", choices=IMPLS,
                   help="GPU: only this implementation (repeatable; the ratios need subquad and an SDPA row)")
    args = p.parse_args(argv)
    dtypes = [getattr(torch, d) for d in args.dtype] if args.dtype else None
    run(args.quick, args.out, args.budget, args.device, args.threads, args.case, dtypes, args.mode, args.impl)
    return 0


if __name__ == "__main__":
    sys.exit(main())
