"""Random-case fuzzing of the Triton kernels against the references (not collected by pytest).

    python tests/fuzz.py [--family neighborhood|routing|hip] [--n 100] [--seed 1000] [--minutes M]

Each case draws a random geometry (odd sizes, windows, strides, dilations, causal dims, GQA,
region grids, HiP block tables), a dtype (fp32 / fp16; bf16 too on a GPU) and, for every tuner
of the family, a random config among those valid for the case's bucket (the tuner may pick any
on a GPU), then runs the family's test check: forward and dq/dk/dv against the float64 naive
definition under the flash-attention error rule, outputs NaN-poisoned. A failure prints the
case, the configs and the seed, which replays it alone (``--seed S --n 1``). On a CPU the kernels
run under the Triton interpreter (seconds per case).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # noqa: E402,F401  (interpreter on a CPU, NaN poisoning: before any kernel import)

import torch  # noqa: E402

from helpers import KERNEL_DTYPES  # noqa: E402
from subquad.autotune import spaces  # noqa: E402


def neighborhood_case(rng: random.Random):
    nd = rng.choice([1, 1, 2, 2, 3])
    spatial, ks, ss, ds, cs = [], [], [], [], []
    for _ in range(nd):
        k = rng.randint(2, {1: 13, 2: 7, 3: 4}[nd])
        d = rng.choice([1, 1, 1, 2, 3])
        extra = {1: 70, 2: 14, 3: 5}[nd]
        if k * d > k * 1 + extra:
            d = 1
        n = rng.randint(k * d, k * d + extra)
        spatial.append(n)
        ks.append(k)
        ss.append(rng.choice([1, k, rng.randint(1, k)]))
        ds.append(d)
        cs.append(rng.random() < 0.3)
    H, Hkv = rng.choice([(1, 1), (2, 1), (3, 1), (2, 2), (4, 2)])
    D = rng.choice([16, 16, 24, 32, 48])
    B = rng.choice([1, 1, 2])
    return (B, tuple(spatial), H, Hkv, D, tuple(ks), tuple(ss), tuple(ds), tuple(cs))


def routing_case(rng: random.Random):
    if rng.random() < 0.4:
        spatial = (rng.randint(1, 160),)
        S = (rng.randint(1, min(spatial[0], rng.choice([6, 40]))),)
    else:  # sometimes more than 16 region columns (pooling's column groups) and padded bands
        spatial = (rng.randint(1, 18), rng.randint(1, rng.choice([18, 40])))
        S = (rng.randint(1, min(spatial[0], 6)), rng.randint(1, min(spatial[1], rng.choice([6, 20]))))
    R = 1
    for s in S:
        R *= s
    topk = rng.choice([1, R, rng.randint(1, R)])
    routing = rng.choice(["shared", "per_head"])
    return (rng.choice([1, 2]), spatial, rng.choice([1, 2, 3]), rng.choice([16, 32, 48]), S, topk, routing)


def hip_case(rng: random.Random):
    Tk = rng.randint(1, 200)
    Tq = rng.choice([Tk, 1, rng.randint(1, Tk)])
    H, Hkv = rng.choice([(1, 1), (2, 1), (2, 2), (4, 2)])
    D = rng.choice([16, 24, 32])
    bsq = rng.choice([1, 4, 5, 16, 32, 64])
    bk = rng.choice([1, 2, 3, 4, 8])
    S = rng.choice([0, rng.randint(1, 20)])
    W = rng.choice([0, rng.randint(1, 40)])
    Kb = rng.randint(1, 12)
    return (rng.choice([1, 2]), Tq, Tk, H, Hkv, D, bsq, bk, S, W, Kb)


FAMILIES = {
    # name: (test module, case generator, tuners whose choice is drawn at random)
    "neighborhood": ("test_neighborhood", neighborhood_case, spaces.NEIGHBORHOOD),
    "routing": ("test_routing", routing_case, spaces.ROUTING),
    "hip": ("test_hip", hip_case, spaces.HIP_ATTENTION),
}


def run_case(family: str, seed: int, picks: dict):
    """One case (raises on a mismatch); ``picks`` receives the configs drawn."""
    module, make, tuners = FAMILIES[family]
    case, dtype = describe(family, seed)

    def chooser(tuner):
        def choose(bucket, device, bench):
            cfg = picks.setdefault(tuner.kernel, random.Random(f"{seed}-{tuner.kernel}").choice(
                tuner.candidates(bucket)))
            return cfg
        return choose

    saved = [(t, t.__dict__.get("choose")) for t in tuners]
    for t in tuners:
        t.choose = chooser(t)
    try:
        check = __import__(module)._check
        check(*case, dtype)
    finally:
        for t, old in saved:
            if old is None:
                del t.choose
            else:
                t.choose = old


def describe(family: str, seed: int):
    rng = random.Random(seed)
    case = FAMILIES[family][1](rng)
    return case, rng.choice(KERNEL_DTYPES)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", action="append", choices=sorted(FAMILIES))
    ap.add_argument("--n", type=int, default=100, help="cases per family")
    ap.add_argument("--seed", type=int, default=1000, help="first seed")
    ap.add_argument("--minutes", type=float, default=0, help="stop after this long (0: no limit)")
    args = ap.parse_args()
    families = args.family or sorted(FAMILIES)
    t_end = time.time() + args.minutes * 60 if args.minutes else float("inf")
    failures = 0
    for i in range(args.n):
        for family in families:
            if time.time() > t_end:
                break
            seed = args.seed + i
            t0 = time.time()
            picks = {}
            case, dtype = describe(family, seed)
            line = f"{family} seed={seed} {case} {str(dtype).replace('torch.', '')}"
            try:
                run_case(family, seed, picks)
                cfgs = " ".join(f"{k}={c.name()}" for k, c in sorted(picks.items()))
                print(f"ok   {time.time() - t0:5.1f}s {line} {cfgs}", flush=True)
            except Exception:
                failures += 1
                cfgs = " ".join(f"{k}={c.name()}" for k, c in sorted(picks.items()))
                print(f"FAIL {line} {cfgs}\n     replay: --family {family} --seed {seed} --n 1", flush=True)
                traceback.print_exc(limit=3)
                sys.stdout.flush()
    print(f"{failures} failure(s)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
