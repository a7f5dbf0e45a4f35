"""The chunked CPU paths' shared machinery (``reference.common.gathered_chunks``) and what it
buys: a backward whose allocations grow like the inputs, not like inputs x chunks, and a forward
that keeps nothing of the chunks' gathered size for the backward. Counted in bytes allocated
(every op's fresh outputs, under a dispatch mode), never timed."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from subquad.reference import hip as hip_ref
from subquad.reference import lightning as lt_ref
from subquad.reference import neighborhood as na_ref
from subquad.reference import routing as rt_ref
from subquad.reference.common import gathered_chunks

from helpers import randn


def _body(a, b, c, w):
    """Nonlinear in every gathered input: a [n, 3], b [3, m], c [m, 2] (rows of dim 0 / 1 / 0)."""
    return torch.tanh(a @ (b * w)) @ c.sin()


def _chunked(x, y, z, n_chunks=3):
    ia = torch.tensor([[0, 4, 4], [1, 2, 0], [5, 5, 3]])  # repeated rows, a row in several chunks
    ib = torch.tensor([[1, 0], [3, 3], [2, 1]])

    def chunk(c):
        return (ia[c], ib[c], ib[c]), (0.5 + c,)
    return gathered_chunks(_body, (x, y, z), (0, 1, 0), n_chunks, chunk, 0)


def test_gathered_chunks_gradients():
    """First and second derivatives (the custom backward and its create_graph branch) against
    finite differences, with rows repeated within and across chunks; an input without grad."""
    x = randn(6, 3, dtype=torch.float64, seed=1, requires_grad=True)
    y = randn(3, 4, dtype=torch.float64, seed=2, requires_grad=True)
    z = randn(4, 2, dtype=torch.float64, seed=3, requires_grad=True)
    assert torch.autograd.gradcheck(_chunked, (x, y, z))
    assert torch.autograd.gradgradcheck(_chunked, (x, y, z))
    zc = z.detach()
    assert torch.autograd.gradcheck(lambda a, b: _chunked(a, b, zc), (x, y))
    # one chunk runs under plain autograd; no grad: plain calls, the same values
    with torch.no_grad():
        assert torch.equal(_chunked(x, y, z), torch.cat([_chunked(x, y, z, 1), _body(
            x[[1, 2, 0]], y[:, [3, 3]], z[[3, 3]], 1.5), _body(x[[5, 5, 3]], y[:, [2, 1]], z[[2, 1]], 2.5)]))


class _Allocated(TorchDispatchMode):
    """Bytes of every fresh tensor an op returns (views and in-place results excluded)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not any(r.alias_info is not None for r in func._schema.returns):
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.bytes += t.numel() * t.element_size()
        return out


def _costs(fn, xs):
    """(bytes saved for the backward beyond the inputs, bytes allocated by the backward), each
    per byte of input."""
    xs = [x.detach().clone().requires_grad_() for x in xs]
    inputs = {x.untyped_storage().data_ptr() for x in xs}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in inputs:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o = fn(*xs)
    with _Allocated() as a:
        o.backward(torch.ones_like(o))
    size = sum(x.numel() * x.element_size() for x in xs)
    return sum(saved.values()) / size, a.bytes / size


def _lightning(n):
    decay = torch.tensor([0.1, 0.2])
    return (lambda q, k, v: lt_ref.lightning_attention(q, k, v, decay, chunk_size=64)[0],
            [randn(1, 256 * n, 2, 16, seed=s) for s in range(3)])


def _neighborhood(n):
    return (lambda q, k, v: na_ref.neighborhood_attention(q, k, v, 7, chunk_elements=1 << 16),
            [randn(1, 16 * n, 32, 2, 16, seed=s) for s in range(3)])


def _routing(n):
    return (lambda q, k, v: rt_ref.bilevel_routing_attention(q, k, v, (2 * n, 4), 2, chunk_elements=1 << 12)[0],
            [randn(1, 16 * n, 32, 2, 16, seed=s) for s in range(3)])


def _hip(n):
    geo = dict(block_size_q=32, block_size_k=2, sink_tokens=4, window=32)
    q, k, v = (randn(1, 512 * n, 2, 16, seed=s) for s in range(3))
    blocks = hip_ref.select_blocks(q, k, topk=64, query_stride=2, **geo)
    return (lambda a, b, c: hip_ref.hip_attention_reference(a, b, c, blocks, **geo, max_elems=1 << 14),
            [q, k, v])


@pytest.mark.parametrize("case", [_lightning, _neighborhood, _routing, _hip])
def test_chunked_backward_costs_grow_like_the_inputs(case):
    """At 1x and 4x the length, many chunks either way: the backward allocates the same bytes per
    input byte (a chunk differentiated as a slice of, or a gather from, a whole input zero-fills
    a full-size gradient: 3.5x more per byte at 4x the length), and the chunked references keep
    nothing but copies of their inputs for it (HiP kept every chunk's gathered K/V and scores)."""
    (saved1, alloc1), (saved4, alloc4) = (_costs(*case(n)) for n in (1, 4))
    assert alloc4 <= 1.2 * alloc1, (alloc1, alloc4)
    if case is not _lightning:  # its state recurrence runs under plain autograd: O(T) saved
        assert saved1 <= 1.1 and saved4 <= 1.1, (saved1, saved4)
