"""Static compile check (``python -m subquad.autotune check``): the parsers on canned tool output,
the cache subcommand, and the real check of every kernel's default config (the one used without
tuning) for sm_80 and sm_90, fp16 and bf16, head dims 64 and 128 (``SUBQUAD_CHECK_HEAD_DIMS``),
compiled without a GPU."""

import json
import os
import subprocess
import sys

import pytest

from subquad.autotune import check
from subquad.autotune.__main__ import main as cli_main

RESOURCE_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _fwd_kernel:
  REG:255 STACK:1368 SHARED:1024 LOCAL:8 CONSTANT[0]:448 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _helper:
  REG:40 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:400 TEXTURE:0 SURFACE:0 SAMPLER:0
"""

SASS = """
\tcode for sm_90a
\t\tFunction : _fwd_kernel
        /*cff0*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR16], RZ, !UPT ;   /* 0x00e00000101879f0 */
                                                                                          /* 0x000fe20008000818 */
        /*d000*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR44], R24 ;        /* 0x00e000002c1879f0 */
        /*d010*/               @P0 HMMA.16816.F32.BF16 R4, R8, R12, R4 ;                  /* 0x0000000c0804723c */
        /*d020*/                   FFMA R0, R1, R2, R0 ;                                  /* 0x0000000201007223 */
        /*d030*/                   MOV R5, 0x0 ;  // HMMA in a comment does not count   /* 0x0000000000057802 */
