"""Host-overhead profile of the small routing cases and HiP decoding on a GPU:

    python bench/profile_host.py

Prints, per call, the wall time and the host time of issuing it (the GPU runs asynchronously):
when the two are close, the case is bound by Python and launch overhead, not by the kernels.
For routing, the host time is also cut into its parts, each timed alone without the profiler (whose
own overhead inflates small ops several times over): one torch op and one bare Triton launch on
this host, the routing ops, the forward and backward launchers called directly, and what autograd
adds, and the backward launcher run where autograd runs it (its CUDA device thread) against the
main thread. Then torch.profiler tables (GPU time per kernel, CPU time per op). The output of one run is
kept in bench/results/<gpu>/profile-*.log."""

import sys
import threading
import time

import torch

if not torch.cuda.is_available():
    sys.exit("bench/profile_host.py measures CUDA launches: it needs a GPU")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import subquad  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from subquad.kernels import routing as K  # noqa: E402
from subquad.reference import routing as R  # noqa: E402

ROUTING_CASES = {"s3": (64, 14, 8, 7, 16), "s1": (64, 56, 2, 7, 1)}  # B, side, heads, regions per dim, topk


def report(name, fn, n=30):
    """Wall and host ms per call of one loop: host = until the last call returned, wall = until the
    GPU finished it."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    print(f"{name} wall {wall / n * 1e3:.3f} ms, host {host / n * 1e3:.3f} ms")


@triton.jit
def _nop_kernel(X, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, f0, f1, N: tl.constexpr):
    """Does nothing (one store): its launch cost is Triton's dispatch with routing's argument count."""
    tl.store(X + tl.program_id(0), a0 + a13)


def launch_costs():
    """Host time of one small torch op and of one bare Triton launch with a tensor, 14 ints and 2
    floats (about the routing kernels' scalar arguments) on this machine."""
    x = torch.zeros(64, device="cuda")
    report("one torch op (x.add_(1))", lambda: x.add_(1), n=200)
    ints = list(range(3, 17))
    report("one Triton launch (17 args)", lambda: _nop_kernel[(1,)](x, *ints, 0.5, 0.25, N=4), n=200)


def routing_parts(q, k, v, do, S, topk):
    """Host time of each part of a routing fwd+bwd, called directly (no autograd unless said)."""
    B, n, _, H, D = q.shape
    g = R.region_geometry((n, n), (S, S))
    q3, k3, v3 = (x.detach().reshape(B, n * n, H, D) for x in (q, k, v))
    scale = D ** -0.5
    report("  part: route_regions (2 launches)", lambda: K.route_regions(q3, k3, g, topk))
    report("  (the reference's routing: 7 torch ops)", lambda: R.route(q3, k3, g, topk))
    idx = K.route_regions(q3, k3, g, topk)
    o, lse = K.route_fwd(q3, k3, v3, idx, g, scale)
    report("  part: route_fwd launcher (o, lse buffers + 1 launch)", lambda: K.route_fwd(q3, k3, v3, idx, g, scale))
    report("  part: inverse_routing (1 launch)", lambda: K.inverse_routing(idx, g.R))
    do3 = do.reshape(o.shape)
    report("  part: route_bwd launcher (buffers + 3 launches)",
           lambda: K.route_bwd(q3, k3, v3, o, lse, do3, idx, g, scale))
    with torch.no_grad():
        report("  whole forward, no autograd", lambda: subquad.bilevel_routing_attention(q, k, v, num_regions=S,
                                                                                        topk=topk))


class _Probe(torch.autograd.Function):
    """An identity op whose backward runs ``ctx.work()`` and adds its host time to ``ctx.log``: what
    a call costs on autograd's CUDA device thread, where every backward runs."""

    @staticmethod
    def forward(ctx, x, work, log):
        ctx.work, ctx.log = work, log
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        t0 = time.perf_counter()
        ctx.work()
        ctx.log.append(time.perf_counter() - t0)
        return g, None, None


def backward_thread(q, k, v, do, S, topk, n=30):
    """Where the backward's host time goes: the fwd+bwd host time minus the forward's is several
    times the backward launcher's own when called directly (H200 at 3a01d05: ~0.84 vs 0.16-0.22
    ms). Times the launcher on the main thread, on a Python worker thread, and inside a backward
    (autograd's device thread), and a backward that does nothing (the engine's own cost)."""
    B, side, _, H, D = q.shape
    g = R.region_geometry((side, side), (S, S))
    q3, k3, v3 = (x.detach() for x in (q, k, v))
    scale = D ** -0.5
    idx = K.route_regions(q3, k3, g, topk)
    o, lse = K.route_fwd(q3, k3, v3, idx, g, scale)
    work = lambda: K.route_bwd(q3, k3, v3, o, lse, do.detach(), idx, g, scale)  # noqa: E731
    x = torch.zeros(8, device=q.device, requires_grad=True)
    g1 = torch.ones(8, device=q.device)
    for name, fn in (("nothing", lambda: None), ("route_bwd", work)):
        log = []
        report(f"  autograd backward running {name}: fwd+bwd of an identity op",
               lambda: _Probe.apply(x, fn, log).backward(g1), n=n)
        print(f"    of which {name} itself on the device thread {sum(log[-n:]) / n * 1e3:.3f} ms")
    report("  route_bwd on the main thread", work, n=n)
    out = {}

    def worker():
        work()
        t0 = time.perf_counter()
        for _ in range(n):
            work()
        out["t"] = (time.perf_counter() - t0) / n

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    torch.cuda.synchronize()
    print(f"  route_bwd on a Python worker thread host {out['t'] * 1e3:.3f} ms")


def tables(fn, rows=18):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    for key in ("cuda_time_total", "cpu_time_total"):
        print(p.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def main():
    launch_costs()
    for name, (B, n, H, S, topk) in ROUTING_CASES.items():
        q, k, v, do = (torch.randn(B, n, n, H, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(4))

        def fwd():
            return subquad.bilevel_routing_attention(q, k, v, num_regions=S, topk=topk)

        def fwd_bwd():
            for x in (q, k, v):
                x.grad = None
            fwd().backward(do)

        report(f"{name} fwd", fwd)
        report(f"{name} fwd+bwd", fwd_bwd)
        routing_parts(q, k, v, do, S, topk)
        backward_thread(q, k, v, do, S, topk)
        tables(fwd_bwd)

    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, 131072, 8, 128, device="cuda", dtype=torch.bfloat16)
    mask = subquad.hip_mask(q, kv)
    step = lambda: subquad.hip_attention(q, kv, kv, mask=mask)  # noqa: E731
    report("hip decode Tk=128k", step)
    tables(step, rows=15)


if __name__ == "__main__":
    main()
