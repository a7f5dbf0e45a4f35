"""Static compile check: every kernel x config x arch, compiled for a GPU target without a GPU.

``python -m subquad.autotune check`` compiles each kernel of each family (the modules
``subquad.kernels.<name>`` for ``name`` in :data:`FAMILIES` that define ``compile_specs``) for
every config of its tuner's space, for sm_80 and sm_90, fp16 and bf16, and a few head dims, with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``. Each cubin goes through
the ``cuobjdump`` shipped in the triton wheel (``--dump-resource-usage --dump-sass``) for
registers, stack / local memory (spills) and static shared memory, and for the count of
tensor-core instructions (HMMA; HGMMA, the wgmma of sm_90).

A row passes when the kernel compiled, does not spill inside a loop (STACK == 0 and LOCAL == 0,
or every spill access outside the loops: a value parked across the main loop costs nothing per
step, and is noted), fits the arch's shared memory per block (static + Triton's dynamic
``metadata.shared``), and, when it has tensor-core eligible dots (``tl.dot`` on 16-bit operands or
with tf32 precision), emits at least one tensor-core instruction. A failing row is

* ``FAIL`` when the config is the tuner's default for that bucket: the config used under the
  interpreter, with tuning off, and the first thing a user gets; the exit code is then 1;
* ``PRUNED`` otherwise: the runtime tuner drops configs that fail to compile or overflow shared
  memory, and times one that spills like any other (the spill shows in its time).

Each row also records ``loop_ops``, the SASS instructions of the main loop (one step of a walk,
per thread): with the tensor-core count, the static measure of a step's overhead used to compare
variants of a kernel before a GPU times them.

Family contract: ``compile_specs(dtype, K, V)`` yields ``(tuner, jit_fn, signature, constexprs)``
per kernel, where ``signature`` maps every runtime argument to its Triton type ("*fp16", "i32",
"fp32", ...) and ``constexprs(cfg)`` gives every compile-time argument for a config; an optional
fifth element lists the tuner buckets to take configs from (default ``[(dtype, K, V, True)]``).
A family yields nothing for a dtype or head dim it does not support; an exception is a failure.

Everything runs in worker processes (one process per compile, ``--jobs`` at a time), so a
compiler crash or hang costs one row, not the run. ``TRITON_INTERPRET`` must be unset: under
the interpreter ``@triton.jit`` makes no ``JITFunction``; :func:`main` re-runs itself without it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import json
import multiprocessing as mp
import multiprocessing.connection
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from .tuner import Config, interpreting

__all__ = [
    "FAMILIES", "ARCHS", "SMEM_LIMIT", "Job", "parse_resource_usage", "sass_instructions", "count_tensor_core_ops",
    "sass_loops", "tensor_core_dots", "collect_jobs", "compile_job", "run_jobs", "format_table", "main",
]

# Kernel families whose modules subquad.kernels.<name> may define compile_specs(dtype, K, V).
FAMILIES = ["lightning", "neighborhood", "hip", "routing"]
ARCHS = (80, 90)
DTYPES = ("float16", "bfloat16")
HEAD_DIMS = (64, 128)
# Shared memory a block may use (cudaDevAttrMaxSharedMemoryPerBlockOptin): A100 163 KiB, H100 227 KiB.
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# Tensor-core SASS opcodes: HMMA (mma.sync, sm_70+), HGMMA (wgmma, sm_90), and their integer /
# fp8 siblings, counted into the total so later fp8 or int8 kernels are covered too.
TC_OPCODES = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA")

_RES_FUNC_RE = re.compile(r"^\s*Function\s+([^\s:]+)\s*:\s*$")
_RES_KV_RE = re.compile(r"([A-Z]+(?:\[\d+\])?):(\d+)")
# one SASS instruction: /*address*/ [predicate] OPCODE[.modifiers] operands ;
_SASS_LINE_RE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)([^;]*);")
_DOT_RE = re.compile(r"\btt\.dot\b(?P<rest>.*?):\s*tensor<(?P<shape>[^>]*)>")


# ------------------------------------------------------------------------------------------------
# parsing cuobjdump / IR text


def parse_resource_usage(text: str) -> Dict[str, Dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` text -> {function: {"REG": .., "STACK": .., ...}}.

    Accepts the two-line form (``Function name:`` then ``REG:.. STACK:..``) and a single line
    holding both; keys are upper case as printed (``CONSTANT[0]`` keeps its index).
    """
    out: Dict[str, Dict[str, int]] = {}
    current: Optional[str] = None
    for line in text.splitlines():
        m = _RES_FUNC_RE.match(line)
        if m is None and line.strip().startswith("Function "):
            head, _, tail = line.strip()[len("Function "):].partition(":")
            if tail and _RES_KV_RE.search(tail):  # "Function f: REG:.. STACK:.."
                current = head.strip()
                out.setdefault(current, {}).update({k: int(v) for k, v in _RES_KV_RE.findall(tail)})
                continue
        if m is not None:
            current = m.group(1)
            out.setdefault(current, {})
            continue
        if current is not None and "REG:" in line:
            out[current].update({k: int(v) for k, v in _RES_KV_RE.findall(line)})
    return out


