"""HiP mask estimation: the Triton tree search equals the reference's selection exactly.

Inputs are integer-valued (small integers), so every dot product is exact whatever the summation
order and ties are frequent: this checks the scores, the tree walk and the tie rule (lower start
first) exactly, in fp32 and fp16. Gaussian inputs can differ from the reference only where two
children's scores are within rounding of each other; the GPU test measures how often that flips
a selection. Odd shapes: partial query and key blocks, NB <= Kb, decoding Tq < Tk, GQA, window 0,
block_size_k not a power of two, several launch waves."""

from __future__ import annotations

import pytest
import torch

import subquad
from subquad.reference import hip as ref

from helpers import DEVICE, KERNEL_DTYPES, assert_close

DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _select(q, k, **kw):
    from subquad.kernels.hip import hip_select_blocks

    return hip_select_blocks(q, k, **kw)


def _int_inputs(B, Tq, Tk, H, Hkv, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (B, Tq, H, D), generator=g).to(dtype).to(DEVICE)
    k = torch.randint(-2, 3, (B, Tk, Hkv, D), generator=g).to(dtype).to(DEVICE)
    return q, k


def _kw(topk, bq, bk, qs, S, W):
    return dict(topk=topk, block_size_q=bq, block_size_k=bk, query_stride=qs, sink_tokens=S, window=W)


# (B, Tq, Tk, H, Hkv, D, topk, bq, bk, qs, S, W)
CASES = [
    (1, 97, 97, 2, 1, 16, 8, 16, 2, 3, 3, 10),   # prefill, partial last query block, GQA, 2-3 rounds
    (1, 5, 203, 3, 3, 16, 12, 4, 4, 2, 5, 7),    # decoding Tq < Tk, bk 4
    (2, 30, 120, 1, 1, 24, 5, 16, 3, 5, 2, 0),   # bk 3 (padded tile), odd topk, window 0, D 24, B 2
    (1, 33, 70, 1, 1, 16, 1, 32, 1, 7, 1, 3),    # Kb = 1, bk 1
    (1, 70, 70, 1, 1, 16, 200, 16, 2, 2, 4, 8),  # NB <= Kb everywhere: 0..NB-1 then -1
]


# fp32 on every case, fp16 on the shorter ones (interpreter time)
DT_CASES = [(c, torch.float32) for c in CASES] + [(c, torch.float16) for c in CASES if c[1] <= 40]


@pytest.mark.parametrize("case,dtype", DT_CASES, ids=lambda x: DT_ID[x] if isinstance(x, torch.dtype)
                         else "-".join(map(str, x)))
def test_select_equals_reference(case, dtype):
    B, Tq, Tk, H, Hkv, D = case[:6]
    kw = _kw(*case[6:])
    q, k = _int_inputs(B, Tq, Tk, H, Hkv, D, dtype, seed=sum(case))
    got = _select(q, k, **kw)
    want = ref.select_blocks(q.cpu(), k.cpu(), **kw)
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert torch.equal(got.cpu(), want), (got != want.to(got.device)).nonzero()[:8]


def test_select_many_ties():
    """All-equal keys: every child ties, the lowest starts must win at every round."""
    q = torch.ones(1, 8, 1, 16, device=DEVICE)
    k = torch.ones(1, 150, 1, 16, device=DEVICE)
    kw = _kw(6, 8, 2, 1, 2, 4)
    got = _select(q, k, **kw)
    want = ref.select_blocks(q.cpu(), k.cpu(), **kw)
    assert torch.equal(got.cpu(), want)


def test_select_ignores_tokens_past_the_search_range():
    """The last key block of a search range can be partial: its representative block holds
    tokens at or past the search end E (the local window's), which must not score. Tq = 1,
    Tk = 16, bk = 4, window 9: E = 7, NB = 2 > Kb = 1; block 0 scores 16, token E would score 1600."""
    q = torch.ones(1, 1, 1, 16, device=DEVICE)
    k = torch.zeros(1, 16, 1, 16, device=DEVICE)
    k[0, 0] = 1.0
    k[0, 7] = 100.0
    kw = _kw(4, 1, 4, 1, 0, 9)
    want = ref.select_blocks(q.cpu(), k.cpu(), **kw)
    assert want.flatten().tolist() == [0]
    assert torch.equal(_select(q, k, **kw).cpu(), want)


def test_select_waves(monkeypatch):
    """Scratch rows shared across several launches (waves of query blocks) give the same rows."""
    from subquad.kernels import hip as hip_kernels

    monkeypatch.setattr(hip_kernels, "SCRATCH_BYTES", 1)  # one query block per launch
    q, k = _int_inputs(1, 48, 48, 1, 1, 16, torch.float32, seed=5)
    kw = _kw(4, 16, 2, 2, 1, 3)
    assert torch.equal(_select(q, k, **kw).cpu(), ref.select_blocks(q.cpu(), k.cpu(), **kw))