"""

TTIR = """
    %a = tt.dot %q, %k, %c, inputPrecision = tf32 : tensor<64x64xf16> * tensor<64x64xf16> -> tensor<64x64xf32> loc(#l1)
    %b = tt.dot %x, %s, %c, inputPrecision = tf32 : tensor<64x64xf32> * tensor<64x64xf32> -> tensor<64x64xf32> loc(#l2)
    %d = tt.dot %x, %s, %c : tensor<64x64xf32> * tensor<64x64xf32> -> tensor<64x64xf32> loc(#l3)
"""


def test_parse_resource_usage():
    usage = check.parse_resource_usage(RESOURCE_USAGE)
    assert set(usage) == {"_fwd_kernel", "_helper"}
    k = usage["_fwd_kernel"]
    assert (k["REG"], k["STACK"], k["SHARED"], k["LOCAL"], k["CONSTANT[0]"]) == (255, 1368, 1024, 8, 448)
    assert usage["_helper"]["REG"] == 40
    # one-line form
    one = check.parse_resource_usage("Function f: REG:32 STACK:0 SHARED:16 LOCAL:0")
    assert one == {"f": {"REG": 32, "STACK": 0, "SHARED": 16, "LOCAL": 0}}


def test_count_tensor_core_ops_and_dots():
    ops = check.count_tensor_core_ops(SASS)
    assert ops["HGMMA"] == 2 and ops["HMMA"] == 1 and sum(ops.values()) == 3
    # fp16 dot and tf32 dot go to tensor cores; the IEEE fp32 dot does not.
    assert check.tensor_core_dots(TTIR) == (3, 2)


LOOP_SASS = """
        /*0000*/                   STL [R1], R8 ;                                         /* 0x0 */
        /*0010*/                   IMAD R2, R3, R4, RZ ;                                  /* 0x0 */
        /*0020*/                   HGMMA.64x64x16.F32 R24, gdesc[UR16], RZ, !UPT ;        /* 0x0 */
        /*0030*/               @P0 BRA 0x50 ;                                             /* 0x0 */
        /*0040*/                   FSEL R5, R5, -INF , !P1 ;                              /* 0x0 */
        /*0050*/                   FFMA R0, R1, R2, R0 ;                                  /* 0x0 */
        /*0060*/               @P1 BRA 0x10 ;                                             /* 0x0 */
        /*0070*/                   LDL.LU R8, [R1] ;                                      /* 0x0 */
        /*0080*/                   IADD3 R9, R9, 0x1, RZ ;                                /* 0x0 */
        /*0090*/                   LDL R7, [R1+0x4] ;                                     /* 0x0 */
        /*00a0*/               @P2 BRA 0x80 ;                                             /* 0x0 */
        /*00b0*/                   EXIT ;                                                 /* 0x0 */
"""


def test_sass_loops():
    # the tensor-core loop is [0x10, 0x60] (6 instructions; the forward branch inside is not a loop);
    # the spill store / reload around it are outside any loop, the LDL in the second loop is inside
    assert check.sass_loops(LOOP_SASS) == {"loop_ops": 6, "loop_spills": 1}
    assert check.sass_loops(LOOP_SASS.replace("@P2 BRA 0x80", "@P2 BRA 0xb0")) == {"loop_ops": 6, "loop_spills": 0}
    assert check.sass_loops(SASS) == {"loop_ops": 0, "loop_spills": 0}


def test_verdicts():
    base = dict(family="f", kernel="k", config="c", arch="sm_80", dtype="float16", K=64, V=64)
    good = dict(regs=128, stack=0, local=0, smem_static=0, smem_dynamic=1000, smem=1000, smem_limit=166912,
                hmma=4, hgmma=0, mma=4, dots=1, tc_dots=1)
    assert check._finish(dict(base, default=True), True, **good)["status"] == "PASS"
    spill = dict(good, stack=56)  # where the spill lies unknown: counts as in a loop
    assert check._finish(dict(base, default=True), True, **spill)["status"] == "FAIL"
    assert check._finish(dict(base, default=False), True, **spill)["status"] == "PRUNED"
    assert check._finish(dict(base, default=True), True, **dict(spill, loop_spills=2))["status"] == "FAIL"
    parked = check._finish(dict(base, default=True), True, **dict(spill, loop_spills=0))
    assert parked["status"] == "PASS" and parked["notes"] == ["spills outside loops only (stack 56 B, local 0 B)"]
    smem = dict(good, smem=200000)
    assert check._finish(dict(base, default=True), True, **smem)["status"] == "FAIL"
    no_tc = dict(good, mma=0, hmma=0)
    assert check._finish(dict(base, default=True), True, **no_tc)["status"] == "FAIL"
    fp32 = dict(good, mma=0, hmma=0, tc_dots=0)  # IEEE fp32 dots: FMA by design
    assert check._finish(dict(base, default=True), True, **fp32)["status"] == "PASS"
    assert check._finish(dict(base, default=True), False, error="boom")["status"] == "FAIL"


def test_cache_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SUBQUAD_CACHE_DIR", str(tmp_path))
    path = tmp_path / "autotune.json"
    assert cli_main(["cache"]) == 0
    assert "no cache file" in capsys.readouterr().out
    entry = {"config": {"kw": {"BT": 64, "BV": 32}, "num_warps": 4, "num_stages": 2},
             "ms": {"BT64_BV32_w4_s2": 0.5, "BT64_BV64_w8_s2": "failed: OutOfResources"}}
    path.write_text(json.dumps({"NVIDIA H100|triton-3.6.0|lightning_fwd|bfloat16-128-128-True": entry}))
    assert cli_main(["cache"]) == 0
    out = capsys.readouterr().out
    assert str(path) in out and "lightning_fwd" in out and "BT=64 BV=32" in out and "0.5000 ms" in out
    assert cli_main(["cache", "--clear"]) == 0
    assert not path.exists()


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return env


def _expected_kernels(family, dtype, K, V):
    import importlib

    mod = importlib.import_module(f"subquad.kernels.{family}")
    return {spec[0].kernel for spec in mod.compile_specs(dtype, K, V)}


def _cuobjdump_available():
    try:
        check._cuobjdump()
        return sys.platform.startswith("linux")
    except Exception:
        return False


def test_check_compiles_the_defaults_of_tf32_buckets():
    """``--dtypes tf32`` checks the configs the tuners pick for tf32 buckets (keyed apart from
    float32's, with defaults of their own), not float32's. No compile: only the jobs."""
    from subquad.autotune import spaces

    def chosen(dtype):
        jobs, errors = check.collect_jobs(["neighborhood", "routing"], [dtype], [(128, 128)], [90], used_only=True)
        assert jobs and not errors, errors
        return {(j.kernel, j.config) for j in jobs}

    tf32, fp32 = chosen("tf32"), chosen("float32")
    for tuner, bucket in ((spaces.NEIGHBORHOOD_BWD_DKDV, (128, 3, False)), (spaces.ROUTING_BWD_DKDV, (128, 64, 64))):
        own, ieee = tuner.default(("tf32", *bucket)), tuner.default(("float32", *bucket))
        assert own != ieee  # the case this test is about: tf32 has a default of its own here
        assert (tuner.kernel, own) in tf32 and (tuner.kernel, own) not in fp32
        assert (tuner.kernel, ieee) in fp32 and (tuner.kernel, ieee) not in tf32


def test_check_keeps_ieee_buckets_of_tf32_inputs():
    """HiP's selection runs IEEE dots whatever torch's TF32 setting (its ranking must match the
    reference's) and its launcher keys buckets by the plain dtype: the tf32 rows must compile the
    float32 bucket's default, not a config the valid filter keeps from fp32 inputs."""
    from subquad.autotune import spaces

    jobs, errors = check.collect_jobs(["hip"], ["tf32"], [(256, 256)], [80], kernels=["hip_select"], used_only=True)
    assert jobs and not errors, errors
    assert {j.config for j in jobs} == {spaces.HIP_SELECT.default(("float32", 256, 256, 2, 32, False))}
    assert all(j.config.kw.get("F32", 1) == 1 for j in jobs)


def test_wide_head_dim_configs_reach_only_wide_buckets():
    """The configs marked for D > 128 (``spaces._wide``) lead at D = 256 only: fp32 / tf32 ones
    everywhere 4-byte inputs overflow sm_80's shared memory there, 16-bit ones where 4 warps spill."""
    from subquad.autotune import spaces

    for dtype in ("float32", "tf32"):
        for tuner in (spaces.NEIGHBORHOOD_FWD, spaces.NEIGHBORHOOD_BWD_DQ):
            for rank in (1, 2, 3):
                assert tuner.default((dtype, 256, rank, False)).kw["DMIN"] == 256
                assert all("DMIN" not in tuner.default((dtype, d, rank, False)).kw for d in (16, 64, 100, 128))
        assert spaces.HIP_FWD.default((dtype, 256, False)).kw["DMIN"] == 256
        assert "DMIN" not in spaces.HIP_FWD.default((dtype, 128, False)).kw
    for dtype in ("float16", "bfloat16"):
        assert spaces.NEIGHBORHOOD_BWD_DKDV.default((dtype, 256, 2, False)).kw["DMIN"] == 256
        assert spaces.NEIGHBORHOOD_BWD_DQ.default((dtype, 256, 3, False)).kw["DMIN"] == 256
        assert "DMIN" not in spaces.NEIGHBORHOOD_FWD.default((dtype, 256, 1, False)).kw
        assert all("DMIN" not in t.default((dtype, 128, r, False)).kw for t in spaces.NEIGHBORHOOD for r in (1, 2, 3))


# 64 and 128 cost about 2 minutes on 2 cores with a cold triton cache; 256 would add about 1.5 more
# (SUBQUAD_CHECK_HEAD_DIMS=64,128,256 to include it; the full space: python -m subquad.autotune check).
DIMS = tuple(int(d) for d in os.environ.get("SUBQUAD_CHECK_HEAD_DIMS", "64,128").split(",") if d.strip())
DTYPES = ("float16", "bfloat16")
ARCHS = ("sm_80", "sm_90")


@pytest.mark.skipif(not _cuobjdump_available(), reason="needs the cuobjdump of the triton wheel (Linux)")
@pytest.mark.parametrize("family", check.FAMILIES)
def test_default_configs_compile_clean(tmp_path, family):
    """Every kernel's default config compiles for sm_80 and sm_90 with no spill inside a loop, fits
    shared memory and uses tensor cores for its dots. One test per family, so pytest-xdist spreads
    the compiles."""
    out = tmp_path / "check.json"
    cmd = [sys.executable, "-m", "subquad.autotune", "check", "--used-only", "--quiet", "--families", family,
           "--head-dims", ",".join(map(str, DIMS)), "--dtypes", ",".join(DTYPES), "--archs", "80,90",
           "--json", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    report = proc.stdout[-6000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    failing = [f"{r['kernel']} {r['config']} {r['arch']} {r['dtype']} {r['K']}x{r['V']}: {r['reasons']}"
               for r in rows if r["status"] != "PASS"]
    assert not failing, "\n".join(failing) + "\n" + report
    assert proc.returncode == 0, report
    seen = {(r["kernel"], r["arch"], r["dtype"], r["K"]) for r in rows}
    for dtype in DTYPES:
        for d in DIMS:
            for kernel in _expected_kernels(family, dtype, d, d):
                for arch in ARCHS:
                    assert (kernel, arch, dtype, d) in seen, f"no row for {kernel} {arch} {dtype} {d}"
    for r in rows:
        assert r["default"] and r["compiled"] and r["regs"] > 0, r
        # no spill, or only outside every loop (a value parked across the main loop: no cost per step)
        assert (r["stack"] == 0 and r["local"] == 0) or r["loop_spills"] == 0, r
        assert r["smem"] <= r["smem_limit"], r
        if r["tc_dots"]:
            assert r["mma"] > 0, r
    assert rows, f"no compile rows for {family}"
    # the lightning chunk kernels are all dot kernels: make sure that was detected
    for r in rows:
        if r["kernel"] in ("lightning_fwd", "lightning_bwd_dq", "lightning_bwd_dkdv"):
            assert r["tc_dots"] > 0 and r["mma"] > 0, r


@pytest.mark.skipif(not _cuobjdump_available(), reason="needs the cuobjdump of the triton wheel (Linux)")
def test_check_leaves_the_interpreter(tmp_path):
    """Under TRITON_INTERPRET=1 the CLI re-runs itself without it (kernels must be JITFunctions)."""
    out = tmp_path / "check.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "subquad.autotune", "check", "--used-only", "--quiet", "--kernels",
           "lightning_recurrent", "--head-dims", "32", "--dtypes", "float16", "--archs", "80", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["kernel"], r["status"]) for r in rows] == [("lightning_recurrent", "PASS")]
    assert "| lightning_recurrent |" in proc.stdout


@pytest.mark.skipif(not _cuobjdump_available(), reason="needs the cuobjdump of the triton wheel (Linux)")
@pytest.mark.parametrize("what", [
    ["--families", "neighborhood", "--kernels", "neighborhood_fwd,neighborhood_bwd_dq", "--configs", "TMA1",
     "--head-dims", "64"],
    ["--families", "neighborhood", "--used-only", "--head-dims", "64"],
    ["--families", "routing", "--used-only", "--head-dims", "32"],
    ["--families", "hip", "--used-only", "--head-dims", "128"],
], ids=["neighborhood-tma", "neighborhood-defaults", "routing-defaults", "hip-defaults"])
def test_compiles_as_launched(tmp_path, what):
    """Kernels compile for sm_90 as typical launches pass them: Triton's launcher makes an integer
    argument equal to 1 a constant (neighborhood: the dims a config's rank lacks, a dilation of 1,
    a GQA group of 1; routing: one region row, topk 1, one head; HiP: a GQA group of 1, a decoding
    step's single query). A `.to()` on such a constant in
    the neighborhood TMA walk failed to compile while every check above, which keeps integers
    runtime values, passed: the GPU's tuner would have dropped every TMA candidate of a
    dilation-1 launch."""
    out = tmp_path / "check.json"
    cmd = [sys.executable, "-m", "subquad.autotune", "check", "--as-launched", "--quiet", *what, "--dtypes",
           "bfloat16", "--archs", "90", "--json", str(out)]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 6, proc.stdout[-3000:] + proc.stderr[-3000:]
    failing = [f"{r['kernel']} {r['config']}: {r['reasons']}" for r in rows if r["status"] != "PASS"]
    assert not failing, "\n".join(failing)


_WIDE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from subquad.autotune.check import build_source
from subquad.kernels import routing as R
done = 0
for spec in R.compile_specs("bfloat16", 32, 32):
    tuner, fn, sig, constexprs, buckets = spec[:5]
    if fn not in (R._route_q_kernel, R._route_kv_kernel):
        continue
    cfg = tuner.candidates(tuple(buckets[0]))[0]
    for padded in (False, True):
        src = build_source(fn, sig, dict(constexprs(cfg), PADDED=padded, WIDE=True))
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
        done += 1
from subquad.kernels import neighborhood as N
for spec in N.compile_specs("bfloat16", 64, 64):
    tuner, fn, sig, constexprs, buckets = spec[:5]
    if fn is not N._na_q_kernel:
        continue
    rank3 = next(b for b in buckets if b[2] == 3)
    cfg = next(c for c in tuner.candidates(tuple(rank3)) if not constexprs(c)["TMA"])
    src = build_source(fn, sig, dict(constexprs(cfg), WIDE=True))
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
    done += 1
print("compiled", done)
"""


def test_wide_offsets_compile():
    """The routing and neighborhood walks' int64 row-offset path (WIDE: one batch element of 2^31 elements or more)
    compiles: the interpreter runs it (test_routing.test_wide_row_offsets) but does not type-check
    it as the compiler does; a helper returning int64 on one branch and int32 on the other passed
    there and failed on the GPU."""
    proc = subprocess.run([sys.executable, "-c", _WIDE_SCRIPT], env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "compiled 8" in proc.stdout, proc.stdout
