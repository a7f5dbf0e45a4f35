"""Bi-level routing attention reference vs its naive restatement (float64 dense mask, routing by
loops), routing rules (ties, empty regions), topk = all regions = full attention, the chunked CPU
path, and the public API's input checks."""

from __future__ import annotations

import math

import pytest
import torch

import subquad
from subquad.reference import routing as ref

from helpers import DEVICE, randn


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _per_dim(S, nd):
    return tuple(S) if isinstance(S, (list, tuple)) else (S,) * nd


# (B, spatial, H, D, num_regions, topk, routing): divisible / padded, tiny and large regions,
# an empty region (9 tokens in 4 regions of 3), topk = 1 and topk = all regions
CASES = [
    (2, (12,), 2, 8, 3, 2, "shared"),
    (1, (9,), 2, 8, 4, 2, "per_head"),            # region 3 has no real token
    (2, (13,), 1, 4, 13, 5, "shared"),            # 1-token regions
    (1, (10, 11), 3, 8, (3, 4), 3, "per_head"),   # padded in both dims
    (2, (8, 8), 2, 8, 4, 1, "shared"),            # 2x2 regions, topk 1
    (1, (7, 6), 2, 8, (2, 3), 6, "shared"),       # topk = R
    (1, (16, 5), 1, 8, (2, 1), 1, "per_head"),    # one large region per half
]


def _ids(c):
    return f"n{'x'.join(map(str, c[1]))}-H{c[2]}-S{c[4]}-k{c[5]}-{c[6]}".replace(" ", "")


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_reference_matches_naive(case):
    B, spatial, H, D, S, topk, mode = case
    S = _per_dim(S, len(spatial))
    q, k, v = (_rand(B, *spatial, H, D, seed=s).requires_grad_() for s in (1, 2, 3))
    do = _rand(B, *spatial, H, D, seed=4)
    o, idx = ref.bilevel_routing_attention(q, k, v, S, topk, routing=mode)
    o_n, idx_n = ref.bilevel_routing_attention_naive(q, k, v, S, topk, routing=mode)
    assert torch.equal(idx, idx_n), "route() disagrees with route_naive()"
    assert idx.shape == ((B, H) if mode == "per_head" else (B,)) + (math.prod(S), topk)
    g = torch.autograd.grad(o, (q, k, v), do)
    g_n = torch.autograd.grad(o_n, (q, k, v), do)
    torch.testing.assert_close(o, o_n, atol=1e-12, rtol=1e-10)
    for a, b in zip(g, g_n):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_chunked_path_equals_one_chunk():
    """Chunks of one query region (recomputed in the backward) give the same o and gradients."""
    B, spatial, H, D, S, topk = 1, (10, 11), 2, 8, (3, 4), 3
    q, k, v = (_rand(B, *spatial, H, D, seed=s).requires_grad_() for s in (1, 2, 3))
    do = _rand(B, *spatial, H, D, seed=4)
    outs = []
    for chunk in (None, 1):
        o, _ = ref.bilevel_routing_attention(q, k, v, S, topk, routing="per_head", chunk_elements=chunk)
        outs.append((o,) + torch.autograd.grad(o, (q, k, v), do))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-12)


