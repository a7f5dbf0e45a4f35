"""Host work of routing's Triton path, on any machine (a CPU included):

    python bench/host_stub.py [case ...]      # default: the BiFormer-S stages of bench/routing.py

The kernels are replaced by launches that do nothing and the tensors live on the meta device, so
what is timed is the Python, autograd and allocation bookkeeping around the six launches of a
fwd+bwd (on a GPU host add the launches themselves: ``bench/profile_host.py``). Small routed
problems are bound by this host time, so it can be cut and counted without a GPU. Prints the best
of 7 rounds of 300 calls (ms per call) for the forward without autograd and for fwd+bwd."""

import os
import sys
import time

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bench.routing import case_by_name  # noqa: E402
from subquad.kernels import routing as K  # noqa: E402

KERNELS = ["_route_q_kernel", "_route_kv_kernel", "_inverse_kernel", "_pool_kernel", "_select_kernel"]


class _NoLaunch:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kw)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kw: None


def best_ms(fn, rounds=7, calls=300) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e3)
    return best


def main(names) -> None:
    saved = {name: getattr(K, name) for name in KERNELS}
    try:
        for name in KERNELS:
            setattr(K, name, _NoLaunch())
        for cn in names:
            c = case_by_name(cn)
            q, k, v = (torch.empty(c["B"], *c["shape"], c["H"], c["D"], dtype=torch.bfloat16, device="meta",
                                   requires_grad=True) for _ in range(3))
            do = torch.empty_like(q, requires_grad=False)
            regions = (c["S"],) * len(c["shape"])
            scale = c["D"] ** -0.5

            def fwd():
                with torch.no_grad():
                    K.routing_attention(q, k, v, regions, c["topk"], scale, "shared")

            def fwd_bwd():
                for x in (q, k, v):
                    x.grad = None
                K.routing_attention(q, k, v, regions, c["topk"], scale, "shared")[0].backward(do)

            print(f"{cn}: forward (no autograd) {best_ms(fwd):.4f} ms, fwd+bwd {best_ms(fwd_bwd):.4f} ms "
                  "of host work, kernels not launched")
    finally:
        for name, fn in saved.items():
            setattr(K, name, fn)


if __name__ == "__main__":
    main(sys.argv[1:] or ["s1-56x56", "s2-28x28", "s3-14x14"])
