"""Bi-level routing attention benchmark: subquad's Triton kernels vs BiFormer's gather approach and
dense attention.

    python bench/routing.py [--quick] [--out DIR] [--device auto|cuda|cpu] [--budget SECONDS]
                            [--case NAME ...] [--dtype bfloat16|float32 ...]
                            [--fp32-precision highest|high]

GPU (when CUDA is available), the issue's cases (B, spatial, heads, head dim, regions per dim, topk):

    s1-56x56     BiFormer-S stage 1 at 224x224: B=64, 56x56, H=2, D=32, S=7, topk=1
    s2-28x28     stage 2:                        B=64, 28x28, H=4, D=32, S=7, topk=4
    s3-14x14     stage 3:                        B=64, 14x14, H=8, D=32, S=7, topk=16
    512-128x128  a 512x512 input's first stage:  B=8, 128x128, H=2, D=32, S=8, topk=4
    600x500      a 600x500 input's first stage:  B=8, 150x125, H=2, D=32, S=7, topk=4 (padded)
    seq-32k      a sequence:                     B=1, T=32768, H=16, D=64, 256 regions, topk=8

(--quick: s1, s3 and 600x500, bf16 only). bf16 and fp32; forward and forward+backward: median ms
(``triton.testing.do_bench``) and peak memory above the inputs, for

* ``subquad``: ``subquad.bilevel_routing_attention`` (routing and attention by the Triton kernels);
* ``gather``: BiFormer's approach, ``subquad.reference.routing.gather_attention``: the same routing,
  then the routed regions' K/V gathered into a ``[B, H, R, topk r1 r2, D]`` copy, batched
  matmuls, autograd (the gather's backward is a scatter-add);
* ``sdpa``: ``scaled_dot_product_attention`` full attention over all N tokens (torch's backend
  choice), on a ``[B, H, N, D]`` copy made outside the timing;
* ``subquad+graph``, ``gather+graph``: the same calls (forward, or forward and backward) captured
  once in a CUDA graph and replayed: no host time (Python, launches, autograd) per call, as in a
  training step captured whole (``torch.cuda.graph``, ``torch.compile(mode="reduce-overhead")``).
  BiFormer's small stages are bound by host time when run eagerly (bench/README.md); these rows
  say what the GPU work costs. Their peak memory is not measured (the graph's pool is held).

Targets (issue 5, on an H100/H200): forward+backward at least 3x faster and peak memory at most
1/4 of the gather implementation on every case.

CPU: the reference path (``subquad.bilevel_routing_attention`` on CPU tensors) vs dense SDPA on CPU,
fp32, forward without autograd, each case in a fresh process (``bench.common.cpu_case``).

Writes ``routing_<cuda|cpu>.json`` / ``.md`` (and ``.png`` with matplotlib) to --out; --quick writes
one ``.md`` with the JSON embedded. ``check()`` is the kernel-vs-reference correctness check that
``python -m bench`` runs.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

import subquad
from bench import common
from bench.common import fmt, ratio

NAME = "routing"
GPU_DEVICE = "cuda"

CASES = [
    dict(name="s1-56x56", B=64, shape=(56, 56), H=2, D=32, S=7, topk=1),
    dict(name="s2-28x28", B=64, shape=(28, 28), H=4, D=32, S=7, topk=4),
    dict(name="s3-14x14", B=64, shape=(14, 14), H=8, D=32, S=7, topk=16),
    dict(name="512-128x128", B=8, shape=(128, 128), H=2, D=32, S=8, topk=4),
    dict(name="600x500", B=8, shape=(150, 125), H=2, D=32, S=7, topk=4),
    dict(name="seq-32k", B=1, shape=(32768,), H=16, D=64, S=256, topk=8),
]
CASE_NAMES = [c["name"] for c in CASES]
QUICK_CASES = ["s1-56x56", "s3-14x14", "600x500"]
GPU_DTYPES = [torch.bfloat16, torch.float32]
GPU_DTYPES_QUICK = [torch.bfloat16]
MODES = ("fwd", "fwdbwd")
IMPLS = ["subquad", "gather", "sdpa", "subquad+graph", "gather+graph"]
LABELS = {"subquad": "subquad (Triton)", "gather": "gather (BiFormer's approach)", "sdpa": "SDPA full attention",
          "subquad+graph": "subquad, CUDA graph", "gather+graph": "gather, CUDA graph"}
GRAPH = "+graph"  # the implementation's whole call captured once in a CUDA graph and replayed

CPU_CASES = [
    dict(name="cpu-28x28", B=1, shape=(28, 28), H=2, D=32, S=7, topk=4),
    dict(name="cpu-56x56", B=1, shape=(56, 56), H=2, D=32, S=7, topk=4),
    dict(name="cpu-112x112", B=1, shape=(112, 112), H=2, D=32, S=14, topk=8),
]
CPU_CASES_QUICK = ["cpu-28x28", "cpu-56x56"]
CPU_LABELS = {"subquad": "subquad reference", "sdpa": "SDPA full (CPU)"}


def case_by_name(name: str) -> dict:
    return next(c for c in CASES + CPU_CASES if c["name"] == name)


def describe(c: dict) -> str:
    return (f"B={c['B']} {'x'.join(map(str, c['shape']))} H={c['H']} D={c['D']} S={c['S']} topk={c['topk']}")


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# the implementations compared


def attention_fn(impl: str, case: dict):
    """(layout, fn(q, k, v) -> o): "spatial" = [B, *spatial, H, D], "bhnd" = [B, H, N, D] (SDPA)."""
    S, topk = case["S"], case["topk"]
    if impl == "subquad":
        return "spatial", lambda q, k, v: subquad.bilevel_routing_attention(q, k, v, num_regions=S, topk=topk)
    if impl == "gather":
        from subquad.reference.routing import gather_attention

        nd = len(case["shape"])
        return "spatial", lambda q, k, v: gather_attention(q, k, v, (S,) * nd, topk)
    if impl == "sdpa":
        return "bhnd", lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    raise ValueError(f"unknown implementation {impl!r}")


def make_inputs(case: dict, dtype, device, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (case["B"], *case["shape"], case["H"], case["D"])
    return [torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(4)]


def make_case(impl: str, mode: str, case: dict, dtype, device, requires_grad: bool = True, seed: int = 0):
    """(fn, leaves) for one measurement (see ``common.timed_call``); an impl ending in "+graph" is
    captured in a CUDA graph (warm-up calls first: they compile and tune) and fn is the replay."""
    graph = impl.endswith(GRAPH)
    layout, attn = attention_fn(impl[:-len(GRAPH)] if graph else impl, case)
    q, k, v, do = (common.to_layout(x, layout) for x in make_inputs(case, dtype, device, seed))
    fn, leaves = common.timed_call(attn, q, k, v, do, mode, requires_grad)
    if not graph:
        return fn, leaves

    def step():  # the captured call writes fresh .grad tensors of the graph's pool, replays rewrite them
        for x in leaves:
            x.grad = None
        fn()

    return common.cuda_graph(step), []


def routed_pairs(case: dict) -> int:
    """Attended (query, key) pairs of the routed attention, upper bound topk r1 r2 keys per query
    (exact when the sizes divide; the padded case counts padded slots)."""
    nd = len(case["shape"])
    N = math.prod(case["shape"])
    rt = math.prod(-(-n // case["S"]) for n in case["shape"])
    del nd
    return N * min(N, case["topk"] * rt)


def flops(impl: str, mode: str, case: dict) -> float:
    """Useful FLOPs: forward 4 B H D x attended pairs (routed pairs; N^2 for SDPA), fwd+bwd 3.5x."""
    N = math.prod(case["shape"])
    pairs = N * N if impl == "sdpa" else routed_pairs(case)
    fwd = 4.0 * case["B"] * case["H"] * case["D"] * pairs
    return {"fwd": fwd, "fwdbwd": 3.5 * fwd}[mode]


# ----------------------------------------------------------------------------------------------
# correctness check (python -m bench)

GPU_CHECKS = [
    dict(name="bf16 2-D 56x56 S=7 topk=4", B=2, shape=(56, 56), H=2, D=32, S=7, topk=4, routing="shared",
         dtype=torch.bfloat16),
    dict(name="bf16 2-D 30x25 S=7 topk=16 per-head", B=2, shape=(30, 25), H=4, D=32, S=7, topk=16,
         routing="per_head", dtype=torch.bfloat16),
    dict(name="fp16 1-D 4096 S=32 topk=4 D=64", B=1, shape=(4096,), H=4, D=64, S=32, topk=4, routing="shared",
         dtype=torch.float16),
]
CPU_CHECKS = [
    dict(name="fp32 2-D 11x13 S=3x4 topk=3 per-head", B=1, shape=(11, 13), H=2, D=16, S=(3, 4), topk=3,
         routing="per_head", dtype=torch.float32),
    dict(name="fp32 2-D 8x8 S=4 topk=5 (4-token regions)", B=1, shape=(8, 8), H=1, D=32, S=4, topk=5,
         routing="shared", dtype=torch.float32),
]


def _check_case(name: str, B: int, shape, H: int, D: int, S, topk: int, routing: str, dtype, device: str):
    """Kernel vs the float64 dense-mask definition for o, dq, dk, dv (the tests' tolerance rule)."""
    from subquad.reference import routing as ref

    gen = torch.Generator().manual_seed(1234)
    q, k, v, do = (torch.randn(B, *shape, H, D, generator=gen, dtype=torch.float64) for _ in range(4))
    Sd = tuple(S) if isinstance(S, (list, tuple)) else (S,) * len(shape)
    _, idx = subquad.bilevel_routing_attention(q.to(device, dtype), k.to(device, dtype), v.to(device, dtype),
                                               num_regions=S, topk=topk, routing=routing, return_routing=True,
                                               backend="triton")

    def run(fn, dt):
        leaves = [x.to(device=device, dtype=dt).requires_grad_() for x in (q, k, v)]
        o = fn(*leaves)
        grads = torch.autograd.grad(o, leaves, do.to(device, o.dtype))
        return dict(zip(["o", "dq", "dk", "dv"], [o, *grads]))

    def op(backend, r):
        return lambda a, b, c: subquad.bilevel_routing_attention(a, b, c, num_regions=S, topk=topk, routing=r,
                                                                 backend=backend)

    kernel = run(op("triton", routing), dtype)
    lowp = run(op("reference", idx), dtype)
    exact = run(lambda a, b, c: ref.bilevel_routing_attention_naive(a, b, c, Sd, topk, routing=idx)[0], torch.float64)
    return common.tolerance_rows(NAME, name, kernel, lowp, exact, dtype)


def check() -> List[dict]:
    """Triton kernels vs the float64 definition, forward and backward: natively on a GPU at moderate
    sizes, else through the Triton interpreter at small sizes (TRITON_INTERPRET=1 must be set
    before triton is imported; ``python -m bench`` does)."""
    cuda = common.require_kernels()
    rows = []
    for c in GPU_CHECKS if cuda else CPU_CHECKS:
        rows += _check_case(device="cuda" if cuda else "cpu", **c)
    return rows


# ----------------------------------------------------------------------------------------------
# output


def _bar_plot(path: str, title: str, labels: List[str], series: Dict[str, List[Optional[float]]],
              ylabel: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(labels)), 4.5))
    width = 0.8 / max(1, len(series))
    for i, (name, ys) in enumerate(series.items()):
        xs = [j + i * width for j, y in enumerate(ys) if y is not None]
        ax.bar(xs, [y for y in ys if y is not None], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=20, ha="right")
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------
# GPU benchmark


