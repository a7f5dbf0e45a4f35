"""Helpers shared by every benchmark family: timing, peak memory, tables, JSON, plots.

GPU timing is ``triton.testing.do_bench`` (median, warm-up and L2 flush included); CPU timing
and CPU peak memory run each case in a fresh Python process (``cpu_case``), so one case's
allocator state and one-time set-up cannot leak into another's numbers.

Nothing here imports triton at module level: ``python -m bench`` must be able to set
``TRITON_INTERPRET=1`` before triton is first imported.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from subquad.autotune.tuner import interpreting

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "bench", "out")
MiB = float(2**20)

# Calls slower than this are timed as the median of 3 CUDA-event runs instead of do_bench,
# whose fixed 5-call estimate alone would cost seconds per case.
SLOW_CALL_MS = 250.0


# ----------------------------------------------------------------------------------------------
# environment


def has_cuda() -> bool:
    return torch.cuda.is_available()


def git_commit() -> str:
    """The commit measured: $SUBQUAD_COMMIT if set, else ``git rev-parse HEAD`` (+"+dirty" when
    tracked files differ from it), else "unknown" (e.g. a copy of the tree without .git)."""
    if os.environ.get("SUBQUAD_COMMIT"):
        return os.environ["SUBQUAD_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        # refresh the index's stat data first: a copied or touched tree would otherwise read as dirty
        subprocess.run(["git", "update-index", "-q", "--refresh"], cwd=REPO, capture_output=True, timeout=10)
        dirty = subprocess.run(["git", "diff-index", "--quiet", "HEAD", "--"], cwd=REPO,
                               capture_output=True, timeout=10).returncode != 0
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def env_info() -> dict:
    info = {
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        # other processes competing for the cores make CPU timings meaningless: record the load
        "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpu": torch.cuda.get_device_name() if has_cuda() else None,
        "cuda": torch.version.cuda if has_cuda() else None,
        "triton_interpret": interpreting(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def device_slug(info: dict) -> str:
    """Folder name for bench/results/<gpu-name>/: 'nvidia-h100-80gb-hbm3', or 'cpu'."""
    name = info.get("gpu") or "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


class Deadline:
    """A time budget for a benchmark run: ``expired()`` once ``seconds`` have passed (never if None)."""

    def __init__(self, seconds: Optional[float]):
        self.end = None if seconds is None else time.monotonic() + seconds

    def expired(self) -> bool:
        return self.end is not None and time.monotonic() > self.end

    def remaining(self, default: float) -> float:
        """Seconds left, or ``default`` without a budget."""
        return default if self.end is None else max(0.0, self.end - time.monotonic())


# ----------------------------------------------------------------------------------------------
# GPU timing and memory


def _clear_grads(tensors):
    for x in tensors or ():
        x.grad = None


def _event_ms(fn: Callable, grad_to_none=None) -> float:
    _clear_grads(grad_to_none)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def gpu_ms(fn: Callable, grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> float:
    """Median milliseconds of ``fn()`` on the current GPU.

    A first timed call (a warm-up, and an estimate) decides how: ``triton.testing.do_bench``'s
    median (it warms up again, flushes L2 between calls and times with CUDA events), or, for calls
    over SLOW_CALL_MS, the median of 3 more CUDA-event-timed calls. ``grad_to_none``: tensors whose .grad is
    reset before every call, so backward passes do not accumulate.
    """
    from triton.testing import do_bench

    probe = _event_ms(fn, grad_to_none)
    if probe > SLOW_CALL_MS:
        return statistics.median(_event_ms(fn, grad_to_none) for _ in range(3))
    return float(do_bench(fn, grad_to_none=list(grad_to_none) if grad_to_none else None, return_mode="median"))


def gpu_peak_mib(fn: Callable, grad_to_none: Optional[Sequence[torch.Tensor]] = None) -> float:
    """Peak GPU memory of one ``fn()`` call above what was allocated before it (the inputs), in
    MiB: ``torch.cuda.max_memory_allocated`` after a reset, minus ``memory_allocated`` before."""
    _clear_grads(grad_to_none)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    _clear_grads(grad_to_none)
    return peak / MiB


def measure_modes(what: str, modes: Sequence[str], deadline: Deadline,
                  make: Callable[[str], tuple], flops: Callable[[str], float]) -> dict:
    """Median ms, peak MiB, first-call seconds and TFLOP/s of each mode ("fwd", "fwdbwd", ...) of one
    implementation on one case: ``make(mode)`` builds ``(fn, leaves)`` (see ``timed_call``),
    ``flops(mode)`` counts the useful work. Modes not started by ``deadline`` and calls that fail
    leave None and say why in ``note``."""
    res: Dict[str, object] = {}

    def say(text):
        res["note"] = (res.get("note", "") + " " + text).strip()

    for mode in modes:
        if deadline.expired():
            res[f"{mode}_ms"] = res[f"{mode}_peak_mib"] = None
            say(f"{mode}: skipped (budget)")
            continue

        def one():
            fn, leaves = make(mode)
            t0 = time.perf_counter()
            fn()  # warm-up: compiles and autotunes (subquad; Flex and its block mask) on first use
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            return gpu_ms(fn, leaves), gpu_peak_mib(fn, leaves), first

        val, note = attempt(f"{what} {mode}", one)
        ms = val[0] if val else None
        res[f"{mode}_ms"] = ms
        res[f"{mode}_peak_mib"] = val[1] if val else None
        res[f"{mode}_first_call_s"] = val[2] if val else None
        res[f"{mode}_tflops"] = flops(mode) / (ms * 1e9) if ms else None
        if note:
            say(f"{mode}: {note}")
        torch.cuda.empty_cache()
    return res


def cuda_graph(fn: Callable) -> Callable:
    """``fn`` captured once in a CUDA graph (after warm-up calls on a side stream, which compile and
    tune); returns the replay. How serving engines run a decoding step: no host time per kernel."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def attempt(what: str, fn: Callable):
    """(fn(), None), or (None, note) when it fails: 'OOM' for out of memory, else the error type.
    A benchmark row says why it is empty instead of the whole run dying."""
    try:
        return fn(), None
    except torch.cuda.OutOfMemoryError:
        note = "OOM"
    except Exception as exc:  # a peer or a kernel failing must not end the whole run
        note = "OOM" if "out of memory" in str(exc) else f"error: {type(exc).__name__}"
        print(f"[bench] {what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
              file=sys.stderr)
    if has_cuda():
        torch.cuda.empty_cache()
    return None, note


