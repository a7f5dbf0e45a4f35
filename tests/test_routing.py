"""Bi-level routing attention kernels vs the reference: forward and dq/dk/dv under the flash rule,
1-D and 2-D, divisible and padded sizes, tiny (1-4 tokens) and large regions, shared / per-head /
supplied routing, topk = 1 and topk = all regions, an empty routed set; the inverse routing table;
every config of the spaces; the nn module vs the same composition in plain torch ops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import subquad
import subquad.nn
from subquad.reference import routing as ref

from helpers import DEVICE, KERNEL_DTYPES, assert_close, distinct_configs, randn, replay_in_cuda_graph

DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _grads(fn, q, k, v, do):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves)
    return (o,) + torch.autograd.grad((o.double() * do.double()).sum(), leaves)


def _affinity64(q, k, S, per_head):
    """The reference's region affinity of q, k ``[B, *spatial, H, D]`` in float64: [B, R, R] shared,
    [B, H, R, R] per head."""
    B, H, D = q.shape[0], q.shape[-2], q.shape[-1]
    spatial = tuple(q.shape[1:-2])
    g = ref.region_geometry(spatial, tuple(S) if isinstance(S, (list, tuple)) else (S,) * len(spatial))
    qr, kr = (ref.region_means(x.detach().double().reshape(B, g.N, H, D), g) for x in (q, k))
    if per_head:
        return torch.matmul(qr.transpose(1, 2), kr.permute(0, 2, 3, 1))
    return torch.bmm(qr.reshape(B, g.R, H * D), kr.reshape(B, g.R, H * D).transpose(1, 2))


def _assert_same_routing(idx, idx_ref, q, k, S, per_head):
    """The Triton routing (fp32 sums in its own order) chooses as the reference does: the same
    regions in the same order, except where two affinities are within rounding of each other,
    so compared by the float64 affinities of the chosen regions, position by position."""
    assert idx.shape == idx_ref.shape and idx.dtype == idx_ref.dtype == torch.int64
    if torch.equal(idx, idx_ref):
        return
    a = _affinity64(q, k, S, per_head)
    got, want = a.gather(-1, idx.to(a.device)), a.gather(-1, idx_ref.to(a.device))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * a.abs().max().item())
    for row in idx.reshape(-1, idx.shape[-1]).tolist():  # a routing row never repeats a region
        assert len(set(row)) == len(row)


def _check(B, spatial, H, D, S, topk, routing, dtype):
    q = randn(B, *spatial, H, D, dtype=dtype, seed=1)
    k = randn(B, *spatial, H, D, dtype=dtype, seed=2)
    v = randn(B, *spatial, H, D, dtype=dtype, seed=3)
    do = torch.randn(q.shape, dtype=torch.float32, device=DEVICE)
    if isinstance(routing, torch.Tensor):
        routing = routing.to(DEVICE)
    kw = dict(num_regions=S, topk=topk)
    _, idx = subquad.bilevel_routing_attention(q, k, v, routing=routing, backend="triton", return_routing=True, **kw)
    if isinstance(routing, str):
        _, idx_ref = subquad.bilevel_routing_attention(q, k, v, routing=routing, backend="reference",
                                                       return_routing=True, **kw)
        _assert_same_routing(idx, idx_ref, q, k, S, routing == "per_head")
    got = _grads(lambda a, b, c: subquad.bilevel_routing_attention(a, b, c, routing=routing, backend="triton", **kw),
                 q, k, v, do)
    low = _grads(lambda a, b, c: subquad.bilevel_routing_attention(a, b, c, routing=idx, backend="reference", **kw),
                 q, k, v, do)
    Sd = tuple(S) if isinstance(S, (list, tuple)) else (S,) * len(spatial)
    exact = _grads(lambda a, b, c: ref.bilevel_routing_attention_naive(a, b, c, Sd, topk, routing=idx)[0],
                   q, k, v, do)
    assert got[0].dtype == dtype
    for name, a, b, c in zip(["o", "dq", "dk", "dv"], got, exact, low):
        assert_close(name, a, b, c)


# (B, spatial, H, D, num_regions, topk, routing)
CASES = [
    (1, (8, 8), 2, 16, 4, 3, "shared"),             # 2x2 = 4-token regions packed 16 per KV tile
    (1, (11, 13), 2, 32, (3, 4), 2, "per_head"),    # padded both dims, 4x4 boxes
    (1, (150,), 1, 16, 2, 1, "shared"),             # 75-token regions: several query / KV tiles each
    (1, (13,), 2, 48, 13, 5, "per_head"),           # 1-token regions, head dim 48 (padded to 64)
    (1, (9, 10), 1, 16, (3, 5), 15, "shared"),      # topk = all regions = full attention
    (2, (20,), 1, 16, 5, 1, "shared"),              # topk 1, batch 2
]


def _id(c):
    return f"n{'x'.join(map(str, c[1]))}-H{c[2]}-D{c[3]}-S{c[4]}-k{c[5]}-{c[6]}".replace(" ", "")


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_kernel_matches_reference(case, dtype):
    _check(*case, dtype)


def test_wide_row_offsets(monkeypatch):
    """The walks' int64 row offsets (taken when one batch element holds 2^31 elements or more,
    too large to test directly) compute the same function as the int32 ones."""
    from subquad.kernels import routing as kr

    monkeypatch.setattr(kr, "wide", lambda q: True)
    _check(1, (11, 13), 2, 32, (3, 4), 2, "per_head", torch.float32)


def test_supplied_routing_with_an_empty_routed_set():
    """9 tokens in 4 regions of 3 (region 3 empty); region 0 routed to {3} only: o = 0 and zero,
    finite gradients there (the kernel's lse = -inf rows), per-head routing supplied by the caller."""
    idx = torch.tensor([[[3, 0], [1, 0], [0, 2], [2, 3]], [[0, 3], [2, 1], [3, 2], [1, 0]]])[None]  # [1, 2, 4, 2]
    _check(1, (9,), 2, 16, 4, 2, idx, torch.float32)
    one = torch.tensor([[[3], [1], [0], [2]]])                                                  # [1, 4, 1]
    _check(1, (9,), 2, 16, 4, 1, one, torch.float32)
    q = randn(1, 9, 2, 16, seed=1)
    o = subquad.bilevel_routing_attention(q, q, q, num_regions=4, topk=1, routing=one.to(DEVICE), backend="triton")
    assert (o[0, :3] == 0).all()


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("B,spatial,H,D,S,topk,per_head", [
    (2, (14, 14), 2, 32, (7, 7), 16, False),   # BiFormer's stage 3 geometry, 4-token regions
    (1, (14, 14), 3, 24, (7, 7), 5, True),     # per head, D not a power of two
    (1, (11, 13), 2, 32, (3, 4), 2, True),     # padded in both dims
    (1, (9,), 2, 16, (4,), 4, False),          # region 3 holds no real token (mean 0); topk = all
    (1, (40,), 1, 16, (40,), 3, False),        # 1-token regions, R = 40 > one select block of 16
])
def test_route_regions(B, spatial, H, D, S, topk, per_head, dtype):
    """The Triton routing (region means, affinity, stable top-k) vs the reference's torch ops."""
    from subquad.kernels.routing import route_regions

    q, k = (randn(B, *spatial, H, D, dtype=dtype, seed=s) for s in (1, 2))
    g = ref.region_geometry(spatial, S)
    q3, k3 = (x.reshape(B, g.N, H, D) for x in (q, k))
    got = route_regions(q3, k3, g, topk, per_head)
    assert got.dtype == torch.int32 and got.shape == (B, H if per_head else 1, g.R, topk)
    want = ref.route(q3, k3, g, topk, per_head)
    _assert_same_routing(got.long() if per_head else got[:, 0].long(), want, q, k, S, per_head)


def test_route_regions_nan_affinity_ranks_first():
    """A NaN key makes its region's mean, and every affinity to it, NaN: the reference's stable
    descending sort ranks NaN first, and so must the Triton selection. (12, 4) in (3, 1) regions:
    each pooling band holds one region column, so the NaN stays in its own region (region 1)."""
    from subquad.kernels.routing import route_regions

    g = ref.region_geometry((12, 4), (3, 1))
    q, k = (randn(1, 48, 1, 16, seed=s) for s in (1, 2))
    k[0, 20] = float("nan")
    want = ref.route(q, k, g, 2)
    assert (want[..., 0] == 1).all()
    assert torch.equal(route_regions(q, k, g, 2)[:, 0].long().cpu(), want.cpu())


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("spatial,HD,S", [
    ((14, 14), (8, 32), (7, 7)),    # BiFormer's stage 3: 4-token regions, 2 x 128 channels
    ((11, 13), (2, 40), (3, 4)),    # padded in both dims, channels not a power of two
    ((9, 10), (1, 16), (4, 4)),     # the last band and the last column group hold padding only
    ((3, 75), (1, 24), (2, 37)),    # three groups of 16 region columns, a padded band of 1 row
    ((70,), (1, 16), (35,)),        # 1-D, three column groups
    ((5, 18), (1, 16), (4, 17)),    # a band and a column group of padding only: both counts 0, not -1 x -2
])
def test_region_means(spatial, HD, S, dtype):
    """The pooling kernel's region means of q and k vs the reference's, regions of padding only
    included (mean 0)."""
    from subquad.kernels.routing import region_means

    B, (H, D) = 2, HD
    q, k = (randn(B, *spatial, H, D, dtype=dtype, seed=s) for s in (4, 5))
    g = ref.region_geometry(spatial, S)
    got = region_means(q, k, g)
    assert got.shape == (B, g.R, 2, H * D) and got.dtype == torch.float32
    for i, x in enumerate((q, k)):
        want = ref.region_means(x.reshape(B, g.N, H, D).double(), g).reshape(B, g.R, H * D)
        torch.testing.assert_close(got[:, :, i].double(), want, atol=1e-6, rtol=1e-5)


def test_route_regions_ties_and_many_regions():
    """Equal affinities go to the lower region index first, in order (as the reference's stable
    sort); more regions than the select kernel holds: the reference's ops, the same result."""
    from subquad.kernels.routing import SELECT_MAX_REGIONS, route_regions

    g = ref.region_geometry((8, 8), (4, 4))
    q = torch.ones(1, 64, 2, 16, device=DEVICE)
    k = q.clone()
    k[:, 27] = 2.0  # token (3, 3): region 5's mean is the largest, the rest tie
    want = ref.route(q, k, g, 6)
    assert want[0, 0].tolist() == [5, 0, 1, 2, 3, 4]
    assert torch.equal(route_regions(q, k, g, 6)[:, 0].long(), want)
    n = SELECT_MAX_REGIONS + 44
    g = ref.region_geometry((n,), (n,))
    q, k = (randn(1, n, 1, 16, seed=s) for s in (1, 2))
    assert torch.equal(route_regions(q, k, g, 3)[:, 0].long(), ref.route(q, k, g, 3))


def test_inverse_routing():
    from subquad.kernels.routing import inverse_routing

    g = torch.Generator().manual_seed(0)
    B, HR, R, topk = 2, 3, 37, 5
    idx = torch.stack([torch.randperm(R, generator=g)[:topk] for _ in range(B * HR * R)]).reshape(B, HR, R, topk)
    cnt, inv = inverse_routing(idx.to(DEVICE, torch.int32).contiguous(), R, block_rows=16)  # 3 steps
    assert cnt.dtype == torch.int32 and inv.dtype == torch.int32 and inv.shape == (B * HR * R, R)
    cnt, inv = cnt.cpu().long(), inv.cpu().long()
    assert cnt.sum() == B * HR * R * topk
    for b in range(B):
        for h in range(HR):
            for rk in range(R):
                j = (b * HR + h) * R + rk
                want = [r for r in range(R) if rk in idx[b, h, r].tolist()]
                assert inv[j, :cnt[j]].tolist() == want


def test_routing_is_returned_and_deterministic():
    q, k, v = (randn(2, 6, 5, 1, 16, seed=s) for s in (1, 2, 3))
    a = subquad.bilevel_routing_attention(q, k, v, num_regions=(3, 2), topk=2, backend="triton", return_routing=True)
    b = subquad.bilevel_routing_attention(q, k, v, num_regions=(3, 2), topk=2, backend="triton", return_routing=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[1].shape == (2, 6, 2) and a[1].dtype == torch.int64
    # the backward has no atomics: gradients are bitwise the same run to run
    do = torch.randn_like(q)
    grads = [_grads(lambda x, y, z: subquad.bilevel_routing_attention(x, y, z, num_regions=(3, 2), topk=2,
                                                                       backend="triton"), q, k, v, do)
             for _ in range(2)]
    for x, y in zip(*grads):
        assert torch.equal(x, y)


# every config of every routing space computes the same function (the tuner may pick any on a GPU)
_RS_CASE = {
    16: (1, (6, 4), 2, 16, (3, 2), 3, "per_head"),  # 2x2 = 4-token regions
    32: (1, (10, 4), 1, 16, (2, 1), 1, "shared"),   # 5x4 = 20-token regions
    64: (1, (11, 13), 1, 16, (1, 1), 1, "shared"),  # one 143-token region
}


def _configs():
    from subquad.autotune import spaces

    return [(t, c) for t in spaces.ROUTING for c in distinct_configs(t.configs())]


@pytest.mark.parametrize("tuner,cfg", _configs(), ids=lambda x: getattr(x, "kernel", None) or x.name())
def test_every_config(tuner, cfg, monkeypatch):
    monkeypatch.setattr(tuner, "choose", lambda bucket, device, bench: cfg)
    from subquad.kernels.routing import region_class

    case = _RS_CASE[cfg.kw["RS"]]
    g = ref.region_geometry(case[1], case[4] if isinstance(case[4], tuple) else (case[4],) * len(case[1]))
    assert region_class(g.RT) == cfg.kw["RS"]
    _check(*case, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("case", [
    (2, (56, 56), 2, 32, 7, 4, "shared"),
    (2, (14, 14), 8, 32, 7, 16, "shared"),
    (1, (150, 125), 2, 32, 7, 4, "per_head"),
    (1, (4096,), 4, 64, 32, 4, "shared"),
    (1, (33, 47), 2, 128, (5, 6), 7, "per_head"),
], ids=_id)
def test_kernel_large(case, dtype):
    _check(*case, dtype)


@pytest.mark.gpu
def test_no_gathered_copy():
    """fwd+bwd peak memory above the inputs stays near what must exist, o, dq, dk, dv (4 times q's
    size) plus per-row lse/delta and the routing tables, with topk = 16 (a gathered
    [regions, topk * region_tokens, D] copy of K and V alone would be 32 times q's size)."""
    q, k, v, do = (randn(8, 28, 28, 4, 32, dtype=torch.bfloat16, seed=s) for s in (1, 2, 3, 4))
    for x in (q, k, v):
        x.requires_grad_()

    def step():
        subquad.bilevel_routing_attention(q, k, v, num_regions=7, topk=16).backward(do)

    step()  # compile
    for x in (q, k, v):
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak <= 5 * q.numel() * q.element_size(), f"peak {peak} B vs q {q.numel() * q.element_size()} B"


# ----------------------------------------------------------------------------------------------
# the module


def _module_by_hand(m: subquad.nn.BiLevelRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """The block in plain torch ops, float64: linear, region means by explicit loops over boxes,
    affinity, stable top-k, dense masked softmax, depthwise conv, linear."""
    x = x.double()
    B, Hi, Wi, C = x.shape
    nh, hd = m.num_heads, m.head_dim
    S = m.num_regions if isinstance(m.num_regions, (tuple, list)) else (m.num_regions,) * 2
    qkv = F.linear(x, m.qkv.weight.double(), None if m.qkv.bias is None else m.qkv.bias.double())
    q, k, v = qkv.reshape(B, Hi, Wi, 3, nh, hd).unbind(3)
    idx = ref.route_naive(q, k, (Hi, Wi), S, m.topk)                        # [B, R, topk]
    mask = ref.routing_mask(idx.to(x.device), (Hi, Wi), S)[:, 0]            # [B, N, N]
    qh, kh, vh = (t.reshape(B, Hi * Wi, nh, hd).transpose(1, 2) for t in (q, k, v))
    s = (qh @ kh.transpose(-1, -2)) * m.scale
    s = s.masked_fill(~mask[:, None], float("-inf"))
    o = (torch.softmax(s, -1) @ vh).transpose(1, 2).reshape(B, Hi, Wi, C)
    lepe = F.conv2d(v.reshape(B, Hi, Wi, C).permute(0, 3, 1, 2), m.lepe.weight.double(), m.lepe.bias.double(),
                    padding=m.lepe.padding, groups=C).permute(0, 2, 3, 1)
    return F.linear(o + lepe, m.proj.weight.double(), m.proj.bias.double())


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("shape,heads,S,topk", [((2, 8, 8, 32), 2, 4, 3), ((1, 7, 5, 32), 2, (3, 2), 2)])
def test_module_matches_plain_torch(backend, shape, heads, S, topk):
    torch.manual_seed(0)
    m = subquad.nn.BiLevelRoutingAttention(shape[-1], num_heads=heads, num_regions=S, topk=topk, side_dwconv=3,
                                           qkv_bias=True, backend=backend).to(DEVICE)
    x = randn(*shape, seed=7)
    y, idx = m(x, return_routing=True)
    want = _module_by_hand(m, x)
    assert y.shape == x.shape and idx.shape == (shape[0], math.prod(S if isinstance(S, tuple) else (S, S)), topk)
    torch.testing.assert_close(y.double(), want, atol=2e-5, rtol=1e-4)
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def _biformer_by_hand(sd, x, heads, n_win, topk, scale):
    """BiFormer's block as its paper states it, from a state dict with BiFormer's key names, in
    float64 (sizes divisible by n_win): windows of q, k, v; window means; affinity; top-k; the
    routed windows' k, v gathered into one key set per window; attention per head; LePE; wo."""
    x = x.double()
    sd = {k: v.double() for k, v in sd.items()}
    B, Hi, Wi, C = x.shape
    hd = C // heads
    q, k, v = F.linear(x, sd["qkv.qkv.weight"], sd.get("qkv.qkv.bias")).split(C, -1)

    def windows(t):  # [B, Hi, Wi, C] -> [B, windows, tokens per window, C], windows row-major
        t = t.reshape(B, n_win, Hi // n_win, n_win, Wi // n_win, C).permute(0, 1, 3, 2, 4, 5)
        return t.reshape(B, n_win * n_win, -1, C)

    qw, kw, vw = windows(q), windows(k), windows(v)
    chosen = ((qw.mean(2) * scale) @ kw.mean(2).transpose(1, 2)).topk(topk, dim=-1).indices  # [B, R, topk]
    batch = torch.arange(B)[:, None, None]
    kg, vg = (t[batch, chosen].flatten(2, 3) for t in (kw, vw))  # [B, R, topk * tokens, C]
    split = lambda t: t.unflatten(-1, (heads, hd)).transpose(2, 3)  # noqa: E731  [B, R, heads, tokens, hd]
    att = torch.softmax((split(qw) @ split(kg).transpose(-1, -2)) * scale, -1) @ split(vg)
    o = att.transpose(2, 3).flatten(-2)  # [B, R, tokens, C] -> image layout
    o = o.reshape(B, n_win, n_win, Hi // n_win, Wi // n_win, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hi, Wi, C)
    lepe = F.conv2d(v.permute(0, 3, 1, 2), sd["lepe.weight"], sd["lepe.bias"],
                    padding=sd["lepe.weight"].shape[-1] // 2, groups=C).permute(0, 2, 3, 1)
    return F.linear(o + lepe, sd["wo.weight"], sd["wo.bias"])


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_module_loads_biformer_weights(backend):
    """A state dict with BiFormer's key names (inside a larger model's, under a prefix) loads, and
    the block then computes BiFormer's gather formulation at BiFormer's scale, C^-0.5."""
    B, side, C, heads, n_win, topk = 2, 8, 32, 2, 4, 3
    g = torch.Generator().manual_seed(3)
    sd = {"qkv.qkv.weight": torch.randn(3 * C, C, generator=g) * C ** -0.5,
          "qkv.qkv.bias": torch.randn(3 * C, generator=g),
          "wo.weight": torch.randn(C, C, generator=g) * C ** -0.5, "wo.bias": torch.randn(C, generator=g),
          "lepe.weight": torch.randn(C, 1, 5, 5, generator=g) * 0.2, "lepe.bias": torch.randn(C, generator=g)}
    outer = torch.nn.Module()
    outer.attn = subquad.nn.BiLevelRoutingAttention(C, num_heads=heads, num_regions=n_win, topk=topk,
                                                    qk_scale=C ** -0.5, qkv_bias=True, backend=backend)
    outer.load_state_dict({"attn." + k: v for k, v in sd.items()})  # strict: every key used, none missing
    outer.to(DEVICE)
    x = randn(B, side, side, C, seed=11)
    want = _biformer_by_hand(sd, x.cpu(), heads, n_win, topk, C ** -0.5).to(DEVICE)
    torch.testing.assert_close(outer.attn(x).double(), want, atol=2e-5, rtol=1e-4)
    own = subquad.nn.BiLevelRoutingAttention(C, num_heads=heads, num_regions=n_win, topk=topk, qkv_bias=True)
    own.load_state_dict(outer.attn.state_dict())  # its own names still load
    with pytest.raises(ValueError, match=r"attn.router.emb.weight: BiFormer's parametric routing"):
        outer.load_state_dict({"attn." + k: v for k, v in sd.items()} | {"attn.router.emb.weight": torch.eye(C)})


def test_module_options():
    m = subquad.nn.BiLevelRoutingAttention(64, num_heads=4, num_regions=7, topk=4)
    assert m.scale == 16 ** -0.5 and m.lepe.kernel_size == (5, 5) and m.qkv.bias is None
    assert subquad.nn.BiLevelRoutingAttention(64, qk_scale=64 ** -0.5).scale == 64 ** -0.5
    assert subquad.nn.BiLevelRoutingAttention(64, side_dwconv=0).lepe is None
    with pytest.raises(ValueError, match="dim must be a multiple of num_heads"):
        subquad.nn.BiLevelRoutingAttention(30, num_heads=8)
    with pytest.raises(ValueError, match="side_dwconv must be 0 or an odd"):
        subquad.nn.BiLevelRoutingAttention(32, num_heads=2, side_dwconv=4)
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        subquad.nn.BiLevelRoutingAttention(32, num_heads=0)
    with pytest.raises(TypeError, match="num_heads must be an int"):
        subquad.nn.BiLevelRoutingAttention(32, num_heads=2.0)
    with pytest.raises(TypeError, match="side_dwconv must be an int"):
        subquad.nn.BiLevelRoutingAttention(32, num_heads=2, side_dwconv=True)
    with pytest.raises(ValueError, match="qk_scale must be > 0"):
        subquad.nn.BiLevelRoutingAttention(32, num_heads=2, qk_scale=-0.1)
    with pytest.raises(ValueError, match=r"x must be \[B, Hi, Wi, C=32\]"):
        subquad.nn.BiLevelRoutingAttention(32, num_heads=2)(torch.randn(1, 8, 32))
    # what does not depend on the input is refused when the block is built, not at its first forward
    with pytest.raises(ValueError, match="backend must be one of"):
        subquad.nn.BiLevelRoutingAttention(32, num_heads=2, backend="cuda")
    with pytest.raises(ValueError, match="num_regions must be >= 1"):
        subquad.nn.BiLevelRoutingAttention(32, num_heads=2, num_regions=(7, 0))
    with pytest.raises(ValueError, match=r"topk must be in \[1, number of regions = 4\]"):
        subquad.nn.BiLevelRoutingAttention(32, num_heads=2, num_regions=2, topk=5)
    with pytest.raises(TypeError, match="topk must be an int"):
        subquad.nn.BiLevelRoutingAttention(32, num_heads=2, topk=2.0)


@pytest.mark.gpu
def test_cuda_graph_capture():
    """Inference in a CUDA graph (padded sizes: the region counts are cached on the device, no
    copy during capture) replays to the eager output."""
    q, k, v = (randn(2, 30, 25, 2, 32, dtype=torch.bfloat16, seed=s) for s in (1, 2, 3))
    with torch.no_grad():
        eager, replayed = replay_in_cuda_graph(
            lambda: subquad.bilevel_routing_attention(q, k, v, num_regions=7, topk=4))
    assert torch.equal(eager, replayed)


@pytest.mark.gpu
def test_cuda_graph_supplied_routing():
    """A supplied routing in a CUDA graph: its values were checked by the warm-up call; the
    capture reads none (a host read would break it) and the replay gives the eager output."""
    q, k, v = (randn(2, 30, 25, 2, 32, dtype=torch.bfloat16, seed=s) for s in (1, 2, 3))
    routing = torch.stack([torch.randperm(9)[:4] for _ in range(2 * 9)]).reshape(2, 9, 4).to(DEVICE)
    with torch.no_grad():
        eager, replayed = replay_in_cuda_graph(
            lambda: subquad.bilevel_routing_attention(q, k, v, num_regions=3, topk=4, routing=routing))
    assert torch.equal(eager, replayed)


@pytest.mark.gpu
def test_cuda_graph_fwd_bwd():
    """Forward and backward (routing, inverse routing, dQ, dK/dV) captured in one CUDA graph, as a
    training step captured whole runs them, replay to the eager output and gradients: nothing in
    the op waits on the host or allocates outside the graph's pool."""
    q, k, v, do = (randn(2, 30, 25, 2, 32, dtype=torch.bfloat16, seed=s) for s in (1, 2, 3, 4))
    for x in (q, k, v):
        x.requires_grad_(True)

    def step():
        for x in (q, k, v):
            x.grad = None
        o = subquad.bilevel_routing_attention(q, k, v, num_regions=7, topk=4)
        o.backward(do)
        return o.detach(), q.grad, k.grad, v.grad

    eager, replayed = replay_in_cuda_graph(step)
    for name, a, b in zip(("o", "dq", "dk", "dv"), eager, replayed):
        assert torch.equal(a, b), name


def test_module_refuses_a_wrong_channel_count():
    m = subquad.nn.BiLevelRoutingAttention(32, num_heads=2, num_regions=2, topk=1, backend="reference")
    with pytest.raises(ValueError, match=r"x must be \[B, Hi, Wi, C=32\]"):
        m(torch.randn(1, 8, 8, 16))
