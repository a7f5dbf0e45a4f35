"""What every public op does around its family's code (``subquad._checks.public_op``): under
torch.autocast it casts its fp32/fp16/bf16 inputs to the autocast dtype, as autocast does for SDPA
(q and k in fp32 after RoPE with v in bf16 from a Linear layer is the common case), gradients
flowing back in each input's own dtype (outside autocast, mixed dtypes are an error: tests of bad
input); on CUDA it runs with its tensors' device current (Triton launches on the current one); an
empty batch gives an empty output that backward passes through, as torch's own ops do."""

from __future__ import annotations

import pytest
import torch

import subquad
from helpers import FAMILIES, assert_close, randn


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


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_empty_batch(family, backend):
    """B = 0 (the tail of a split batch, an empty bucket of a sampler): an empty output in the
    autograd graph, empty gradients, no launch failing on an empty grid."""
    q, k, v = (randn(0, 18, 2, 16, seed=s, requires_grad=True) for s in (0, 1, 2))
    o = FAMILIES[family](q, k, v, backend)
    assert o.shape == (0, 18, 2, 16) and o.dtype == q.dtype and o.requires_grad
    o.sum().backward()
    assert all(x.grad is not None and x.grad.shape == x.shape for x in (q, k, v))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_outputs_are_contiguous(family, backend):
    """Both backends return a contiguous o, so that model code's head merge ``o.view(B, T, H * D)``
    runs on CPU (auto: the reference) as it does on CUDA (auto: Triton)."""
    q, k, v = (randn(2, 18, 3, 16, seed=s) for s in (0, 1, 2))
    o = FAMILIES[family](q, k, v, backend)
    assert o.is_contiguous()
    o.view(2, 18, 48)
    if family == "routing":
        _, idx = subquad.bilevel_routing_attention(q, k, v, num_regions=3, topk=2, backend=backend,
                                                   return_routing=True)
        assert idx.is_contiguous()


def _fwd_bwd(family, do, backend="triton"):
    leaves = [randn(1, 40, 2, 16, seed=s, requires_grad=True) for s in range(3)]
    o = FAMILIES[family](*leaves, backend)
    return (o.detach(), *torch.autograd.grad(o, leaves, do))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_non_contiguous_grad_output(family):
    """A transposed (or expanded) grad_output gives the gradients of its contiguous copy, bit for
    bit: the backward kernels index dO as if contiguous."""
    do = randn(1, 2, 40, 16, seed=3).transpose(1, 2)
    assert not do.is_contiguous()
    for a, b in zip(_fwd_bwd(family, do), _fwd_bwd(family, do.contiguous())):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tuning_launches_change_nothing(family, monkeypatch):
    """On a GPU a bucket's first call launches every kernel once per candidate config, and
    do_bench repeats each launch: a launcher that accumulates into a buffer must start it afresh
    on every launch (a CPU run never tunes). Simulated: each tuner benches its default, twice over,
    before the call goes on with it; outputs and gradients stay the same, bit for bit."""
    from subquad.autotune import spaces
    from subquad.kernels import hip, lightning, neighborhood, routing

    do = randn(1, 40, 2, 16, seed=3)
    want = _fwd_bwd(family, do)
    for module in (hip, lightning, neighborhood, routing):
        monkeypatch.setattr(module, "bench_launch", lambda launch: (launch(), launch(), 1.0)[-1])
    benched = set()
    for tuner in spaces.ALL:
        def choose(bucket, device, bench, t=tuner):
            benched.add(t.kernel)
            bench(t.default(bucket))
            return t.default(bucket)
        monkeypatch.setattr(tuner, "choose", choose)
    for a, b in zip(_fwd_bwd(family, do), want):
        assert torch.equal(a, b)
    if family == "hip":  # the selection at T = 40 leaves work for the gathered dK/dV kernel
        assert {"hip_bwd_dkdv_gather", "hip_bwd_dkdv_local"} <= benched


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_inference_mode(backend):
    """Serving runs under torch.inference_mode, whose tensors have no version counter: the caches
    of checked values (lightning's decay, a reused HiP mask) must not read one. Same outputs as
    outside it."""
    q, k, v = (randn(1, 18, 2, 16, seed=s) for s in (0, 1, 2))
    decay = torch.tensor([0.1, 0.3], device=q.device)
    hip_kw = dict(block_size_q=16, block_size_k=2, topk=8, sink_tokens=2, window=4, backend=backend)
    want = [fn(q, k, v, backend) for fn in FAMILIES.values()]
    want.append(subquad.lightning_attention(q, k, v, decay, backend=backend)[0])
    with torch.inference_mode():
        qi, ki, vi, di = (x.clone() for x in (q, k, v, decay))
        got = [fn(qi, ki, vi, backend) for fn in FAMILIES.values()]
        for _ in range(2):  # the second call meets the cache
            o, _ = subquad.lightning_attention(qi, ki, vi, di, backend=backend)
        got.append(o)
        o, mask = subquad.hip_attention(qi, ki, vi, return_mask=True, **hip_kw)
        for _ in range(2):
            torch.testing.assert_close(subquad.hip_attention(qi, ki, vi, mask=mask, **hip_kw), o, rtol=0, atol=0)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_empty_sequence_in_graph():
    """lightning at T = 0 (its only empty-length case: the other families need T >= a window or
    region count): the empty output is in the graph too."""
    q, k, v = (randn(2, 0, 2, 16, seed=s, requires_grad=True) for s in (0, 1, 2))
    for backend in ("reference", "triton"):
        o, _ = subquad.lightning_attention(q, k, v, backend=backend)
        o.sum().backward()
        assert all(x.grad.shape == x.shape for x in (q, k, v))