def test_supplied_routing_and_mask():
    """A supplied routing is used as given; the dense mask is exactly 'key region in the routed set'."""
    spatial, S = (6, 4), (3, 2)        # regions of 2x2 tokens
    idx = torch.tensor([[[1, 0], [2, 5], [0, 3], [3, 4], [5, 1], [4, 2]]])
    mask = ref.routing_mask(idx, spatial, S)[0, 0]
    reg = torch.tensor([[(i // 2) * 2 + j // 2 for j in range(4)] for i in range(6)]).reshape(-1)
    want = torch.zeros(24, 24, dtype=torch.bool)
    for a in range(24):
        for b in range(24):
            want[a, b] = int(reg[b]) in idx[0, int(reg[a])].tolist()
    assert torch.equal(mask, want)
    q, k, v = (_rand(1, *spatial, 1, 4, seed=s) for s in (1, 2, 3))
    o, got = ref.bilevel_routing_attention(q, k, v, S, 2, routing=idx)
    assert torch.equal(got, idx)
    o_n, _ = ref.bilevel_routing_attention_naive(q, k, v, S, 2, routing=idx)
    torch.testing.assert_close(o, o_n, atol=1e-12, rtol=1e-10)


def test_ties_go_to_the_lower_index():
    """Equal affinities: regions in increasing index order. All-zero keys make every affinity 0."""
    q = _rand(2, 12, 2, 4, seed=1)
    k = torch.zeros(2, 12, 2, 4, dtype=torch.float64)
    g = ref.region_geometry((12,), (6,))
    for per_head in (False, True):
        idx = ref.route(q, k, g, 4, per_head)
        assert (idx == torch.arange(4)).all()
    # two regions with identical mean keys tie: the lower one comes first
    k = _rand(1, 8, 1, 4, seed=2)
    k[:, 6:8] = k[:, 2:4]              # regions 1 and 3 (2 tokens each) have the same mean key
    q = k[:, 2:4].mean(1, keepdim=True).expand(1, 8, 1, 4).contiguous()
    idx = ref.route(q, k, ref.region_geometry((8,), (4,)), 4)
    pos1, pos3 = idx[0, 0].tolist().index(1), idx[0, 0].tolist().index(3)
    assert pos1 + 1 == pos3


def test_region_means_count_only_real_tokens():
    """Padding does not dilute a region's mean; an empty region's mean is 0."""
    x = _rand(1, 10, 1, 3, seed=5)
    g = ref.region_geometry((10,), (4,))          # regions of 3: [0,3) [3,6) [6,9) [9,12)
    m = ref.region_means(x, g)
    torch.testing.assert_close(m[0, 3, 0], x[0, 9, 0])
    torch.testing.assert_close(m[0, 1, 0], x[0, 3:6, 0].mean(0))
    g = ref.region_geometry((9,), (4,))
    assert (ref.region_means(x[:, :9], g)[0, 3] == 0).all()


@pytest.mark.parametrize("spatial,S", [((13,), 4), ((7, 9), (2, 3)), ((8, 8), (4, 4))])
def test_topk_all_regions_is_full_attention(spatial, S):
    B, H, D = 1, 2, 8
    S = _per_dim(S, len(spatial))
    q, k, v = (_rand(B, *spatial, H, D, seed=s) for s in (1, 2, 3))
    o, _ = ref.bilevel_routing_attention(q, k, v, S, math.prod(S))
    N = math.prod(spatial)
    qh, kh, vh = (x.reshape(B, N, H, D).transpose(1, 2) for x in (q, k, v))
    full = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh).transpose(1, 2).reshape(o.shape)
    torch.testing.assert_close(o, full, atol=1e-12, rtol=1e-10)


def test_empty_routed_set_gives_zero():
    """Region 0 routed only to the empty region 3 (9 tokens, 4 regions): its queries get o = 0."""
    q, k, v = (_rand(1, 9, 1, 4, seed=s).requires_grad_() for s in (1, 2, 3))
    idx = torch.tensor([[[3], [1], [0], [2]]])
    o, _ = ref.bilevel_routing_attention(q, k, v, (4,), 1, routing=idx)
    assert (o[0, :3] == 0).all() and (o[0, 3:].abs() > 0).all()
    o.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[0, :3] == 0).all()


def test_public_api_reference_backend():
    q, k, v = (_rand(2, 6, 7, 2, 8, seed=s, dtype=torch.float32) for s in (1, 2, 3))
    o = subquad.bilevel_routing_attention(q, k, v, num_regions=3, topk=2)
    o2, idx = subquad.bilevel_routing_attention(q, k, v, num_regions=(3, 3), topk=2, return_routing=True,
                                                backend="reference")
    assert torch.equal(o, o2) and o.dtype == torch.float32 and idx.shape == (2, 9, 2) and idx.dtype == torch.int64
    o3 = subquad.bilevel_routing_attention(q, k, v, num_regions=3, topk=2, routing=idx.to(torch.int32))
    torch.testing.assert_close(o3, o)


# ----------------------------------------------------------------------------------------------
# bad input


def _qkv(shape=(1, 8, 8, 2, 16), dtype=torch.float32):
    return [torch.randn(shape, dtype=dtype, device=DEVICE) for _ in range(3)]


def _call(q=None, k=None, v=None, **kw):
    dq, dk, dv = _qkv()
    args = dict(num_regions=2, topk=2)
    args.update(kw)
    return subquad.bilevel_routing_attention(dq if q is None else q, dk if k is None else k,
                                             dv if v is None else v, **args)


BAD = [
    (dict(q=torch.randn(1, 8, 2, 2, 16, 4)), ValueError, "q must have 4 or 5 dims"),
    (dict(k=torch.randn(1, 8, 8, 2, 8)), ValueError, "k must have q's shape"),
    (dict(v=torch.randn(1, 8, 7, 2, 16)), ValueError, "v must have q's shape"),
    (dict(q=torch.randn(1, 8, 8, 2, 16, dtype=torch.float64)), TypeError, "q must have dtype"),
    (dict(k=torch.randn(1, 8, 8, 2, 16).half()), TypeError, "k must have the dtype of q"),
    (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    (dict(num_regions=0), ValueError, "num_regions must be >= 1"),
    (dict(num_regions=9), ValueError, "num_regions must be <= the input size"),
    (dict(num_regions=(2, 2, 2)), ValueError, "num_regions must be an int or a sequence of 2"),
    (dict(num_regions=2.0), TypeError, "num_regions must be an int"),
    (dict(num_regions=(2, 2.5)), TypeError, "num_regions must hold ints"),
    (dict(topk=0), ValueError, r"topk must be in \[1, number of regions = 4\]"),
    (dict(topk=5), ValueError, r"topk must be in \[1, number of regions = 4\]"),
    (dict(topk=1.5), TypeError, "topk must be an int"),
    (dict(routing="dense"), ValueError, "routing must be one of"),
    (dict(routing=3), TypeError, "routing must be a str or a torch.Tensor"),
    (dict(routing=torch.zeros(1, 4, 2)), TypeError, "routing must be an int32 or int64 tensor"),
    (dict(routing=torch.zeros(1, 4, 3, dtype=torch.int64)), ValueError, r"routing must have shape \[B, R, topk\]"),
    (dict(routing=torch.zeros(1, 3, 4, 2, dtype=torch.int64)), ValueError, r"routing must have shape"),
    (dict(routing=torch.full((1, 4, 2), 4)), ValueError, r"routing holds region indices outside \[0, 4\)"),
    (dict(routing=torch.full((1, 2, 4, 2), -1)), ValueError, r"routing holds region indices outside"),
    (dict(routing=torch.zeros(1, 4, 2, dtype=torch.int64)), ValueError, "duplicate indices"),
    (dict(scale="x"), TypeError, "scale must be a float"),
    (dict(scale=-0.5), ValueError, "scale must be > 0"),  # the kernels' softmax scales the raw row max
    (dict(scale=0.0), ValueError, "scale must be > 0"),
    (dict(scale=1e-46), ValueError, r"scale must be in \[1.18e-38, 1.7e\+38\]"),  # 0 in fp32
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(return_routing=1), TypeError, "return_routing must be a bool"),
]


@pytest.mark.parametrize("kw,exc,msg", BAD, ids=[m for _, _, m in BAD])
def test_bad_input(kw, exc, msg):
    kw = {name: (x.to(DEVICE) if isinstance(x, torch.Tensor) else x) for name, x in kw.items()}
    with pytest.raises(exc, match=msg):
        _call(**kw)


def test_bad_input_triton_limits():
    q = torch.randn(1, 8, 8, 2, 160, device=DEVICE)
    with pytest.raises(ValueError, match=r"head dim D must be in \[16, 128\]"):
        subquad.bilevel_routing_attention(q, q, q, num_regions=2, topk=1, backend="triton")
    q = torch.empty(65536, 4, 1, 16, device=DEVICE).expand(65536, 4, 1, 16)
    with pytest.raises(ValueError, match="exceeds the Triton kernel's grid limit"):
        subquad.bilevel_routing_attention(q, q, q, num_regions=2, topk=1, backend="triton")


def test_route_ties_go_to_the_lower_index_with_many_regions():
    """Every key region has the same mean, so every affinity of a row ties: the documented order
    is the lower index first. With more than 16 regions torch's unstable sort reorders ties."""
    from subquad.reference import routing as ref
    g = ref.region_geometry((96,), (32,))
    q = randn(1, 96, 2, 16, seed=1)
    k = torch.ones(1, 96, 2, 16, device=DEVICE)
    want = torch.arange(5, device=DEVICE).expand(1, 32, 5)
    assert torch.equal(ref.route(q, k, g, 5), want)
    assert torch.equal(ref.route(q, k, g, 5, per_head=True), want[:, None].expand(1, 2, 32, 5))
    _, idx = subquad.bilevel_routing_attention(q, k, k, num_regions=32, topk=5, backend="reference",
                                               return_routing=True)
    assert torch.equal(idx, want)


@pytest.mark.parametrize("spatial,S", [((13,), (4,)), ((7, 10), (2, 4))])
def test_gather_attention_masks_padded_keys(spatial, S):
    """The benchmark's baseline (BiFormer's gather) must compute the same attention as the
    reference on sizes that do not divide: padded keys masked (no empty region in these)."""
    from subquad.reference import routing as ref
    q, k, v = (randn(2, *spatial, 2, 16, seed=s) for s in (1, 2, 3))
    want, _ = ref.bilevel_routing_attention(q, k, v, S, 2)
    torch.testing.assert_close(ref.gather_attention(q, k, v, S, 2), want, atol=1e-5, rtol=1e-5)
