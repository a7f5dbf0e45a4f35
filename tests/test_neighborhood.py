"""Neighborhood attention kernels vs the reference: forward and dq/dk/dv, 1-D/2-D/3-D, odd sizes
leaving partial tiles, even and odd windows, stride, dilation, causal per dim, GQA."""

from __future__ import annotations

import random

import pytest
import torch
import triton
import triton.language as tl

import subquad
from subquad.kernels.neighborhood import _query_tiles
from subquad.reference import neighborhood as ref

from helpers import DEVICE, KERNEL_DTYPES, assert_close, distinct_configs, randn

DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _grads(fn, q, k, v, do):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves)
    return (o,) + torch.autograd.grad((o.double() * do.double()).sum(), leaves)


def _check(B, spatial, H, Hkv, D, ks, ss, ds, cs, dtype):
    q = randn(B, *spatial, H, D, dtype=dtype, seed=1)
    k = randn(B, *spatial, Hkv, D, dtype=dtype, seed=2)
    v = randn(B, *spatial, Hkv, D, dtype=dtype, seed=3)
    kw = dict(stride=ss, dilation=ds, is_causal=cs)
    do = torch.randn(q.shape, dtype=torch.float32, device=DEVICE)
    got = _grads(lambda a, b, c: subquad.neighborhood_attention(a, b, c, ks, backend="triton", **kw), q, k, v, do)
    low = _grads(lambda a, b, c: subquad.neighborhood_attention(a, b, c, ks, backend="reference", **kw), q, k, v, do)
    exact = _grads(lambda a, b, c: ref.neighborhood_attention_naive(a, b, c, ks, ss, ds, cs), q, k, v, do)
    assert got[0].dtype == dtype
    for name, a, b, c in zip(["o", "dq", "dk", "dv"], got, exact, low):
        assert_close(name, a, b, c)


# (B, spatial, H, Hkv, D, kernel_size, stride, dilation, is_causal): hand-picked corners
CASES = [
    (2, (37,), 2, 1, 16, 5, 1, 1, False),          # 1-D, partial last tile, GQA
    (1, (64,), 1, 1, 32, 64, 1, 1, False),         # window = whole sequence (dense)
    (1, (70,), 2, 2, 16, 6, 3, 2, False),          # even window, stride, dilation with unequal groups
    (1, (67,), 2, 1, 16, 7, 7, 1, False),          # stride = window (fully block-sparse)
    (1, (65,), 1, 1, 24, 9, 2, 3, True),           # causal + stride + dilation, head dim not pow2
    (1, (11, 13), 2, 1, 16, (3, 4), (1, 2), (2, 1), (False, True)),
    (1, (9, 10), 1, 1, 16, 5, 5, 1, False),
    (1, (5, 6, 7), 2, 1, 16, (2, 3, 3), (1, 2, 3), (2, 1, 2), (True, False, False)),
    # GQA with several KV heads: h // GROUP and h % H_kv (or hk GROUP + hh and hh H_kv + hk) differ
    (1, (37,), 4, 2, 16, 5, 1, 1, False),
    (1, (9, 10), 6, 2, 16, (3, 5), (1, 2), (1, 1), (False, True)),
]


def _id(c):
    B, sp, H, Hkv, D, ks, ss, ds, cs = c
    return f"n{'x'.join(map(str, sp))}-H{H}/{Hkv}-D{D}-k{ks}-s{ss}-d{ds}-c{cs}".replace(" ", "")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_kernel_matches_reference(case, dtype):
    _check(*case, dtype)


def _random_case(rng: random.Random, nd: int):
    spatial, ks, ss, ds, cs = [], [], [], [], []
    for _ in range(nd):
        k = rng.randint(2, 5 if nd == 3 else 7)
        d = rng.randint(1, 2)
        n = rng.randint(k * d, k * d + (3 if nd == 3 else 17))
        spatial.append(n)
        ks.append(k)
        ss.append(rng.randint(1, k))
        ds.append(d)
        cs.append(rng.random() < 0.3)
    H, Hkv = rng.choice([(1, 1), (2, 1), (2, 2)])
    return (1, tuple(spatial), H, Hkv, 16, tuple(ks), tuple(ss), tuple(ds), tuple(cs))


