"""HiP sparse attention kernels (kernels/hip.py) vs the definition, for given selections.

The selection is held fixed here: random valid ``blocks`` tables (ascending unique key-block
indices of each query block's search range, -1 padded at the end) and the full-budget table, so
the attention kernels are tested independently of the tree search. Expected values: dense masked
attention in float64 over a visibility mask restated here from the contract (and checked against
``reference.hip.hip_visible``); the low-precision comparison point of the flash rule is
``reference.hip.hip_attention_reference`` in the kernel's dtype. Forward and dq/dk/dv, fp32 and
fp16 (bf16 on a GPU), odd lengths, partial query and key blocks, decoding (Tq < Tk, Tq = 1),
GQA, windows and sinks that overlap, empty selections, every config of the HIP_* spaces.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

import subquad
from subquad.kernels.hip import hip_sparse_attention
from subquad.reference import hip as ref

from helpers import DEVICE, KERNEL_DTYPES, assert_close, distinct_configs, randn

DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _cdiv(a, b):
    return -(-a // b)


def random_blocks(B, H, Tq, Tk, bsq, bk, S, W, Kb, seed=0, fill=1.0):
    """A valid selection: per (b, h, query block) up to Kb distinct key blocks of the block's search
    range [S, E), ascending, -1 padded; ``fill`` < 1 selects fewer than possible (more padding)."""
    g = torch.Generator().manual_seed(seed)
    nqb = _cdiv(Tq, bsq)
    blocks = torch.full((B, H, nqb, Kb), -1, dtype=torch.int32)
    for qb in range(nqb):
        E = Tk - Tq + qb * bsq - W + 1
        nb = _cdiv(max(E - S, 0), bk)
        n = min(nb, Kb, int(math.ceil(fill * Kb)))
        for b in range(B):
            for h in range(H):
                if n:
                    blocks[b, h, qb, :n] = torch.randperm(nb, generator=g)[:n].sort().values.to(torch.int32)
    return blocks


def full_blocks(B, H, Tq, Tk, bsq, bk, S, W, Kb):
    """Every key block of the search range (needs Kb >= NB for every query block)."""
    nqb = _cdiv(Tq, bsq)
    blocks = torch.full((B, H, nqb, Kb), -1, dtype=torch.int32)
    for qb in range(nqb):
        nb = _cdiv(max(Tk - Tq + qb * bsq - W + 1 - S, 0), bk)
        assert nb <= Kb
        blocks[:, :, qb, :nb] = torch.arange(nb, dtype=torch.int32)
    return blocks


def visible(blocks, Tq, Tk, bsq, bk, S, W):
    """bool [B, H, Tq, Tk], restated from the contract: key j is visible to query i (position
    p = Tk - Tq + i, block qb = i // bsq, E = Tk - Tq + qb bsq - W + 1) iff j <= p and (j < S, or
    j >= E, or S <= j < E and (j - S) // bk is a selected block of (b, h, qb))."""
    B, H, NQB, _ = blocks.shape
    i = torch.arange(Tq)
    p = Tk - Tq + i
    E = Tk - Tq + (i // bsq) * bsq - W + 1
    j = torch.arange(Tk)
    nb = _cdiv(Tk, bk)  # slot nb: "not selected" (the -1 padding and tokens below S land there)
    slots = torch.where(blocks < 0, torch.full_like(blocks, nb), blocks).long().clamp(max=nb)
    chosen = torch.zeros(B, H, NQB, nb + 1, dtype=torch.bool).scatter_(-1, slots, True)
    chosen[..., nb] = False
    jb = torch.where(j >= S, (j - S) // bk, torch.full_like(j, nb)).clamp(max=nb)
    sel = chosen[:, :, i // bsq][..., jb]  # [B, H, Tq, Tk]: key j's block is selected for query i
    in_range = (j[None, :] >= S) & (j[None, :] < E[:, None])
    return (j[None, :] <= p[:, None]) & ((j < S)[None, :] | (j[None, :] >= E[:, None]) | (in_range & sel))


def naive64(q, k, v, vis, scale):
    """Dense masked attention in float64 ([B, Tq, H, D]); rows with nothing visible give 0."""
    H, Hkv = q.shape[2], k.shape[2]
    qq = q.double().permute(0, 2, 1, 3)
    kk = k.double().repeat_interleave(H // Hkv, 2).permute(0, 2, 1, 3)
    vv = v.double().repeat_interleave(H // Hkv, 2).permute(0, 2, 1, 3)
    s = (qq @ kk.transpose(-1, -2)) * scale
    s = s.masked_fill(~vis.to(s.device), float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    l = p.sum(-1, keepdim=True)
    return ((p @ vv) / torch.where(l == 0, torch.ones_like(l), l)).permute(0, 2, 1, 3)


def _grads(fn, q, k, v, do):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves)
    return (o,) + torch.autograd.grad((o.double() * do.double()).sum(), leaves)


def _check(B, Tq, Tk, H, Hkv, D, bsq, bk, S, W, Kb, dtype, fill=1.0, blocks=None, grads=True, seed=0):
    q = randn(B, Tq, H, D, dtype=dtype, seed=seed + 1)
    k = randn(B, Tk, Hkv, D, dtype=dtype, seed=seed + 2)
    v = randn(B, Tk, Hkv, D, dtype=dtype, seed=seed + 3)
    if blocks is None:
        blocks = random_blocks(B, H, Tq, Tk, bsq, bk, S, W, Kb, seed=seed, fill=fill)
    geo = dict(block_size_q=bsq, block_size_k=bk, sink_tokens=S, window=W)
    scale = D ** -0.5
    vis = visible(blocks, Tq, Tk, bsq, bk, S, W)
    blocks_dev = blocks.to(DEVICE)
    do = torch.randn(q.shape, dtype=torch.float32, device=DEVICE)

    def kernel(a, b, c):
        return hip_sparse_attention(a, b, c, blocks_dev, **geo)

    def lowp(a, b, c):
        return ref.hip_attention_reference(a, b, c, blocks_dev, **geo)

    def exact(a, b, c):
        return naive64(a, b, c, vis, scale)

    if not grads:
        with torch.no_grad():
            got, low, ex = kernel(q, k, v), lowp(q, k, v), exact(q, k, v)
        assert got.dtype == dtype
        assert_close("o", got, ex, low)
        return got
    got, low, ex = _grads(kernel, q, k, v, do), _grads(lowp, q, k, v, do), _grads(exact, q, k, v, do)
    assert got[0].dtype == dtype
    for name, a, b, c in zip(["o", "dq", "dk", "dv"], got, ex, low):
        assert_close(name, a, b, c)
    return got[0]


# (B, Tq, Tk, H, Hkv, D, bsq, bk, S, W, Kb): hand-picked corners
CASES = {
    "prefill-odd": (1, 75, 75, 2, 1, 16, 16, 2, 4, 8, 5),           # partial last query block, GQA
    "prefill-bk3": (2, 53, 53, 2, 2, 16, 16, 3, 5, 7, 4),           # key blocks of 3, partial last block
    "prefill-bsq5": (1, 37, 37, 1, 1, 24, 5, 2, 3, 4, 3),           # query block of 5 (tile rows masked), D=24
    "chunk-Tq<Tk": (1, 20, 90, 4, 2, 16, 16, 2, 6, 10, 6),          # chunked prefill: queries at Tk-Tq+i
    "decode-1": (1, 1, 300, 2, 1, 16, 64, 2, 16, 32, 8),            # one query
    "decode-3": (1, 3, 157, 2, 2, 32, 64, 4, 7, 19, 5),             # a few queries, Tq < block_size_q
    "sinks-overlap-local": (1, 40, 40, 1, 1, 16, 8, 2, 20, 10, 4),  # local region reaches into the sinks
    "no-window-no-sinks": (1, 33, 33, 2, 1, 16, 16, 2, 0, 0, 4),    # first query of block 0 sees nothing
    "window-covers-all": (1, 29, 29, 1, 1, 16, 16, 2, 4, 64, 2),    # dense causal through the local region
    "bsq-over-tile": (1, 150, 150, 1, 1, 16, 100, 2, 8, 12, 10),    # 100-query blocks: 2 tiles of 64 per block
}


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_kernel_matches_definition(case, dtype):
    _check(*CASES[case], dtype)


def test_padding_only_and_partial_fill():
    """Selections with fewer blocks than Kb (-1 padding in the middle of the budget) and none at all."""
    _check(1, 64, 64, 2, 1, 16, 16, 2, 4, 4, 8, torch.float32, fill=0.4)
    B, Tq, Tk, H = 1, 48, 48, 1
    empty_sel = torch.full((B, H, 3, 4), -1, dtype=torch.int32)
    _check(B, Tq, Tk, H, 1, 16, 16, 2, 4, 4, 4, torch.float32, blocks=empty_sel)


@pytest.mark.parametrize("Tq", [40, 70])
def test_query_on_the_first_key_of_a_kv_tile(Tq):
    """Tk = Tq + 1: query 31 sits at position 32, the first key of the KV tile starting there, and
    sees it on its diagonal; the local dK/dV kernel's query rows must start at that query."""
    _check(1, Tq, Tq + 1, 1, 1, 16, 16, 2, 2, 4, 4, torch.float32)


@pytest.mark.parametrize("Tq,Tk", [(70, 70), (9, 83)])
def test_full_budget_is_dense_causal(Tq, Tk):
    """Every block of every search range selected: dense causal attention (queries at Tk - Tq + i)."""
    B, H, Hkv, D, bsq, bk, S, W = 1, 2, 1, 16, 16, 2, 4, 8
    Kb = _cdiv(Tk, bk)
    q = randn(B, Tq, H, D, seed=5)
    k = randn(B, Tk, Hkv, D, seed=6)
    v = randn(B, Tk, Hkv, D, seed=7)
    blocks = full_blocks(B, H, Tq, Tk, bsq, bk, S, W, Kb).to(DEVICE)
    o = hip_sparse_attention(q, k, v, blocks, block_size_q=bsq, block_size_k=bk, sink_tokens=S, window=W)
    causal = torch.arange(Tk)[None, :] <= (Tk - Tq + torch.arange(Tq))[:, None]
    want = naive64(q, k, v, causal.expand(B, H, Tq, Tk), D ** -0.5)
    torch.testing.assert_close(o.double().cpu(), want.cpu(), atol=2e-5, rtol=1e-4)


def test_visibility_restatement_matches_reference():
    """The test's visibility mask (from the contract) and reference.hip.hip_visible agree."""
    for (B, Tq, Tk, H, Hkv, D, bsq, bk, S, W, Kb) in CASES.values():
        blocks = random_blocks(B, H, Tq, Tk, bsq, bk, S, W, Kb, seed=3, fill=0.7)
        mine = visible(blocks, Tq, Tk, bsq, bk, S, W)
        theirs = ref.hip_visible(blocks, Tq, Tk, block_size_q=bsq, block_size_k=bk, sink_tokens=S, window=W)
        assert torch.equal(mine, theirs.cpu())


def test_decode_work_does_not_grow_with_tk():
    """One query at Tk = 2^20 with a reused selection: the kernel walks only sinks + selected blocks
    + window (under the interpreter a walk over Tk would take minutes; here it is ~15 tiles), and
    keys no query can see are NaN, so touching one would poison the output."""
    B, Tq, Tk, H, D, bsq, bk, S, W, Kb = 1, 1, 1 << 20, 1, 16, 64, 2, 16, 64, 32
    q = randn(B, Tq, H, D, seed=1)
    k = torch.full((B, Tk, H, D), float("nan"), device=DEVICE)
    v = torch.full((B, Tk, H, D), float("nan"), device=DEVICE)
    blocks = random_blocks(B, H, Tq, Tk, bsq, bk, S, W, Kb, seed=4)
    vis = visible(blocks, Tq, Tk, bsq, bk, S, W)[0, 0, 0]
    idx = vis.nonzero()[:, 0].to(DEVICE)
    assert idx.numel() == S + Kb * bk + W
    k[:, idx] = randn(B, idx.numel(), H, D, seed=2)
    v[:, idx] = randn(B, idx.numel(), H, D, seed=3)
    t0 = time.perf_counter()
    o = hip_sparse_attention(q, k, v, blocks.to(DEVICE), block_size_q=bsq, block_size_k=bk, sink_tokens=S, window=W)
    if o.is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    s = (q[0, 0, 0].double() @ k[0, idx, 0].double().T) * D ** -0.5
    want = torch.softmax(s, -1) @ v[0, idx, 0].double()
    torch.testing.assert_close(o[0, 0, 0].double(), want, atol=2e-5, rtol=1e-4)
    assert elapsed < 30, f"decoding one token took {elapsed:.1f} s: the walk grows with Tk"


def test_split_k_decoding(monkeypatch):
    """Decoding splits the walk over several programs per head (split-K) and combines the parts;
    the backward runs on the combined lse. Then more parts than KV tiles: the trailing parts see
    no key (lse = -inf) and the combine must skip them."""
    from subquad.kernels import hip as kh

    B, Tq, Tk, H, Hkv, D, bsq, bk, S, W, Kb = 1, 2, 600, 4, 2, 16, 64, 2, 16, 64, 120
    blocks = random_blocks(B, H, Tq, Tk, bsq, bk, S, W, Kb, seed=9)
    q = torch.empty(B, Tq, H, D, device=DEVICE)
    cfg = kh.spaces.HIP_FWD.default(kh._bucket(q))
    _, _, grid = kh._q_grid(cfg, q, q.new_empty(B, Tk, Hkv, D), bsq)
    assert kh.num_splits(q, None, blocks, (bsq, bk, S, W), cfg.kw["BN"], grid[0] * grid[1]) >= 3
    _check(B, Tq, Tk, H, Hkv, D, bsq, bk, S, W, Kb, torch.float32, blocks=blocks)
    _check(B, Tq, Tk, H, Hkv, D, bsq, bk, S, W, Kb, torch.float16, blocks=blocks)
    monkeypatch.setattr(kh, "num_splits", lambda *args: 13)
    _check(B, Tq, Tk, H, Hkv, D, bsq, bk, S, W, Kb, torch.float32, blocks=blocks)


def _hip_configs():
    from subquad.autotune import spaces

    return [(t, c) for t in spaces.HIP_ATTENTION if len(t.configs()) > 1 for c in distinct_configs(t.configs())]


@pytest.mark.parametrize("tuner,cfg", _hip_configs(), ids=lambda x: getattr(x, "kernel", None) or x.name())
def test_every_config(tuner, cfg, monkeypatch):
    """Every config of every HIP_* space computes the same function (the tuner may pick any on a GPU);
    forward configs also on a split-K decoding case."""
    monkeypatch.setattr(tuner, "choose", lambda bucket, device, bench: cfg)
    _check(1, 70, 70, 2, 1, 16, 32, 3, 4, 9, 6, torch.float32, seed=7)
    if tuner.kernel == "hip_fwd":
        _check(1, 1, 400, 2, 1, 16, 64, 2, 8, 40, 64, torch.float32, grads=False, seed=8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("case", [
    (1, 2048, 2048, 8, 2, 128, 64, 2, 16, 256, 256),    # prefill, issue defaults (topk 512)
    (2, 1000, 1531, 4, 4, 64, 64, 2, 16, 128, 64),      # chunked prefill, odd lengths
    (1, 777, 777, 4, 1, 96, 48, 3, 10, 100, 40),        # D=96, bsq 48, bk 3
    (1, 4, 65536, 8, 2, 128, 64, 2, 16, 256, 256),      # decoding, a few queries at 64k
], ids=lambda c: "x".join(map(str, c)))
def test_kernel_large(case, dtype):
    _check(*case, dtype, fill=0.9)


@pytest.mark.parametrize("Tq", [1, 40])
@pytest.mark.parametrize("layout", ["cache-slice", "head-major"])
def test_kv_cache_layouts_read_in_place(layout, Tq):
    """K/V as a serving loop holds them: the filled part ``cache[:, :Tk]`` of a preallocated
    ``[B, T_max, H_kv, D]`` cache, or a ``[B, H_kv, T, D]`` cache transposed. The selection and the
    forward read them in place (a decoding step must not copy the whole cache) and give exactly what
    their contiguous copies give; the gradients reach the cache."""
    import subquad
    from subquad.kernels.hip import kv_in_place

    B, Tk, H, Hkv, D = 2, 90, 4, 2, 16
    if layout == "cache-slice":
        kc, vc = (randn(B, 128, Hkv, D, seed=s, requires_grad=True) for s in (2, 3))
        view = lambda c: c[:, :Tk]  # noqa: E731
    else:
        kc, vc = (randn(B, Hkv, Tk, D, seed=s, requires_grad=True) for s in (2, 3))
        view = lambda c: c.transpose(1, 2)  # noqa: E731
    k, v = view(kc), view(vc)
    assert not k.is_contiguous()
    kin, vin = kv_in_place(k, v)
    assert kin.data_ptr() == k.data_ptr() and vin.data_ptr() == v.data_ptr()
    q = randn(B, Tq, H, D, seed=1, requires_grad=True)
    do = randn(B, Tq, H, D, seed=4)
    kw = dict(topk=16, block_size_q=16, block_size_k=2, query_stride=2, sink_tokens=4, window=8)
    got, mask = subquad.hip_attention(q, k, v, backend="triton", return_mask=True, **kw)
    k2, v2 = (x.detach().contiguous().requires_grad_() for x in (k, v))
    want, mask2 = subquad.hip_attention(q, k2, v2, backend="triton", return_mask=True, **kw)
    assert torch.equal(mask.blocks, mask2.blocks) and torch.equal(got, want)
    low = subquad.hip_attention(q.detach(), k.detach(), v.detach(), backend="reference", mask=mask, **kw)
    torch.testing.assert_close(got, low, rtol=1e-4, atol=1e-5)
    dq, dkc, dvc = torch.autograd.grad((got * do).sum(), (q, kc, vc))
    dq2, dk2, dv2 = torch.autograd.grad((want * do).sum(), (q, k2, v2))
    assert torch.equal(dq, dq2) and torch.equal(view(dkc), dk2) and torch.equal(view(dvc), dv2)
    if layout == "cache-slice":
        assert not dkc[:, Tk:].any() and not dvc[:, Tk:].any()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_hip_query_that_sees_no_key_gets_zero(backend):
    """window = 0, sink_tokens = 0 and a selection of nothing (all -1): the first query of each
    query block sees no key (its local region [p_first + 1, p_i] is empty) and gets o = 0, as
    documented; not the NaN of a softmax over nothing. Every output and gradient is finite."""
    from subquad import HipMask
    kw = dict(topk=4, block_size_q=8, block_size_k=4, query_stride=1, sink_tokens=0, window=0)
    q, k, v = (randn(1, 20, 2, 16, seed=s, requires_grad=True) for s in (0, 1, 2))
    blocks = torch.full((1, 2, 3, 1), -1, dtype=torch.int32, device=DEVICE)
    mask = HipMask(blocks, **kw, B=1, Tq=20, Tk=20, H=2, H_kv=2)
    o = subquad.hip_attention(q, k, v, mask=mask, backend=backend, **kw)
    assert torch.isfinite(o).all()
    assert torch.equal(o[:, 0::8], torch.zeros_like(o[:, 0::8]))  # queries 0, 8, 16
    assert o[:, 1:8].abs().sum() > 0  # the others see their block's earlier positions
    grads = torch.autograd.grad(o.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)
