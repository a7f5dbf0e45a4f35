"""pytest-benchmark cases for HiP attention: ``pytest bench --benchmark-only``.

On a GPU: bf16, B=1, H=32, H_kv=8, D=128, the API defaults, subquad's hip_attention (mask
estimation + attention every call), hip_attention with a reused mask, and SDPA causal, forward
and forward+backward at T = 8k and 32k; every timed call ends with ``torch.cuda.synchronize()``.
On CPU: the reference path with a reused mask vs SDPA causal on CPU, fp32, B=1, H=2, H_kv=1,
D=32, T=1024 (the literal tree search is left to ``python bench/hip.py``). The full tables are
``python bench/hip.py``.

Also, outside --benchmark-only (``pytest bench``): the capture benchmark's visibility mask equals
``reference.hip.hip_visible``, and its capture of a selection that keeps every block is 1.
Not part of ``pytest tests``.
"""

import pytest
import torch

from bench import common
from bench import hip

CUDA = torch.cuda.is_available()
if CUDA:
    DEVICE, DTYPE, SHAPE, TS, ROUNDS = "cuda", torch.bfloat16, dict(B=1, H=32, Hkv=8, D=128), [8192, 32768], 10
    IMPLS = ["hip_attention", "hip_attention_masked", "sdpa"]
else:
    DEVICE, DTYPE, SHAPE, TS, ROUNDS = "cpu", torch.float32, dict(B=1, H=2, Hkv=1, D=32), [1024], 3
    IMPLS = ["hip_attention_masked", "sdpa"]


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_hip(benchmark, impl, mode, T):
    B, H, Hkv, D = SHAPE["B"], SHAPE["H"], SHAPE["Hkv"], SHAPE["D"]
    fn, leaves = hip.make_case(impl, mode, B, T, H, Hkv, D, DTYPE, DEVICE)
    common.pytest_benchmark_run(benchmark, fn, leaves, ROUNDS, f"hip {mode} T={T}", B=B, T=T, H=H, H_kv=Hkv, D=D,
                                dtype=str(DTYPE), params=str(hip.PARAMS))


# ----------------------------------------------------------------------------------------------
# the capture benchmark measures what it says (not benchmarks: skipped by --benchmark-only)


def test_visible_rows_matches_reference():
    from subquad.reference import hip as ref

    Tq, Tk, H, bsq, bk, S, W, Kb = 50, 90, 2, 16, 3, 5, 9, 4
    g = torch.Generator().manual_seed(0)
    nqb = -(-Tq // bsq)
    blocks = torch.full((1, H, nqb, Kb), -1, dtype=torch.int32)
    for qb in range(nqb):
        nb = max(0, -(-(Tk - Tq + qb * bsq - W + 1 - S) // bk))
        n = min(nb, Kb - 1)
        for h in range(H):
            if n:
                blocks[0, h, qb, :n] = torch.randperm(nb, generator=g)[:n].sort().values.int()
    want = ref.hip_visible(blocks, Tq, Tk, block_size_q=bsq, block_size_k=bk, sink_tokens=S, window=W)
    for h in range(H):
        got = torch.cat([hip.visible_rows(blocks[0, h], r0, min(r0 + 7, Tq), Tq, Tk, bsq, bk, S, W)
                         for r0 in range(0, Tq, 7)])
        assert torch.equal(got, want[0, h])


def test_capture_of_full_selection_is_one():
    B, T, H, D = 1, 96, 2, 16
    p = dict(hip.PARAMS, topk=256, block_size_q=16, sink_tokens=4, window=8)
    q, k, _ = hip.make_qkv(B, T, H, 1, D, torch.float32, "cpu", seed=1)
    nqb = T // 16
    blocks = torch.full((B, H, nqb, 128), -1, dtype=torch.int32)
    for qb in range(nqb):
        nb = max(0, -(-(qb * 16 - 8 + 1 - 4) // 2))
        blocks[:, :, qb, :nb] = torch.arange(nb, dtype=torch.int32)
    res = hip.capture_fraction(q * 3, k, blocks, p, chunk=40)
    assert abs(res["capture"] - 1) < 1e-5 and abs(res["coverage"] - 1) < 1e-6
    partial = hip.capture_fraction(q * 3, k, torch.full_like(blocks, -1), p, chunk=40)
    assert partial["capture"] < 0.99 and partial["coverage"] < 0.99