def sass_instructions(sass: str) -> List[Tuple[int, str, str]]:
    """``cuobjdump --dump-sass`` text -> (address, opcode, operands) per instruction (predicated or
    not; comments and encodings ignored)."""
    out = []
    for line in sass.splitlines():
        m = _SASS_LINE_RE.match(line)
        if m is not None:
            out.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return out


def count_tensor_core_ops(sass: str) -> Dict[str, int]:
    """Counts of tensor-core opcodes (predicated or not) in ``cuobjdump --dump-sass`` text."""
    counts = {op: 0 for op in TC_OPCODES}
    for _, op, _ in sass_instructions(sass):
        if op in counts:
            counts[op] += 1
    return counts


_SPILL_OPS = ("STL", "LDL")


def sass_loops(sass: str) -> Dict[str, int]:
    """Loop structure of one kernel's ``cuobjdump --dump-sass`` text: ``loop_ops``, the instructions
    of the innermost loop holding tensor-core ops (the shortest backward branch's range around
    one: the main loop of a walk, so its per-step cost; 0 when there is none), and
    ``loop_spills``, the spill accesses (STL / LDL) inside any loop. A spill outside loops (a value
    parked across the main loop) costs a few instructions per program; one inside costs them
    every step."""
    ins = sass_instructions(sass)
    at = {a: i for i, (a, _, _) in enumerate(ins)}
    loops = []
    for i, (a, op, args) in enumerate(ins):
        target = re.findall(r"0x([0-9a-fA-F]+)", args) if op == "BRA" else []
        if target and int(target[-1], 16) <= a and int(target[-1], 16) in at:
            loops.append((at[int(target[-1], 16)], i))
    in_loop = set(j for lo, hi in loops for j in range(lo, hi + 1))
    tc = [(lo, hi) for lo, hi in loops if any(ins[j][1] in TC_OPCODES for j in range(lo, hi + 1))]
    return {"loop_ops": min((hi - lo + 1 for lo, hi in tc), default=0),
            "loop_spills": sum(1 for j in in_loop if ins[j][1] in _SPILL_OPS)}


def tensor_core_dots(ttir: str) -> Tuple[int, int]:
    """(all ``tt.dot`` ops, those that should use tensor cores) in a TTIR module.

    A dot of fp32 operands with the default IEEE precision (printed without ``inputPrecision``)
    runs on FMA units by design; every other dot (16-bit or 8-bit operands, or tf32 / tf32x3
    precision) belongs on tensor cores.
    """
    total = tc = 0
    for m in _DOT_RE.finditer(ttir):
        total += 1
        elem = m.group("shape").split("x")[-1].strip()
        rest = m.group("rest")
        prec = re.search(r"inputPrecision\s*=\s*(\w+)", rest)
        if elem != "f32" or (prec is not None and prec.group(1) != "ieee"):
            tc += 1
    return total, tc


# ------------------------------------------------------------------------------------------------
# jobs


@dataclass(frozen=True)
class Job:
    family: str
    dtype: str
    K: int
    V: int
    spec: int  # index into compile_specs(dtype, K, V)
    kernel: str
    config: Config
    default: bool
    arch: int
    as_launched: bool = False  # integer arguments a typical launch passes as 1 compiled as constants


def _family_module(name: str):
    return importlib.import_module(f"subquad.kernels.{name}")