def test_autocast_casts_only_named_float_tensors():
    from subquad._checks import public_op

    @public_op("a", "b")
    def op(a, b, c, d=None):
        return a.dtype, b.dtype, c.dtype, d.dtype, torch.is_autocast_enabled("cpu")

    x32, x64 = torch.ones(2), torch.ones(2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert op(x32, x64, x32, d=x32) == (torch.bfloat16, torch.float64, torch.float32, torch.float32, False)
        assert op(a=x32, b=x32, c=x32, d=x32)[:2] == (torch.bfloat16, torch.bfloat16)
    assert op(x32, x32, x32, d=x32) == (torch.float32,) * 4 + (False,)
    with torch.autocast("cuda", dtype=torch.float16, enabled=torch.cuda.is_available()):
        assert op(x32, x32, x32, d=x32)[0] == torch.float32  # CPU tensors: CPU autocast is off


class _OnCuda1(torch.Tensor):
    """A CPU tensor that reports living on cuda:1 (the guard's logic, testable without GPUs)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def test_ops_run_with_their_cuda_device_current(monkeypatch):
    """Triton launches on the current device: an op on cuda:1 tensors while cuda:0 is current (a
    model spread over GPUs in one process) must make cuda:1 current for the call, and only then."""
    from subquad._checks import public_op

    current, entered = [0], []

    class FakeDeviceContext:
        def __init__(self, dev):
            self.index = torch.device(dev).index

        def __enter__(self):
            entered.append(self.index)
            self.prev, current[0] = current[0], self.index

        def __exit__(self, *exc):
            current[0] = self.prev

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", FakeDeviceContext)

    @public_op("q")
    def op(q):
        return current[0]

    x = torch.ones(2).as_subclass(_OnCuda1)
    assert op(x) == 1 and entered == [1] and current[0] == 0
    current[0] = 1
    assert op(x) == 1 and entered == [1]  # already current: no switch
    assert op(torch.ones(2)) == 1 and entered == [1]  # CPU tensors: nothing to do


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_every_family_on_a_second_gpu():
    for family, fn in FAMILIES.items():
        q, k, v = (randn(1, 18, 2, 16, seed=s).to("cuda:1") for s in range(3))
        assert torch.cuda.current_device() == 0
        o = fn(q, k, v, "triton")
        want = fn(q.cpu(), k.cpu(), v.cpu(), "reference")
        torch.testing.assert_close(o.cpu(), want, rtol=1e-3, atol=1e-3, msg=family)


@pytest.fixture
def tf32_allowed():
    """torch.set_float32_matmul_precision("high") for one test, then torch's previous setting."""
    matmul = torch.backends.cuda.matmul
    before = (torch.get_float32_matmul_precision(), getattr(matmul, "fp32_precision", None))
    torch.set_float32_matmul_precision("high")
    yield
    torch.set_float32_matmul_precision(before[0])
    if before[1] is not None:
        matmul.fp32_precision = before[1]


def test_fp32_dot_precision_follows_torch(tf32_allowed):
    from subquad.kernels import common

    assert common.fp32_dot_precision() == "tf32" and common.dtype_key(torch.float32) == "tf32"
    assert common.dtype_key(torch.float16) == "float16"
    torch.set_float32_matmul_precision("highest")
    assert common.fp32_dot_precision() == "ieee" and common.dtype_key(torch.float32) == "float32"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9: the explicit setting wins
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert common.fp32_dot_precision() == "tf32"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fp32_under_tf32_setting(family, tf32_allowed, monkeypatch):
    """fp32 with TF32 allowed: the attention kernels are tuned and launched as "tf32" (selections
    stay IEEE), and agree with the fp32 definition by the flash rule against the reference run
    under the same setting (on a GPU its matmuls use TF32 too; on a CPU both are exact)."""
    from subquad.autotune import spaces
    from subquad.kernels import block_sparse

    seen = {}
    for tuner in spaces.LIGHTNING + spaces.NEIGHBORHOOD + spaces.ROUTING + spaces.HIP_ATTENTION + [spaces.HIP_SELECT]:
        def choose(bucket, device, bench, t=tuner):
            seen[t.kernel] = bucket[0]
            return t.default(bucket)
        monkeypatch.setattr(tuner, "choose", choose)
    q, k, v = (randn(1, 18, 2, 16, seed=s) for s in range(3))
    got = FAMILIES[family](q, k, v, "triton")
    low = FAMILIES[family](q, k, v, "reference")
    exact = FAMILIES[family](q.cpu(), k.cpu(), v.cpu(), "reference")  # CPU matmuls: IEEE fp32 whatever the setting
    assert_close("o", got, exact, low)
    attention = {kern: b for kern, b in seen.items() if kern != "hip_select"}
    assert attention and set(attention.values()) == {"tf32"}, seen
    if family == "hip":
        assert seen["hip_select"] == "float32"
        assert block_sparse.precision(torch.float32, follow_torch=False) == "ieee"


def test_numpy_scalar_scale():
    """A NumPy scalar scale (np.float32 is not a Python float) is taken as its value."""
    np = pytest.importorskip("numpy")
    q, k, v = (randn(1, 18, 2, 16, seed=s) for s in (0, 1, 2))
    want = subquad.neighborhood_attention(q, k, v, 3, scale=0.25)
    torch.testing.assert_close(subquad.neighborhood_attention(q, k, v, 3, scale=np.float32(0.25)), want, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("family", ["neighborhood", "routing", "hip"])
def test_fp16_gradient_headroom(family, backend):
    """fp16 gradients of the softmax families where dO . v (about 1e5 here) passes 65504 while what
    the gradient needs fits: the kernels scale dS = P (dP - delta) before rounding it to a 16-bit
    dot operand, and the references round P without rounding its gradient
    (``reference.common.rounded``). Before, both gave inf / NaN. (Lightning has no P <= 1 to shrink
    dO . v: its own test_fp16_headroom stays within scale dO . v < 65504.)"""
    g = torch.Generator().manual_seed(5)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(1, 18, 2, 16, generator=g)  # noqa: E731
    q, k = u(-0.1, 0.1), u(-0.1, 0.1)
    v, do = u(-2e4, 2e4), u(3.0, 5.0)  # the sign mix of v keeps o and dv small, dO . v is not
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    half = [x.half().to(dev).requires_grad_() for x in (q, k, v)]
    o = FAMILIES[family](*half, backend)
    grads = torch.autograd.grad(o, half, do.half().to(dev))
    exact = [x.detach().float().requires_grad_() for x in half]  # fp32 reference on the same values
    o32 = FAMILIES[family](*exact, "reference")
    g32 = torch.autograd.grad(o32, exact, do.to(dev))
    for name, a, b in zip(("o", "dq", "dk", "dv"), (o, *grads), (o32, *g32)):
        a, b = a.detach().double().cpu(), b.detach().double().cpu()
        assert torch.isfinite(a).all(), f"{name}: {int((~torch.isfinite(a)).sum())} non-finite"
        err, mag = (a - b).abs().max().item(), b.abs().max().item()
        assert err <= 1e-2 * mag, f"{name}: max error {err:.3e} vs max {mag:.3e}"


@pytest.mark.parametrize("family", ["hip", "neighborhood", "routing"])
def test_gradient_when_only_v_requires_grad(family):
    """Frozen q and k (only v trainable): the op must still build its autograd node, and dV must be
    the dV of the call where every input requires grad."""
    from helpers import FAMILIES
    q, k, v = (randn(1, 18, 2, 16, seed=s) for s in (0, 1, 2))
    do = randn(1, 18, 2, 16, seed=3)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    (dv_all,) = torch.autograd.grad(FAMILIES[family](*leaves, "triton"), leaves[2:], do)
    v1 = v.clone().requires_grad_()
    o = FAMILIES[family](q, k, v1, "triton")
    assert o.requires_grad
    (dv,) = torch.autograd.grad(o, v1, do)
    torch.testing.assert_close(dv, dv_all, rtol=0, atol=0)
