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
    return x + (x.to(dtype).to(x.dtype) - x).detach()


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


class _Recomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, q, k, v, *rest):
        ctx.fn = fn
        save_with_rest(ctx, (q, k, v), rest)
        with torch.no_grad():
            return fn(q, k, v, *rest)

    @staticmethod
    def backward(ctx, grad_out):
        (q, k, v), rest = saved_with_rest(ctx)
        wanted = ctx.needs_input_grad[1:4]
        # Under backward(create_graph=True) the gradients must carry history (a double backward):
        # recompute from the saved inputs themselves, through one view per role (q and k may be one
        # tensor); otherwise from detached copies.
        create = torch.is_grad_enabled()
        with torch.enable_grad():
            xs = [x.view_as(x) if create else x.detach().requires_grad_(bool(r)) for x, r in zip((q, k, v), wanted)]
            o = ctx.fn(*xs, *rest)
            need = [x for x, r in zip(xs, wanted) if r]
            got = iter(torch.autograd.grad(o, need, grad_out, create_graph=create) if need else ())
        return (None, *[next(got) if r else None for r in wanted]) + (None,) * len(rest)


def recomputed(fn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest):
    """``fn(q, k, v, *rest)``, differentiable in q, k, v, with its activations recomputed in the
    backward pass (activation checkpointing without torch.utils.checkpoint, whose first use imports
    torch._dynamo: ~3 s), so a chunked reference keeps nothing of a chunk's gathered size between
    the passes. ``rest`` (index tables, masks, scalars) is not differentiable. Twice differentiable."""
    return _Recomputed.apply(fn, q, k, v, *rest)