def test_select_gaussian_fp32():
    """Gaussian fp32 inputs at a size with no near-tie: the same selection (IEEE dots)."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 64, 2, 32, generator=g).to(DEVICE)
    k = torch.randn(1, 64, 1, 32, generator=g).to(DEVICE)
    kw = _kw(6, 16, 2, 2, 2, 6)
    assert torch.equal(_select(q, k, **kw).cpu(), ref.select_blocks(q.cpu(), k.cpu(), **kw))


def _grads(fn, q, k, v, do):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves)
    return (o,) + torch.autograd.grad((o.double() * do.double()).sum(), leaves)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: DT_ID[d])
def test_api_triton_end_to_end(dtype):
    """hip_attention(backend="triton"): the Triton selection + attention vs the reference path
    (same selection) and the float64 definition, output and gradients."""
    B, Tq, Tk, H, Hkv, D = 1, 45, 60, 2, 1, 16
    kw = _kw(6, 16, 2, 2, 3, 5)
    q, k = _int_inputs(B, Tq, Tk, H, Hkv, D, torch.float32, seed=3)
    q = (q / 4).to(dtype)
    k = (k / 4).to(dtype)
    v = torch.randn(B, Tk, Hkv, D, device=DEVICE).to(dtype)
    do = torch.randn(B, Tq, H, D, device=DEVICE)
    mask = subquad.hip_mask(q, k, backend="triton", **kw)
    assert torch.equal(mask.blocks.cpu(), ref.select_blocks(q.cpu(), k.cpu(), **kw))
    akw = dict(block_size_q=16, block_size_k=2, sink_tokens=3, window=5)
    got = _grads(lambda a, b, c: subquad.hip_attention(a, b, c, backend="triton", **kw), q, k, v, do)
    low = _grads(lambda a, b, c: subquad.hip_attention(a, b, c, backend="reference", **kw), q, k, v, do)
    exact = _grads(lambda a, b, c: ref.hip_attention_naive(a, b, c, mask.blocks, **akw), q, k, v, do)
    assert got[0].dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # the rule below needs a right `low`
    torch.testing.assert_close(low[0].double(), exact[0].double(), rtol=tol, atol=tol)
    for name, a, b, c in zip(["o", "dq", "dk", "dv"], got, exact, low):
        assert_close(name, a, b, c)


def test_api_triton_decoding_reused_mask():
    """Decoding on Triton: a mask made at Tk0 for one query, reused while the cache grows, equals the
    reference path (window + growth over the same blocks)."""
    q0, k = _int_inputs(1, 1, 90, 2, 1, 16, torch.float32, seed=8)
    k = k / 4
    v = torch.randn(1, 90, 1, 16, device=DEVICE)
    kw = _kw(8, 16, 2, 2, 2, 6)
    mask = subquad.hip_mask(q0, k[:, :84], backend="triton", **kw)
    for d in (0, 6):
        q = torch.randn(1, 1, 2, 16, device=DEVICE)
        got = subquad.hip_attention(q, k[:, :84 + d], v[:, :84 + d], mask=mask, backend="triton", **kw)
        low = subquad.hip_attention(q, k[:, :84 + d], v[:, :84 + d], mask=mask, backend="reference", **kw)
        exact = ref.hip_attention_naive(q, k[:, :84 + d], v[:, :84 + d], mask.blocks, block_size_q=16,
                                        block_size_k=2, sink_tokens=2, window=6 + d)
        torch.testing.assert_close(low.double(), exact, rtol=1e-5, atol=1e-5)  # the rule needs a right `low`
        assert_close("o", got, exact, low)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=lambda d: DT_ID[d])
def test_select_gpu_defaults(dtype):
    """Defaults (topk 512, bq 64, bk 2, stride 2, S 16, W 256) at T = 8192, H 4 / H_kv 2, D 128:
    exact on integer-valued inputs; on Gaussian inputs the fraction of rows that differ from the
    reference (near-ties flipped by summation order) is reported and must stay small."""
    B, T, H, Hkv, D = 1, 8192, 4, 2, 128
    kw = _kw(512, 64, 2, 2, 16, 256)
    q, k = _int_inputs(B, T, T, H, Hkv, D, dtype, seed=1)
    got = _select(q, k, **kw)
    want = ref.select_blocks(q, k, **kw)
    assert torch.equal(got, want)
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(B, T, H, D, device="cuda", generator=g).to(dtype)
    k = torch.randn(B, T, Hkv, D, device="cuda", generator=g).to(dtype)
    got = _select(q, k, **kw)
    want = ref.select_blocks(q, k, **kw)
    rows = (got != want).any(-1)
    frac = rows.float().mean().item()
    print(f"hip_select {DT_ID[dtype]} gaussian: {int(rows.sum())} of {rows.numel()} rows differ ({frac:.2%}); "
          f"{int((got != want).sum())} of {got.numel()} entries")
    assert frac <= 0.05


@pytest.mark.gpu
def test_select_gpu_decoding_long_cache():
    """One decoding query at Tk = 262144 with the defaults: exact on integer-valued inputs."""
    kw = _kw(512, 64, 2, 2, 16, 256)
    q, k = _int_inputs(1, 1, 262144, 8, 2, 128, torch.float16, seed=4)
    assert torch.equal(_select(q, k, **kw), ref.select_blocks(q, k, **kw))

