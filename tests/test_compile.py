"""torch.compile: every Triton path (lightning, neighborhood, routing with computed or supplied
routing, HiP) traces to one graph with no graph break, its kernels as opaque custom ops
(``subquad::*``), and computes what eager computes, forward and gradients. The custom ops pass
torch's own registration checks (``opcheck``)."""

import pytest
import torch

import subquad
from helpers import DEVICE, randn
from subquad.kernels import hip as hip_kernels  # noqa: F401  (registers the ops checked below)
from subquad.kernels import routing as routing_kernels  # noqa: F401
from subquad.reference import routing as routing_ref

OPS = {
    "routing 2-D padded, shared": (
        lambda q, k, v: subquad.bilevel_routing_attention(q, k, v, num_regions=(3, 2), topk=2, backend="triton"),
        (2, 9, 7, 2, 16), None),
    "routing 1-D, per head": (
        lambda q, k, v: subquad.bilevel_routing_attention(q, k, v, num_regions=5, topk=3, routing="per_head",
                                                          backend="triton"),
        (1, 23, 3, 16), None),
    "routing 1-D, supplied": (
        lambda q, k, v: subquad.bilevel_routing_attention(q, k, v, num_regions=3, topk=2, backend="triton",
                                                          routing=torch.tensor([[[2, 0], [1, 2], [0, 1]]],
                                                                               device=DEVICE)),
        (1, 14, 2, 16), None),
    "neighborhood 2-D, stride, causal dim, GQA": (
        lambda q, k, v: subquad.na2d(q, k, v, (3, 5), stride=(1, 2), is_causal=(True, False), backend="triton"),
        (1, 9, 11, 4, 16), 2),
    "neighborhood 1-D, dilation": (
        lambda q, k, v: subquad.na1d(q, k, v, 5, dilation=3, backend="triton"), (2, 29, 2, 16), None),
    "lightning, decay, initial state, final state": (
        lambda q, k, v: subquad.lightning_attention(q, k, v, torch.tensor([0.1, 0.5], device=DEVICE),
                                                    initial_state=q[:, :16].transpose(1, 2).float(),
                                                    output_final_state=True, backend="triton")[1],
        (1, 40, 2, 16), None),
    "lightning, packed sequences": (
        lambda q, k, v: subquad.lightning_attention(q, k, v, cu_seqlens=torch.tensor([0, 17, 40], device=DEVICE),
                                                    backend="triton")[0],
        (1, 40, 2, 16), None),
    "hip": (
        lambda q, k, v: subquad.hip_attention(q, k, v, topk=4, block_size_q=8, window=6, sink_tokens=2,
                                              backend="triton"),
        (1, 40, 2, 16), None),
}


@pytest.mark.parametrize("name", list(OPS))
def test_compiled_equals_eager(name):
    """``torch.compile(fullgraph=True)`` (a graph break would raise) gives eager's output and
    gradients bit for bit: the same kernels run on the same inputs."""
    fn, shape, hkv = OPS[name]
    kv_shape = shape if hkv is None else shape[:-2] + (hkv, shape[-1])
    xs = [randn(*s, seed=i) for i, s in enumerate((shape, kv_shape, kv_shape))]
    eager = [x.clone().requires_grad_() for x in xs]
    comp = [x.clone().requires_grad_() for x in xs]
    o = fn(*eager)
    do = randn(*o.shape, seed=9)
    o.backward(do)
    o_c = torch.compile(fn, backend="aot_eager", fullgraph=True)(*comp)
    o_c.backward(do)
    assert torch.equal(o_c, o), (o_c - o).abs().max()
    for x, y, g in zip(comp, eager, "qkv"):
        assert torch.equal(x.grad, y.grad), f"d{g}: {(x.grad - y.grad).abs().max()}"


