"""Host-overhead profile of the small routing cases and HiP decoding on a GPU:

    python bench/profile_host.py

Prints, per call, the wall time and the host time of issuing it (the GPU runs asynchronously):
when the two are close, the case is bound by Python and launch overhead, not by the kernels.
Then torch.profiler tables (GPU time per kernel, CPU time per op). The output of one run is kept
in bench/results/<gpu>/profile-*.log."""

import sys
import time

import torch

if not torch.cuda.is_available():
    sys.exit("bench/profile_host.py measures CUDA launches: it needs a GPU")

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


def tables(fn, rows=18):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    for key in ("cuda_time_total", "cpu_time_total"):
        print(p.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60))


def main():
    for name, (B, n, H, S, topk) in ROUTING_CASES.items():
        q, k, v, do = (torch.randn(B, n, n, H, 32, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(4))
        g = R.region_geometry((n, n), (S, S))
        q3 = q.detach().reshape(B, n * n, H, 32)

        def fwd():
            return subquad.bilevel_routing_attention(q, k, v, num_regions=S, topk=topk)

        def fwd_bwd():
            for x in (q, k, v):
                x.grad = None
            fwd().backward(do)

        report(f"{name} route", lambda: R.route(q3, q3, g, topk))
        report(f"{name} fwd", fwd)
        report(f"{name} fwd+bwd", fwd_bwd)
        idx = R.route(q3, q3, g, topk).to(torch.int32)[:, None].contiguous()
        report(f"{name} inverse_routing", lambda: K.inverse_routing(idx, g.R))
        tables(fwd_bwd)

    q = torch.randn(1, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
    kv = torch.randn(1, 131072, 8, 128, device="cuda", dtype=torch.bfloat16)
    mask = subquad.hip_mask(q, kv)
    step = lambda: subquad.hip_attention(q, kv, kv, mask=mask)  # noqa: E731
    report("hip decode Tk=128k", step)
    tables(step, rows=15)


if __name__ == "__main__":
    main()