def measure_gpu(impl: str, case: dict, dtype, modes: Sequence[str], deadline: common.Deadline) -> dict:
    res = common.measure_modes(f"{impl} {case['name']} {_dt(dtype)}", modes, deadline,
                               lambda mode: make_case(impl, mode, case, dtype, GPU_DEVICE),
                               lambda mode: flops(impl.replace(GRAPH, ""), mode, case))
    if impl.endswith(GRAPH):  # a replay allocates nothing: its peak would read ~0
        res.update({f"{mode}_peak_mib": None for mode in modes})
    return res


def summarize_gpu(payload: dict) -> dict:
    by = {(r["case"], r["dtype"], r["impl"]): r for r in payload["rows"]}
    per_case = []
    for cn in payload["config"]["cases"]:
        for dt in payload["config"]["dtypes"]:
            ours, gat, sd, ours_g, gat_g = (by.get((cn, dt, i), {}) for i in IMPLS)
            if not ours:
                continue
            per_case.append({
                "case": cn, "dtype": dt,
                "fwd_vs_gather": ratio(gat.get("fwd_ms"), ours.get("fwd_ms")),
                "fwdbwd_vs_gather": ratio(gat.get("fwdbwd_ms"), ours.get("fwdbwd_ms")),
                "fwd_vs_sdpa": ratio(sd.get("fwd_ms"), ours.get("fwd_ms")),
                "fwdbwd_vs_sdpa": ratio(sd.get("fwdbwd_ms"), ours.get("fwdbwd_ms")),
                "fwd_mem_over_gather": ratio(ours.get("fwd_peak_mib"), gat.get("fwd_peak_mib")),
                "fwdbwd_mem_over_gather": ratio(ours.get("fwdbwd_peak_mib"), gat.get("fwdbwd_peak_mib")),
                "fwd_vs_gather_graph": ratio(gat_g.get("fwd_ms"), ours_g.get("fwd_ms")),
                "fwdbwd_vs_gather_graph": ratio(gat_g.get("fwdbwd_ms"), ours_g.get("fwdbwd_ms")),
            })
    speed = [p["fwdbwd_vs_gather"] for p in per_case if p["fwdbwd_vs_gather"] is not None]
    mem = [p["fwdbwd_mem_over_gather"] for p in per_case if p["fwdbwd_mem_over_gather"] is not None]
    graphed = [p["fwdbwd_vs_gather_graph"] for p in per_case if p["fwdbwd_vs_gather_graph"] is not None]
    worst_speed = min(speed) if speed else None
    worst_mem = max(mem) if mem else None
    worst_graphed = min(graphed) if graphed else None
    targets = [
        common.target_line("fwd+bwd >= 3x faster than the gather implementation on every case (worst x)",
                           worst_speed, None if worst_speed is None else worst_speed >= 3.0),
        common.target_line("fwd+bwd peak memory <= 1/4 of the gather implementation on every case (worst ratio)",
                           worst_mem, None if worst_mem is None else worst_mem <= 0.25),
    ]
    return {"per_case": per_case, "targets": targets, "worst_fwdbwd_vs_gather_graph": worst_graphed}


