"""pytest-benchmark cases for neighborhood attention: ``pytest bench --benchmark-only``.

On a GPU: fp16, B=1, H=24, D=128, subquad's kernel vs SDPA full attention (cuDNN and flash
backends) vs NATTEN (when importable with its compiled library), forward and forward+backward, on
two moderate cases (1-D n=8192 k=512; 2-D 64x64 k=16 stride 8); every timed call ends with
``torch.cuda.synchronize()``. Compiled FlexAttention is left to ``python bench/neighborhood.py``
(its compiles would take most of a GPU check's time cap). On CPU: the reference path vs dense SDPA
on CPU, fp32, B=1, H=4, D=32, 2-D k=7 at 32x32 and 64x64.

Also, outside --benchmark-only (``pytest bench``): the FlexAttention baseline's mask_mod agrees
with the reference's neighborhood_mask, and eager flex_attention under its BlockMask agrees with
the reference op, on small 1-D/2-D/3-D cases with stride, dilation and causal dims (CPU).
Not part of ``pytest tests``.
"""

import pytest
import torch

from bench import common
from bench import neighborhood as nb

CUDA = torch.cuda.is_available()
if CUDA:
    DEVICE, DTYPE, SHAPE, ROUNDS = "cuda", torch.float16, dict(B=1, H=24, D=128), 20
    CASES = [dict(name="1d-n8192-k512", shape=(8192,), kernel_size=512),
             dict(name="2d-64x64-k16-s8", shape=(64, 64), kernel_size=(16, 16), stride=(8, 8))]
    IMPLS = ["subquad", "sdpa_cudnn", "sdpa_flash", "natten"]
else:
    DEVICE, DTYPE, SHAPE, ROUNDS = "cpu", torch.float32, dict(B=1, H=4, D=32), 3
    CASES = [dict(name="2d-32x32-k7", shape=(32, 32), kernel_size=7),
             dict(name="2d-64x64-k7", shape=(64, 64), kernel_size=7)]
    IMPLS = ["subquad", "sdpa"]  # "sdpa": plain SDPA on CPU


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_neighborhood(benchmark, impl, mode, case):
    if impl == "natten" and not nb.natten_gpu_usable(nb.natten_module()):
        pytest.skip("NATTEN needs a GPU and must be importable with its compiled library (libnatten)")
    B, H, D = SHAPE["B"], SHAPE["H"], SHAPE["D"]
    fn, leaves = nb.make_case("sdpa_flash" if impl == "sdpa" else impl, mode, case, B, H, D, DTYPE, DEVICE)

    common.pytest_benchmark_run(benchmark, fn, leaves, ROUNDS, f"neighborhood {mode} {case['name']}", B=B, H=H, D=D, dtype=str(DTYPE), case=nb.describe(case))


# ----------------------------------------------------------------------------------------------
# the FlexAttention baseline computes the same function (not benchmarks: skipped by --benchmark-only)


@pytest.mark.parametrize("mask_case", nb.FLEX_MASK_CHECKS, ids=lambda c: nb.describe(c).replace(" ", "_"))
def test_flex_mask_mod_matches_neighborhood_mask(mask_case):
    row = nb.check_flex_mask(**mask_case)
    assert row["ok"], f"{row['case']}: {row['err']} positions differ from neighborhood_mask"


@pytest.mark.parametrize("case", [
    dict(name="1d", shape=(150,), kernel_size=6, stride=3, dilation=2, is_causal=False),
    dict(name="2d", shape=(11, 13), kernel_size=(3, 4), stride=(1, 2), dilation=(2, 1), is_causal=(False, True)),
    dict(name="3d", shape=(5, 6, 7), kernel_size=(2, 3, 3), stride=(1, 2, 3), dilation=(2, 1, 2),
         is_causal=(True, False, False)),
], ids=lambda c: c["name"])
def test_flex_attention_matches_reference(case):
    """Eager flex_attention under create_block_mask(flex_mask_mod) on CPU (the vmap path that builds
    the block mask, with partial 128-token blocks) vs subquad's reference op, same inputs."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    B, H, D = 1, 2, 16
    outs = []
    for impl in ("subquad", "flex"):
        layout, attn = nb.attention_fn(impl, case, "cpu", compiled_flex=False)
        q, k, v, _ = nb.make_inputs(case, B, H, D, torch.float32, "cpu", seed=3)
        o = attn(*(common.to_layout(x, layout) for x in (q, k, v)))
        outs.append(nb.from_layout(o, layout, q))
    torch.testing.assert_close(outs[1], outs[0], atol=2e-5, rtol=1e-4)


def test_run_gpu_measures_only_the_implementations_asked_for(monkeypatch, tmp_path):
    """--impl restricts the rows the GPU benchmark measures (the loop over implementation groups once
    shadowed the argument, and every implementation ran). The measurement itself is stubbed: this
    runs on a CPU."""
    seen = []

    def fake_measure(impl, case, dtype, B, H, D, modes, deadline):
        seen.append(impl)
        return {"fwd_ms": 1.0}

    monkeypatch.setattr(nb, "measure_gpu", fake_measure)
    monkeypatch.setattr(nb, "natten_module", lambda: None)
    nb.run_gpu(True, str(tmp_path), cases=["1d-s256"], modes=["fwd"], impls=["subquad", "sdpa_cudnn"])
    assert seen == ["subquad", "sdpa_cudnn"]


def test_kernel_tiles_report_the_tuned_choice():
    """The tile bound is computed on the tiles that ran: the tuner's choice on the device, not the
    bucket's default (the tuner memoises per device; looking up the bare bucket always missed)."""
    from subquad.autotune import spaces
    from subquad.kernels.neighborhood import tuner_bucket

    case = dict(name="3d", shape=(30, 48, 80), kernel_size=(18, 24, 24), stride=(16, 8, 8))
    bucket = tuner_bucket(torch.float16, 128, 3, (16, 8, 8))
    dev = torch.device("cuda", 0)
    tuner = spaces.NEIGHBORHOOD_FWD
    other = next(c for c in tuner.candidates(bucket) if c != tuner.default(bucket))
    key = (bucket, "cuda", 0)
    tuner._memo[key] = other
    try:
        fwd = nb.kernel_tiles(torch.float16, 128, case, device=dev)["fwd"]
    finally:
        del tuner._memo[key]
    assert fwd["source"] == "chosen" and fwd["config"] == other.name()
    assert nb.kernel_tiles(torch.float16, 128, case, device=dev)["fwd"]["source"] == "default"
