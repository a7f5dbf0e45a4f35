"""Second-order gradients (create_graph=True: gradient penalties, meta-learning). The Triton
backwards are not differentiable: differentiating their gradients must raise, not silently drop
the second-order terms. The references are: their double backward (the chunked, recomputed CPU
paths included) equals that of the float64 naive definitions."""

from __future__ import annotations

import pytest
import torch

import subquad
from subquad.reference import hip as hip_ref
from subquad.reference import lightning as lt_ref
from subquad.reference import neighborhood as na_ref
from subquad.reference import routing as rt_ref

from helpers import FAMILIES, randn


def _penalty(fn, q, k, v):
    """A gradient penalty: |d<o, w>/dq|^2 + <o, w>, differentiated w.r.t. q, k, v."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = fn(*leaves)
    w = torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device).reshape(o.shape)
    (gq,) = torch.autograd.grad((o * w).sum(), leaves[0], create_graph=True)
    loss = gq.pow(2).sum() + (o * w).sum()
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_triton_double_backward_raises(family):
    q, k, v = (randn(1, 18, 2, 16, seed=s, requires_grad=True) for s in range(3))
    o = FAMILIES[family](q, k, v, "triton")
    w = torch.ones_like(o)
    (gq,) = torch.autograd.grad((o * w).sum(), q, create_graph=True)
    # the penalty alone, and mixed into a loss with a differentiable term (where it used to vanish)
    with pytest.raises(RuntimeError, match="backward is not differentiable"):
        gq.pow(2).sum().backward()
    o = FAMILIES[family](q, k, v, "triton")
    (gq,) = torch.autograd.grad(o.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="backward is not differentiable"):
        (gq.pow(2).sum() + q.sum()).backward()
    # first order with create_graph=True still returns the gradients
    o = FAMILIES[family](q, k, v, "triton")
    (gq2,) = torch.autograd.grad(o.sum(), q, create_graph=True)
    (gq1,) = torch.autograd.grad(FAMILIES[family](q, k, v, "triton").sum(), q)
    torch.testing.assert_close(gq2.detach(), gq1)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_reference_backend_is_twice_differentiable(family):
    """backend="reference" (what the error message offers) runs a gradient penalty; its value is
    checked against float64 definitions below and by gradgradcheck."""
    q, k, v = (randn(1, 18, 2, 16, seed=s).cpu() for s in range(3))
    grads = _penalty(lambda a, b, c: FAMILIES[family](a, b, c, "reference"), q, k, v)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_lightning_and_hip_references_gradgradcheck():
    q, k, v = (randn(1, 13, 2, 4, seed=s, dtype=torch.float64).cpu().requires_grad_() for s in range(3))
    decay = subquad.lightning_slopes(2).double()
    assert torch.autograd.gradgradcheck(
        lambda a, b, c: lt_ref.lightning_attention(a, b, c, decay, 0.5, None, False, None, chunk_size=4)[0],
        (q, k, v), fast_mode=True)
    blocks = torch.tensor([[[[0, 2], [1, 3]], [[2, 0], [3, 1]]]])  # [B, H, query blocks, Kb] key blocks
    geo = dict(block_size_q=8, block_size_k=2, sink_tokens=1, window=3)
    assert torch.autograd.gradgradcheck(
        lambda a, b, c: hip_ref.hip_attention_reference(a, b, c, blocks, **geo, max_elems=16), (q, k, v),
        fast_mode=True)


def test_chunked_references_double_backward_equals_naive():
    """The recomputed (activation-checkpointed) chunks of the neighborhood and routing CPU paths,
    forced by a tiny chunk budget, against the dense-mask float64 definitions."""
    q, k, v = (randn(1, 7, 9, 2, 16, seed=s, dtype=torch.float64).cpu() for s in range(3))
    ks, ss, ds, cs = (3, 4), (1, 2), (2, 1), (False, True)
    got = _penalty(lambda a, b, c: na_ref.neighborhood_attention(a, b, c, ks, ss, ds, cs, chunk_elements=64), q, k, v)
    want = _penalty(lambda a, b, c: na_ref.neighborhood_attention_naive(a, b, c, ks, ss, ds, cs), q, k, v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    idx = rt_ref.bilevel_routing_attention(q, k, v, (3, 2), 2)[1]
    got = _penalty(lambda a, b, c: rt_ref.bilevel_routing_attention(a, b, c, (3, 2), 2, routing=idx,
                                                                     chunk_elements=64)[0], q, k, v)
    want = _penalty(lambda a, b, c: rt_ref.bilevel_routing_attention_naive(a, b, c, (3, 2), 2, routing=idx)[0],
                    q, k, v)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
