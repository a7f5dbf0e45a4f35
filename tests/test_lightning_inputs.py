"""Bad input to lightning_attention: each documented error, with the argument named; nothing runs."""

from __future__ import annotations

import pytest
import torch

import subquad

from helpers import DEVICE, randn


def _qkv(B=1, T=8, H=2, K=16, V=16, dtype=torch.float32):
    return (torch.randn(B, T, H, K, dtype=dtype, device=DEVICE), torch.randn(B, T, H, K, dtype=dtype, device=DEVICE),
            torch.randn(B, T, H, V, dtype=dtype, device=DEVICE))


# every tensor of a case lives on the test device, so each case fails on its own check, not on
# a device mismatch
def _randn(*a, **kw):
    return torch.randn(*a, device=DEVICE, **kw)


def _ones(*a, **kw):
    return torch.ones(*a, device=DEVICE, **kw)


def _zeros(*a, **kw):
    return torch.zeros(*a, device=DEVICE, **kw)


def _tensor(*a, **kw):
    return torch.tensor(*a, device=DEVICE, **kw)


def _call(q=None, k=None, v=None, decay=None, **kw):
    q0, k0, v0 = _qkv()
    kw.setdefault("backend", "triton")
    return subquad.lightning_attention(q0 if q is None else q, k0 if k is None else k, v0 if v is None else v,
                                       decay, **kw)


