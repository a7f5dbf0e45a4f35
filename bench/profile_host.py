"""Host-overhead profile of the small routing cases and HiP decoding on a GPU (python bench/profile_host.py).

Prints wall vs host (launch-side) time per call and torch.profiler tables: when host time is close
to wall time, the case is bound by Python and launch overhead, not by the kernels. The output of
one run is kept in bench/results/<gpu>/profile-*.log."""
import time, torch
import subquad
from subquad.reference import routing as R
from subquad.kernels import routing as K
from torch.profiler import profile, ProfilerActivity
dev = "cuda"
def wall(fn, n=30):
    fn(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n): fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3
def cpu_only(fn, n=30):  # host time of issuing the calls (GPU async)
    fn(); torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n): fn()
    c = (time.perf_counter() - t) / n * 1e3
    torch.cuda.synchronize()
    return c
for name, (B, n, H, S, topk) in {"s3": (64, 14, 8, 7, 16), "s1": (64, 56, 2, 7, 1)}.items():
    q, k, v, do = (torch.randn(B, n, n, H, 32, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(4))
    g = R.region_geometry((n, n), (S, S))
    q3 = q.detach().reshape(B, n * n, H, 32)
    f = lambda: subquad.bilevel_routing_attention(q, k, v, num_regions=S, topk=topk)
    fb = lambda: f().backward(do)
    rt = lambda: R.route(q3, q3, g, topk)
    print(name, "route wall %.3f host %.3f" % (wall(rt), cpu_only(rt)))
    print(name, "fwd wall %.3f host %.3f" % (wall(f), cpu_only(f)))
    print(name, "fwd+bwd wall %.3f host %.3f" % (wall(fb), cpu_only(fb)))
    idx = rt().to(torch.int32)[:, None].contiguous()
    print(name, "inverse_routing wall %.3f" % wall(lambda: K.inverse_routing(idx, g.R)))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(5): fb()
        torch.cuda.synchronize()
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    print(p.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60))
# hip decode overhead
q = torch.randn(1, 1, 32, 128, device=dev, dtype=torch.bfloat16)
kk = torch.randn(1, 131072, 8, 128, device=dev, dtype=torch.bfloat16)
m = subquad.hip_mask(q, kk)
h = lambda: subquad.hip_attention(q, kk, kk, mask=m)
print("hip decode wall %.3f host %.3f" % (wall(h), cpu_only(h)))
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
    for _ in range(5): h()
    torch.cuda.synchronize()
print(p.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))
