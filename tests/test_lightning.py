"""Lightning attention: reference vs the naive definition, kernel vs reference (forward and every
gradient), decoding, varlen."""

from __future__ import annotations

import pytest
import torch

import subquad
from subquad.reference.lightning import lightning_attention as ref_chunked
from subquad.reference.lightning import lightning_attention_naive

from helpers import DEVICE, KERNEL_DTYPES, assert_close, distinct_configs, randn, replay_in_cuda_graph

DT_ID = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _inputs(B, T, H, K, V, dtype, decay, state, N=None, seed=0):
    q = randn(B, T, H, K, dtype=dtype, seed=seed, requires_grad=True)
    k = randn(B, T, H, K, dtype=dtype, seed=seed + 1, requires_grad=True)
    v = randn(B, T, H, V, dtype=dtype, seed=seed + 2, requires_grad=True)
    d = None
    if decay:  # strong and weak decays across heads, including rates whose lambda^64 underflows
        d = (subquad.lightning_slopes(H) * torch.linspace(0.5, 8.0, H)).to(DEVICE)
    s0 = randn(N or B, H, K, V, seed=seed + 3, requires_grad=True) if state else None
    return q, k, v, d, s0


def _run(fn, q, k, v, d, s0, cu, do, dS):
    """Forward + backward of ``fn`` on fresh leaves; returns (o, final, grads of q, k, v, s0)."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    s0l = None if s0 is None else s0.detach().clone().requires_grad_()
    o, f = fn(*leaves, d, s0l, cu)
    loss = (o.double() * do.double()).sum()
    if dS is not None:
        loss = loss + (f.double() * dS.double()).sum()
    grads = torch.autograd.grad(loss, leaves + ([s0l] if s0l is not None else []))
    return o, f, grads


def _check(q, k, v, d, s0, cu=None, final=True, backend="triton"):
    kern = lambda q_, k_, v_, d_, s_, cu_: subquad.lightning_attention(  # noqa: E731
        q_, k_, v_, d_, initial_state=s_, output_final_state=final, cu_seqlens=cu_, backend=backend)
    lowp = lambda q_, k_, v_, d_, s_, cu_: subquad.lightning_attention(  # noqa: E731
        q_, k_, v_, d_, initial_state=s_, output_final_state=final, cu_seqlens=cu_, backend="reference")
    naive = lambda q_, k_, v_, d_, s_, cu_: lightning_attention_naive(q_, k_, v_, d_, None, s_, cu_)  # noqa: E731
    o, f = kern(q, k, v, d, s0, cu)
    do = torch.randn_like(o, dtype=torch.float32)
    dS = torch.randn_like(f) if final else None
    runs = [_run(fn, q, k, v, d, s0, cu, do, dS) for fn in (kern, lowp)]
    o64, f64, g64 = _run(naive, *(x if x is None else x for x in (q, k, v)), d, s0, cu, do, dS)
    (ok, fk, gk), (ol, fl, gl) = runs
    assert_close("o", ok, o64, ol)  # o is in the compute dtype
    assert ok.dtype == v.dtype
    if final:
        assert fk.dtype == torch.float32
        assert_close("final_state", fk, f64, fl, dtype=q.dtype)
    else:
        assert fk is None
    for name, a, b, c in zip(["dq", "dk", "dv", "d_initial_state"], gk, g64, gl):
        assert_close(name, a, b, c, dtype=q.dtype)


# (B, T, H, K, V): odd lengths, partial chunks, non-power-of-two head dims, T=1 and T <= 16
# (token-recurrent forward) and T > 64 (several chunks).
SHAPES = [
    (1, 1, 2, 16, 16),
    (2, 7, 3, 16, 24),
    (1, 16, 1, 32, 16),
    (2, 17, 2, 16, 32),
    (1, 77, 2, 24, 40),
    (1, 131, 1, 16, 16),
]


def _sid(s):
    return "B{}-T{}-H{}-K{}-V{}".format(*s)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("shape", SHAPES, ids=_sid)
@pytest.mark.parametrize("decay,state", [(True, True), (False, False), (True, False), (False, True)],
                         ids=["decay-state", "plain", "decay", "state"])
def test_kernel_matches_reference(shape, dtype, decay, state):
    q, k, v, d, s0 = _inputs(*shape, dtype, decay, state)
    _check(q, k, v, d, s0)


def test_split_partials_with_a_batch():
    """K = 100, V = 72 split the forward and dK/dV over K blocks and dQ over V blocks, whose fp32
    partials ``[NK | NV, B, T, H, *]`` need the batch in their offsets: B = 2 (with B = 1 an offset
    that forgets the batch stride is the right one)."""
    _check(*_inputs(2, 40, 1, 100, 72, torch.float32, True, True))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_fp16_state_past_fp16_range(backend):
    """fp16 inputs whose state sum k v^T passes 65504 (~2.3e5) while o stays in range: the state
    must enter the products of later chunks in fp32, not rounded to fp16 (inf, then NaN)."""
    g = torch.Generator().manual_seed(0)
    T, K = 100, 16  # more than one chunk whatever the chunk size
    q = (1e-3 * torch.rand(1, T, 1, K, generator=g, dtype=torch.float64)).half().to(DEVICE)
    k, v = ((60 + torch.rand(1, T, 1, K, generator=g, dtype=torch.float64)).half().to(DEVICE) for _ in range(2))
    o, f = subquad.lightning_attention(q, k, v, backend=backend, output_final_state=True)
    o64, f64 = lightning_attention_naive(q, k, v)
    assert f64.abs().max() > 1e5
    ol, fl = subquad.lightning_attention(q, k, v, backend="reference", output_final_state=True)
    assert_close("o", o, o64, ol)
    assert_close("final_state", f, f64, fl, dtype=torch.float16)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: DT_ID[d])
def test_kernel_without_final_state(dtype):
    q, k, v, d, s0 = _inputs(2, 70, 2, 16, 16, dtype, True, True)
    _check(q, k, v, d, s0, final=False)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("lens", [[1, 16, 0, 73, 40], [5, 3, 1], [130]], ids=lambda l: "L" + "-".join(map(str, l)))
def test_kernel_varlen(lens, dtype):
    cu = torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32)
    T = int(cu[-1])
    q, k, v, d, s0 = _inputs(1, T, 2, 16, 32, dtype, True, True, N=len(lens))
    _check(q, k, v, d, s0, cu=cu.to(DEVICE))


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("case", ["forward", "backward"])
def test_fp16_headroom(case, backend):
    """fp16 products that overflow only unscaled: q.k (forward) or dO.v (backward) past 65504 while
    scale times it fits. The intra-chunk products must be scaled before they are rounded to fp16
    (the kernel's dot operand, the reference's mirror of it) and the reference's gradients must not
    pass through fp16: before, the kernel gave inf / NaN here, and the reference too."""
    T, K = 40, 16  # T > 16: the chunked forward, as training takes
    g = torch.Generator().manual_seed(3)
    noise = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if case == "forward":  # q.k = 80 * 80 * 16 = 102400 unscaled, 25600 scaled
        q = k = 80 + noise(1, T, 1, K)
        v, do = 1e-3 * (noise(1, T, 1, K) - 0.5), 1e-2 * (noise(1, T, 1, K) - 0.5)  # dv too stays in fp16
    else:  # dO.v = 30 * 300 * 16 = 144000 unscaled
        q, k = (1e-2 * (noise(1, T, 1, K) - 0.5) for _ in range(2))
        v, do = 300 + noise(1, T, 1, K), 30 + noise(1, T, 1, K)
    leaves = [x.to(torch.float16).to(DEVICE).requires_grad_() for x in (q, k, v)]
    o, _ = subquad.lightning_attention(*leaves, backend=backend)
    grads = torch.autograd.grad(o.float(), leaves, do.float().to(DEVICE))
    exact = [x.detach().double().requires_grad_() for x in leaves]
    o64, _ = lightning_attention_naive(*exact)
    g64 = torch.autograd.grad(o64, exact, do.to(DEVICE))
    for name, a, b in zip(["o", "dq", "dk", "dv"], (o, *grads), (o64, *g64)):
        assert_close(name, a, b, b, dtype=torch.float16)


def test_varlen_equals_separate_calls():
    """Each packed sequence gets exactly what a separate call with its own state gives."""
    lens = [9, 70, 24]
    cu = torch.tensor([0, 9, 79, 103], dtype=torch.int64, device=DEVICE)
    q, k, v, d, s0 = _inputs(1, 103, 2, 16, 16, torch.float32, True, True, N=3)
    o, f = subquad.lightning_attention(q, k, v, d, initial_state=s0, output_final_state=True, cu_seqlens=cu,
                                       backend="triton")
    start = 0
    for n, L in enumerate(lens):
        sl = slice(start, start + L)
        o_n, f_n = subquad.lightning_attention(q[:, sl], k[:, sl], v[:, sl], d, initial_state=s0[n:n + 1],
                                               output_final_state=True, backend="triton")
        torch.testing.assert_close(o[:, sl], o_n, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(f[n:n + 1], f_n, rtol=1e-5, atol=1e-5)
        start += L


@pytest.mark.parametrize("dtype", KERNEL_DTYPES, ids=lambda d: DT_ID[d])
def test_decoding_step_continues_prefill(dtype):
    """Prefill, then decode one token at a time from the returned state (the T == 1 steps run the
    recurrent kernel): outputs and final state meet the tolerance rule against the float64
    definition over the whole sequence, with the reference in the same dtype as the yardstick."""
    q, k, v, d, _ = _inputs(2, 40, 2, 32, 32, dtype, True, False)
    o_pre, state = subquad.lightning_attention(q[:, :37], k[:, :37], v[:, :37], d, output_final_state=True,
                                               backend="triton")
    outs = [o_pre]
    for t in range(37, 40):
        o_t, state = subquad.lightning_attention(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], d,
                                                 initial_state=state, output_final_state=True, backend="triton")
        outs.append(o_t)
    o64, f64 = lightning_attention_naive(q, k, v, d)
    o_low, f_low = subquad.lightning_attention(q, k, v, d, output_final_state=True, backend="reference")
    assert_close("o", torch.cat(outs, 1), o64, o_low)
    assert_close("final_state", state, f64, f_low, dtype=dtype)


def test_empty_sequence():
    q, k, v, d, s0 = _inputs(2, 0, 2, 16, 24, torch.float32, True, True)
    for backend in ("triton", "reference"):
        o, f = subquad.lightning_attention(q, k, v, d, initial_state=s0, output_final_state=True, backend=backend)
        assert o.shape == (2, 0, 2, 24) and torch.equal(f, s0)
        assert f.data_ptr() != s0.data_ptr()  # a new tensor: updating it leaves the caller's state alone
        s1 = s0.clone().requires_grad_()
        _, f = subquad.lightning_attention(q, k, v, d, initial_state=s1, output_final_state=True, backend=backend)
        assert torch.equal(torch.autograd.grad(f.sum(), s1)[0], torch.ones_like(s1))
        o, f = subquad.lightning_attention(q, k, v, backend=backend, output_final_state=True)
        assert f.shape == (2, 2, 16, 24) and not f.any()


def test_scale_argument():
    q, k, v, d, _ = _inputs(1, 20, 1, 16, 16, torch.float32, True, False)
    o1, _ = subquad.lightning_attention(q, k, v, d, scale=1.0, backend="triton")
    o2, _ = subquad.lightning_attention(q, k, v, d, backend="triton")  # default scale 16 ** -0.5
    torch.testing.assert_close(o1 * 0.25, o2, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# reference vs the naive O(T^2) definition, float64


@pytest.mark.parametrize("T,chunk", [(1, 64), (63, 16), (64, 16), (100, 64), (257, 32)], ids=lambda x: str(x))
@pytest.mark.parametrize("decay", [None, "slopes", "huge"])
def test_reference_matches_naive(T, chunk, decay):
    B, H, K, V = 2, 3, 8, 12
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64) for D in (K, K, V))
    s0 = torch.randn(B, H, K, V, dtype=torch.float64)
    d = {None: None, "slopes": subquad.lightning_slopes(H), "huge": torch.tensor([0.0, 30.0, 800.0])}[decay]
    o, f = ref_chunked(q, k, v, d, 0.7, s0, True, chunk_size=chunk)
    o2, f2 = lightning_attention_naive(q, k, v, d, 0.7, s0)
    assert torch.isfinite(o).all() and torch.isfinite(f).all()
    torch.testing.assert_close(o, o2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(f, f2, rtol=1e-10, atol=1e-10)


def test_naive_matches_recurrence():
    """The naive formula against the literal recurrence S_t = lambda S_{t-1} + k_t v_t^T, o_t = scale q_t S_t."""
    B, T, H, K, V = 2, 19, 3, 5, 7
    q, k, v = (torch.randn(B, T, H, D, dtype=torch.float64) for D in (K, K, V))
    S = torch.randn(B, H, K, V, dtype=torch.float64)
    d = subquad.lightning_slopes(H).double()
    o, f = lightning_attention_naive(q, k, v, d, 0.3, S)
    lam = torch.exp(-d)[None, :, None, None]
    outs = []
    for t in range(T):
        S = lam * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(0.3 * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    torch.testing.assert_close(o, torch.stack(outs, 1))
    torch.testing.assert_close(f, S)


def test_public_op_matches_fla_convention():
    """The public op (default scale, decay, initial and final state) against flash-linear-attention's
    own pure-PyTorch recurrence for simple GLA with a per-head gate g = -decay (fla-core, when
    importable; CI installs it): the mapping bench/lightning.py uses to compare with FLA's kernels."""
    naive = pytest.importorskip("fla.ops.simple_gla.naive")
    B, T, H, K, V = 2, 29, 3, 16, 24
    q, k = (randn(B, T, H, K, seed=s) for s in (1, 2))
    v = randn(B, T, H, V, seed=3)
    s0 = randn(B, H, K, V, seed=4)
    decay = subquad.lightning_slopes(H) * 10
    o, final = subquad.lightning_attention(q.cpu(), k.cpu(), v.cpu(), decay, initial_state=s0.cpu(),
                                           output_final_state=True, backend="reference")
    g = (-decay).expand(B, T, H).contiguous()
    o2, final2 = naive.naive_recurrent_simple_gla(q.cpu(), k.cpu(), v.cpu(), g, initial_state=s0.cpu(),
                                                  output_final_state=True)
    torch.testing.assert_close(o, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final, final2, rtol=1e-5, atol=1e-5)