def gpu_markdown(payload: dict) -> str:
    cfg, info, s = payload["config"], payload["env"], payload["summary"]
    out = [f"## Bi-level routing attention on {info['gpu']}",
           f"commit {info['commit']}, torch {info['torch']}, triton {info['triton']}; do_bench medians (ms; calls "
           "over 250 ms: median of 3); peak = max_memory_allocated minus the inputs; TFLOP/s count useful FLOPs "
           "(routed pairs; all N^2 pairs for SDPA; fwd+bwd = 3.5 x fwd). Every implementation includes the "
           "routing (region means, affinity, top-k) except SDPA, which has none.", ""]
    order = {n: i for i, n in enumerate(CASE_NAMES)}
    table = []
    for r in sorted(payload["rows"], key=lambda r: (order[r["case"]], r["dtype"], IMPLS.index(r["impl"]))):
        table.append([f"{r['case']} ({describe(case_by_name(r['case']))})", r["dtype"], LABELS[r["impl"]],
                      fmt(r.get("fwd_ms")), fmt(r.get("fwdbwd_ms")), fmt(r.get("fwd_tflops")),
                      fmt(r.get("fwdbwd_tflops")), fmt(r.get("fwd_peak_mib"), ".0f"),
                      fmt(r.get("fwdbwd_peak_mib"), ".0f"), r.get("note", "")])
    out.append(common.markdown_table(["case", "dtype", "impl", "fwd ms", "fwd+bwd ms", "fwd TFLOP/s",
                                      "fwd+bwd TFLOP/s", "peak fwd MiB", "peak fwd+bwd MiB", "note"], table))
    out += ["", "subquad vs the others (speed: other's time / subquad's, eager unless marked graph; memory: "
            "subquad's peak / gather's):", ""]
    out.append(common.markdown_table(
        ["case", "dtype", "fwd vs gather", "fwd+bwd vs gather", "fwd vs SDPA", "fwd+bwd vs SDPA",
         "peak fwd / gather", "peak fwd+bwd / gather", "graph: fwd vs gather", "graph: fwd+bwd vs gather"],
        [[p["case"], p["dtype"], fmt(p["fwd_vs_gather"], ".2f"), fmt(p["fwdbwd_vs_gather"], ".2f"),
          fmt(p["fwd_vs_sdpa"], ".2f"), fmt(p["fwdbwd_vs_sdpa"], ".2f"), fmt(p["fwd_mem_over_gather"], ".3f"),
          fmt(p["fwdbwd_mem_over_gather"], ".3f"), fmt(p.get("fwd_vs_gather_graph"), ".2f"),
          fmt(p.get("fwdbwd_vs_gather_graph"), ".2f")] for p in s["per_case"]]))
    out += ["", "Targets:", ""] + [f"- {t['text']}" for t in s["targets"]]
    out += ["", "Both replayed from CUDA graphs (GPU time alone; not how the target is measured): fwd+bwd vs "
            f"gather, worst x: {fmt(s.get('worst_fwdbwd_vs_gather_graph'), '.2f')}"]
    del cfg
    return "\n".join(out)


