"""pytest-benchmark cases for bi-level routing attention: ``pytest bench --benchmark-only``.

On a GPU: bf16, subquad's kernels vs the gather implementation (BiFormer's approach) vs SDPA full
attention, forward and forward+backward, on BiFormer-S stages 1 and 3 at batch 16 (56x56, H=2,
topk 1; 14x14, H=8, topk 16; D=32, 7x7 regions). On CPU: the reference path vs dense SDPA on CPU,
fp32, 28x28 and 56x56 (H=2, D=32, 7x7 regions, topk 4). Full tables: ``python bench/routing.py``.

Also, outside --benchmark-only: the gather baseline computes what subquad computes (CPU).
Not part of ``pytest tests``.
"""

import pytest
import torch

from bench import common
from bench import routing as rb

CUDA = torch.cuda.is_available()
if CUDA:
    DEVICE, DTYPE, ROUNDS, IMPLS = "cuda", torch.bfloat16, 20, ["subquad", "gather", "sdpa"]
    CASES = [dict(name="s1-56x56-b16", B=16, shape=(56, 56), H=2, D=32, S=7, topk=1),
             dict(name="s3-14x14-b16", B=16, shape=(14, 14), H=8, D=32, S=7, topk=16)]
else:
    DEVICE, DTYPE, ROUNDS, IMPLS = "cpu", torch.float32, 3, ["subquad", "sdpa"]
    CASES = [dict(name="28x28", B=1, shape=(28, 28), H=2, D=32, S=7, topk=4),
             dict(name="56x56", B=1, shape=(56, 56), H=2, D=32, S=7, topk=4)]


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_routing(benchmark, impl, mode, case):
    fn, leaves = rb.make_case(impl, mode, case, DTYPE, DEVICE)
    common.pytest_benchmark_run(benchmark, fn, leaves, ROUNDS, f"routing {mode} {case['name']}",
                                dtype=str(DTYPE), case=rb.describe(case))


def test_gather_baseline_matches_subquad():
    """The benchmark's gather baseline and subquad's op agree (CPU reference path, padded sizes)."""
    case = dict(name="t", B=2, shape=(15, 11), H=2, D=16, S=4, topk=3)
    outs = []
    for impl in ("subquad", "gather"):
        _, attn = rb.attention_fn(impl, case)
        q, k, v, _ = rb.make_inputs(case, torch.float32, "cpu", seed=3)
        outs.append(attn(q, k, v))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)


def test_host_stub_times_the_host_path_and_restores_the_kernels(capsys):
    """bench/host_stub.py (routing's host work with the launches stubbed, on meta tensors) runs on
    any machine and puts the real kernels back afterwards."""
    from bench import host_stub
    from subquad.kernels import routing as K

    before = {name: getattr(K, name) for name in host_stub.KERNELS}
    host_stub.main(["s3-14x14"])
    assert "s3-14x14: forward (no autograd)" in capsys.readouterr().out
    assert {name: getattr(K, name) for name in host_stub.KERNELS} == before