def test_reference_varlen_matches_naive():
    cu = torch.tensor([0, 3, 3, 70, 101])
    q, k, v = (torch.randn(1, 101, 2, D, dtype=torch.float64) for D in (8, 8, 4))
    s0 = torch.randn(4, 2, 8, 4, dtype=torch.float64)
    d = subquad.lightning_slopes(2)
    o, f = ref_chunked(q, k, v, d, None, s0, True, cu, chunk_size=16)
    o2, f2 = lightning_attention_naive(q, k, v, d, None, s0, cu)
    torch.testing.assert_close(o, o2)
    torch.testing.assert_close(f, f2)


def test_slopes():
    s = subquad.lightning_slopes(8)
    assert s.dtype == torch.float32 and s.shape == (8,)
    torch.testing.assert_close(s, torch.tensor([2.0 ** (-(i + 1)) for i in range(8)]))


def test_cpu_auto_backend_is_reference():
    q, k, v = (torch.randn(1, 9, 2, 16) for _ in range(3))
    o, _ = subquad.lightning_attention(q, k, v)
    o2, _ = ref_chunked(q, k, v)
    torch.testing.assert_close(o, o2)


# ------------------------------------------------------------------------------------------------
# GPU only: realistic sizes, bf16, no recompiles across sequence lengths


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=lambda d: DT_ID[d])
@pytest.mark.parametrize("shape", [(2, 1000, 4, 128, 128), (1, 2049, 2, 64, 96), (1, 777, 2, 256, 256)], ids=_sid)
def test_kernel_large(shape, dtype):
    q, k, v, d, s0 = _inputs(*shape, dtype, True, True)
    with torch.no_grad():
        q.mul_(0.3), k.mul_(0.3)
    _check(q, k, v, d, s0)