@contextlib.contextmanager
def _fp32_precision(dtype: str):
    """The check's dtype "tf32" is fp32 inputs under ``torch.backends.cuda.matmul.fp32_precision =
    "tf32"`` (the launchers' dot precision follows torch's setting): families build their specs
    for "float32" inside this context."""
    if dtype != "tf32":
        yield dtype
        return
    import torch

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield "float32"
    finally:
        matmul.fp32_precision = before


def _specs(mod, dtype: str, K: int, V: int) -> list:
    with _fp32_precision(dtype) as as_dtype:
        return list(mod.compile_specs(as_dtype, K, V))


def collect_jobs(
    families: Sequence[str] = tuple(FAMILIES),
    dtypes: Sequence[str] = DTYPES,
    dims: Sequence[Tuple[int, int]] = tuple((d, d) for d in HEAD_DIMS),
    archs: Sequence[int] = ARCHS,
    kernels: Optional[Iterable[str]] = None,
    used_only: bool = False,
    configs: Optional[str] = None,
    as_launched: bool = False,
) -> Tuple[List[Job], List[dict]]:
    """Every (family, dtype, dims, kernel, config, arch) to compile, and error rows for specs that
    could not even be enumerated (a family module that fails to import, a bucket with no config).
    configs: only configs whose name contains this text; as_launched: see ``compile_job``."""
    wanted = set(kernels) if kernels else None
    jobs: List[Job] = []
    errors: List[dict] = []
    for fam in families:
        try:
            mod = _family_module(fam)
        except Exception as exc:  # a broken module is a failure of the check, not a skip
            errors.append(_error_row(fam, f"<{fam}>", "-", True, 0, "-", 0, 0, f"import failed: {_short(exc)}"))
            continue
        specs_fn = getattr(mod, "compile_specs", None)
        if specs_fn is None:
            continue
        for dtype in dtypes:
            for K, V in dims:
                try:
                    specs = _specs(mod, dtype, K, V)
                except Exception as exc:
                    errors.append(_error_row(fam, f"<{fam}>", "-", True, 0, dtype, K, V,
                                             f"compile_specs failed: {_short(exc)}"))
                    continue
                for i, spec in enumerate(specs):
                    tuner = spec[0]
                    if wanted is not None and tuner.kernel not in wanted:
                        continue
                    # optional 5th element: the tuner buckets these specs serve (default: the
                    # (dtype, K, V, has_decay=True) bucket of lightning-style tuners); optional 6th:
                    # units(cfg), the integer arguments a typical launch of cfg passes as 1
                    # (compiled as constants with as_launched)
                    buckets = list(spec[4]) if len(spec) > 4 and spec[4] is not None else [(dtype, K, V, True)]
                    if dtype == "tf32" and tuner.keys_tf32:  # specs are built as float32; tuners key tf32 apart
                        buckets = [("tf32", *b[1:]) if b and b[0] == "float32" else b for b in buckets]
                    chosen: Dict[Config, bool] = {}  # config -> default of some bucket
                    for bucket in buckets:
                        try:
                            cands = tuner.candidates(tuple(bucket))
                        except Exception as exc:
                            for arch in archs:
                                errors.append(_error_row(fam, tuner.kernel, "-", True, arch, dtype, K, V,
                                                         f"no config for bucket {tuple(bucket)}: {_short(exc)}"))
                            continue
                        for cfg in ([cands[0]] if used_only else cands):
                            chosen[cfg] = chosen.get(cfg, False) or cfg == cands[0]
                    for cfg, is_default in chosen.items():
                        if configs and configs not in cfg.name():
                            continue
                        for arch in archs:
                            jobs.append(Job(fam, dtype, K, V, i, tuner.kernel, cfg, is_default, arch, as_launched))
    return jobs, errors


def _short(exc: BaseException, limit: int = 400) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Triton's CompilationError puts the source excerpt first and the reason last.
    msg = lines[0] if len(lines) <= 1 else f"{lines[0]} ... {lines[-1]}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _row_base(job: Job) -> dict:
    return dict(
        family=job.family, kernel=job.kernel, config=job.config.name(), default=job.default,
        arch=f"sm_{job.arch}", dtype=job.dtype, K=job.K, V=job.V,
        num_warps=job.config.num_warps, num_stages=job.config.num_stages,
    )


def _error_row(fam, kernel, config, default, arch, dtype, K, V, error) -> dict:
    row = dict(family=fam, kernel=kernel, config=config, default=default, arch=f"sm_{arch}", dtype=dtype,
               K=K, V=V, num_warps=None, num_stages=None)
    return _finish(row, compiled=False, error=error)


