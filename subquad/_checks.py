"""Input checks and backend dispatch shared by every family.

Every check raises before any kernel runs or any output is allocated, with a message that
names the argument, what was expected and what was given.
"""

from __future__ import annotations

import functools
from numbers import Integral, Real
from typing import Optional, Sequence, Tuple

import torch

from .autotune.tuner import interpreting

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BACKENDS = ("auto", "triton", "reference")


def is_int(x) -> bool:
    """A Python or numpy integer, not a bool."""
    return isinstance(x, Integral) and not isinstance(x, bool)


def check_int(name: str, value, lo: int) -> int:
    """An int (Python or NumPy, not a bool) of at least ``lo``."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return value


def _is_bool(x) -> bool:
    """A Python or NumPy bool."""
    return isinstance(x, bool) or (type(x).__module__ == "numpy" and type(x).__name__ in ("bool", "bool_"))


def _per_dim(name: str, value, nd: int, ok, cast, kind: str) -> tuple:
    """A ``kind`` ("int" / "bool") or a list/tuple of ``nd`` of them (one per spatial dim) -> tuple."""
    one = f"{'an' if kind == 'int' else 'a'} {kind}"
    if ok(value):
        return (cast(value),) * nd
    if isinstance(value, (list, tuple)):
        if len(value) != nd:
            raise ValueError(f"{name} must be {one} or a sequence of {nd} {kind}s (one per spatial dim), "
                             f"got {len(value)} values: {tuple(value)}")
        for x in value:
            if not ok(x):
                raise TypeError(f"{name} must hold {kind}s, got {type(x).__name__} in {tuple(value)}")
        return tuple(cast(x) for x in value)
    raise TypeError(f"{name} must be {one} or a sequence of {nd} {kind}s, got {type(value).__name__}")


def per_dim_ints(name: str, value, nd: int) -> Tuple[int, ...]:
    """An int, or a list/tuple of ``nd`` ints (one per spatial dim) -> tuple of ints."""
    return _per_dim(name, value, nd, is_int, int, "int")


def per_dim_bools(name: str, value, nd: int) -> Tuple[bool, ...]:
    """A bool (Python or NumPy), or a list/tuple of ``nd`` of them -> tuple of bools."""
    return _per_dim(name, value, nd, _is_bool, bool, "bool")


def tensor_version(t: torch.Tensor) -> Optional[int]:
    """A tensor's in-place version counter, for caches of checked values; None for an inference
    tensor (it has no counter) and in traced code (which reads none)."""
    if torch.compiler.is_compiling() or t.is_inference():
        return None
    return t._version


def check_tensor(name: str, x, rank: Optional[int] = None, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {str(x.dtype).replace('torch.', '')}")
    if rank is not None and x.dim() != rank:
        raise ValueError(f"{name} must have {rank} dims, got {x.dim()} (shape {tuple(x.shape)})")
    return x


def public_op(*names: str):
    """Decorates a public op whose first arguments are the tensors ``names`` (e.g. "q", "k", "v").

    * CUDA device: the op runs with q's device current. Triton launches on the current device,
      not the tensors' own: a model spread over GPUs in one process (e.g. ``device_map="auto"``)
      calls ops on ``cuda:1`` tensors while ``cuda:0`` is current. (Backward passes need no guard:
      autograd runs them on a thread of the tensors' device.)
    * ``torch.autocast`` for q's device type, as autocast treats SDPA: those of ``names`` in fp32,
      fp16 or bf16 are cast to the autocast dtype (q and k in fp32 after RoPE with v in bf16 from a
      Linear layer run in bf16 instead of failing the dtype check; gradients flow back in each
      input's dtype), and the op runs with autocast off (it chooses its own internal precision,
      like a kernel).

    Otherwise the call is untouched (a flag read, and the current device for CUDA tensors)."""
    def cast(x, dt):
        return x.to(dt) if isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES else x

    def deco(fn):
        @functools.wraps(fn)
        def op(*args, **kwargs):
            first = args[0] if args else kwargs.get(names[0])
            if not isinstance(first, torch.Tensor):
                return fn(*args, **kwargs)
            dev = first.device
            if (dev.type == "cuda" and dev.index is not None and not torch.compiler.is_compiling()
                    and dev.index != torch.cuda.current_device()):
                with torch.cuda.device(dev):
                    return op(*args, **kwargs)
            if not torch.is_autocast_enabled(dev.type):
                return fn(*args, **kwargs)
            dt = torch.get_autocast_dtype(dev.type)
            args = tuple(cast(x, dt) if i < len(names) else x for i, x in enumerate(args))
            kwargs = {a: cast(x, dt) if a in names else x for a, x in kwargs.items()}
            with torch.autocast(dev.type, enabled=False):
                return fn(*args, **kwargs)
        return op
    return deco


def capturing(x: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream (for x on a CUDA device). Then
    nothing may read a device value on the host (a sync, which breaks the capture): value checks
    are left to the warm-up call that a capture needs anyway, and no config is timed."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def check_same(ref_name: str, ref: torch.Tensor, **others):
    """Same dtype and device as ``ref`` for every tensor in ``others``."""
    for name, x in others.items():
        if x.dtype != ref.dtype:
            raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {x.dtype}")
        if x.device != ref.device:
            raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {x.device}")


def check_dim(name: str, value: int, lo: int, hi: int, what: str):
    if not lo <= value <= hi:
        raise ValueError(f"{name}: {what} must be in [{lo}, {hi}] for the Triton backend, got {value}")


# the scales a block-sparse kernel can take: scale log2(e) a normal fp32 (a zero or inf product
# turns the -inf of a masked score into NaN)
SCALE_RANGE = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max / 2)


def check_scale(scale, positive: bool = False, name: str = "scale"):
    """A real number (NumPy scalars included) or None, finite; in SCALE_RANGE when ``positive``:
    the block-sparse kernels' online softmax scales the row max of the raw scores, and masked
    scores (-inf) must stay -inf after scaling."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, Real):
        raise TypeError(f"{name} must be a float or None, got {type(scale).__name__}")
    scale = float(scale)
    if not scale == scale or scale in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be finite, got {scale}")
    if positive and scale <= 0:
        raise ValueError(f"{name} must be > 0, got {scale}")
    if positive and not SCALE_RANGE[0] <= scale <= SCALE_RANGE[1]:
        raise ValueError(f"{name} must be in [{SCALE_RANGE[0]:.3g}, {SCALE_RANGE[1]:.3g}] (the kernels scale "
                         f"scores in fp32), got {scale}")
    return scale


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """'auto' -> Triton for CUDA tensors, the reference otherwise. 'triton' on CPU tensors runs only
    under TRITON_INTERPRET=1."""
    check_backend(backend)
    if backend == "auto":
        return "triton" if x.is_cuda else "reference"
    if backend == "triton" and not x.is_cuda and not interpreting():
        raise ValueError(
            f"backend='triton' needs CUDA tensors, got tensors on {x.device}; set TRITON_INTERPRET=1 "
            "before importing subquad to run the kernels on CPU through the interpreter, or use "
            "backend='reference'")
    return backend