@pytest.mark.gpu
def test_no_recompile_across_lengths():
    from subquad.kernels import lightning as kl

    def n_compiled():
        return sum(len(c) for c in kl._fwd_kernel.device_caches.values()) if hasattr(kl._fwd_kernel, "device_caches") \
            else sum(len(c) for c in kl._fwd_kernel.cache.values())

    q, k, v, d, _ = _inputs(1, 300, 2, 64, 64, torch.bfloat16, True, False)
    subquad.lightning_attention(q, k, v, d)
    before = n_compiled()
    for T in (100, 257, 299, 64, 33):
        subquad.lightning_attention(q[:, :T], k[:, :T], v[:, :T], d)
    assert n_compiled() == before


# ------------------------------------------------------------------------------------------------
# every config of every space computes the same function (the default is tested above; the tuner
# may pick any other on a GPU)


def _all_configs():
    from subquad.autotune import spaces

    bucket = ("float32", 100, 72, True)
    return [(t, c) for t in (spaces.LIGHTNING_FWD, spaces.LIGHTNING_RECURRENT, spaces.LIGHTNING_BWD_DQ,
                             spaces.LIGHTNING_BWD_DKDV) for c in distinct_configs(t.candidates(bucket))]


@pytest.mark.parametrize("tuner,cfg", _all_configs(), ids=lambda x: getattr(x, "kernel", None) or x.name())
def test_every_config(tuner, cfg, monkeypatch):
    monkeypatch.setattr(tuner, "choose", lambda bucket, device, bench: cfg)
    T = 5 if tuner.kernel == "lightning_recurrent" else 70
    q, k, v, d, s0 = _inputs(1, T, 1, 100, 72, torch.float32, True, True)
    _check(q, k, v, d, s0)