def plot_gpu(payload: dict, path: str) -> Optional[str]:
    by = {(r["case"], r["dtype"], r["impl"]): r for r in payload["rows"]}
    keys = [(c, d) for c in payload["config"]["cases"] for d in payload["config"]["dtypes"]]
    labels = [f"{c}\n{d}" for c, d in keys]
    series = {LABELS[i]: [by.get((c, d, i), {}).get("fwdbwd_ms") for c, d in keys] for i in IMPLS}
    return _bar_plot(path, f"Bi-level routing attention fwd+bwd, {payload['env']['gpu']}", labels, series,
                     "ms (median)")


def run_gpu(quick: bool, out_dir: str, budget: Optional[float] = None, cases: Optional[List[str]] = None,
            dtypes: Optional[List[torch.dtype]] = None) -> dict:
    names = cases or (QUICK_CASES if quick else CASE_NAMES)
    dtypes = dtypes or (GPU_DTYPES_QUICK if quick else GPU_DTYPES)
    deadline = common.Deadline(budget)
    payload = {"family": NAME, "device": "cuda", "quick": quick, "env": common.env_info(),
               "config": {"cases": names, "dtypes": [_dt(d) for d in dtypes], "modes": list(MODES),
                          "case_defs": {n: case_by_name(n) for n in names},
                          "float32_matmul_precision": torch.get_float32_matmul_precision(),
                          "flops": " ".join(flops.__doc__.split())},
               "rows": []}
    stem = f"{NAME}_cuda"

    def write():
        payload["summary"] = summarize_gpu(payload)
        md = gpu_markdown(payload)
        return md, common.write_results(out_dir, stem, payload, md, quick, plot_gpu)

    for cn in names:
        case = case_by_name(cn)
        for dtype in dtypes:
            for impl in IMPLS:
                row = {"case": cn, "dtype": _dt(dtype), "impl": impl}
                if deadline.expired():
                    row["note"] = "skipped: time budget"
                else:
                    t0 = time.perf_counter()
                    row.update(measure_gpu(impl, case, dtype, MODES, deadline))
                    print(f"[bench] {impl:8s} {cn:12s} {_dt(dtype):8s}: fwd {fmt(row.get('fwd_ms'))} ms, fwd+bwd "
                          f"{fmt(row.get('fwdbwd_ms'))} ms, peak {fmt(row.get('fwdbwd_peak_mib'), '.0f')} MiB "
                          f"{row.get('note', '')} ({time.perf_counter() - t0:.0f} s)", flush=True)
                payload["rows"].append(row)
                write()
    md, where = write()
    print(md)
    print(f"\n[bench] wrote {where}; results to keep go to bench/results/{common.device_slug(payload['env'])}/")
    return payload


