"""HiP reference vs naive restatements: the tree search vs a brute-force Python restatement of
step 2 (exact, on integer-valued inputs full of ties and on float64 Gaussians), the visibility
mask's properties, the memory-light attention vs dense masked attention in float64 (output and
gradients), exact-dense equivalence at full budget, a planted needle span, decoding geometry."""

from __future__ import annotations

import math

import pytest
import torch

from subquad.reference import hip as ref


def _brute_select(q, k, *, topk, block_size_q, block_size_k, query_stride, sink_tokens, window):
    """Step 2 restated with Python lists, one (batch, head, query block) at a time, float64 scores."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    bq, bk, S, W = block_size_q, block_size_k, sink_tokens, window
    Kb = math.ceil(topk / bk)
    NQB = math.ceil(Tq / bq)
    out = torch.full((B, H, NQB, Kb), -1, dtype=torch.int32)
    for b in range(B):
        for h in range(H):
            full = q[b, :, h].double() @ k[b, :, h // (H // Hkv)].double().T  # [Tq, Tk]
            for qb in range(NQB):
                p_first = Tk - Tq + qb * bq
                E = p_first - W + 1
                NB = max(0, math.ceil((E - S) / bk))
                if NB <= Kb:
                    sel = list(range(NB))
                else:
                    queries = list(range(qb * bq, min(qb * bq + bq, Tq), query_stride))

                    def score(c):
                        rep = c[0] + c[1] // 2
                        toks = [t for t in range(S + rep * bk, S + rep * bk + bk) if t < E]
                        return full[queries][:, toks].max().item()

                    groups = [(i * NB // Kb, (i + 1) * NB // Kb - i * NB // Kb) for i in range(Kb)]
                    while any(g > 1 for _, g in groups):
                        children = []
                        for s, g in groups:
                            children += [(s, g // 2), (s + g // 2, g - g // 2)] if g >= 2 else [(s, g)]
                        children.sort(key=lambda c: (-score(c), c[0]))
                        groups = sorted(children[:Kb])
                    sel = sorted(s for s, _ in groups)
                out[b, h, qb, :len(sel)] = torch.tensor(sel, dtype=torch.int32)
    return out


# (B, Tq, Tk, H, Hkv, D, topk, bq, bk, qs, S, W)
SELECT_CASES = [
    (1, 97, 97, 2, 1, 8, 8, 16, 2, 3, 3, 10),     # prefill, partial last query block, GQA
    (2, 61, 61, 1, 1, 4, 5, 8, 1, 1, 0, 1),       # bk=1, odd topk, no sinks, window 1
    (1, 5, 203, 3, 3, 8, 12, 4, 4, 2, 5, 7),      # decoding: Tq < Tk, bk 4
    (1, 40, 150, 4, 2, 8, 6, 16, 2, 5, 2, 0),     # window 0, stride larger than useful
    (1, 70, 70, 1, 1, 8, 200, 16, 2, 2, 4, 8),    # NB <= Kb everywhere: all blocks
    (1, 33, 33, 1, 1, 8, 1, 32, 8, 7, 1, 3),      # Kb = 1, partial last key block
]


def _sel_kwargs(c):
    return dict(topk=c[6], block_size_q=c[7], block_size_k=c[8], query_stride=c[9], sink_tokens=c[10], window=c[11])


@pytest.mark.parametrize("case", SELECT_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("kind", ["int", "gauss64"])
def test_select_matches_brute_force(case, kind):
    B, Tq, Tk, H, Hkv, D = case[:6]
    g = torch.Generator().manual_seed(sum(case))
    if kind == "int":  # small integers: exact dot products in any order, many exact ties
        q = torch.randint(-2, 3, (B, Tq, H, D), generator=g).float()
        k = torch.randint(-2, 3, (B, Tk, Hkv, D), generator=g).float()
    else:
        q = torch.randn(B, Tq, H, D, generator=g, dtype=torch.float64)
        k = torch.randn(B, Tk, Hkv, D, generator=g, dtype=torch.float64)
    kw = _sel_kwargs(case)
    got = ref.select_blocks(q, k, **kw)
    want = _brute_select(q, k, **kw)
    assert got.dtype == torch.int32 and got.shape == want.shape
    assert torch.equal(got, want)


def test_select_blocks_layout():
    """Ascending, unique, in [0, NB), padded with -1 exactly when NB < Kb."""
    B, Tq, Tk, H, D = 1, 50, 180, 2, 8
    kw = dict(topk=10, block_size_q=16, block_size_k=2, query_stride=2, sink_tokens=4, window=20)
    q = torch.randn(B, Tq, H, D)
    k = torch.randn(B, Tk, H, D)
    blocks = ref.select_blocks(q, k, **kw)
    Kb = 5
    assert blocks.shape == (B, H, math.ceil(Tq / 16), Kb)
    for qb in range(blocks.shape[2]):
        NB = ref.num_key_blocks(Tq, Tk, qb, block_size_q=16, block_size_k=2, sink_tokens=4, window=20)
        row = blocks[0, :, qb]
        n = min(NB, Kb)
        assert (row[:, n:] == -1).all()
        assert (row[:, :n] >= 0).all() and (row[:, :n] < NB).all()
        assert (row[:, 1:n] > row[:, :n - 1]).all()


VIS = dict(block_size_q=8, block_size_k=3, sink_tokens=4, window=6)


def test_visible_properties():
    Tq, Tk = 29, 60
    blocks = ref.select_blocks(torch.randn(1, Tq, 2, 8), torch.randn(1, Tk, 1, 8), topk=6, query_stride=2, **VIS)
    vis = ref.hip_visible(blocks, Tq, Tk, **VIS)
    assert vis.shape == (1, 2, Tq, Tk) and vis.dtype == torch.bool
    for i in range(Tq):
        p = Tk - Tq + i
        qb = i // 8
        E = Tk - Tq + qb * 8 - 6 + 1
        row = vis[0, :, i]
        assert not row[:, p + 1:].any()  # causal
        assert row[:, :min(4, p + 1)].all()  # sinks
        assert row[:, max(E, 0):p + 1].all()  # local region
        for h in range(2):
            sel = set()
            for j in blocks[0, h, qb].tolist():
                if j >= 0:
                    sel |= {t for t in range(4 + 3 * j, 4 + 3 * j + 3) if t < E}
            search = set(range(4, E))
            seen = {t for t in search if row[h, t]}
            assert seen == sel  # inside the search range exactly the selected tokens


def test_visible_full_budget_is_causal():
    Tq, Tk = 23, 41
    blocks = ref.select_blocks(torch.randn(1, Tq, 1, 4), torch.randn(1, Tk, 1, 4), topk=100, query_stride=1, **VIS)
    vis = ref.hip_visible(blocks, Tq, Tk, **VIS)
    causal = torch.arange(Tk)[None, :] <= (Tk - Tq + torch.arange(Tq))[:, None]
    assert torch.equal(vis[0, 0], causal)


def _dense_causal64(q, k, v, scale):
    B, Tq, H, D = q.shape
    Tk = k.shape[1]
    rep = H // k.shape[2]
    qd = q.double().transpose(1, 2)
    kd = k.double().repeat_interleave(rep, 2).transpose(1, 2)
    vd = v.double().repeat_interleave(rep, 2).transpose(1, 2)
    s = qd @ kd.transpose(-1, -2) * scale
    mask = torch.arange(Tk)[None, :] <= (Tk - Tq + torch.arange(Tq))[:, None]
    s = s.masked_fill(~mask, float("-inf"))
    return (torch.softmax(s, -1) @ vd).transpose(1, 2)


@pytest.mark.parametrize("Tq,Tk", [(45, 45), (7, 60), (1, 33)])
def test_full_budget_equals_dense_causal(Tq, Tk):
    H, Hkv, D = 4, 2, 16
    q = torch.randn(2, Tq, H, D, dtype=torch.float64)
    k = torch.randn(2, Tk, Hkv, D, dtype=torch.float64)
    v = torch.randn(2, Tk, Hkv, D, dtype=torch.float64)
    kw = dict(block_size_q=16, block_size_k=2, sink_tokens=3, window=5)
    blocks = ref.select_blocks(q, k, topk=64, query_stride=2, **kw)
    o = ref.hip_attention_reference(q, k, v, blocks, scale=0.3, **kw)
    torch.testing.assert_close(o, _dense_causal64(q, k, v, 0.3), rtol=1e-12, atol=1e-12)


# (B, Tq, Tk, H, Hkv, D, topk, bq, bk, qs, S, W)
ATTN_CASES = [
    (1, 53, 53, 2, 1, 16, 8, 16, 2, 2, 3, 9),
    (2, 6, 97, 2, 2, 8, 10, 4, 4, 1, 5, 4),
    (1, 37, 80, 3, 1, 8, 6, 8, 3, 3, 0, 0),   # window 0, no sinks: a query may see nothing -> 0
    (1, 20, 20, 1, 1, 8, 4, 32, 1, 2, 25, 2),  # sinks longer than the sequence
]


@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "-".join(map(str, c)))
def test_reference_matches_dense_masked(case):
    B, Tq, Tk, H, Hkv, D = case[:6]
    kw = _sel_kwargs(case)
    q = torch.randn(B, Tq, H, D, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Tk, Hkv, D, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Tk, Hkv, D, dtype=torch.float64, requires_grad=True)
    blocks = ref.select_blocks(q, k, **kw)
    akw = {n: kw[n] for n in ("block_size_q", "block_size_k", "sink_tokens", "window")}
    do = torch.randn(B, Tq, H, D, dtype=torch.float64)
    got = ref.hip_attention_reference(q, k, v, blocks, max_elems=4000, **akw)  # several chunks
    want = ref.hip_attention_naive(q, k, v, blocks, **akw)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g1 = torch.autograd.grad((got * do).sum(), (q, k, v))
    g2 = torch.autograd.grad((want * do).sum(), (q, k, v))
    for name, a, b in zip("qkv", g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d{name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_low_precision(dtype):
    B, Tq, Tk, H, D = 1, 40, 70, 2, 16
    kw = dict(block_size_q=16, block_size_k=2, sink_tokens=2, window=8)
    q, k, v = (torch.randn(B, T, H, D).to(dtype) for T in (Tq, Tk, Tk))
    blocks = ref.select_blocks(q, k, topk=8, query_stride=2, **kw)
    o = ref.hip_attention_reference(q, k, v, blocks, **kw)
    assert o.dtype == dtype
    want = ref.hip_attention_naive(q, k, v, blocks, **kw)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(o.double(), want, rtol=tol, atol=tol)


def test_duplicate_and_padding_blocks_count_once():
    B, T, H, D = 1, 40, 1, 8
    kw = dict(block_size_q=8, block_size_k=2, sink_tokens=1, window=4)
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64) for _ in range(3))
    blocks = torch.full((1, 1, 5, 3), -1, dtype=torch.int32)
    blocks[0, 0, 4] = torch.tensor([3, 3, 1])
    o = ref.hip_attention_reference(q, k, v, blocks, **kw)
    clean = blocks.clone()
    clean[0, 0, 4] = torch.tensor([1, 3, -1])
    torch.testing.assert_close(o, ref.hip_attention_naive(q, k, v, clean, **kw), rtol=1e-12, atol=1e-12)


def test_needle_span_is_selected():
    """A span of ~100 keys scoring far above the rest for the last query block is what it selects."""
    T, H, D = 1024, 1, 16
    g = torch.Generator().manual_seed(3)
    u = torch.randn(D, generator=g)
    u = u / u.norm()
    q = torch.randn(1, T, H, D, generator=g) * 0.3
    k = torch.randn(1, T, H, D, generator=g) * 0.3
    q[0, -64:, 0] += 3 * u
    span = range(300, 400)
    k[0, 300:400, 0] += 3 * u
    kw = dict(block_size_q=64, block_size_k=2, sink_tokens=4, window=64)
    blocks = ref.select_blocks(q, k, topk=64, query_stride=2, **kw)
    sel = [j for j in blocks[0, 0, -1].tolist() if j >= 0]
    toks = {t for j in sel for t in (4 + 2 * j, 5 + 2 * j)}
    assert len(sel) == 32
    assert len(toks & set(span)) >= 60, sorted(toks)  # 64 selected tokens, nearly all in the span
    # and the attention of the last block puts most of its mass there
    v = torch.zeros(1, T, H, D)
    v[0, 300:400, 0, 0] = 1.0
    o = ref.hip_attention_reference(q, k, v, blocks, **kw)
    assert o[0, -64:, 0, 0].mean() > 0.5


def test_search_geometry():
    # p_first = Tk - Tq + qb bq; E = p_first - W + 1; NB = ceil((E - S) / bk)
    assert ref.num_key_blocks(10, 100, 0, block_size_q=4, block_size_k=3, sink_tokens=5, window=7) == \
        math.ceil((90 - 7 + 1 - 5) / 3)
    assert ref.num_key_blocks(100, 100, 0, block_size_q=4, block_size_k=3, sink_tokens=5, window=7) == 0
    st, sz = ref.initial_groups(10, 4)
    assert st.tolist() == [0, 2, 5, 7] and sz.tolist() == [2, 3, 2, 3]


def test_grown_cache_equals_enlarged_window():
    """Reusing a selection made at Tk0 at Tk = Tk0 + d equals the spec with window + d: the search
    range is unchanged and every newer key is in the local region."""
    B, H, D, Tk0, d = 1, 2, 8, 90, 7
    kw = dict(block_size_q=4, block_size_k=2, sink_tokens=3)
    q0 = torch.randn(B, 1, H, D, dtype=torch.float64)
    k = torch.randn(B, Tk0 + d, H, D, dtype=torch.float64)
    v = torch.randn(B, Tk0 + d, H, D, dtype=torch.float64)
    blocks = ref.select_blocks(q0, k[:, :Tk0], topk=8, query_stride=1, window=10, **kw)
    vis0 = ref.hip_visible(blocks, 1, Tk0, window=10, **kw)
    vis = ref.hip_visible(blocks, 1, Tk0 + d, window=10 + d, **kw)
    assert torch.equal(vis[..., :Tk0], vis0) and vis[..., Tk0:].all()
    q = torch.randn(B, 1, H, D, dtype=torch.float64)
    o = ref.hip_attention_reference(q, k, v, blocks, window=10 + d, **kw)
    torch.testing.assert_close(o, ref.hip_attention_naive(q, k, v, blocks, window=10 + d, **kw))


def test_canonical_blocks_drops_the_block_at_the_search_end():
    """Block NB (the first past the search range) selects nothing: the canonical form holds only
    blocks 0 <= j < NB. Tq = Tk = 40, bq = 8, bk = 4, S = 2, W = 5: query block 4 has E = 28, NB = 7."""
    from subquad.reference.hip import canonical_blocks, num_key_blocks
    kw = dict(block_size_q=8, block_size_k=4, sink_tokens=2, window=5)
    assert num_key_blocks(40, 40, 4, **kw) == 7
    blocks = torch.full((1, 1, 5, 3), -1, dtype=torch.int32)
    blocks[0, 0, 4] = torch.tensor([7, 3, 6])
    out = canonical_blocks(blocks, 40, 40, **kw)
    assert out[0, 0, 4].tolist() == [3, 6, -1]
