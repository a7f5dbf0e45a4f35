"""Mixed precision: under torch.autocast every op casts its fp32/fp16/bf16 inputs to the autocast
dtype, as autocast does for SDPA (q and k in fp32 after RoPE with v in bf16 from a Linear layer is
the common case), and gradients flow back in each input's own dtype. Outside autocast, mixed
dtypes are an error (tests of bad input)."""

from __future__ import annotations

import pytest
import torch

from helpers import FAMILIES, randn


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_autocast_casts_inputs(family, backend):
    # bf16 tl.dot is garbage under the interpreter: the Triton kernels run in fp16 there
    dt = torch.bfloat16 if backend == "reference" or torch.cuda.is_available() else torch.float16
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    q, k = (randn(1, 18, 2, 16, seed=s, requires_grad=True) for s in (0, 1))
    v = randn(1, 18, 2, 16, seed=2, dtype=dt, requires_grad=True)
    with torch.autocast(dev, dtype=dt):
        o = FAMILIES[family](q, k, v, backend)
    assert o.dtype == dt
    want = FAMILIES[family](q.detach().to(dt), k.detach().to(dt), v.detach(), backend)
    torch.testing.assert_close(o, want, rtol=0, atol=0)
    o.float().sum().backward()
    assert q.grad.dtype == torch.float32 and k.grad.dtype == torch.float32 and v.grad.dtype == dt
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_autocast_casts_only_named_float_tensors():
    from subquad._checks import autocast_op

    @autocast_op("a", "b")
    def op(a, b, c, d=None):
        return a.dtype, b.dtype, c.dtype, d.dtype, torch.is_autocast_enabled("cpu")

    x32, x64 = torch.ones(2), torch.ones(2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert op(x32, x64, x32, d=x32) == (torch.bfloat16, torch.float64, torch.float32, torch.float32, False)
        assert op(a=x32, b=x32, c=x32, d=x32)[:2] == (torch.bfloat16, torch.bfloat16)
    assert op(x32, x32, x32, d=x32) == (torch.float32,) * 4 + (False,)
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        assert op(x32, x32, x32, d=x32)[0] == torch.float32  # CPU tensors: CPU autocast is off