# ----------------------------------------------------------------------------------------------
# CPU timing and memory: one fresh process per case

CPU_MEMORY_METHOD = (
    "each case runs in a fresh process; after the timed calls, glibc is set to serve every block of "
    "64 KiB or more with its own mmap (so freed tensors leave RSS at once) and hands free heap memory "
    "back (malloc_trim), the kernel's peak-RSS counter is reset (/proc/self/clear_refs = 5), and peak "
    "memory = VmHWM during one more call minus VmRSS before it (the inputs are already resident)")

_RESULT_TAG = "BENCH_CASE_RESULT "


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _release_free_memory() -> None:
    """Make RSS track live allocations: every block >= 64 KiB gets its own mmap from now on (a fixed
    threshold, so glibc stops raising it and serving large blocks from a fragmented heap), and free
    heap pages go back to the OS, so that a call reusing them shows up in the peak."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may be off by what the heap keeps
        pass


def _peak_mib(fn: Callable) -> Optional[float]:
    """Peak RSS of one ``fn()`` above the RSS before it, in MiB; None where Linux's counters are missing."""
    _release_free_memory()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        before = _proc_status_kib("VmRSS")
    except (OSError, KeyError):
        return None
    fn()
    return (_proc_status_kib("VmHWM") - before) / 1024.0


def _run_case_here(target: str, kwargs: dict, reps: int) -> dict:
    """Child side of ``cpu_case``: build the case, warm up, time ``reps`` calls, measure peak memory."""
    module, func = target.split(":")
    fn = getattr(importlib.import_module(module), func)(**kwargs)
    t0 = time.perf_counter()
    fn()  # warm-up: one-time set-up (thread pools, kernels) stays out of the numbers
    first_ms = (time.perf_counter() - t0) * 1e3
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(times), "times_ms": times, "first_ms": first_ms, "peak_mib": _peak_mib(fn)}


