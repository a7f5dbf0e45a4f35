"""python -m bench: check every family's Triton kernel against its reference, then time it.

On a CUDA machine the kernels run natively (moderate sizes) and the speed table is the GPU one
(kernel vs SDPA and peers). Without CUDA the kernels run through the Triton interpreter (small
sizes) and the speed table is the CPU one (reference path vs SDPA on CPU). Exits 1 when a
correctness check fails. Quick sizes by default: a few minutes at most on any machine.
"""

import os
import sys

import torch

# The interpreter must be switched on before triton is first imported (subquad's kernels import it).
if not torch.cuda.is_available():
    from subquad.autotune.tuner import interpreting  # imports no triton

    if "triton" in sys.modules and not interpreting():
        sys.exit("python -m bench: triton was imported before TRITON_INTERPRET=1 could be set")
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import importlib  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from unittest import mock  # noqa: E402

from bench import FAMILIES, common  # noqa: E402
from bench.common import fmt  # noqa: E402


def run_checks(name: str) -> list:
    """The family's check rows; an exception becomes one failed row. The checks run each kernel's
    default config, untuned: their inputs are small, and a tuning bucket holds no problem size, so
    timing candidates on them would pick configs on launch-latency-sized calls, which the speed
    tables (and the disk cache) would then reuse. The choices are forgotten afterwards, so the speed
    tables tune on their own sizes. (Every config is checked against the reference by the tests.)"""
    from subquad.autotune import spaces

    try:
        with mock.patch.dict(os.environ, {"SUBQUAD_AUTOTUNE": "0"}):
            return importlib.import_module(f"bench.{name}").check()
    except Exception as exc:
        traceback.print_exc()
        return [dict(family=name, case="check", tensor="-", err=None, ref_err=None, bound=None, ok=False,
                     error=f"{type(exc).__name__}: {exc}")]
    finally:
        for tuner in spaces.ALL:
            tuner.forget_choices()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=common.DEFAULT_OUT, help="folder for results (default bench/out)")
    p.add_argument("--full", action="store_true", help="full benchmark sizes instead of the quick ones")
    p.add_argument("--check-only", action="store_true", help="correctness checks only, no speed tables")
    p.add_argument("--speed-only", action="store_true",
                   help="speed tables only, no checks (when the test suite has just run on this machine)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the checks and speed tables, all families together (each family's table gets "
                        "an equal share of what is left); cases past it are skipped")
    p.add_argument("--family", action="append", choices=FAMILIES, help="only this family (repeatable)")
    args = p.parse_args(argv)
    families = args.family or FAMILIES
    start = time.monotonic()

    info = common.env_info()
    where = f"GPU {info['gpu']} (native)" if info["gpu"] else "CPU (Triton interpreter for the kernels)"
    print(f"# subquad bench: {where}; torch {info['torch']}, triton {info['triton']}, commit {info['commit']}\n")

    failed = []
    for name in [] if args.speed_only else families:
        t0 = time.monotonic()
        rows = run_checks(name)
        print(f"## {name}: Triton kernel vs float64 reference ({time.monotonic() - t0:.0f} s)\n")
        print(common.markdown_table(
            ["case", "tensor", "max error", "reference-in-dtype error", "bound", "result"],
            [[r["case"], r["tensor"], fmt(r["err"]), fmt(r["ref_err"]), fmt(r["bound"]),
              "PASS" if r["ok"] else "FAIL " + r.get("error", "")] for r in rows]))
        print()
        failed += [r for r in rows if not r["ok"]]

    if not args.check_only:
        for i, name in enumerate(families):
            # a fair share of what is left: one family (FLA's autotuning in lightning's) cannot starve the next
            left = None if args.budget is None else max(0.0, args.budget - (time.monotonic() - start))
            budget = None if left is None else left / (len(families) - i)
            importlib.import_module(f"bench.{name}").run(quick=not args.full, out_dir=args.out, budget=budget)
            print()

    verdict = f"FAIL ({len(failed)} checks)" if failed else "not run (--speed-only)" if args.speed_only else "PASS"
    print(f"# correctness: {verdict}; total {time.monotonic() - start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