def _finish(row: dict, compiled: bool, error: Optional[str] = None, **res) -> dict:
    """Fill in the measured fields (``None`` where unknown) and the verdict."""
    for key in ("regs", "stack", "local", "smem_static", "smem_dynamic", "smem", "smem_limit", "hmma",
                "hgmma", "mma", "dots", "tc_dots", "loop_ops", "loop_spills", "seconds"):
        row.setdefault(key, None)
    row.update(res)
    row["compiled"] = compiled
    row["error"] = error
    reasons, notes = [], []
    if not compiled:
        reasons.append(error or "did not compile")
    else:
        if row["stack"] or row["local"]:
            where = f"stack {row['stack']} B, local {row['local']} B"
            if row["loop_spills"] == 0:
                notes.append(f"spills outside loops only ({where})")
            else:  # inside a loop, or not inspected
                reasons.append(f"spills ({where})")
        if row["smem_limit"] is not None and row["smem"] > row["smem_limit"]:
            reasons.append(f"shared memory {row['smem']} B > {row['smem_limit']} B")
        if row["tc_dots"] and not row["mma"]:
            reasons.append("no tensor-core instruction")
        if not row["regs"]:
            reasons.append("no register count")
    row["reasons"] = reasons
    row["notes"] = notes
    row["status"] = "PASS" if not reasons else ("FAIL" if row["default"] else "PRUNED")
    return row


def _cuobjdump() -> str:
    try:
        from triton import knobs

        path = knobs.nvidia.cuobjdump.path
        if path and os.path.exists(path):
            return path
    except Exception:
        pass
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise RuntimeError(f"cuobjdump not found (looked at {path}); set TRITON_CUOBJDUMP_PATH")
    return path


def _quiet_triton_warnings() -> None:
    warnings.filterwarnings("ignore", message=r".*TRITON_DEFAULT_FP_FUSION.*")


