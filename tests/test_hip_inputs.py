"""HiP public API: every documented input error (type, message), the API end to end on the
reference backend, masks (fields, reuse, reuse at a grown decoding cache), return_mask."""

from __future__ import annotations

import pytest
import torch

import subquad
from subquad import HipMask, hip_attention, hip_mask
from subquad.reference import hip as ref

from helpers import DEVICE, randn, replay_in_cuda_graph

KW = dict(topk=6, block_size_q=8, block_size_k=2, query_stride=2, sink_tokens=2, window=5)
AKW = dict(block_size_q=8, block_size_k=2, sink_tokens=2, window=5)


def _qkv(B=1, Tq=30, Tk=30, H=2, Hkv=1, D=16, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, Tq, H, D, generator=g).to(dtype).to(device)
    k = torch.randn(B, Tk, Hkv, D, generator=g).to(dtype).to(device)
    v = torch.randn(B, Tk, Hkv, D, generator=g).to(dtype).to(device)
    return q, k, v


def test_reference_end_to_end():
    q, k, v = _qkv(B=2, Tq=21, Tk=40, H=4, Hkv=2)
    o, mask = hip_attention(q, k, v, return_mask=True, backend="reference", **KW)
    blocks = ref.select_blocks(q, k, **KW)
    assert isinstance(mask, HipMask) and torch.equal(mask.blocks, blocks)
    assert (mask.B, mask.Tq, mask.Tk, mask.H, mask.H_kv) == (2, 21, 40, 4, 2)
    assert mask.params() == KW
    assert o.shape == q.shape and o.dtype == q.dtype
    torch.testing.assert_close(o.double(), ref.hip_attention_naive(q, k, v, blocks, **AKW), rtol=1e-5, atol=1e-5)
    # auto on CPU = reference; a passed mask skips estimation and gives the same output
    o2, mask2 = hip_attention(q, k, v, mask=mask, return_mask=True, **KW)
    assert mask2 is mask and torch.equal(o2, o)
    m = hip_mask(q, k, **KW)
    assert torch.equal(m.blocks, blocks) and "HipMask(" in repr(m)


def test_defaults_and_gradients():
    """Default parameters (topk 512, bq 64, bk 2, stride 2, S 16, W 256) at a length where the
    search range exceeds the budget; gradients flow to q, k, v with the mask fixed."""
    q, k, v = _qkv(Tq=1500, Tk=1500, H=1, D=16)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    o, mask = hip_attention(q, k, v, return_mask=True)
    assert (mask.blocks[..., -1] >= 0).any()  # the late query blocks pick exactly Kb = 256 blocks
    dense = ref.hip_attention_naive(q, k, v, mask.blocks, block_size_q=64, block_size_k=2, sink_tokens=16,
                                    window=256)
    torch.testing.assert_close(o.double(), dense, rtol=1e-5, atol=1e-5)
    do = torch.randn_like(o)
    g1 = torch.autograd.grad((o * do).sum(), (q, k, v))
    g2 = torch.autograd.grad((dense * do.double()).sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-4)


def test_decoding_mask_reuse_at_grown_cache():
    """A mask made for one decoding query at Tk0 is reused while the cache grows: the result is
    HiP with window + (Tk - Tk0) over the same blocks (every new key attended)."""
    B, H, Hkv, D, Tk0 = 1, 2, 1, 16, 300
    _, k, v = _qkv(Tq=1, Tk=Tk0 + 6, H=H, Hkv=Hkv, D=D)
    q0 = torch.randn(B, 1, H, D)
    mask = hip_mask(q0, k[:, :Tk0], **KW)
    assert mask.Tk == Tk0
    for d in (0, 1, 5):
        q = torch.randn(B, 1, H, D)
        o = hip_attention(q, k[:, :Tk0 + d], v[:, :Tk0 + d], mask=mask, **KW)
        want = ref.hip_attention_naive(q, k[:, :Tk0 + d], v[:, :Tk0 + d], mask.blocks,
                                       **dict(AKW, window=KW["window"] + d))
        torch.testing.assert_close(o.double(), want, rtol=1e-5, atol=1e-5)
        vis = ref.hip_visible(mask.blocks, 1, Tk0 + d, **dict(AKW, window=KW["window"] + d))
        assert vis[..., Tk0 - KW["window"] + 1:].all()  # the old local region and every new key
        assert mask.window_at(Tk0 + d) == KW["window"] + d