def cpu_case(target: str, kwargs: dict, reps: int = 3, timeout: float = 900) -> dict:
    """Time one CPU case in a fresh process. ``target`` = "module:function"; the function, called
    with ``kwargs``, builds the inputs and returns a zero-argument callable to measure.

    Returns {"ms": median of ``reps`` calls after one warm-up, "times_ms", "first_ms",
    "peak_mib": peak memory of one call above the resident inputs (see CPU_MEMORY_METHOD)},
    or {"ms": None, "error": ...} when the child fails or times out.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [sys.executable, "-m", "bench.common", target, json.dumps(kwargs), str(reps)]
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ms": None, "peak_mib": None, "error": f"timeout after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_RESULT_TAG):
            return json.loads(line[len(_RESULT_TAG):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    print(f"[bench] cpu case {target} {kwargs} failed: {tail[0]}", file=sys.stderr)
    return {"ms": None, "peak_mib": None, "error": tail[0]}


# ----------------------------------------------------------------------------------------------
# output: tables, JSON, plots


def fmt(x, spec: str = ".3g") -> str:
    """A table cell: '—' for None, strings as they are, numbers with ``spec``."""
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    return format(x, spec)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return None if num is None or den is None or den == 0 else num / den


def growth_exponent(xs: Sequence[float], ys: Sequence[Optional[float]]) -> Optional[float]:
    """Log-log slope between the last two points that have a value: 1 = linear, 2 = quadratic.
    The two largest sizes are used so that fixed overheads at small sizes do not count."""
    pts = [(x, y) for x, y in zip(xs, ys) if y]
    if len(pts) < 2:
        return None
    (x0, y0), (x1, y1) = pts[-2:]
    return math.log(y1 / y0) / math.log(x1 / x0)


def target_line(name: str, value: Optional[float], ok: Optional[bool], spec: str = ".2f") -> dict:
    """One target of the issue: {'target', 'value', 'status': PASS / FAIL / n/a}."""
    status = "n/a" if ok is None else ("PASS" if ok else "FAIL")
    return {"target": name, "value": value, "status": status, "text": f"{status:4}  {name}: {fmt(value, spec)}"}


def save(out_dir: str, stem: str, payload: dict, markdown: str) -> List[str]:
    """Write ``<stem>.json`` and ``<stem>.md`` into out_dir; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, stem + ".json"), os.path.join(out_dir, stem + ".md")]
    with open(paths[0], "w") as f:
        json.dump(payload, f, indent=2)
    with open(paths[1], "w") as f:
        f.write(markdown.rstrip() + "\n")
    return paths