CASES = [
    ("q rank", lambda: _call(q=_randn(8, 2, 16)), ValueError, "q must have 4 dims"),
    ("v rank", lambda: _call(v=_randn(1, 1, 8, 2, 16)), ValueError, "v must have 4 dims"),
    ("q type", lambda: _call(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    ("int tensor", lambda: _call(q=_ones(1, 8, 2, 16, dtype=torch.int64)), TypeError, "q must have dtype"),
    ("fp64 unsupported", lambda: _call(q=_randn(1, 8, 2, 16, dtype=torch.float64)), TypeError, "q must have dtype"),
    ("mixed dtypes", lambda: _call(k=_randn(1, 8, 2, 16, dtype=torch.float16)), TypeError, "k must have the dtype of q"),
    ("B mismatch", lambda: _call(k=_randn(2, 8, 2, 16)), ValueError, "k must have q's [B, T, H]"),
    ("T mismatch", lambda: _call(v=_randn(1, 9, 2, 16)), ValueError, "v must have q's [B, T, H]"),
    ("H mismatch", lambda: _call(v=_randn(1, 8, 3, 16)), ValueError, "v must have q's [B, T, H]"),
    ("K mismatch", lambda: _call(k=_randn(1, 8, 2, 32)), ValueError, "k must have q's head dim K=16"),
    ("K too small for triton", lambda: _call(q=_randn(1, 8, 2, 8), k=_randn(1, 8, 2, 8)), ValueError,
     "head dim K must be in [16, 256]"),
    ("V too large for triton", lambda: _call(v=_randn(1, 8, 2, 300)), ValueError, "head dim V must be in [16, 256]"),
    ("decay shape", lambda: _call(decay=_ones(3)), ValueError, "decay must have shape [H] = [2]"),
    ("decay rank", lambda: _call(decay=_ones(2, 1)), ValueError, "decay must have 1 dims"),
    ("decay negative", lambda: _call(decay=_tensor([0.1, -0.2])), ValueError, "decay rates must be finite and >= 0"),
    ("decay nan", lambda: _call(decay=_tensor([0.1, float("nan")])), ValueError, "decay rates must be finite"),
    ("decay int", lambda: _call(decay=_tensor([1, 2])), TypeError, "decay must have dtype"),
    ("decay learnable", lambda: _call(decay=_ones(2, requires_grad=True)), ValueError, "not learnable"),
    ("state shape", lambda: _call(initial_state=_zeros(1, 2, 16, 17)), ValueError,
     "initial_state must have shape [N, H, K, V] = (1, 2, 16, 16)"),
    ("state int", lambda: _call(initial_state=_zeros(1, 2, 16, 16, dtype=torch.int32)), TypeError,
     "initial_state must have dtype"),
    ("cu not tensor", lambda: _call(cu_seqlens=[0, 8]), TypeError, "cu_seqlens must be a torch.Tensor"),
    ("cu float", lambda: _call(cu_seqlens=_tensor([0.0, 8.0])), TypeError, "cu_seqlens must be an int32 or int64"),
    ("cu 2-D", lambda: _call(cu_seqlens=_tensor([[0, 8]])), ValueError, "cu_seqlens must be 1-D"),
    ("cu start", lambda: _call(cu_seqlens=_tensor([1, 8])), ValueError, "cu_seqlens must start at 0"),
    ("cu decreasing", lambda: _call(cu_seqlens=_tensor([0, 5, 3, 8])), ValueError, "non-decreasing"),
    ("cu end", lambda: _call(cu_seqlens=_tensor([0, 5, 7])), ValueError, "cu_seqlens must end at T=8"),
    ("cu with B>1", lambda: _call(*_qkv(B=2), cu_seqlens=_tensor([0, 8])), ValueError, "B == 1"),
    ("cu state rows", lambda: _call(cu_seqlens=_tensor([0, 3, 8]), initial_state=_zeros(1, 2, 16, 16)),
     ValueError, "initial_state must have shape [N, H, K, V] = (2, 2, 16, 16)"),
    ("scale type", lambda: _call(scale="0.5"), TypeError, "scale must be a float"),
    ("scale nan", lambda: _call(scale=float("nan")), ValueError, "scale must be finite"),
    ("backend", lambda: _call(backend="cuda"), ValueError, "backend must be one of"),
    ("final flag", lambda: _call(output_final_state=1), TypeError, "output_final_state must be a bool"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case):
    _, fn, exc, msg = case
    with pytest.raises(exc) as info:
        fn()
    assert msg in str(info.value)


def test_reference_accepts_small_head_dims():
    """The head-dim range is a kernel limit; the reference backend takes any size."""
    q, k, v = (torch.randn(1, 5, 2, 4) for _ in range(3))
    o, _ = subquad.lightning_attention(q, k, v, backend="reference")
    assert o.shape == (1, 5, 2, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_triton_backend_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = (torch.randn(1, 5, 2, 16) for _ in range(3))
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        subquad.lightning_attention(q, k, v, backend="triton")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_mixed_devices():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="k must be on the device of q"):
        subquad.lightning_attention(q, k.cpu(), v)


def test_decay_values_rechecked_after_in_place_change():
    """The value check of decay is skipped for a tensor already checked, unless it was modified."""
    d = torch.tensor([0.1, 0.2], device=DEVICE)
    _call(decay=d, backend="reference")
    d[1] = -1.0  # bumps the version counter: checked again
    with pytest.raises(ValueError, match="decay rates must be finite and >= 0"):
        _call(decay=d, backend="reference")


def test_strided_int32_cu_seqlens():
    """An int32 view with strides is read by value, not as raw storage (the kernels index CU by offset)."""
    from subquad.reference.lightning import lightning_attention_naive

    q, k, v = (torch.randn(1, 20, 1, 16, device=DEVICE) for _ in range(3))
    cu = torch.tensor([0, 7, 3, 7, 20, 7], dtype=torch.int32, device=DEVICE)[::2]  # [0, 3, 20], not contiguous
    want_o, want_f = lightning_attention_naive(q, k, v, None, None, None, cu)
    for backend in ("triton", "reference"):
        o, f = subquad.lightning_attention(q, k, v, cu_seqlens=cu, output_final_state=True, backend=backend)
        torch.testing.assert_close(o.double(), want_o, rtol=1e-4, atol=1e-4, msg=backend)
        torch.testing.assert_close(f.double(), want_f, rtol=1e-4, atol=1e-4, msg=backend)


def test_float64_decay_past_float32_range():
    """A finite float64 rate above fp32's max forgets all history, as the largest fp32 rate does (it
    became inf in fp32, and inf * 0 on the diagonal made every output NaN)."""
    from subquad.reference.lightning import lightning_attention_naive

    q, k, v = (torch.randn(1, 19, 2, 16, device=DEVICE) for _ in range(3))
    s0 = torch.randn(1, 2, 16, 16, device=DEVICE)
    decay = torch.tensor([1e30, 1e300], dtype=torch.float64, device=DEVICE)
    want_o, want_f = lightning_attention_naive(q, k, v, decay, None, s0, None)
    assert torch.isfinite(want_o).all()
    for backend in ("triton", "reference"):
        o, f = subquad.lightning_attention(q, k, v, decay, initial_state=s0, output_final_state=True, backend=backend)
        torch.testing.assert_close(o.double(), want_o, rtol=1e-4, atol=1e-4, msg=backend)
        torch.testing.assert_close(f.double(), want_f, rtol=1e-4, atol=1e-4, msg=backend)


def test_slopes():
    """2^(-8 (h+1) / H) per head; a head count that is not a positive int is refused (2.5 used to
    give 3 rates, -1 an unrelated torch error)."""
    s = subquad.lightning_slopes(8)
    assert s.dtype == torch.float32 and s.shape == (8,)
    assert torch.equal(s, torch.tensor([2.0 ** (-(h + 1)) for h in range(8)]))
    with pytest.raises(TypeError, match="num_heads must be an int"):
        subquad.lightning_slopes(2.5)
    with pytest.raises(ValueError, match="num_heads must be >= 1"):
        subquad.lightning_slopes(-1)


def test_lightning_zero_value_dim_is_refused():
    """V = 0 (and K = 0) is the documented ValueError, not an empty output or a ZeroDivisionError."""
    q = randn(1, 8, 2, 16)
    for backend in ("reference", "triton"):
        with pytest.raises(ValueError, match="head dims must be positive"):
            subquad.lightning_attention(q, q, q[..., :0], backend=backend)
        with pytest.raises(ValueError, match="head dims must be positive"):
            subquad.lightning_attention(q[..., :0], q[..., :0], q, backend=backend)


def test_lightning_infinite_decay_is_refused():
    """An infinite rate is refused like a NaN one (exp(-inf * 0) is NaN on the diagonal)."""
    q = randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="decay rates must be finite"):
        subquad.lightning_attention(q, q, q, decay=torch.tensor([0.1, float("inf")], device=DEVICE),
                                    backend="reference")


def test_lightning_negative_infinite_scale_is_refused():
    q = randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="scale must be finite"):
        subquad.lightning_attention(q, q, q, scale=float("-inf"), backend="reference")