@pytest.mark.gpu
def test_cuda_graph_capture():
    """Serving captures decoding steps in CUDA graphs: one token a sequence with a state in and out,
    and packed sequences, replay to the eager outputs bit for bit. Nothing in the op reads a device
    value inside the capture: the decay and cu_seqlens checks ran in the warm-up, and the packed
    sequences' longest length (5 here: the recurrent kernel; the bound T = 24 would pick the
    chunked one, whose rounding differs) is the one the warm-up read from the same tensor."""
    H, K = 2, 64
    d = subquad.lightning_slopes(H).to(DEVICE)
    q, k, v = (randn(4, 1, H, K, dtype=torch.bfloat16, seed=s) for s in (1, 2, 3))
    s0 = randn(4, H, K, K, seed=4)
    qp, kp, vp = (randn(1, 24, H, K, dtype=torch.bfloat16, seed=s) for s in (5, 6, 7))
    cu = torch.tensor([0, 5, 10, 15, 20, 24], dtype=torch.int32, device=DEVICE)
    with torch.no_grad():
        for fn in (lambda: subquad.lightning_attention(q, k, v, d, initial_state=s0, output_final_state=True),
                   lambda: subquad.lightning_attention(qp, kp, vp, d, cu_seqlens=cu, output_final_state=True)):
            eager, replayed = replay_in_cuda_graph(fn)
            for name, a, b in zip(("o", "final state"), eager, replayed):
                assert torch.equal(a, b), name