# ----------------------------------------------------------------------------------------------
# CPU benchmark


def cpu_forward_case(impl: str, case: str, threads: Optional[int] = None):
    """Target of ``common.cpu_case`` (runs in the child process): one forward, no autograd."""
    if threads:
        torch.set_num_threads(threads)
    fn, _ = make_case(impl, "fwd", case_by_name(case), torch.float32, "cpu", requires_grad=False)

    def call():
        with torch.no_grad():
            return fn()

    return call


def cpu_markdown(payload: dict) -> str:
    info = payload["env"]
    by = {(r["case"], r["impl"]): r for r in payload["rows"]}
    out = [f"## Bi-level routing attention on CPU ({info['cpu']}, {info['cpu_threads']} threads): reference path "
           "vs dense SDPA",
           f"commit {info['commit']}, torch {info['torch']}; fp32, forward without autograd; median ms of "
           f"{payload['config']['reps']} calls after a warm-up, each case in a fresh process.", ""]
    table = []
    for cn in payload["config"]["cases"]:
        r, d = by.get((cn, "subquad"), {}), by.get((cn, "sdpa"), {})
        table.append([f"{cn} ({describe(case_by_name(cn))})", fmt(r.get("ms")), fmt(d.get("ms")),
                      fmt(ratio(d.get("ms"), r.get("ms")), ".2f"), fmt(r.get("peak_mib"), ".1f"),
                      fmt(d.get("peak_mib"), ".1f"),
                      " ".join(dict.fromkeys(x["error"] for x in (r, d) if x.get("error")))])
    out.append(common.markdown_table(["case", "reference ms", "SDPA ms", "reference vs SDPA (x)",
                                      "reference peak MiB", "SDPA peak MiB", "note"], table))
    out += ["", f"Memory: {common.CPU_MEMORY_METHOD}."]
    out += common.load_warning(info)
    return "\n".join(out)