RANDOM = [_random_case(random.Random(seed), nd) for nd, seeds in ((1, range(6)), (2, range(3)), (3, range(2)))
          for seed in seeds]


@pytest.mark.parametrize("case", RANDOM, ids=[_id(c) for c in RANDOM])
def test_random_sweep(case):
    _check(*case, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("case", [
    (2, (1000,), 4, 2, 128, 65, 1, 1, False),
    (1, (4097,), 2, 1, 64, 512, 128, 1, True),
    (1, (45, 67), 4, 4, 128, (13, 11), (1, 3), (2, 1), (False, False)),
    (1, (12, 20, 24), 2, 1, 64, (5, 6, 7), (2, 3, 1), (1, 2, 1), (True, False, False)),
], ids=_id)
def test_kernel_large(case, dtype):
    _check(*case, dtype)


def test_wide_row_offsets(monkeypatch):
    """The forward / dQ walks' int64 KV-tile row offsets (taken when one batch element of K holds
    2^31 elements or more, too large to test here; a dilated 3-D box spans most of it) compute the
    same function as the int32 ones."""
    from subquad.kernels import neighborhood as kn

    monkeypatch.setattr(kn, "wide", lambda x: True)
    _check(1, (5, 6, 7), 2, 1, 16, (3, 2, 3), (1, 2, 1), (1, 2, 2), (False, True, False), torch.float32)


@pytest.mark.parametrize("is_causal", [False, True])
def test_window_wider_than_a_kv_tile(is_causal):
    """k = 70, stride 1: a query tile's window starts span more than a 32-key KV tile, so some
    visited tiles lie inside every query's window (the unmasked path) and others only inside the
    first query's (masked); smaller windows never reach the unmasked path on these CPU tiles."""
    _check(1, (300,), 1, 1, 16, 70, 1, 1, is_causal, torch.float32)


def test_grid_limit_is_a_clear_error(monkeypatch):
    """Batch x query heads beyond the grid's 65535 programs: a ValueError before any launch, also
    where batch x KV heads stays below it (the launch is stubbed out: a missing check fails fast)."""
    from subquad.kernels import block_sparse

    def no_launch(*args, **kwargs):
        raise AssertionError("launched past the grid limit")
    monkeypatch.setattr(block_sparse, "block_sparse_attention", no_launch)
    q = torch.empty(65536, 8, 1, 16, device=DEVICE).expand(65536, 8, 1, 16)
    with pytest.raises(ValueError, match="exceeds the Triton kernel's grid limit"):
        subquad.na1d(q, q, q, 3, backend="triton")
    kv = torch.empty(32768, 8, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="exceeds the Triton kernel's grid limit"):
        subquad.na1d(kv.expand(32768, 8, 2, 16), kv, kv, 3, backend="triton")


# every config of every neighborhood space computes the same function (the tuner may pick any on a GPU)
_RANK_CASE = {
    1: (1, (41,), 2, 1, 16, 5, 2, 2, True),
    2: (1, (9, 11), 2, 1, 16, (3, 5), (1, 2), (2, 1), (False, True)),
    3: (1, (5, 6, 7), 1, 1, 16, (2, 3, 3), (1, 2, 3), (2, 1, 1), (True, False, False)),
}


def _na_configs():
    from subquad.autotune import spaces

    return [(t, c) for t in spaces.NEIGHBORHOOD for c in distinct_configs(t.configs())]


@pytest.mark.parametrize("tuner,cfg", _na_configs(), ids=lambda x: getattr(x, "kernel", None) or x.name())
def test_every_config(tuner, cfg, monkeypatch):
    monkeypatch.setattr(tuner, "choose", lambda bucket, device, bench: cfg)
    _check(*_RANK_CASE[cfg.kw["R"]], torch.float32)


def test_misaligned_kv_under_a_tma_config(monkeypatch):
    """K/V that are contiguous views starting off a 16-byte boundary (slices of one packed buffer):
    ``.contiguous()`` keeps them as they are, and a TMA config (which the GPU tuner may pick and
    cache for the bucket) builds its descriptors on them, whose base must be 16-byte aligned."""
    from subquad.autotune import spaces

    for tuner in (spaces.NEIGHBORHOOD_FWD, spaces.NEIGHBORHOOD_BWD_DQ):
        tma = next(c for c in tuner.configs() if c.kw.get("TMA") and c.kw["R"] == 1)
        monkeypatch.setattr(tuner, "choose", lambda bucket, device, bench, cfg=tma: cfg)
    B, T, H, D = 1, 41, 2, 16
    n = B * T * H * D
    q = randn(B, T, H, D, dtype=torch.float32, seed=1)
    packed = randn(2 * n + 1, dtype=torch.float32, seed=2)
    do = randn(B, T, H, D, dtype=torch.float32, seed=3)
    results = []
    for backend in ("triton", "reference"):
        leaves = [q.clone().requires_grad_(), packed.clone().requires_grad_()]
        k, v = leaves[1][1:n + 1].view(B, T, H, D), leaves[1][n + 1:].view(B, T, H, D)
        assert k.is_contiguous() and k.data_ptr() % 16 and v.data_ptr() % 16
        o = subquad.na1d(leaves[0], k, v, 5, dilation=2, backend=backend)
        results.append((o,) + torch.autograd.grad((o * do).sum(), leaves))
    for name, a, b in zip(["o", "dq", "d packed kv"], *results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@triton.jit
def _query_tiles_probe(OUT, TK, TQ, n, k, s, causal, nbits):
    t = tl.program_id(0)
    lo, cnt, full_lo, full_hi = _query_tiles(t, TK, TQ, n, k, s, causal, nbits)
    tl.store(OUT + 4 * t, lo)
    tl.store(OUT + 4 * t + 1, cnt)
    tl.store(OUT + 4 * t + 2, full_lo)
    tl.store(OUT + 4 * t + 3, full_hi)


@pytest.mark.parametrize("n,k,s,causal,TQ,TK", [
    (41, 5, 2, True, 8, 8), (41, 5, 2, False, 8, 4), (64, 16, 16, False, 16, 16), (37, 7, 1, False, 4, 8),
    (100, 20, 7, True, 16, 8), (33, 33, 1, False, 8, 8), (200, 64, 1, False, 16, 16), (200, 64, 32, True, 16, 16),
])
def test_query_tiles_of_a_kv_tile(n, k, s, causal, TQ, TK):
    """dK/dV's walk per dim, found once per program by bisection: the query tiles whose windows meet
    a KV tile must be exactly those a brute force over the reference's windows finds (one too few
    would drop gradient terms), and the tiles it runs without the element mask exactly those whose
    every query's window holds the whole KV tile (one more would be a wrong gradient, one fewer a
    masked tile that need not be)."""
    ntk = -(-n // TK)
    out = torch.empty(4 * ntk, dtype=torch.int32, device=DEVICE)
    _query_tiles_probe[(ntk,)](out, TK, TQ, n, k, s, int(causal), n.bit_length())
    got = out.cpu().reshape(-1, 4).tolist()
    st, en = ref.ingroup_window(torch.arange(n), n, k, s, causal)
    fulls = 0
    for tk, (lo, cnt, full_lo, full_hi) in enumerate(got):
        a, b = tk * TK, min(tk * TK + TK, n) - 1
        for t in range(-(-n // TQ)):
            queries = range(t * TQ, min(t * TQ + TQ, n))
            meets = any(st[i] <= b and a < en[i] for i in queries)
            assert (lo <= t < lo + cnt) == meets, (a, b, t, lo, cnt)
            want = all(st[i] <= a and b < en[i] for i in queries)
            assert (full_lo <= t <= full_hi) == want, (a, b, t, full_lo, full_hi)
            fulls += want
    assert fulls > 0  # the cases are not all partial tiles


def test_neighborhood_dilation_product_limit(monkeypatch):
    """3-D dilations whose product passes 65535 (grid axis 1): the documented ValueError, checked
    before any launch (stubbed here; expanded inputs, no memory)."""
    from subquad.kernels import block_sparse
    def no_launch(*args, **kwargs):
        raise AssertionError("launched: a Triton limit was not checked")
    monkeypatch.setattr(block_sparse, "block_sparse_attention", no_launch)
    q = torch.empty(1, 1, 1, 1, 1, 16, device=DEVICE).expand(1, 82, 82, 82, 1, 16)
    with pytest.raises(ValueError, match="product of dilations"):
        subquad.na3d(q, q, q, 2, dilation=41, backend="triton")
