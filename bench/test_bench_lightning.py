"""pytest-benchmark cases for lightning attention: ``pytest bench --benchmark-only``.

On a GPU: bf16, B=4, H=32, D=128, subquad's kernel vs SDPA causal (flash) vs FLA's
chunk_simple_gla (when importable), forward and forward+backward; every timed call ends with
``torch.cuda.synchronize()`` so the timer sees the GPU's work. On CPU: the reference path vs SDPA
causal on CPU, fp32, B=1, H=8, D=64, small T. The full tables are ``python bench/lightning.py``;
these exist so results can be compared across commits with pytest-benchmark's own tools
(``--benchmark-autosave``, ``--benchmark-compare``). Not part of ``pytest tests``.
"""

import pytest
import torch

from bench import common, lightning

CUDA = torch.cuda.is_available()
if CUDA:
    DEVICE, DTYPE, SHAPE, TS, ROUNDS = "cuda", torch.bfloat16, dict(B=4, H=32, D=128), [4096, 16384], 20
else:
    DEVICE, DTYPE, SHAPE, TS, ROUNDS = "cpu", torch.float32, dict(B=1, H=8, D=64), [1024, 2048], 3


@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", ["subquad", "sdpa", "fla_chunk"])
def test_lightning(benchmark, impl, mode, T):
    if impl == "fla_chunk" and (not CUDA or lightning.fla_ops() is None):
        pytest.skip("flash-linear-attention needs a GPU and must be importable")
    B, H, D = SHAPE["B"], SHAPE["H"], SHAPE["D"]
    fn, leaves = lightning.make_case(impl, mode, B, T, H, D, DTYPE, DEVICE)

    common.pytest_benchmark_run(benchmark, fn, leaves, ROUNDS, f"lightning {mode} T={T}", B=B, T=T, H=H, D=D, dtype=str(DTYPE), tokens=B * T)
