"""Machinery shared by the references."""

from __future__ import annotations

from typing import Callable

import torch

def empty_output(shape, dtype, *inputs: torch.Tensor) -> torch.Tensor:
    """What a call on empty inputs (a batch or a sequence of length 0) returns: zeros of ``shape``
    that stay in the autograd graph of ``inputs``, as torch's own ops do, so that a backward
    through them gives the inputs' empty gradients instead of failing for want of a grad_fn.
    Each input must be empty: its sum, added in, is then exactly 0."""
    assert all(x.numel() == 0 for x in inputs), "empty_output takes empty inputs only"
    link = sum(x.sum() for x in inputs)
    return inputs[0].new_zeros(shape, dtype=dtype) + link.to(dtype)


def rounded(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``dtype`` and back, as a kernel rounds a dot operand (P, a decay-weighted
    block) to the input dtype, with the gradient passed through unrounded: a plain
    ``x.to(dtype).to(x.dtype)`` would also round the incoming gradient to ``dtype``, and an fp16
    gradient overflows long before the kernel's fp32 one does. Exact: ``x + (r - x) == r``."""
    if dtype == x.dtype:
        return x
    r = x.to(dtype).to(x.dtype)
    if not (x.requires_grad and torch.is_grad_enabled()):
        return r  # the same values, without two more passes over x
    return x + (r - x).detach()


_SAVED = object()  # marks where a saved tensor goes back into the other arguments


def save_with_rest(ctx, tensors, rest) -> None:
    """For an autograd Function: saves ``tensors`` and the tensors among ``rest`` (index tables
    beside scalars, ...) for the backward, keeping ``rest``'s other values on ctx."""
    ctx.save_for_backward(*tensors, *[x for x in rest if torch.is_tensor(x)])
    ctx.n_lead = len(tensors)
    ctx.rest = [_SAVED if torch.is_tensor(x) else x for x in rest]


def saved_with_rest(ctx):
    """(tensors, rest) as given to ``save_with_rest``, in the backward."""
    saved = ctx.saved_tensors
    more = iter(saved[ctx.n_lead:])
    return saved[:ctx.n_lead], [next(more) if x is _SAVED else x for x in ctx.rest]


def _gather(xs, dims, idx):
    return [x.index_select(d, i) for x, d, i in zip(xs, dims, idx)]


def _run_chunks(body, xs, dims, n_chunks, chunk):
    outs = []
    for c in range(n_chunks):
        idx, rest = chunk(c)
        outs.append(body(*_gather(xs, dims, idx), *rest))
    return outs


class _GatheredChunks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, body, chunk, n_chunks, dims, cat_dim, *xs):
        ctx.body, ctx.chunk, ctx.dims, ctx.cat_dim = body, chunk, dims, cat_dim
        ctx.save_for_backward(*xs)
        with torch.no_grad():
            outs = _run_chunks(body, xs, dims, n_chunks, chunk)
        ctx.sizes = [o.shape[cat_dim] for o in outs]
        return torch.cat(outs, cat_dim)

    @staticmethod
    def backward(ctx, grad_out):
        xs = ctx.saved_tensors
        wanted = ctx.needs_input_grad[5:]
        # Under backward(create_graph=True) the gradients must carry history (a double backward):
        # gather from the saved inputs themselves and accumulate out of place; otherwise from
        # detached inputs into one buffer per input, so a chunk costs its own size, not the inputs'.
        # The buffers are fp32 for 16-bit inputs: a row's gradient is summed over chunks and repeats
        # once, as a kernel's fp32 accumulator does, then rounded.
        create = torch.is_grad_enabled()
        grads = [None if not w else torch.zeros_like(x) if create else
                 torch.zeros_like(x, dtype=torch.promote_types(x.dtype, torch.float32)) for x, w in zip(xs, wanted)]
        for c, g_out in enumerate(grad_out.split(ctx.sizes, ctx.cat_dim)):
            idx, rest = ctx.chunk(c)
            with torch.enable_grad():
                parts = _gather(xs if create else [x.detach() for x in xs], ctx.dims, idx)
                if not create:
                    parts = [p.requires_grad_(bool(w)) for p, w in zip(parts, wanted)]
                o = ctx.body(*parts, *rest)
                need = [p for p, w in zip(parts, wanted) if w]
                got = iter(torch.autograd.grad(o, need, g_out, create_graph=create) if need else ())
            for j, (d, i) in enumerate(zip(ctx.dims, idx)):
                if wanted[j]:
                    g = next(got)
                    grads[j] = grads[j].index_add(d, i, g) if create else grads[j].index_add_(d, i, g.to(grads[j].dtype))
        return (None,) * 5 + tuple(None if g is None else g.to(x.dtype) for g, x in zip(grads, xs))


def gathered_chunks(body: Callable, xs, dims, n_chunks: int, chunk: Callable, cat_dim: int) -> torch.Tensor:
    """``cat([body(*gathered_c, *rest_c) for c in range(n_chunks)], cat_dim)`` where
    ``(idx_c, rest_c) = chunk(c)`` and ``gathered_c[j] = xs[j].index_select(dims[j], idx_c[j])``:
    the chunked CPU paths, differentiable in ``xs`` (``rest``: index tables, masks, scalars).

    With gradients and more than one chunk, each chunk is recomputed in the backward pass
    (activation checkpointing without torch.utils.checkpoint, whose first use imports
    torch._dynamo: ~3 s), so nothing of a chunk's gathered size is kept between the passes; its
    gradients are taken w.r.t. the gathered rows and added into one buffer per input, so the
    backward costs the chunks' sizes, not the inputs' size per chunk (a chunk differentiated
    w.r.t. a whole input zero-fills a full-size gradient: quadratic in the input length).
    ``chunk(c)`` runs again in the backward. Twice differentiable."""
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in xs)
    if grad and n_chunks > 1:
        return _GatheredChunks.apply(body, chunk, n_chunks, tuple(dims), cat_dim, *xs)
    outs = _run_chunks(body, xs, dims, n_chunks, chunk)
    return outs[0] if len(outs) == 1 else torch.cat(outs, cat_dim)