def build_source(fn, signature: Dict[str, str], constexprs: Dict[str, object]):
    """The ``ASTSource`` Triton 3.6-3.9 expect: a signature over every parameter, in order, with
    ``"constexpr"`` for compile-time ones (defaults filled in), pointers marked 16-byte aligned
    as torch allocations are (what the launcher specialises on at run time)."""
    from triton.compiler import ASTSource

    names = list(fn.arg_names)
    unknown = set(signature) | set(constexprs)
    unknown -= set(names)
    if unknown:
        raise TypeError(f"{fn.__name__}: unknown arguments {sorted(unknown)}")
    params = {p.name: p for p in getattr(fn, "params", [])}
    sig: Dict[str, str] = {}
    consts = dict(constexprs)
    attrs = {}
    for i, name in enumerate(names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in signature:
            sig[name] = signature[name]
            if signature[name].startswith("*"):
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            p = params.get(name)
            default = getattr(p, "default", inspect.Parameter.empty)
            if p is not None and getattr(p, "is_constexpr", False) and default is not inspect.Parameter.empty:
                consts[name] = default
                sig[name] = "constexpr"
            else:
                raise TypeError(f"{fn.__name__}: argument {name!r} is neither in the signature nor a constexpr")
    return ASTSource(fn, sig, consts, attrs)


def compile_job(job: Job) -> dict:
    """Compile one job and measure it; never raises (a failure is a row)."""
    _quiet_triton_warnings()
    row = _row_base(job)
    t0 = time.perf_counter()
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        specs = _specs(_family_module(job.family), job.dtype, job.K, job.V)
        tuner, fn, signature, constexprs_fn = specs[job.spec][:4]
        if tuner.kernel != job.kernel:
            raise RuntimeError(f"compile_specs order changed: spec {job.spec} is {tuner.kernel}")
        if not isinstance(fn, triton.runtime.JITFunction):
            raise RuntimeError(f"{type(fn).__name__} is not a JITFunction: is TRITON_INTERPRET set?")
        constexprs = dict(constexprs_fn(job.config))
        if job.as_launched and len(specs[job.spec]) > 5:
            # Triton's launcher passes an integer argument equal to 1 as a constant: compiled so, code
            # that treats such an argument as a tensor (x.to(...)) fails where it never did above
            constexprs.update({name: 1 for name in specs[job.spec][5](job.config)})
        src = build_source(fn, signature, constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", job.arch, 32),
                                  options={"num_warps": job.config.num_warps,
                                           "num_stages": job.config.num_stages})
    except Exception as exc:
        return _finish(row, compiled=False, error=_short(exc), seconds=round(time.perf_counter() - t0, 2))
    try:
        cubin = compiled.asm["cubin"]
        fd, path = tempfile.mkstemp(suffix=".cubin")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(cubin)
            out = subprocess.run([_cuobjdump(), "--dump-resource-usage", "--dump-sass", path],
                                 capture_output=True, text=True, check=True).stdout
        finally:
            os.remove(path)
        usage = parse_resource_usage(out)
        name = getattr(compiled.metadata, "name", None) or fn.__name__
        res = usage.get(name) or (max(usage.values(), key=lambda d: d.get("REG", 0)) if usage else {})
        if not res:
            raise RuntimeError("cuobjdump reported no resource usage")
        ops = count_tensor_core_ops(out)
        loops = sass_loops(out)
        src_dot = "tl.dot" in (getattr(fn, "src", None) or "")
        if "ttir" in compiled.asm:  # exact: inlined helpers counted, constexpr-dead branches not
            dots, tc = tensor_core_dots(compiled.asm["ttir"])
        else:
            dots = tc = int(src_dot)
        dyn = int(getattr(compiled.metadata, "shared", 0) or 0)
        static = int(res.get("SHARED", 0))
        return _finish(
            row, compiled=True, regs=res.get("REG"), stack=res.get("STACK", 0), local=res.get("LOCAL", 0),
            smem_static=static, smem_dynamic=dyn, smem=static + dyn, smem_limit=SMEM_LIMIT.get(job.arch),
            hmma=ops["HMMA"], hgmma=ops["HGMMA"], mma=sum(ops.values()), dots=dots, tc_dots=tc, src_dot=src_dot,
            **loops,
            seconds=round(time.perf_counter() - t0, 2),
        )
    except Exception as exc:
        return _finish(row, compiled=False, error=f"inspection failed: {_short(exc)}",
                       seconds=round(time.perf_counter() - t0, 2))


# ------------------------------------------------------------------------------------------------
# process pool: one process per compile, at most `jobs` at a time


def _child(conn, job: Job) -> None:
    try:
        row = compile_job(job)
    except BaseException as exc:  # compile_job does not raise; belt and braces
        row = _finish(_row_base(job), compiled=False, error=_short(exc))
    conn.send(row)
    conn.close()


def _context():
    methods = mp.get_all_start_methods()
    # fork is cheap (the parent has torch and triton imported); spawn elsewhere.
    return mp.get_context("fork" if "fork" in methods and sys.platform != "darwin" else "spawn")


def run_jobs(jobs: Sequence[Job], n_jobs: int = 0, timeout: float = 900.0, progress=None) -> List[dict]:
    """Rows in the order of ``jobs``. Each job runs in its own process, so a compiler crash or
    hang becomes a failed row (``timeout`` seconds per compile)."""
    n_jobs = max(1, n_jobs or os.cpu_count() or 1)
    ctx = _context()
    results: List[Optional[dict]] = [None] * len(jobs)
    pending = list(range(len(jobs)))
    pending.reverse()
    running: Dict[object, Tuple[int, object, float]] = {}  # reader -> (index, process, start)
    done = 0
    try:
        while pending or running:
            while pending and len(running) < n_jobs:
                i = pending.pop()
                reader, writer = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child, args=(writer, jobs[i]), daemon=True)
                proc.start()
                writer.close()
                running[reader] = (i, proc, time.monotonic())
            ready = mp.connection.wait(list(running), timeout=1.0)
            now = time.monotonic()
            for reader in list(running):
                i, proc, t0 = running[reader]
                row = None
                if reader in ready:
                    try:
                        row = reader.recv()
                    except (EOFError, OSError):
                        proc.join(5)
                        row = _finish(_row_base(jobs[i]), compiled=False, seconds=round(now - t0, 2),
                                      error=f"compiler process died (exit code {proc.exitcode})")
                elif now - t0 > timeout:
                    proc.kill()
                    row = _finish(_row_base(jobs[i]), compiled=False, seconds=round(now - t0, 2),
                                  error=f"compile timed out after {timeout:.0f} s")
                if row is None:
                    continue
                reader.close()
                proc.join(5)
                del running[reader]
                results[i] = row
                done += 1
                if progress is not None:
                    progress(done, len(jobs), row)
    finally:
        for reader, (i, proc, t0) in running.items():
            proc.kill()
            proc.join(5)
    return [r for r in results if r is not None]