def plot_cpu(payload: dict, path: str) -> Optional[str]:
    by = {(r["case"], r["impl"]): r for r in payload["rows"]}
    names = payload["config"]["cases"]
    series = {CPU_LABELS[i]: [by.get((c, i), {}).get("ms") for c in names] for i in ("subquad", "sdpa")}
    return _bar_plot(path, "Bi-level routing attention on CPU, fp32 forward", names, series, "ms (median)")


def run_cpu(quick: bool, out_dir: str, budget: Optional[float] = None, threads: Optional[int] = None) -> dict:
    names = CPU_CASES_QUICK if quick else [c["name"] for c in CPU_CASES]
    reps = 2 if quick else 5
    deadline = common.Deadline(budget)
    payload = {"family": NAME, "device": "cpu", "quick": quick, "env": common.env_info(),
               "config": {"cases": names, "case_defs": {n: case_by_name(n) for n in names}, "dtype": "float32",
                          "reps": reps, "memory_method": common.CPU_MEMORY_METHOD}, "rows": []}
    for cn in names:
        for impl in ("subquad", "sdpa"):
            row = {"case": cn, "impl": impl}
            if deadline.expired():
                row.update(ms=None, peak_mib=None, error="skipped: time budget")
            else:
                row.update(common.cpu_case(f"bench.{NAME}:cpu_forward_case", dict(impl=impl, case=cn, threads=threads),
                                           reps=reps, timeout=deadline.remaining(900) + 30))
                print(f"[bench] cpu {impl:8s} {cn}: {fmt(row.get('ms'))} ms, peak {fmt(row.get('peak_mib'), '.1f')} "
                      "MiB", flush=True)
            payload["rows"].append(row)
    if threads:
        payload["env"]["cpu_threads"] = threads
    md = cpu_markdown(payload)
    where = common.write_results(out_dir, f"{NAME}_cpu", payload, md, quick, plot_cpu)
    print(md)
    print(f"\n[bench] wrote {where}")
    return payload


def run(quick: bool = True, out_dir: str = common.DEFAULT_OUT, budget: Optional[float] = None, device: str = "auto",
        threads: Optional[int] = None, cases: Optional[List[str]] = None,
        dtypes: Optional[List[torch.dtype]] = None) -> dict:
    """The benchmark on the GPU when there is one (or device="cuda"), else on the CPU."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return run_gpu(quick, out_dir, budget, cases, dtypes)
    return run_cpu(quick, out_dir, budget, threads)


def main(argv=None) -> int:
    p = common.base_parser(__doc__, quick_help="GPU: bf16, 3 cases; CPU: the two small cases")
    p.add_argument("--case", action="append", choices=CASE_NAMES, help="GPU: only this case (repeatable)")
    p.add_argument("--dtype", action="append", choices=["bfloat16", "float32", "float16"],
                   help="GPU: only this dtype (repeatable)")
    p.add_argument("--fp32-precision", choices=["highest", "high"], default="highest",
                   help="torch.set_float32_matmul_precision for the run: 'high' runs the fp32 rows on TF32 "
                        "tensor cores, subquad's kernels and the gather's matmuls alike (recorded in the JSON)")
    args = p.parse_args(argv)
    torch.set_float32_matmul_precision(args.fp32_precision)
    dtypes = [getattr(torch, d) for d in args.dtype] if args.dtype else None
    run(args.quick, args.out, args.budget, args.device, args.threads, args.case, dtypes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
