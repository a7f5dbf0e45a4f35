"""Neighborhood attention, reference side: the per-dim window rules against a literal restatement
of the issue's rules, NATTEN's facts, the memory-efficient reference vs the dense-mask definition
(float64, forward and dq/dk/dv), the analytic speedup bound, and bad input to the public op."""

from __future__ import annotations

import itertools
import math
import os
import random
import warnings

import pytest
import torch

from subquad import neighborhood as nb_api
from subquad.reference import neighborhood as nb

from helpers import DEVICE, randn


# ---------------------------------------------------------------------------------------------
# The issue's rules, restated literally (plain Python, one query at a time)
# ---------------------------------------------------------------------------------------------

def brute_keys(i: int, n: int, k: int, s: int, d: int, causal: bool):
    """Sorted list of the keys (original coordinates) query i attends along one dim."""
    g = i % d
    ip = i // d
    ng = math.ceil((n - g) / d)
    kL = k // 2
    if causal:
        L = min((ip // s) * s + s - 1, ng - 1)
        keys = range(max(L - k + 1, 0), ip + 1)
    else:
        L = min((ip // s) * s + s // 2, ng - 1)
        start = min(max(L - kL, 0), ng - k)
        keys = range(start, start + k)
    return [jp * d + g for jp in keys]


def all_combos(max_n: int):
    for n in range(2, max_n + 1):
        for k in range(2, n + 1):
            for d in range(1, n // k + 1):
                for s in range(1, k + 1):
                    for causal in (False, True):
                        yield n, k, s, d, causal


EXTRA = [(100, 13, 5, 7, False), (100, 13, 13, 7, True), (97, 10, 4, 9, False), (97, 10, 10, 9, True),
         (64, 8, 8, 8, False), (129, 2, 1, 64, True), (129, 2, 2, 64, False), (250, 31, 16, 8, False),
         (250, 31, 31, 8, True), (61, 60, 30, 1, False), (61, 60, 59, 1, True)]


def test_window_rules_match_the_literal_restatement():
    combos = list(all_combos(17)) + EXTRA
    assert len(combos) > 2000
    for n, k, s, d, causal in combos:
        brute = [brute_keys(i, n, k, s, d, causal) for i in range(n)]
        m = nb.dim_mask(n, k, s, d, causal)
        expect = torch.zeros(n, n, dtype=torch.bool)
        for i, keys in enumerate(brute):
            expect[i, keys] = True
        assert torch.equal(m, expect), (n, k, s, d, causal)
        # vectorised start/end and the fixed-width gather table agree with the same keys
        st, en = nb.window_start_end(torch.arange(n), n, k, s, d, causal)
        idx, valid = nb.window_table(n, k, s, d, causal)
        for i, keys in enumerate(brute):
            assert (int(st[i]), int(en[i])) == (keys[0], keys[-1] + 1), (n, k, s, d, causal, i)
            assert list(range(int(st[i]), int(en[i]), d)) == keys
            assert idx[i][valid[i]].tolist() == keys
            assert idx[i].min() >= 0 and idx[i].max() < n
    # plain ints take the same path
    for n, k, s, d, causal in EXTRA:
        for i in (0, 1, n // 2, n - 2, n - 1):
            keys = brute_keys(i, n, k, s, d, causal)
            assert nb.window_start_end(i, n, k, s, d, causal) == (keys[0], keys[-1] + 1)


def test_natten_facts():
    for n, k, s, d, causal in list(all_combos(15)) + EXTRA:
        i = torch.arange(n)
        g, ip, ng = nb.dilation_group(i, n, d)
        st, en = nb.ingroup_window(ip, ng, k, s, causal)
        m = nb.dim_mask(n, k, s, d, causal)
        assert m.diagonal().all(), "every query attends itself"
        # keys only from the query's own dilation group
        j = torch.arange(n)
        assert not (m & ((i[:, None] % d) != (j[None, :] % d))).any()
        assert (st >= 0).all() and (en <= ng).all()
        if causal:
            assert torch.equal(en, ip + 1), "causal windows end at the query"
            cnt = en - st
            assert (cnt >= 1).all() and (cnt <= k).all()
            # the stride group's leader (its last query, or the group's last) sees a full window
            # unless truncated at the left border
            leader = torch.minimum((ip // s) * s + s - 1, ng - 1)
            assert torch.equal(st, (leader - k + 1).clamp(min=0))
        else:
            assert (m.sum(1) == k).all(), "every non-causal query sees exactly k keys"
            assert torch.equal(en - st, torch.full_like(st, k))
            # interior queries (s == 1): kL keys left, kR keys right
            if s == 1:
                kL, kR = k // 2, k // 2 + k % 2 - 1
                inner = (ip >= kL) & (ip + kR <= ng - 1)
                assert torch.equal(st[inner], ip[inner] - kL)
        # all the queries of a stride group (same group g, same ip // s) share a start
        key = g * (n + 1) + ip // s
        for kk in key.unique():
            sel = key == kk
            assert st[sel].unique().numel() == 1


def test_reference_matches_natten():
    """The reference against NATTEN itself (its pure-Python install runs on a CPU through Flex
    Attention; CI installs it, see .ci/run): forward on random 1-D/2-D/3-D windows, strides,
    dilations and causal dims, odd sizes, GQA. Equal outputs on random inputs pin down the same
    attended keys for every query."""
    natten = pytest.importorskip("natten")
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    if not hasattr(natten, "na1d"):
        pytest.skip("natten < 0.20 (no generic na1d/na2d/na3d)")
    rng = random.Random(0)
    compared = 0
    for _ in range(40):
        nd = rng.choice([1, 1, 2, 2, 3])
        spatial, ks, ss, ds, cs = [], [], [], [], []
        for _ in range(nd):
            k = rng.randint(2, {1: 11, 2: 6, 3: 4}[nd])
            d = rng.choice([1, 1, 2, 3])
            spatial.append(rng.randint(k * d, k * d + {1: 30, 2: 8, 3: 4}[nd]))
            ks.append(k)
            ss.append(rng.randint(1, k))
            ds.append(d)
            cs.append(rng.random() < 0.3)
        H, Hkv = rng.choice([(2, 2), (2, 1), (4, 2)])
        g = torch.Generator().manual_seed(compared)
        q = torch.randn(1, *spatial, H, 16, generator=g)
        k_, v_ = (torch.randn(1, *spatial, Hkv, 16, generator=g) for _ in range(2))
        kw = dict(kernel_size=tuple(ks), stride=tuple(ss), dilation=tuple(ds), is_causal=tuple(cs))
        try:
            want = getattr(natten, f"na{nd}d")(q, k_, v_, backend="flex-fna", **kw)
        except NotImplementedError:  # e.g. causal with the window = the whole input (NATTEN's Flex
            continue                 # path has no causal dense attention)
        got = nb_api.neighborhood_attention(q, k_, v_, tuple(ks), stride=tuple(ss), dilation=tuple(ds),
                                            is_causal=tuple(cs), backend="reference")
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{tuple(spatial)} {kw}: {m}")
        compared += 1
    assert compared >= 34, compared


def test_multi_dim_mask_is_the_box_product():
    shape, ks, ss, ds, cs = (5, 7, 6), (2, 3, 3), (1, 3, 2), (2, 2, 1), (False, True, True)
    m = nb.neighborhood_mask(shape, ks, ss, ds, cs)
    N = math.prod(shape)
    assert m.shape == (N, N)
    per = [nb.dim_mask(shape[a], ks[a], ss[a], ds[a], cs[a]) for a in range(3)]
    for qi in range(0, N, 7):
        qc = [qi // (shape[1] * shape[2]), (qi // shape[2]) % shape[1], qi % shape[2]]
        for ki in range(N):
            kc = [ki // (shape[1] * shape[2]), (ki // shape[2]) % shape[1], ki % shape[2]]
            assert bool(m[qi, ki]) == all(bool(per[a][qc[a], kc[a]]) for a in range(3))


# ---------------------------------------------------------------------------------------------
# Memory-efficient reference vs the dense-mask definition (float64)
# ---------------------------------------------------------------------------------------------

def _random_case(rng: random.Random, nd: int):
    max_n = {1: 37, 2: 11, 3: 7}[nd]
    shape, ks, ss, ds, cs = [], [], [], [], []
    for _ in range(nd):
        n = rng.randint(2, max_n)
        k = rng.randint(2, n)
        d = rng.randint(1, n // k)
        s = rng.randint(1, k)
        shape.append(n); ks.append(k); ss.append(s); ds.append(d); cs.append(rng.random() < 0.4)
    H, Hkv = rng.choice([(1, 1), (2, 2), (4, 2), (3, 1), (6, 3)])
    D = rng.choice([4, 8, 16])
    B = rng.choice([1, 2])
    return B, tuple(shape), H, Hkv, D, tuple(ks), tuple(ss), tuple(ds), tuple(cs)


def _grads(fn, q, k, v, do):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves)
    dq, dk, dv = torch.autograd.grad((o.double() * do).sum(), leaves)
    return o, dq, dk, dv


SWEEP = [(nd, seed) for nd in (1, 2, 3) for seed in range(12)]


@pytest.mark.parametrize("nd,seed", SWEEP, ids=[f"{nd}d-{s}" for nd, s in SWEEP])
def test_reference_matches_naive_fwd_bwd(nd, seed):
    rng = random.Random(1000 * nd + seed)
    B, shape, H, Hkv, D, ks, ss, ds, cs = _random_case(rng, nd)
    q = randn(B, *shape, H, D, dtype=torch.float64, seed=seed)
    k = randn(B, *shape, Hkv, D, dtype=torch.float64, seed=seed + 1)
    v = randn(B, *shape, Hkv, D, dtype=torch.float64, seed=seed + 2)
    do = randn(B, *shape, H, D, dtype=torch.float64, seed=seed + 3)
    scale = rng.choice([None, 0.3])
    # the default tiling, one-query tiles, and tiny chunks (several checkpointed chunks)
    q_tile = rng.choice([None, 1, tuple(rng.randint(1, 4) for _ in range(nd))])
    chunk = rng.choice([1 << 24, 3000])
    naive = lambda a, b, c: nb.neighborhood_attention_naive(a, b, c, ks, ss, ds, cs, scale)  # noqa: E731
    ref = lambda a, b, c: nb.neighborhood_attention(a, b, c, ks, ss, ds, cs, scale, q_tile=q_tile,  # noqa: E731
                                                    chunk_elements=chunk)
    o64, *g64 = _grads(naive, q, k, v, do)
    o, *g = _grads(ref, q, k, v, do)
    case = f"shape={shape} k={ks} s={ss} d={ds} causal={cs} H={H}/{Hkv} q_tile={q_tile} chunk={chunk}"
    assert o.dtype == torch.float64 and o.shape == q.shape
    assert torch.allclose(o, o64, atol=1e-12, rtol=0), f"o: {case}"
    for name, a, b in zip(("dq", "dk", "dv"), g, g64):
        assert torch.allclose(a, b, atol=1e-11, rtol=0), f"{name} max err {(a - b).abs().max():.2e}: {case}"


def test_reference_edge_shapes():
    """Minimal and full windows, k == n, stride == k, dilation == n // k, B > 1, with GQA."""
    cases = [((2,), 2, 1, 1, False), ((2,), 2, 2, 1, True), ((9,), 9, 9, 1, False), ((9,), 3, 3, 3, True),
             ((2, 3), (2, 3), (2, 1), 1, (True, False)), ((4, 1 + 4, 6), (2, 2, 3), (2, 1, 3), (2, 2, 2), True),
             ((13, 3), (6, 3), (6, 3), (2, 1), (False, True))]
    for shape, ks, ss, ds, cs in cases:
        q = randn(2, *shape, 4, 8, dtype=torch.float64, seed=1)
        k = randn(2, *shape, 2, 8, dtype=torch.float64, seed=2)
        v = randn(2, *shape, 2, 8, dtype=torch.float64, seed=3)
        a = nb.neighborhood_attention(q, k, v, ks, ss, ds, cs)
        b = nb.neighborhood_attention_naive(q, k, v, ks, ss, ds, cs)
        assert torch.allclose(a, b, atol=1e-12, rtol=0), (shape, ks, ss, ds, cs)


def test_full_window_is_dense_attention():
    """k = n in every dim, non-causal: plain softmax attention."""
    q = randn(1, 5, 6, 2, 8, dtype=torch.float64, seed=4)
    k = randn(1, 5, 6, 2, 8, dtype=torch.float64, seed=5)
    v = randn(1, 5, 6, 2, 8, dtype=torch.float64, seed=6)
    o = nb.neighborhood_attention(q, k, v, (5, 6))
    qh, kh, vh = (x.reshape(1, 30, 2, 8).transpose(1, 2) for x in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(q.shape)
    assert torch.allclose(o, ref, atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 4e-3), (torch.bfloat16, 3e-2)])
def test_reference_low_precision(dtype, tol):
    """fp32 accumulation for low-precision inputs; output and gradients in the input dtype."""
    shape, ks, ss, ds, cs = (9, 10), (3, 4), (2, 1), (2, 1), (False, True)
    q = randn(2, *shape, 4, 16, dtype=dtype, seed=7, requires_grad=True)
    k = randn(2, *shape, 2, 16, dtype=dtype, seed=8, requires_grad=True)
    v = randn(2, *shape, 2, 16, dtype=dtype, seed=9, requires_grad=True)
    o = nb.neighborhood_attention(q, k, v, ks, ss, ds, cs, chunk_elements=2000)
    assert o.dtype == dtype
    o64 = nb.neighborhood_attention_naive(q, k, v, ks, ss, ds, cs)
    assert (o.double() - o64).abs().max() <= tol
    o.float().sum().backward()
    assert all(x.grad is not None and x.grad.dtype == dtype and torch.isfinite(x.grad).all() for x in (q, k, v))


def test_chunked_gradients_for_some_inputs_only():
    """The recomputed chunks return gradients only for the inputs that need them."""
    q = randn(1, 6, 7, 2, 8, dtype=torch.float64, seed=20)
    k = randn(1, 6, 7, 1, 8, dtype=torch.float64, seed=21)
    v = randn(1, 6, 7, 1, 8, dtype=torch.float64, seed=22)
    args = ((3, 4), (2, 1), 1, (False, True))
    for which in ([1], [0, 2], [2]):
        leaves = [x.clone().requires_grad_(i in which) for i, x in enumerate((q, k, v))]
        o = nb.neighborhood_attention(*leaves, *args, q_tile=(2, 2), chunk_elements=500)
        grads = torch.autograd.grad(o.sum(), [leaves[i] for i in which])
        leaves64 = [x.clone().requires_grad_(i in which) for i, x in enumerate((q, k, v))]
        o64 = nb.neighborhood_attention_naive(*leaves64, *args)
        ref = torch.autograd.grad(o64.sum(), [leaves64[i] for i in which])
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, ref))
    with torch.no_grad():
        o = nb.neighborhood_attention(q, k, v, *args, chunk_elements=500)
    assert not o.requires_grad


def test_public_op_matches_reference():
    q = randn(1, 7, 8, 4, 16, seed=10)
    k = randn(1, 7, 8, 2, 16, seed=11)
    v = randn(1, 7, 8, 2, 16, seed=12)
    o = nb_api.na2d(q, k, v, (3, 4), stride=(1, 2), dilation=(2, 1), is_causal=(True, False), backend="reference")
    o2 = nb_api.neighborhood_attention(q, k, v, [3, 4], stride=[1, 2], dilation=[2, 1], is_causal=[True, False],
                                       backend="reference")  # list arguments == tuple arguments, bit for bit
    ref = nb.neighborhood_attention_naive(q, k, v, (3, 4), (1, 2), (2, 1), (True, False))
    assert torch.allclose(o.double(), ref, atol=1e-5) and torch.equal(o, o2)
    # default scale is D ** -0.5
    o3 = nb_api.na1d(q[:, 0], k[:, 0], v[:, 0], 3, scale=16 ** -0.5)
    assert torch.allclose(o3, nb_api.na1d(q[:, 0], k[:, 0], v[:, 0], 3))
    q3, k3, v3 = (x.reshape(1, 7, 2, 4, x.shape[-2], 16) for x in (q, k, v))
    o4 = nb_api.na3d(q3, k3, v3, (3, 2, 2), stride=(3, 1, 2), is_causal=(False, True, False), backend="auto")
    ref4 = nb.neighborhood_attention_naive(q3, k3, v3, (3, 2, 2), (3, 1, 2), 1, (False, True, False))
    assert o4.shape == q3.shape and torch.allclose(o4.double(), ref4, atol=1e-5)
    # empty batch
    e = nb_api.na1d(q[:0, 0], k[:0, 0], v[:0, 0], 3)
    assert e.shape == (0, 8, 4, 16)


def test_triton_head_dim_limit():
    """Head dims outside 16..256 are a kernel limit, named before any launch."""
    q = randn(1, 8, 2, 8, seed=13)
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("backend='triton' on CPU tensors needs TRITON_INTERPRET=1")
    with pytest.raises(ValueError, match="head dim D must be in \\[16, 256\\]"):
        nb_api.na1d(q, q, q, 3, backend="triton")


def test_reference_is_fast_and_small_on_cpu():
    """2-D 64x64, k=7: the CPU path runs through several chunks without the dense mask."""
    q = torch.randn(1, 64, 64, 2, 16)
    o = nb.neighborhood_attention(q, q, q, 7, chunk_elements=1 << 18)
    ref = nb.neighborhood_attention(q, q, q, 7)
    assert torch.allclose(o, ref, atol=1e-6)
    # spot-check rows against the definition, computed directly for a few queries
    qd = q.double()
    for (x, y) in [(0, 0), (31, 17), (63, 63), (3, 60)]:
        xs, xe = nb.window_start_end(x, 64, 7)
        ys, ye = nb.window_start_end(y, 64, 7)
        keys = qd[0, xs:xe, ys:ye].reshape(-1, 2, 16)
        p = torch.softmax(torch.einsum("hd,khd->hk", qd[0, x, y], keys) * 16 ** -0.5, -1)
        exp = torch.einsum("hk,khd->hd", p, keys)
        assert torch.allclose(o[0, x, y].double(), exp, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Analytic speedup bound
# ---------------------------------------------------------------------------------------------

def test_speedup_bound_sanity_values_from_the_issue():
    r = nb_api.neighborhood_speedup_bound((32768,), 2048, 1, q_tile=128, kv_tile=128)
    assert abs(r.tile_bound - 15.1) < 0.05 and r.masked_tiles > 0
    assert r.visited_tiles == 4336 and r.self_attention_tiles == 256 * 256
    assert r.flop_bound == 16.0
    r = nb_api.neighborhood_speedup_bound((32768,), 2048, 256, q_tile=128, kv_tile=128)
    assert r.tile_bound == 16.0 and r.dense_tiles == r.visited_tiles and r.masked_tiles == 0
    r = nb_api.neighborhood_speedup_bound((256, 256), (80, 80), (16, 16), q_tile=(16, 8), kv_tile=(16, 8))
    assert r.tile_bound == 10.24 == r.flop_bound and r.dense_tiles == r.visited_tiles
    r = nb_api.neighborhood_speedup_bound((256, 256), 80, 1, q_tile=(16, 8), kv_tile=(16, 8))
    assert abs(r.tile_bound - 7.51) < 0.01 and r.masked_tiles > 0
    # the default tiles are 128 / (16, 8) / (4, 4, 8)
    assert nb_api.neighborhood_speedup_bound((32768,), 2048, 256).q_tile == (128,)
    assert nb_api.neighborhood_speedup_bound((256, 256), 80, 16).tile_bound == 10.24
    r3 = nb_api.neighborhood_speedup_bound((30, 48, 80), (18, 24, 24), (16, 8, 8))
    assert r3.q_tile == (4, 4, 8) and r3.kv_tile == (4, 4, 8)
    assert abs(r3.flop_bound - 30 * 48 * 80 / (18 * 24 * 24)) < 1e-12


def _brute_tiles(shape, ks, ss, ds, cs, tq, tkv):
    """Tile pairs counted from the dense mask: tiles inside dilation groups, boxes per dim."""
    nd = len(shape)
    m = nb.neighborhood_mask(shape, ks, ss, ds, cs).reshape(*shape, *shape)
    visited = dense = 0
    for gs in itertools.product(*[range(d) for d in ds]):
        sl = tuple(slice(g, None, d) for g, d in zip(gs, ds))
        sub = m[sl + sl]                                        # in-group coordinates
        ng = sub.shape[:nd]
        qt = [range(0, n, t) for n, t in zip(ng, tq)]
        kt = [range(0, n, t) for n, t in zip(ng, tkv)]
        for q0 in itertools.product(*qt):
            qs = tuple(slice(a, a + t) for a, t in zip(q0, tq))
            for k0 in itertools.product(*kt):
                ksl = tuple(slice(a, a + t) for a, t in zip(k0, tkv))
                blk = sub[qs + ksl]
                if blk.any():
                    visited += 1
                    dense += bool(blk.all())
    # dense self-attention (causal along the causal dims) on the original layout
    self_mask = torch.ones(1, 1, dtype=torch.bool)
    for n, c in zip(shape, cs):
        dm = torch.ones(n, n, dtype=torch.bool).tril() if c else torch.ones(n, n, dtype=torch.bool)
        P, K = self_mask.shape
        self_mask = (self_mask[:, None, :, None] & dm[None, :, None, :]).reshape(P * n, K * n)
    self_mask = self_mask.reshape(*shape, *shape)
    self_tiles = 0
    for q0 in itertools.product(*[range(0, n, t) for n, t in zip(shape, tq)]):
        qs = tuple(slice(a, a + t) for a, t in zip(q0, tq))
        for k0 in itertools.product(*[range(0, n, t) for n, t in zip(shape, tkv)]):
            ksl = tuple(slice(a, a + t) for a, t in zip(k0, tkv))
            self_tiles += bool(self_mask[qs + ksl].any())
    pairs = int(nb.neighborhood_mask(shape, ks, ss, ds, cs).sum())
    return visited, dense, self_tiles, pairs, int(self_mask.sum())


BOUND_CASES = [
    ((37,), 9, 3, 1, False, 4, 8), ((37,), 9, 3, 1, True, 5, 3), ((40,), 6, 6, 3, False, 4, 4),
    ((41,), 4, 2, 5, True, 3, 2), ((64,), 16, 16, 1, False, 8, 8), ((33,), 2, 1, 16, False, 2, 1),
    ((13, 11), (5, 4), (2, 4), (1, 2), (False, True), (4, 2), (3, 4)),
    ((16, 16), (8, 8), (4, 4), 1, False, (4, 4), (4, 4)), ((12, 10), (3, 3), 1, (3, 2), (True, True), (2, 3), (4, 2)),
    ((6, 7, 5), (3, 2, 5), (1, 2, 5), (2, 3, 1), (False, True, False), (2, 2, 3), (3, 2, 2)),
]



@pytest.mark.parametrize("kw,exc,msg", [
    (dict(is_causal=(True,)), ValueError, "is_causal must be a bool or a sequence of 2 bools"),
    (dict(is_causal=(True, False, False)), ValueError, "is_causal must be a bool or a sequence of 2 bools"),
    (dict(is_causal="no"), TypeError, "is_causal must be a bool"),
    (dict(stride=True), TypeError, "stride must be an int"),
    (dict(kernel_size=3.9), TypeError, "kernel_size must be an int"),
    (dict(q_tile=2.5), TypeError, "q_tile must be an int"),
    (dict(kv_tile=(8, 0)), ValueError, "kv_tile must be >= 1"),
    (dict(shape=(16, 0)), ValueError, "shape must be a sequence of 1, 2 or 3 positive ints"),
    (dict(kernel_size=17), ValueError, "kernel_size \\* dilation must be <= the input size"),
])
def test_speedup_bound_checks_its_arguments(kw, exc, msg):
    """The public bound checks its arguments as the op does (it used to coerce them: 3.9 -> 3,
    "no" -> causal, an extra per-dim value ignored)."""
    args = dict(dict(shape=(16, 16), kernel_size=3), **kw)
    with pytest.raises(exc, match=msg):
        nb_api.neighborhood_speedup_bound(args.pop("shape"), args.pop("kernel_size"), **args)


def test_numpy_bools_and_ints_accepted():
    np = pytest.importorskip("numpy")
    q, k, v = (torch.randn(1, 9, 10, 1, 16) for _ in range(3))
    want = nb_api.na2d(q, k, v, 3, is_causal=(True, False), backend="reference")
    got = nb_api.na2d(q, k, v, np.int64(3), is_causal=(np.bool_(True), np.bool_(False)), backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert nb_api.neighborhood_speedup_bound((16, 16), 3, is_causal=np.bool_(True)).is_causal == (True, True)

@pytest.mark.parametrize("case", BOUND_CASES, ids=[str(c[0]) + str(i) for i, c in enumerate(BOUND_CASES)])
def test_speedup_bound_counts_match_the_dense_mask(case):
    shape, ks, ss, ds, cs, tq, tkv = case
    nd = len(shape)
    r = nb.neighborhood_speedup_bound(shape, ks, ss, ds, cs, q_tile=tq, kv_tile=tkv)
    norm = lambda x: nb.normalize_per_dim(x, nd)  # noqa: E731
    visited, dense, self_tiles, pairs, self_pairs = _brute_tiles(
        shape, norm(ks), norm(ss), norm(ds), norm(cs), norm(tq), norm(tkv))
    assert (r.visited_tiles, r.dense_tiles, r.self_attention_tiles) == (visited, dense, self_tiles)
    assert (r.attended_pairs, r.self_attention_pairs) == (pairs, self_pairs)
    assert r.tile_bound == self_tiles / visited and r.flop_bound == self_pairs / pairs
    assert r.masked_tiles == visited - dense


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def _qkv(shape=(9, 10), H=4, Hkv=2, D=16, dtype=torch.float32):
    return (torch.randn(1, *shape, H, D, dtype=dtype), torch.randn(1, *shape, Hkv, D, dtype=dtype),
            torch.randn(1, *shape, Hkv, D, dtype=dtype))


def _call(q=None, k=None, v=None, kernel_size=3, fn=None, **kw):
    q0, k0, v0 = _qkv()
    kw.setdefault("backend", "reference")
    fn = fn or nb_api.neighborhood_attention
    return fn(q0 if q is None else q, k0 if k is None else k, v0 if v is None else v, kernel_size, **kw)


BAD = [
    ("q type", lambda: _call(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ("q rank 3", lambda: _call(q=torch.randn(1, 9, 16), k=torch.randn(1, 9, 16), v=torch.randn(1, 9, 16)),
     ValueError, "q must have 4, 5 or 6 dims"),
    ("q rank 7", lambda: _call(*[torch.randn(1, 2, 2, 2, 2, 1, 4)] * 3, kernel_size=2), ValueError,
     "q must have 4, 5 or 6 dims"),
    ("na1d rank", lambda: _call(fn=nb_api.na1d), ValueError, "q must have 4 dims for na1d"),
    ("na3d rank", lambda: _call(fn=nb_api.na3d), ValueError, "q must have 6 dims for na3d"),
    ("k rank", lambda: _call(k=torch.randn(1, 90, 2, 16)), ValueError, "k must have q's 5 dims"),
    ("int tensor", lambda: _call(q=torch.ones(1, 9, 10, 4, 16, dtype=torch.int64)), TypeError, "q must have dtype"),
    ("mixed dtypes", lambda: _call(k=torch.randn(1, 9, 10, 2, 16, dtype=torch.float16)), TypeError,
     "k must have the dtype of q"),
    ("device", lambda: _call(k=torch.randn(1, 9, 10, 2, 16, device="meta")), ValueError,
     "k must be on the device of q"),
    ("spatial mismatch", lambda: _call(k=torch.randn(1, 9, 11, 2, 16)), ValueError, "k must have q's [B, *spatial]"),
    ("batch mismatch", lambda: _call(k=torch.randn(2, 9, 10, 2, 16)), ValueError, "k must have q's [B, *spatial]"),
    ("v shape", lambda: _call(v=torch.randn(1, 9, 10, 2, 8)), ValueError, "v must have k's shape"),
    ("head dim", lambda: _call(k=torch.randn(1, 9, 10, 2, 8), v=torch.randn(1, 9, 10, 2, 8)), ValueError,
     "k must have q's head dim D=16"),
    ("heads", lambda: _call(k=torch.randn(1, 9, 10, 3, 16), v=torch.randn(1, 9, 10, 3, 16)), ValueError,
     "q's heads H=4 must be a positive multiple of k's and v's heads H_kv=3"),
    ("kernel_size 1", lambda: _call(kernel_size=1), ValueError, "kernel_size must be >= 2 in every dim, got kernel_size=1 in dim 0"),
    ("kernel_size dim 1", lambda: _call(kernel_size=(3, 1)), ValueError, "got kernel_size=1 in dim 1"),
    ("kernel_size length", lambda: _call(kernel_size=(3, 3, 3)), ValueError,
     "kernel_size must be an int or a sequence of 2 ints (one per spatial dim), got 3 values"),
    ("kernel_size float", lambda: _call(kernel_size=3.0), TypeError, "kernel_size must be an int or a sequence"),
    ("kernel_size bool", lambda: _call(kernel_size=True), TypeError, "kernel_size must be an int or a sequence"),
    ("kernel_size elem", lambda: _call(kernel_size=(3, 2.5)), TypeError, "kernel_size must hold ints"),
    ("kernel too big", lambda: _call(kernel_size=(3, 11)), ValueError,
     "kernel_size=11 * dilation=1 = 11 > size=10 in dim 1"),
    ("kernel*dilation too big", lambda: _call(kernel_size=3, dilation=(1, 4)), ValueError,
     "kernel_size=3 * dilation=4 = 12 > size=10 in dim 1"),
    ("stride 0", lambda: _call(stride=0), ValueError, "stride must be in [1, kernel_size] in every dim, got stride=0 with kernel_size=3 in dim 0"),
    ("stride > k", lambda: _call(kernel_size=(3, 4), stride=(1, 5)), ValueError, "got stride=5 with kernel_size=4 in dim 1"),
    ("stride length", lambda: _call(stride=[1]), ValueError, "stride must be an int or a sequence of 2 ints"),
    ("dilation 0", lambda: _call(dilation=(1, 0)), ValueError, "dilation must be >= 1 in every dim, got dilation=0 in dim 1"),
    ("dilation type", lambda: _call(dilation="2"), TypeError, "dilation must be an int or a sequence"),
    ("causal int", lambda: _call(is_causal=1), TypeError, "is_causal must be a bool or a sequence of 2 bools"),
    ("causal length", lambda: _call(is_causal=(True,)), ValueError, "is_causal must be a bool or a sequence of 2 bools"),
    ("causal elem", lambda: _call(is_causal=(True, 0)), TypeError, "is_causal must hold bools"),
    ("scale type", lambda: _call(scale="0.5"), TypeError, "scale must be a float"),
    ("scale inf", lambda: _call(scale=float("inf")), ValueError, "scale must be finite"),
    ("scale negative", lambda: _call(scale=-0.5), ValueError, "scale must be > 0"),
    ("backend", lambda: _call(backend="cuda"), ValueError, "backend must be one of"),
    ("bound dims", lambda: nb_api.neighborhood_speedup_bound((4, 4, 4, 4), 2), ValueError,
     "shape must be a sequence of 1, 2 or 3 positive ints"),
    ("bound window", lambda: nb_api.neighborhood_speedup_bound((16, 16), (4, 17)), ValueError,
     "= 17 > size=16 in dim 1"),
    ("bound tile", lambda: nb_api.neighborhood_speedup_bound((16,), 4, q_tile=0), ValueError, "q_tile must be >= 1"),
]


@pytest.mark.parametrize("name,fn,exc,msg", BAD, ids=[b[0] for b in BAD])
def test_bad_input(name, fn, exc, msg):
    with pytest.raises(exc) as info:
        fn()
    assert msg in str(info.value), str(info.value)


def test_query_tile_shape_halves_the_first_of_equal_dims():
    """The documented example: 2-D k = 7 gives (4, 8) (the first of equal dims is halved)."""
    from subquad.reference.neighborhood import query_tile_shape
    assert query_tile_shape((64, 64), 7) == (4, 8)
    assert query_tile_shape((64, 64, 64), 3) == (2, 4, 4)


def test_neighborhood_reference_chunks_bound_the_score_elements(monkeypatch):
    """chunk_elements bounds a chunk's score/gathered elements over the whole batch: with B = 4
    no chunk may hold more than chunk_elements of them (the per-tile estimate must count B)."""
    from subquad.reference import neighborhood as rn
    seen = []
    body = rn._tile_chunk

    def spy(qg, kg, vg, bias, Hkv, out_dtype):
        Tc, Q, _, K = bias.shape
        scores = qg.shape[0] * (qg.shape[-1] // kg.shape[-1]) * Tc * Q * K  # B H Tc Q K
        seen.append(kg.numel() + vg.numel() + 3 * scores + 2 * qg.numel())  # gathered rows, s / p, q / o
        return body(qg, kg, vg, bias, Hkv, out_dtype)

    monkeypatch.setattr(rn, "_tile_chunk", spy)
    q, k, v = (randn(4, 256, 2, 16, seed=s) for s in (0, 1, 2))
    budget = 100_000
    o = rn.neighborhood_attention(q, k, v, 5, chunk_elements=budget)
    assert len(seen) > 1 and max(seen) <= budget, seen
    torch.testing.assert_close(o, rn.neighborhood_attention(q, k, v, 5))
