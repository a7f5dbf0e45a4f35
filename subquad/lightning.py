"""Public lightning attention op: input checks, backend dispatch."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Optional, Tuple

import torch

from ._checks import (capturing, check_dim, check_int, check_same, check_scale, check_tensor, public_op,
                      resolve_backend, tensor_version)
from .reference import lightning as _ref
from .reference.common import empty_output

__all__ = ["lightning_attention", "lightning_slopes"]


def lightning_slopes(num_heads: int) -> torch.Tensor:
    """Per-head decay rates of the Lightning Attention-2 code (ALiBi-style): ``s_h = 2^(-8 (h+1) /
    H)`` for h < H = num_heads, fp32 ``[H]``, for ``lightning_attention(..., decay=...)`` (move it to
    q's device)."""
    return _ref.lightning_slopes(check_int("num_heads", num_heads, 1))


# Decay tensors whose values were checked, by identity (weak reference) and version counter: a
# decoding loop passes the same decay every step, and checking its values on a GPU costs a device
# sync. A new tensor, or an in-place change of a checked one, is checked again (writes through
# ``.data`` or NumPy do not bump the version counter: documented, not caught).
_CHECKED_DECAYS: "OrderedDict[int, tuple]" = OrderedDict()


def _check_decay_values(decay: torch.Tensor) -> None:
    version = tensor_version(decay)  # None (an inference tensor): checked at every call
    seen = _CHECKED_DECAYS.get(id(decay))
    if version is not None and seen is not None and seen[0]() is decay and seen[1] == version:
        return
    if not bool(torch.isfinite(decay).all()) or bool((decay < 0).any()):
        raise ValueError(f"decay rates must be finite and >= 0, got {decay.tolist()}")
    if version is not None:
        _CHECKED_DECAYS[id(decay)] = (weakref.ref(decay), version)
    if len(_CHECKED_DECAYS) > 64:
        _CHECKED_DECAYS.popitem(last=False)


def _check_cu_seqlens(cu_seqlens, B: int, T: int, values: bool = True):
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be an int32 or int64 tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if B != 1:
        raise ValueError(f"cu_seqlens requires batch size B == 1 (sequences packed along T), got B={B}")
    if values:
        _check_cu_values(cu_seqlens, T)


def _check_cu_values(cu_seqlens, T: int):
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if any(b < a for a, b in zip(cu[:-1], cu[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu}")
    if cu[-1] != T:
        raise ValueError(f"cu_seqlens must end at T={T}, got {cu[-1]}")


@public_op("q", "k", "v")
def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    decay: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal linear attention with per-head exponential decay (Lightning Attention-2).

    For each head h with lambda_h = exp(-decay[h]) (1 when decay is None)::

        o_t = scale * sum_{u<=t} lambda^(t-u) (q_t . k_u) v_u  +  scale * lambda^(t+1) q_t S_0
        S_T = sum_u lambda^(T-1-u) k_u v_u^T  +  lambda^T S_0        (the final state)

    i.e. the recurrence ``S_t = lambda S_{t-1} + k_t v_t^T, o_t = scale q_t S_t``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``. Same dtype (float32, float16, bfloat16; under
            torch.autocast any of them, cast to its dtype as for SDPA) and device. K and V may
            differ; the Triton backend takes 16 <= K, V <= 256.
        decay: ``None`` (no decay) or a float tensor ``[H]`` of rates ``s_h >= 0``. Not
            differentiable (an error is raised if it requires grad); see ``lightning_slopes``.
            Its values are checked once per tensor and in-place change (version counter): a
            write that bypasses the counter (``.data``, a NumPy view) is not re-checked. A tensor
            made under ``torch.inference_mode`` has no counter: it is checked at every call (on
            a GPU a device sync; make it outside inference mode, e.g. as a module buffer).
        scale: defaults to ``K ** -0.5``; pass 1.0 for the original lightning code's convention.
        initial_state: ``[N, H, K, V]`` (N = B, or the number of sequences with cu_seqlens),
            any float dtype, used in fp32. Differentiable.
        output_final_state: also return the final state ``[N, H, K, V]`` (fp32, differentiable).
        cu_seqlens: int tensor ``[N+1]`` of packed sequence boundaries (B must be 1): each sequence
            starts from its own initial state and gets its own final state.
        backend: "auto" (Triton for CUDA tensors, reference for CPU), "triton", "reference".

    Returns:
        ``(o, final_state)``: o ``[B, T, H, V]`` in v's dtype; final_state as above, or None.

    A sequence length up to 16 (e.g. T == 1 decoding with a state) runs a token-recurrent kernel
    with no padding to a chunk. Gradients flow to q, k, v, initial_state, and through
    final_state when it is used in the loss.
    """
    compiling = torch.compiler.is_compiling()
    check_tensor("q", q, rank=4)
    check_tensor("k", k, rank=4)
    check_tensor("v", v, rank=4)
    check_same("q", q, k=k, v=v)
    # value checks read tensors: not in traced code (the custom op makes them when it runs) nor in
    # a CUDA graph capture (the warm-up call before it made them)
    read_values = not compiling and not capturing(q)
    B, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape:
        if k.shape[:3] != q.shape[:3]:
            raise ValueError(f"k must have q's [B, T, H] = {tuple(q.shape[:3])}, got {tuple(k.shape[:3])}")
        raise ValueError(f"k must have q's head dim K={K}, got {k.shape[-1]}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must have q's [B, T, H] = {tuple(q.shape[:3])}, got {tuple(v.shape[:3])}")
    if K < 1 or V < 1:
        raise ValueError(f"head dims must be positive, got K={K}, V={V}")
    scale = check_scale(scale)
    scale = K ** -0.5 if scale is None else scale
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")
    if decay is not None:
        check_tensor("decay", decay, rank=1, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
        if decay.shape[0] != H:
            raise ValueError(f"decay must have shape [H] = [{H}], got {tuple(decay.shape)}")
        if decay.requires_grad:
            raise ValueError("decay must not require grad: the decay rates are not learnable in this op "
                             "(pass decay.detach())")
        if decay.device != q.device:
            raise ValueError(f"decay must be on q's device ({q.device}), got {decay.device}")
        if read_values:
            _check_decay_values(decay)
    N = B
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, B, T, values=read_values)
        N = cu_seqlens.numel() - 1
    if initial_state is not None:
        check_tensor("initial_state", initial_state, rank=4, dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))
        if tuple(initial_state.shape) != (N, H, K, V):
            raise ValueError(f"initial_state must have shape [N, H, K, V] = {(N, H, K, V)}, got {tuple(initial_state.shape)}")
        if initial_state.device != q.device:
            raise ValueError(f"initial_state must be on q's device ({q.device}), got {initial_state.device}")
    backend = resolve_backend(backend, q)
    if backend == "triton":
        check_dim("q", K, 16, 256, "head dim K")
        check_dim("v", V, 16, 256, "head dim V")

    s0 = None if initial_state is None else initial_state.float()
    if decay is not None and decay.dtype == torch.float64:  # a rate past fp32's max decays as fully as the max
        decay = decay.clamp(max=torch.finfo(torch.float32).max)  # (exp(-rate d) = 0 for every d >= 1)
    dec = None if decay is None else decay.float()
    if T == 0 or B == 0:  # nothing to compute: no launch (and no autotuning on an empty grid)
        o = empty_output((B, T, H, V), v.dtype, q, k, v)
        if not output_final_state:
            return o, None
        final = s0 * 1.0 if s0 is not None else q.new_zeros(N, H, K, V, dtype=torch.float32)
        return o, final
    if backend == "reference":
        return _ref.lightning_attention(q, k, v, dec, scale, s0, output_final_state, cu_seqlens)

    # contiguous: .to() returns an int32 view unchanged, and the kernels index CU by offset
    cu = None if cu_seqlens is None else cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
    args = (q.contiguous(), k.contiguous(), v.contiguous(), None if dec is None else dec.contiguous(),
            None if s0 is None else s0.contiguous(), cu, scale, output_final_state)
    if compiling:
        o, final = _fwd_op(*args)
        return o, (final if output_final_state else None)
    from .kernels.lightning import LightningAttentionFunction

    return LightningAttentionFunction.apply(*args)


# Under torch.compile the Triton path is two custom ops, opaque to the compiler and free of graph
# breaks (see ``subquad.kernels.block_sparse``); eager calls keep LightningAttentionFunction. The
# forward op makes the value checks that the traced code cannot (they read the tensors). A custom
# op returns tensors only: an absent final state / state gradient is an empty tensor.
@torch.library.custom_op("subquad::lightning_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: Optional[torch.Tensor],
            initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], scale: float,
            output_final_state: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    from .kernels.lightning import lightning_fwd

    if not capturing(q):  # a capture cannot read values: its warm-up call checked them
        if decay is not None:
            _check_decay_values(decay)
        if cu_seqlens is not None:
            _check_cu_values(cu_seqlens, q.shape[1])
    o, final = lightning_fwd(q, k, v, decay, scale, initial_state, output_final_state, cu_seqlens)
    return o, (final if final is not None else q.new_empty(0, dtype=torch.float32))


def _state_shape(q, v, cu_seqlens):
    from .kernels.lightning import _geometry

    N, _, _, H, K, V = _geometry(q, v, cu_seqlens)
    return (N, H, K, V)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, decay, initial_state, cu_seqlens, scale, output_final_state):
    final = _state_shape(q, v, cu_seqlens) if output_final_state else (0,)
    return v.new_empty(q.shape[:-1] + (v.shape[-1],)), q.new_empty(final, dtype=torch.float32)


@torch.library.custom_op("subquad::lightning_bwd", mutates_args=())
def _bwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, decay: Optional[torch.Tensor],
            initial_state: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], do: torch.Tensor,
            dfinal: Optional[torch.Tensor], scale: float,
            need_ds0: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from .kernels.lightning import lightning_bwd

    dq, dk, dv, ds0 = lightning_bwd(q, k, v, decay, scale, initial_state, cu_seqlens, do, dfinal, need_ds0)
    return dq, dk, dv, (ds0 if ds0 is not None else q.new_empty(0, dtype=torch.float32))


@_bwd_op.register_fake
def _bwd_fake(q, k, v, decay, initial_state, cu_seqlens, do, dfinal, scale, need_ds0):
    ds0 = _state_shape(q, v, cu_seqlens) if need_ds0 else (0,)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), q.new_empty(ds0, dtype=torch.float32)


def _op_setup(ctx, inputs, output):
    q, k, v, decay, initial_state, cu_seqlens, scale, output_final_state = inputs
    ctx.save_for_backward(q, k, v, decay, initial_state, cu_seqlens)
    ctx.scale = scale
    ctx.need_ds0 = initial_state is not None and ctx.needs_input_grad[4]


def _op_backward(ctx, do, dfinal):
    q, k, v, decay, initial_state, cu_seqlens = ctx.saved_tensors
    if dfinal is not None and dfinal.numel() == 0:  # no final state was returned
        dfinal = None
    dq, dk, dv, ds0 = _bwd_op(q, k, v, decay, initial_state, cu_seqlens, do.contiguous(),
                              None if dfinal is None else dfinal.contiguous().float(), ctx.scale, ctx.need_ds0)
    return dq, dk, dv, None, ds0 if ctx.need_ds0 else None, None, None, None


_fwd_op.register_autograd(_op_backward, setup_context=_op_setup)