# ------------------------------------------------------------------------------------------------
# report


def _sort_key(order: Dict[Tuple[str, str], int]):
    def key(row):
        return (row["family"], row["kernel"], row["dtype"], row["K"], row["V"],
                order.get((row["kernel"], row["config"]), 10 ** 6), row["arch"])
    return key


def _fmt(v) -> str:
    return "-" if v is None else str(v)


def format_table(rows: Sequence[dict], failing_only: bool = False) -> str:
    head = "| kernel | config | arch | dtype | K x V | regs | stack/spill B | smem B | mma | step instrs | status | notes |"
    lines = [head, "|---|---|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if failing_only and r["status"] == "PASS":
            continue
        spill = None if r["stack"] is None else (r["stack"] or 0) + (r["local"] or 0)
        mma = r["mma"]
        if mma is not None and (r["hmma"] or r["hgmma"]):
            mma = f"{mma} ({'HGMMA' if r['hgmma'] else 'HMMA'})" if not (r["hmma"] and r["hgmma"]) else \
                f"{mma} ({r['hmma']} HMMA, {r['hgmma']} HGMMA)"
        notes = "; ".join(r["reasons"] + r.get("notes", [])).replace("|", "/")
        lines.append(
            f"| {r['kernel']} | {r['config']}{' *' if r['default'] else ''} | {r['arch']} | {r['dtype']} | "
            f"{r['K']}x{r['V']} | {_fmt(r['regs'])} | {_fmt(spill)} | {_fmt(r['smem'])} | {_fmt(mma)} | "
            f"{_fmt(r.get('loop_ops'))} | {r['status']} | {notes} |"
        )
    return "\n".join(lines)


def summarize(rows: Sequence[dict]) -> str:
    n = len(rows)
    by = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "PRUNED", "FAIL")}
    out = [f"{n} compiles: {by['PASS']} PASS, {by['PRUNED']} PRUNED, {by['FAIL']} FAIL"]
    kernels = sorted({r["kernel"] for r in rows})
    for k in kernels:
        bad = [r for r in rows if r["kernel"] == k and r["status"] != "PASS"]
        if not bad:
            out.append(f"- {k}: every config passes")
            continue
        groups: Dict[str, List[str]] = {}
        for r in bad:
            groups.setdefault(r["config"] + (" (default)" if r["default"] else ""), []).append(
                f"{r['arch']}/{r['dtype']}/{r['K']}x{r['V']}")
        out.append(f"- {k}: {len(bad)} failing rows")
        for cfg, where in groups.items():
            out.append(f"  - {cfg}: {', '.join(where)}")
    fails = [r for r in rows if r["status"] == "FAIL"]
    if fails:
        out.append("FAIL (default configs, used without tuning; fix the space):")
        for r in fails:
            out.append(f"  - {r['kernel']} {r['config']} {r['arch']} {r['dtype']} {r['K']}x{r['V']}: "
                       f"regs {_fmt(r['regs'])}, stack {_fmt(r['stack'])} B, local {_fmt(r['local'])} B, "
                       f"smem {_fmt(r['smem'])} B: {'; '.join(r['reasons'])}")
    out.append("Legend: * = the tuner's default for the bucket (used under the interpreter and with tuning "
               "off). FAIL = a default config fails. PRUNED = a non-default config fails: the runtime tuner "
               "drops configs that fail to compile or overflow shared memory, and times one that spills in a "
               "loop or lacks tensor-core instructions like any other (it is only slow and loses the timing). "
               "step instrs = SASS instructions per thread of the innermost loop holding tensor-core ops "
               "(one step of a walk).")
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# CLI


def _parse_dims(text: str) -> List[Tuple[int, int]]:
    dims = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        k, _, v = item.partition("x")
        try:
            dims.append((int(k), int(v or k)))
        except ValueError:
            raise argparse.ArgumentTypeError(f"head dims: expected e.g. '64,128' or '64x32', got {text!r}")
    if not dims:
        raise argparse.ArgumentTypeError("head dims: empty list")
    return dims