def plot(path: str, title: str, panels: List[dict]) -> Optional[str]:
    """A PNG with one log-log panel per entry of ``panels``:
    {"title", "xlabel", "ylabel", "series": {label: (xs, ys)}}; None values are left out.
    Returns the path, or None when matplotlib is not importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.5 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        for label, (xs, ys) in panel["series"].items():
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(panel["title"])
        ax.set_xlabel(panel.get("xlabel", "T"))
        ax.set_ylabel(panel["ylabel"])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    # Child of cpu_case: python -m bench.common MODULE:FUNC KWARGS_JSON REPS
    _result = _run_case_here(sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]))
    print(_RESULT_TAG + json.dumps(_result), flush=True)


def timed_call(attn: Callable, q, k, v, do, mode: str, requires_grad: bool):
    """(fn, leaves) for one measurement of ``attn(q, k, v)``: mode "fwd", "bwd" (backward of one
    retained forward graph) or "fwdbwd". leaves: the tensors whose .grad must be reset between calls."""
    leaves = [x.requires_grad_() for x in (q, k, v)] if requires_grad else []
    if mode == "fwd":
        return (lambda: attn(q, k, v)), leaves
    if not requires_grad:
        raise ValueError(f"mode {mode!r} needs requires_grad=True")
    if mode == "fwdbwd":
        return (lambda: attn(q, k, v).backward(do)), leaves
    if mode == "bwd":
        o = attn(q, k, v)
        return (lambda: o.backward(do, retain_graph=True)), leaves
    raise ValueError(f"unknown mode {mode!r}")


def pytest_benchmark_run(benchmark, fn: Callable, leaves, rounds: int, group: str, **info) -> None:
    """Time ``fn`` with pytest-benchmark: CUDA-synchronised on a GPU, .grad reset between rounds,
    one untimed call first (compile / autotune)."""

    def call():
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def clear_grads():  # backward must not accumulate into .grad across rounds
        for x in leaves:
            x.grad = None

    call()
    benchmark.group = group
    benchmark.extra_info.update(info)
    benchmark.pedantic(call, setup=clear_grads, rounds=rounds, warmup_rounds=1, iterations=1)


# The tests' tolerance rule (tests/helpers.py: assert_close), as report rows.
ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def tolerance_rows(family: str, case: str, kernel: dict, lowp: dict, exact: dict, dtype) -> List[dict]:
    """One row per tensor: the kernel's max error against the float64 result must be at most twice
    the error of the reference computed in ``dtype``, plus ATOL[dtype] times the magnitude."""
    rows = []
    for tensor, ref64 in exact.items():
        out = kernel[tensor].detach().double().cpu()
        ref64 = ref64.detach().cpu()
        err = (out - ref64).abs().max().item()
        ref_err = (lowp[tensor].detach().double().cpu() - ref64).abs().max().item()
        bound = 2.0 * ref_err + ATOL[dtype] * max(1.0, ref64.abs().max().item())
        ok = bool(torch.isfinite(out).all()) and err <= bound
        rows.append(dict(family=family, case=case, tensor=tensor, err=err, ref_err=ref_err, bound=bound, ok=ok))
    return rows


def require_kernels() -> bool:
    """True on a CUDA machine; without CUDA the kernels run only through the Triton interpreter,
    which must have been switched on before triton's import (``python -m bench`` does)."""
    cuda = torch.cuda.is_available()
    if not cuda and not interpreting():
        raise RuntimeError("no CUDA device: set TRITON_INTERPRET=1 before triton is imported to check "
                           "the kernels through the interpreter (python -m bench does)")
    return cuda


def base_parser(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """The options every family benchmark takes: --quick --out --device --budget --threads."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", default=DEFAULT_OUT, help="folder for the results (default bench/out)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                   help="auto: the GPU benchmark when CUDA is available, else the CPU one")
    p.add_argument("--budget", type=float, default=None, help="seconds; cases not started by then are skipped")
    p.add_argument("--threads", type=int, default=None, help="CPU benchmark: torch threads (default: torch's)")
    return p


def write_results(out_dir: str, stem: str, payload: dict, md: str, single: bool, plot_fn) -> str:
    """Full runs: <stem>.json, .md and (matplotlib) .png. Quick runs (single=True): one <stem>.md
    holding the markdown and, at its end, the JSON payload in a fenced block."""
    if not single:
        save(out_dir, stem, payload, md)
        png = plot_fn(payload, os.path.join(out_dir, stem + ".png"))
        return f"{os.path.join(out_dir, stem)}.json/.md" + (" and .png" if png else " (no matplotlib: no plot)")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, stem + ".md")
    with open(path, "w") as f:
        f.write(md.rstrip() + "\n\n<details><summary>JSON payload</summary>\n\n```json\n"
                + json.dumps(payload, indent=1) + "\n```\n\n</details>\n")
    return path + " (quick run: one file, JSON embedded)"


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """[B, *spatial, H, D] -> an implementation's layout: "spatial" as is, "bhnd" a contiguous
    [B, H, N, D] copy (SDPA, Flex)."""
    if layout == "spatial":
        return x
    B, H, D = x.shape[0], x.shape[-2], x.shape[-1]
    return x.reshape(B, -1, H, D).transpose(1, 2).contiguous()


def load_warning(info: dict) -> List[str]:
    """Markdown lines warning that the CPU was busy before (or, when recorded, after) a CPU run."""
    cores = info.get("cpu_count") or 1
    start, end = info.get("loadavg_1min"), info.get("loadavg_1min_end")
    if not ((start is not None and start > 0.5 * cores) or (end is not None and end > cores + 1)):
        return []
    if end is None:
        when = f"{start:.1f} on {cores} cores at the start"
    else:
        when = f"{fmt(start, '.1f')} before and {fmt(end, '.1f')} after this run on {cores} cores"
    return ["", f"WARNING: 1-min load average {when}: other processes competed for the CPU, so these times are "
                "not reliable."]