def test_decoding_long_cache_reference():
    """One query at Tk = 2^18 with a reused mask: the reference gathers only its candidate keys."""
    Tk = 1 << 18
    k = torch.randn(1, Tk, 1, 16)
    v = torch.randn(1, Tk, 1, 16)
    q = torch.randn(1, 1, 1, 16)
    kw = dict(KW, topk=64, window=32)
    mask = hip_mask(q, k[:, :Tk - 3], **kw)
    o = hip_attention(q, k, v, mask=mask, **kw)
    blocks = mask.blocks
    sel = sorted({t for j in blocks[0, 0, 0].tolist() if j >= 0 for t in (2 + 2 * j, 3 + 2 * j)})
    keys = [0, 1] + sel + list(range(Tk - 3 - 32, Tk))  # sinks, selected, local region (grown by 3)
    s = (q[0, 0, 0] @ k[0, keys, 0].T) * 16 ** -0.5
    want = torch.softmax(s.double(), 0).float() @ v[0, keys, 0]
    torch.testing.assert_close(o[0, 0, 0], want, rtol=1e-5, atol=1e-5)


def _err(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


def test_bad_tensors():
    q, k, v = _qkv()
    _err(TypeError, "q must be a torch.Tensor", hip_attention, q.numpy(), k, v)
    _err(TypeError, "q must have dtype", hip_attention, q.long(), k, v)
    _err(ValueError, "q must have 4 dims", hip_attention, q[0], k, v)
    _err(ValueError, "v must have 4 dims", hip_attention, q, k, v[0])
    _err(TypeError, r"k must have the dtype of q \(torch.float32\), got torch.float16", hip_attention, q, k.half(), v)
    _err(ValueError, "k must have q's batch size", hip_attention, q, torch.cat([k, k]), torch.cat([v, v]))
    _err(ValueError, "k must have q's head dim", hip_attention, q, k[..., :8], v[..., :8])
    _err(ValueError, "v must have k's shape", hip_attention, q, k, v[:, :20])
    _err(ValueError, "positive multiple of k's heads", hip_attention, q, k.expand(1, 30, 3, 16),
         v.expand(1, 30, 3, 16))
    _err(ValueError, "Tq=30 must be <= k's length Tk=20", hip_attention, q, k[:, :20], v[:, :20])
    _err(ValueError, "at least one query", hip_attention, q[:, :0], k, v)
    _err(ValueError, "Tq=30 must be <= k's length", hip_mask, q, k[:, :20])
    _err(TypeError, "k must be a torch.Tensor", hip_mask, q, None)


@pytest.mark.parametrize("name,value,exc,match", [
    ("topk", 0, ValueError, "topk must be >= 1, got 0"),
    ("topk", 2.0, TypeError, "topk must be an int, got float"),
    ("topk", True, TypeError, "topk must be an int, got bool"),
    ("block_size_q", 0, ValueError, "block_size_q must be >= 1"),
    ("block_size_k", -2, ValueError, "block_size_k must be >= 1"),
    ("query_stride", 0, ValueError, "query_stride must be >= 1"),
    ("sink_tokens", -1, ValueError, "sink_tokens must be >= 0"),
    ("window", -1, ValueError, "window must be >= 0, got -1"),
    ("window", None, TypeError, "window must be an int"),
    ("scale", 0.0, ValueError, "scale must be > 0"),
    ("scale", -0.5, ValueError, "scale must be > 0"),
    ("scale", 1e300, ValueError, r"scale must be in \["),
    ("scale", float("nan"), ValueError, "scale must be finite"),
    ("scale", "0.1", TypeError, "scale must be a float"),
    ("backend", "cuda", ValueError, "backend must be one of"),
    ("return_mask", 1, TypeError, "return_mask must be a bool"),
])
def test_bad_arguments(name, value, exc, match):
    q, k, v = _qkv()
    _err(exc, match, hip_attention, q, k, v, **{name: value})
    if name not in ("return_mask",):
        _err(exc, match, hip_mask, q, k, **{name: value})


@pytest.mark.parametrize("kw,match", [
    (dict(block_size_k=256), "block_size_k must be <= 128 for the Triton backend, got 256"),
    (dict(block_size_q=512, query_stride=2), r"at most 128 strided queries .* ceil\(512 / 2\) = 256"),
    (dict(topk=5000, block_size_k=2), r"at most 2048 selected blocks .* ceil\(5000 / 2\) = 2500"),
])
def test_triton_limits(kw, match):
    q, k, v = _qkv(device=DEVICE)
    _err(ValueError, match, hip_attention, q, k, v, backend="triton", **kw)
    _err(ValueError, match, hip_mask, q, k, backend="triton", **kw)
    hip_mask(q, k, backend="reference", **kw)  # the reference takes them


def test_triton_head_dim():
    q, k, v = _qkv(D=8, device=DEVICE)
    _err(ValueError, r"head dim D must be in \[16, 256\] for the Triton backend, got 8", hip_attention, q, k, v,
         backend="triton")
    _err(ValueError, "head dim D must be in", hip_mask, q, k, backend="triton")


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = _qkv()
    _err(ValueError, "backend='triton' needs CUDA tensors", hip_attention, q, k, v, backend="triton")


def test_bad_masks():
    q, k, v = _qkv(Tq=20, Tk=40)
    mask = hip_mask(q, k, **KW)
    _err(TypeError, "mask must be a HipMask", hip_attention, q, k, v, mask=mask.blocks, **KW)
    _err(ValueError, "mask was made with topk=6, but this call has topk=512", hip_attention, q, k, v, mask=mask)
    _err(ValueError, "mask was made with window=5, but this call has window=6", hip_attention, q, k, v, mask=mask,
         **dict(KW, window=6))
    _err(ValueError, "mask was made with query_stride=2", hip_attention, q, k, v, mask=mask,
         **dict(KW, query_stride=1))
    _err(ValueError, "mask was made for Tq=20, but the inputs have Tq=19", hip_attention, q[:, 1:], k, v, mask=mask,
         **KW)
    q2, k2, v2 = _qkv(B=2, Tq=20, Tk=40)
    _err(ValueError, "mask was made for B=1", hip_attention, q2, k2, v2, mask=mask, **KW)
    q3, k3, v3 = _qkv(Tq=20, Tk=40, H=4, Hkv=2)
    _err(ValueError, "mask was made for H=2", hip_attention, q3, k3, v3, mask=mask, **KW)
    q4, k4, v4 = _qkv(Tq=20, Tk=40, H=2, Hkv=2)
    _err(ValueError, "mask was made for H_kv=1", hip_attention, q4, k4, v4, mask=mask, **KW)
    _err(ValueError, "mask was made at Tk=40 keys; it can be reused only at Tk >= 40", hip_attention, q, k[:, :39],
         v[:, :39], mask=mask, **KW)
    bad = HipMask(mask.blocks.long(), **KW, B=1, Tq=20, Tk=40, H=2, H_kv=1)
    _err(ValueError, "mask.blocks must be an int32 tensor of shape", hip_attention, q, k, v, mask=bad, **KW)
    bad = HipMask(mask.blocks[..., :2], **KW, B=1, Tq=20, Tk=40, H=2, H_kv=1)
    _err(ValueError, r"mask.blocks must be an int32 tensor of shape \(1, 2, 3, 3\)", hip_attention, q, k, v,
         mask=bad, **KW)


def test_exported():
    assert subquad.hip_attention is hip_attention and subquad.hip_mask is hip_mask
    assert {"hip_attention", "hip_mask", "HipMask"} <= set(subquad.__all__)
    assert DEVICE in ("cpu", "cuda")


@pytest.mark.gpu
def test_decoding_in_cuda_graph():
    """A decoding step with a reused mask (split-K forward + combine) captured in a CUDA graph
    replays to the eager output."""
    q, k, v = _qkv(Tq=1, Tk=3000, H=8, Hkv=2, D=64, dtype=torch.bfloat16, device=DEVICE)
    kw = dict(topk=64, block_size_q=8, block_size_k=2, query_stride=1, sink_tokens=4, window=32)
    mask = hip_mask(q, k, **kw)
    eager, replayed = replay_in_cuda_graph(lambda: hip_attention(q, k, v, mask=mask, **kw))
    assert torch.equal(eager, replayed)


def _out_and_grads(fn, q, k, v):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(7)).to(o.device)
    return [o] + list(torch.autograd.grad((o.double() * do).sum(), leaves))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_hand_built_mask_read_canonically(backend):
    """A HipMask built by hand may hold repeats, -1 before blocks, negative and out-of-range blocks
    (here block 9 of a 6-block search range, and 2**30): each block counts once, the rest selects
    nothing, on both backends; an in-place change of its blocks is seen at the next call."""
    q, k, v = _qkv(Tq=32, Tk=32, H=1, Hkv=1, device=DEVICE)
    kw = dict(topk=16, block_size_q=16, block_size_k=2, query_stride=2, sink_tokens=2, window=4)
    akw = dict(block_size_q=16, block_size_k=2, sink_tokens=2, window=4)
    raw = torch.tensor([[[[-1] * 8, [-1, 3, 3, 0, -5, 9, 2 ** 30, 1]]]], dtype=torch.int32, device=DEVICE)
    canon = torch.tensor([[[[-1] * 8, [0, 1, 3] + [-1] * 5]]], dtype=torch.int32, device=DEVICE)
    assert torch.equal(ref.canonical_blocks(raw, 32, 32, **akw), canon)
    mask = HipMask(raw.clone(), **kw, B=1, Tq=32, Tk=32, H=1, H_kv=1)
    for blocks in (canon, canon.flip(-1)):  # the flipped row: the same set, -1 first
        want = ref.hip_attention_naive(q, k, v, canon if blocks is canon else canon, **akw)
        got = hip_attention(q, k, v, mask=mask, backend=backend, **kw)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        mask.blocks.copy_(blocks)  # in place: the next call reads the new contents
    mask.blocks[0, 0, 1, 0] = 4  # {4, 3, 1, 0}
    canon[0, 0, 1, :4] = torch.tensor([0, 1, 3, 4])
    got = hip_attention(q, k, v, mask=mask, backend=backend, **kw)
    torch.testing.assert_close(got.double(), ref.hip_attention_naive(q, k, v, canon, **akw), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name,params", [
    ("window", dict(window=2 ** 31 - 1)),                       # "unbounded": dense causal
    ("sinks", dict(sink_tokens=2 ** 31 - 1)),                   # every key a sink
    ("stride", dict(query_stride=2 ** 30)),                     # the first query of each block
    ("block", dict(block_size_q=2 ** 30, query_stride=2 ** 29)),  # one query block
])
def test_parameters_past_int32_products(backend, name, params):
    """Parameters far past the sequence (a window of 2**31 - 1 for "no limit") select and attend
    exactly as their values clipped to the problem: the kernels' int32 positions (window + t,
    t * stride) must not wrap (they dropped every local term of dK/dV, read q out of bounds)."""
    q, k, v = _qkv(Tq=29, Tk=40, H=2, Hkv=1, device=DEVICE)
    kw = dict(dict(topk=4, block_size_q=8, block_size_k=2, query_stride=2, sink_tokens=2, window=3), **params)
    akw = {n: kw[n] for n in ("block_size_q", "block_size_k", "sink_tokens", "window")}
    mask = hip_mask(q, k, backend=backend, **kw)
    assert torch.equal(mask.blocks, ref.select_blocks(q, k, **kw).to(DEVICE))
    got = _out_and_grads(lambda a, b, c: hip_attention(a, b, c, mask=mask, backend=backend, **kw), q, k, v)
    want = _out_and_grads(lambda a, b, c: ref.hip_attention_naive(a, b, c, mask.blocks, **akw), q, k, v)
    for what, a, b in zip(("o", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5, msg=lambda m, w=what: f"{w}: {m}")


def test_reference_half_precision_large_logits():
    """The reference (the CPU path) rounds as a kernel does: fp32 scores and sums, P in fp16. Raw
    q . k of ~7e4 (past fp16's max before scaling) and 70000 equal weights (a sum past it) stay
    finite."""
    g = torch.Generator().manual_seed(3)
    q = (24 + torch.rand(1, 8, 1, 128, generator=g)).half()
    k = (24 + torch.rand(1, 16, 1, 128, generator=g)).half()
    v = torch.randn(1, 16, 1, 128, generator=g).half()
    kw = dict(block_size_q=8, block_size_k=2, sink_tokens=2, window=16)
    blocks = torch.full((1, 1, 1, 2), -1, dtype=torch.int32)
    o = ref.hip_attention_reference(q, k, v, blocks, **kw)
    want = ref.hip_attention_naive(q, k, v, blocks, **kw)
    torch.testing.assert_close(o.double(), want, rtol=2e-3, atol=2e-3)
    q, k = torch.zeros(1, 1, 1, 16).half(), torch.zeros(1, 70000, 1, 16).half()
    v = torch.ones(1, 70000, 1, 16).half()
    o = ref.hip_attention_reference(q, k, v, torch.full((1, 1, 1, 1), -1, dtype=torch.int32),
                                    **dict(kw, window=70000))
    torch.testing.assert_close(o.float(), torch.ones(1, 1, 1, 16), rtol=1e-3, atol=1e-3)


def _no_launch(*a, **k):
    raise RuntimeError("launched: a Triton limit was not checked")


@pytest.mark.parametrize("kw,match", [
    (dict(block_size_q=257, query_stride=2), r"at most 128 strided queries .* = 129"),
    (dict(topk=4097, block_size_k=2), r"at most 2048 selected blocks .* = 2049"),
])


def test_hip_triton_limits_round_up(kw, match, monkeypatch):
    """The limits count ceil(block_size_q / query_stride) strided queries and ceil(topk /
    block_size_k) selected blocks: sizes that do not divide must be refused as well (the test of
    the suite uses sizes that divide, where floor and ceil agree). Launches are stubbed."""
    from subquad.kernels import hip as kh
    monkeypatch.setattr(kh, "hip_select_blocks", _no_launch)
    q = randn(1, 30, 2, 16)
    with pytest.raises(ValueError, match=match):
        subquad.hip_attention(q, q[:, :, :1], q[:, :, :1], backend="triton", **kw)


def test_hip_zero_heads_is_refused():
    q = randn(1, 30, 2, 16)
    k = q[:, :, :1]
    with pytest.raises(ValueError, match="positive multiple of k's heads"):
        subquad.hip_attention(q[:, :, :0], k, k, backend="reference")