def _parse_list(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parse_archs(text: str) -> List[int]:
    try:
        archs = [int(t.replace("sm_", "")) for t in _parse_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"archs: expected e.g. '80,90', got {text!r}")
    return archs


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--head-dims", type=_parse_dims, default=[(d, d) for d in HEAD_DIMS],
                   help="comma-separated head dims, K=V (e.g. 32,64,128,256) or KxV (64x128); default 64,128")
    p.add_argument("--dtypes", type=_parse_list, default=list(DTYPES),
                   help="comma-separated input dtypes (float16, bfloat16, float32, tf32: fp32 inputs with "
                   "torch's TF32 matmul setting); default float16,bfloat16")
    p.add_argument("--fp32", action="store_true", help="also check float32 inputs")
    p.add_argument("--archs", type=_parse_archs, default=list(ARCHS), help="comma-separated sm archs; default 80,90")
    p.add_argument("--kernels", type=_parse_list, default=None, help="only these tuner kernel names (comma-separated)")
    p.add_argument("--families", type=_parse_list, default=list(FAMILIES), help="kernel family modules to check")
    p.add_argument("--used-only", action="store_true",
                   help="only each bucket's default config (the one used without tuning)")
    p.add_argument("--configs", default=None, metavar="TEXT", help="only configs whose name contains TEXT")
    p.add_argument("--as-launched", action="store_true",
                   help="compile the integer arguments a typical launch passes as 1 (the dims a config's rank "
                        "lacks, dilation, ...; named by each family's compile_specs) as the constants Triton's "
                        "launcher makes of them")
    p.add_argument("--jobs", "-j", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: CPUs)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per compile")
    p.add_argument("--json", metavar="PATH", default=None, help="write every row (and a summary) as JSON")
    p.add_argument("--failing-only", action="store_true", help="print only the rows that do not pass")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")


def _without_interpreter_env() -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def run(args: argparse.Namespace) -> int:
    if interpreting() or os.environ.get("TRITON_INTERPRET") is not None:
        # Kernels imported under the interpreter are not JITFunctions: start over without it.
        cmd = [sys.executable, "-m", "subquad.autotune", "check"] + list(args._argv)
        sys.stdout.flush()
        return subprocess.call(cmd, env=_without_interpreter_env())
    _quiet_triton_warnings()
    import triton

    dtypes = list(args.dtypes) + (["float32"] if args.fp32 and "float32" not in args.dtypes else [])
    t0 = time.perf_counter()
    jobs, errors = collect_jobs(args.families, dtypes, args.head_dims, args.archs, args.kernels, args.used_only,
                                args.configs, args.as_launched)
    if args.kernels:
        seen = {j.kernel for j in jobs} | {e["kernel"] for e in errors}
        missing = [k for k in args.kernels if k not in seen]
        if missing:
            print(f"subquad check: no kernel named {', '.join(missing)}", file=sys.stderr)
            return 2
    order = {}
    for j in jobs:
        order.setdefault((j.kernel, j.config.name()), len(order))

    def progress(done, total, row):
        if not args.quiet:
            print(f"[{done}/{total}] {row['kernel']} {row['config']} {row['arch']} {row['dtype']} "
                  f"{row['K']}x{row['V']}: {row['status']} ({row['seconds']} s)", file=sys.stderr, flush=True)

    if not args.quiet:
        print(f"subquad check: {len(jobs)} compiles on {max(1, args.jobs)} processes "
              f"(triton {triton.__version__})", file=sys.stderr, flush=True)
    rows = errors + run_jobs(jobs, args.jobs, args.timeout, progress)
    rows.sort(key=_sort_key(order))
    seconds = time.perf_counter() - t0
    print(format_table(rows, failing_only=args.failing_only))
    print()
    print(summarize(rows))
    print(f"triton {triton.__version__}; {len(rows)} rows in {seconds:.1f} s with {max(1, args.jobs)} processes")
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "seconds": round(seconds, 1), "jobs": max(1, args.jobs),
                       "archs": list(args.archs), "dtypes": dtypes, "head_dims": [list(d) for d in args.head_dims],
                       "used_only": bool(args.used_only), "as_launched": bool(args.as_launched), "rows": rows},
                      f, indent=1)
    return 1 if any(r["status"] == "FAIL" for r in rows) else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m subquad.autotune check", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    args._argv = argv
    return run(args)
