"""Shared test machinery: device, dtypes, the tolerance rule, random inputs."""

from __future__ import annotations

import torch

from conftest import HAS_CUDA

import subquad  # noqa: E402  (after conftest: the interpreter is chosen before any kernel import)

DEVICE = "cuda" if HAS_CUDA else "cpu"
# bf16 tl.dot is garbage under the interpreter: bf16 runs on a GPU only.
KERNEL_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])

# Absolute slack of the rule, relative to the reference's magnitude: covers the reference's own
# error being ~0 on trivially exact elements.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_close(name: str, out: torch.Tensor, ref64: torch.Tensor, ref_lowp: torch.Tensor, factor: float = 2.0,
                 dtype: torch.dtype = None):
    """The flash-attention rule: the kernel's max error against the float64 reference is at most
    ``factor`` times the error of the same reference computed in the kernel's dtype, plus a small
    atol scaled by the reference's magnitude. NaN (e.g. an unwritten poisoned element) fails.

    ``dtype`` is the dtype the computation ran in (default: out's). It sets the atol: an fp32
    result of an fp16 computation (a state or its gradient) carries fp16 rounding."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    out64 = out.detach().double().cpu()
    ref64 = ref64.detach().double().cpu()
    assert torch.isfinite(out64).all(), f"{name}: {int((~torch.isfinite(out64)).sum())} non-finite elements"
    err = (out64 - ref64).abs().max().item() if out64.numel() else 0.0
    ref_err = (ref_lowp.detach().double().cpu() - ref64).abs().max().item() if out64.numel() else 0.0
    mag = max(1.0, ref64.abs().max().item()) if out64.numel() else 1.0
    bound = factor * ref_err + ATOL[dtype or out.dtype] * mag
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (reference in {out.dtype}: {ref_err:.3e})"


def randn(*shape, dtype=torch.float32, scale=1.0, requires_grad=False, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)
    return x.requires_grad_(requires_grad)


def replay_in_cuda_graph(fn):
    """(eager output, output of a replay): ``fn()`` (a tensor or a tuple of tensors) run once eagerly
    on a side stream (compiles and tunes), then captured in a CUDA graph; the captured outputs are
    poisoned with NaN before the replay, so the replay must rewrite them. Serving engines run
    decoding steps this way, training loops captured whole run forward and backward this way."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        eager = fn()
        eager = tuple(x.clone() for x in eager) if isinstance(eager, tuple) else eager.clone()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    for x in out if isinstance(out, tuple) else (out,):
        x.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    return eager, out


# config keys the launchers never pass to a kernel (they only steer the tuners' valid filters)
_MARKERS = ("DMIN", "F32")


def distinct_configs(configs):
    """The configs a per-config test runs: all of them on a GPU, where warps and stages change the
    compiled code; under the interpreter, which ignores those (and the tuners' markers), one per
    distinct set of compile-time sizes, so a CPU run does not repeat identical work."""
    configs = list(configs)
    if HAS_CUDA:
        return configs
    seen = {}
    for c in configs:
        seen.setdefault(tuple(sorted((k, v) for k, v in c.kw.items() if k not in _MARKERS)), c)
    return list(seen.values())


# one small call per family, for cross-family tests: (q, k, v [1, 18, H, 16], backend) -> o
FAMILIES = {
    "neighborhood": lambda q, k, v, backend: subquad.neighborhood_attention(q, k, v, 3, stride=2, backend=backend),
    "routing": lambda q, k, v, backend: subquad.bilevel_routing_attention(q, k, v, num_regions=3, topk=2,
                                                                          backend=backend),
    "lightning": lambda q, k, v, backend: subquad.lightning_attention(q, k, v, backend=backend)[0],
    "hip": lambda q, k, v, backend: subquad.hip_attention(q, k, v, block_size_q=16, block_size_k=2, topk=8,
                                                          sink_tokens=2, window=4, backend=backend),
}
