"""The shared block-sparse machinery: the inference bypass of autograd. (The backward's delta, computed
in the dQ walk into a NaN-poisoned buffer, is checked by every family's gradient tests.)"""

from __future__ import annotations

import pytest
import torch

import subquad
from subquad.kernels import block_sparse

from helpers import randn


def test_inference_skips_autograd():
    """Without a gradient to compute, the forward launcher runs alone (no autograd node), and gives
    the same output as the differentiable path."""
    calls = []

    def fwd(q, k, v, tag):
        calls.append(tag)
        return q * 2 + k + v, None

    fam = block_sparse.Family("test", fwd, None, None, None, None)
    q, k, v = (randn(2, 3, 1, 4) for _ in range(3))
    o = block_sparse.block_sparse_attention(q, k, v, fam, "t")
    assert o.grad_fn is None and calls == ["t"]
    q.requires_grad_()
    with torch.no_grad():
        assert block_sparse.block_sparse_attention(q, k, v, fam, "t").grad_fn is None


@pytest.mark.parametrize("dtype", [torch.float32])
def test_no_grad_output_equals_grad_output(dtype):
    """One public op per family: the no-grad output is the autograd path's output, bit for bit."""
    q, k, v = (randn(1, 40, 2, 16, dtype=dtype, seed=s) for s in (1, 2, 3))
    with torch.no_grad():
        o0 = subquad.hip_attention(q, k, v, topk=4, block_size_q=8, window=6, sink_tokens=2, backend="triton")
    o1 = subquad.hip_attention(q.requires_grad_(), k, v, topk=4, block_size_q=8, window=6, sink_tokens=2,
                               backend="triton")
    assert o1.grad_fn is not None and torch.equal(o0, o1.detach())


def test_descriptor_scratch_installs_an_allocator_once():
    """TMA configs build descriptors on the device, which needs Triton's scratch allocator: the
    launcher installs one on torch's caching allocator, and leaves a caller's own in place."""
    import contextvars

    import triton
    from triton.runtime import _allocation

    from subquad.kernels import common

    def run():
        # start from no allocator: a TMA test run earlier in this process (xdist's order) set one
        triton.set_allocator(_allocation.NullAllocator())
        common.descriptor_scratch()
        assert _allocation._allocator.get() is common._scratch
        mine = lambda size, alignment, stream: None  # noqa: E731
        triton.set_allocator(mine)
        common.descriptor_scratch()
        assert _allocation._allocator.get() is mine

    contextvars.copy_context().run(run)  # the allocator is a context variable: nothing leaks
