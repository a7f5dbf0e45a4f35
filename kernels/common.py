"""Machinery shared by every family's launchers."""

from __future__ import annotations

import os

import torch

from ..autotune.spaces import next_pow2, pow2  # noqa: F401  (re-exported for the launchers)


def fp32_dot_precision() -> str:
    """The Triton dot precision of fp32 inputs, "ieee" or "tf32", following torch's fp32 matmul
    setting as torch's own FlexAttention kernels do: ``torch.backends.cuda.matmul.fp32_precision``
    when set ("ieee" / "tf32"), else TF32 unless ``torch.get_float32_matmul_precision()`` is
    "highest" (the default: IEEE fp32, as cuBLAS). ``torch.set_float32_matmul_precision("high")``
    therefore runs fp32 attention on TF32 tensor cores (~1e-3 relative error, several times faster)."""
    explicit = getattr(torch.backends.cuda.matmul, "fp32_precision", "none")  # torch >= 2.9
    if explicit in ("ieee", "tf32"):
        return explicit
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def dtype_key(dtype: torch.dtype) -> str:
    """The dtype element of a tuner bucket: the dtype's name, and "tf32" for fp32 inputs whose dots
    run on TF32 tensor cores (``fp32_dot_precision``): their best tiles are not the IEEE path's."""
    if dtype == torch.float32 and fp32_dot_precision() == "tf32":
        return "tf32"
    return str(dtype).replace("torch.", "")


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launchers. Not ``triton.cdiv``: since triton 3.5 that is a constexpr_function,
    whose wrapper costs ~5 us a call on the host (triton 3.6), where small launches are host-bound."""
    return -(-a // b)


def wide(x: torch.Tensor) -> bool:
    """Whether element offsets within one batch element of ``x`` (its numel / B) need int64: the
    kernels' ``WIDE`` switch, so the common sizes keep 32-bit offset arithmetic in their loops."""
    return x.numel() // max(x.shape[0], 1) >= 2 ** 31


# Read once: an environment lookup costs ~2 us, and a routing fwd+bwd allocates ten buffers on a
# host-bound path. The tests set it before importing the kernels (tests/conftest.py).
POISON = os.environ.get("SUBQUAD_POISON", "0") not in ("", "0")


def empty(shape, dtype, device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled when SUBQUAD_POISON=1 (tests), so that an
    element a kernel forgets to write fails the comparison instead of passing by luck."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan"))
    return out


def aligned(x: torch.Tensor) -> torch.Tensor:
    """``x`` contiguous and starting on a 16-byte boundary. ``.contiguous()`` keeps a contiguous view
    at any storage offset (a slice of a packed buffer); a TMA descriptor's base must be 16-byte
    aligned, so such a view is copied (a fresh allocation is aligned). Called in the launchers,
    which see real tensors also under torch.compile (there a traced op has no data pointer)."""
    x = x.contiguous()
    return x if x.data_ptr() % 16 == 0 else x.clone()


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def descriptor_scratch() -> None:
    """Kernels that build TMA tensor descriptors on the device need Triton's global scratch
    allocator; install one backed by torch's caching allocator unless the caller has set their
    own (``triton.set_allocator``)."""
    import triton

    try:  # a private module: where it is missing, assume no allocator was set
        from triton.runtime import _allocation

        if not isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
            return
    except (ImportError, AttributeError):
        pass
    triton.set_allocator(_scratch)


class _NotTwiceDifferentiable(torch.autograd.Function):
    """Passes gradients through; differentiating them raises (see ``first_order_only``)."""

    @staticmethod
    def forward(ctx, anchor, *grads):
        return tuple(None if g is None else g.clone() for g in grads)

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError("subquad: the Triton kernels' backward is not differentiable (double backward, "
                           "create_graph=True); backend='reference' supports it")


def first_order_only(grads: tuple, *inputs: torch.Tensor) -> tuple:
    """A Triton backward's gradients. Under ``create_graph=True`` they would carry no history, and
    second-order terms built on them (a gradient penalty) would silently drop out of the loss; they
    are returned through a node that raises if differentiated instead. ``once_differentiable``
    does not catch this: it looks at the incoming gradient, not at the saved inputs."""
    if not torch.is_grad_enabled():  # a plain backward: grad mode is off inside it
        return grads
    anchor = next((x for x in inputs if x is not None and x.requires_grad), None)
    return grads if anchor is None else _NotTwiceDifferentiable.apply(anchor, *grads)