def test_compiled_hip_decoding_reuses_a_mask():
    """HiP decoding with a reused ``HipMask`` (and ``return_mask``) compiles to one graph too."""
    q, kv = randn(1, 1, 2, 16, seed=1), randn(1, 64, 2, 16, seed=2)
    mask = subquad.hip_mask(q, kv, topk=8, block_size_q=1, backend="triton")

    def step(q, kv):
        return subquad.hip_attention(q, kv, kv, topk=8, block_size_q=1, mask=mask, backend="triton")

    o = step(q, kv)
    assert torch.equal(torch.compile(step, backend="aot_eager", fullgraph=True)(q, kv), o)
    o2, m2 = torch.compile(lambda q, kv: subquad.hip_attention(q, kv, kv, topk=8, block_size_q=1, return_mask=True,
                                                               backend="triton"),
                           backend="aot_eager", fullgraph=True)(q, kv)
    assert torch.equal(o2, o) and torch.equal(m2.blocks, mask.blocks)


def test_compiled_lightning_checks_decay_values():
    """The traced code cannot read decay's values: the compiled op checks them when it runs."""
    q = randn(1, 8, 2, 16)
    fn = torch.compile(lambda q, d: subquad.lightning_attention(q, q, q, d, backend="triton")[0],
                       backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match="decay rates must be finite and >= 0"):
        fn(q, torch.tensor([-1.0, 0.0], device=DEVICE))


def test_compiled_routing_checks_supplied_values():
    """A supplied routing's values cannot be read by traced code: the compiled call checks them
    when it runs, with eager's error (before, the check's host read broke the graph)."""
    q = randn(1, 12, 2, 16)
    fn = torch.compile(lambda q, r: subquad.bilevel_routing_attention(q, q, q, num_regions=3, topk=2, routing=r,
                                                                      backend="triton"),
                       backend="aot_eager", fullgraph=True)
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        fn(q, torch.tensor([[[0, 1], [1, 3], [2, 0]]], device=DEVICE))
    with pytest.raises(ValueError, match="twice"):
        fn(q, torch.tensor([[[0, 1], [1, 1], [2, 0]]], device=DEVICE))


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations, autograd registration and AOT dispatch of the ops that
    torch.compile sees, checked by ``torch.library.opcheck`` on small routing / HiP / lightning
    inputs."""
    q, k, v = (randn(1, 6, 5, 2, 16, seed=s) for s in (1, 2, 3))
    g = routing_ref.region_geometry((6, 5), (2, 2))
    idx = torch.ops.subquad.route_regions(q, k, list(g), 2, False)
    assert idx.shape == (1, 1, 4, 2) and idx.dtype == torch.int32
    torch.library.opcheck(torch.ops.subquad.route_regions.default, (q, k, list(g), 2, False))
    torch.library.opcheck(torch.ops.subquad.check_routing.default, (idx[:, 0].long(), 4))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    torch.library.opcheck(torch.ops.subquad.block_sparse_fwd.default,
                          ("routing", qg, kg, vg, [idx], list(g), 0.25))
    qh, kh = randn(1, 40, 2, 16, seed=4), randn(1, 40, 2, 16, seed=5)
    torch.library.opcheck(torch.ops.subquad.hip_select_blocks.default, (qh, kh, 4, 8, 2, 2, 2, 6))
    ql, kl, vl = (randn(1, 20, 2, 16, seed=s, requires_grad=True) for s in (6, 7, 8))
    s0 = randn(1, 2, 16, 16, seed=9, requires_grad=True)
    torch.library.opcheck(torch.ops.subquad.lightning_fwd.default,
                          (ql, kl, vl, torch.tensor([0.1, 0.5], device=DEVICE), s0, None, 0.25, True))


@pytest.mark.gpu
def test_reduce_overhead_replays_routing():
    """On a GPU, inductor with CUDA graphs (mode="reduce-overhead"): BiFormer's small stages are
    bound by eager host time, which a graph replay removes. Same output as eager after replays."""
    fn = OPS["routing 2-D padded, shared"][0]
    q, k, v = (randn(4, 14, 14, 8, 32, seed=s, dtype=torch.bfloat16) for s in (1, 2, 3))
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # warm-up, record, replay
        o_c = compiled(q, k, v).clone()
    assert torch.equal(o_c, fn(q, k, v))
    assert DEVICE == "cuda"
