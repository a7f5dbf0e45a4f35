#!/usr/bin/env bash
# The one GPU check of this repo, for a lent H100/H200 (offline; device time is scarce).
#
#   bash bench/gpu_check.sh          # from anywhere; it works in the repo root
#
# Steps, each under a time cap (seconds, overridable by environment):
#   1. carried wheels in .whl/ (fla-core for the FLA baseline) -> /tmp/site on PYTHONPATH
#   2. subquad installed offline (pip install -e ., PEP 660), checked by importing its kernels
#   3. $OUT/env.txt      GPU, driver, python / torch / triton / FLA versions, commit
#   4. $OUT/tests.log    python3 -m pytest $TESTS -q, natively on the GPU        (TESTS_TIMEOUT=150)
#   5. $OUT/bench.log    python3 -m bench: every family's kernel-vs-reference check, then each
#                        family's quick GPU benchmark (lightning, neighborhood, hip, routing, in
#                        that order, sharing BENCH_BUDGET=240 s)                     (BENCH_TIMEOUT=290)
#   6. appended to $OUT/bench.log: pytest bench --benchmark-only, FLA left out   (PYBENCH_TIMEOUT=0: off;
#                        ~40 cases, some tuning: give it 120 s or more to finish)
#   7. $OUT/autotune.json     the configs the autotuner chose on this GPU
#   8. $OUT/results.tar.gz    every benchmark's .json/.md/.png (the device returns at most 8 files,
#                             so they travel as one archive; unpack into bench/results/<gpu>/); written
#                             after step 5 and again on exit (a TERM or INT too), so a cut run keeps it
# Worst case about 7.5 minutes (caps 150 + 290 s plus set-up and 30 s kill-afters); run it with
# timeout_s=600. Each cap sends SIGINT first (pytest then prints its failures and summary; a benchmark
# stops at its row), then SIGKILL 30 s later.
# The benchmark writes its JSON/MD/PNG after every row, so a run cut short keeps what it measured;
# it measures subquad and SDPA first, then decoding, then FLA (whose first call autotunes for
# minutes). At most 8 files land in $OUT.
#
# Env: TESTS (pytest paths, default tests), BENCH_CMD (replaces step 5's command, run by bash -c: it may
# chain several, and may write under $RES, which is exported), PYBENCH_TIMEOUT=0 skips step 6, OUT (default bench/out/gpu_check), SUBQUAD_COMMIT (the commit measured, recorded in the
# results; pass it when the tree was copied without .git), TESTS_AUTOTUNE (default 0: the tests
# run each kernel's default config, and they test every config explicitly; 1 tunes every shape
# bucket the tests touch, minutes of compiling; python -m bench's checks run the defaults too, and
# its speed tables tune on their own sizes).
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/bench/out/gpu_check}"
RES="${RES:-/tmp/gpu_check_results}"  # benchmark files, archived into $OUT/results.tar.gz at the end
mkdir -p "$OUT" "$RES"
export RES
TESTS_TIMEOUT="${TESTS_TIMEOUT:-150}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-290}"
BENCH_BUDGET="${BENCH_BUDGET:-240}"
PYBENCH_TIMEOUT="${PYBENCH_TIMEOUT:-0}"
TESTS="${TESTS:-tests}"
BENCH_CMD="${BENCH_CMD:-python3 -m bench --out $RES --budget $BENCH_BUDGET}"
export SUBQUAD_CACHE_DIR="${SUBQUAD_CACHE_DIR:-/tmp/subquad-cache}"
T0=$(date +%s)
say() { echo "[gpu_check +$(($(date +%s) - T0))s] $*"; }
# benchmark files -> one archive in $OUT (what the device returns); idempotent, also run on exit
archive() { if compgen -G "$RES/*" > /dev/null; then tar czf "$OUT/results.tar.gz" -C "$RES" .; fi; }
trap archive EXIT
trap 'archive; exit 143' TERM
trap 'archive; exit 130' INT
cap() { timeout -s INT -k 30 "$@"; }  # SIGINT first: pytest and the benchmarks end cleanly on it

# 1. peers, carried as wheels (nothing can be downloaded on the device)
if compgen -G ".whl/*.whl" > /dev/null; then
  say "installing carried wheels: $(cd .whl && echo *.whl)"
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    say "WARNING: carried wheels did not install: the peer baselines will be missing"
  fi
fi

# 2. subquad. setup.py maps kernels/ reference/ autotune/ into the package (package_dir), which a
# plain PYTHONPATH cannot do: an editable PEP 660 install can (--use-pep517: an old pip with
# `wheel` present would otherwise fall back to `setup.py develop`, which ignores the mapping).
say "pip install -e . (offline)"
python3 -m pip install -q --no-deps --no-build-isolation --no-index --use-pep517 -e . 2>&1 | tail -n 5
if ! (cd /tmp && python3 -c "import subquad.kernels.lightning, subquad.reference.lightning, subquad.autotune"); then
  say "editable install unusable: linking kernels/ reference/ autotune/ into subquad/ in this copy"
  for d in kernels reference autotune; do [ -e "subquad/$d" ] || ln -s "../$d" "subquad/$d"; done
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  (cd /tmp && python3 -c "import subquad.kernels.lightning") || { say "FATAL: subquad does not import"; exit 2; }
fi

# 3. environment
{
  echo "commit: ${SUBQUAD_COMMIT:-$(git rev-parse HEAD 2> /dev/null || echo unknown)}"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
  python3 - << 'EOF'
import sys, torch, triton
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda, "| triton", triton.__version__)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
else:
    print("gpu: NO CUDA DEVICE")
try:
    from bench.lightning import fla_ops, fla_version
    print("FLA:", fla_version() if fla_ops() else "not importable")
except Exception as exc:
    print("FLA: not importable:", type(exc).__name__, exc)
import subquad
print("subquad", subquad.__file__)
EOF
} 2>&1 | tee "$OUT/env.txt"

# 4. the test suite, natively on the GPU (bf16 and the gpu-marked large shapes included)
say "pytest $TESTS (cap ${TESTS_TIMEOUT}s)"
# pytest-xdist (on the device image) spreads the kernel compiles over the CPU cores
xdist=""; python3 -c "import xdist" 2> /dev/null && xdist="-n ${TESTS_WORKERS:-16}"
SUBQUAD_AUTOTUNE="${TESTS_AUTOTUNE:-0}" cap "$TESTS_TIMEOUT" python3 -m pytest $TESTS -q -p no:cacheprovider $xdist \
  --maxfail=30 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}

# 5. main job: correctness check with tuned configs, then the quick benchmark
say "$BENCH_CMD (cap ${BENCH_TIMEOUT}s)"
cap "$BENCH_TIMEOUT" bash -c "$BENCH_CMD" 2>&1 | tee "$OUT/bench.log"
bench_rc=${PIPESTATUS[0]}
archive

# 6. pytest-benchmark plumbing (synchronised GPU timing); FLA left out: it would re-tune here
say "pytest bench --benchmark-only (cap ${PYBENCH_TIMEOUT}s)"
[ "$PYBENCH_TIMEOUT" = 0 ] && echo "skipped" > "$OUT/pytest-bench.tmp" ||
cap "$PYBENCH_TIMEOUT" python3 -m pytest bench --benchmark-only -q -p no:cacheprovider -k "not fla" \
  --benchmark-columns=min,median,max,rounds 2>&1 | tee "$OUT/pytest-bench.tmp"
pybench_rc=${PIPESTATUS[0]}
{ echo; echo "## pytest bench --benchmark-only"; cat "$OUT/pytest-bench.tmp"; } >> "$OUT/bench.log"

# 7. tuned configs
cp "$SUBQUAD_CACHE_DIR/autotune.json" "$OUT/autotune.json" 2> /dev/null || true

verdict() { case "$1" in 0) echo "ok" ;; 124 | 137) echo "TIMED OUT" ;; *) echo "FAILED (rc $1)" ;; esac; }
echo
echo "=================== gpu_check summary ($(($(date +%s) - T0)) s) ==================="
sed -n '1p;3p' "$OUT/env.txt"
echo "tests:        $(verdict "$tests_rc"): $(grep -E '(passed|failed|error)' "$OUT/tests.log" | tail -n 1)"
echo "python -m bench: $(verdict "$bench_rc"): $(grep -E '^# correctness' "$OUT/bench.log" | tail -n 1)"
echo "pytest-bench: $(verdict "$pybench_rc"): $(grep -E '(passed|failed|error)' "$OUT/pytest-bench.tmp" | tail -n 1)"
for md in "$RES"/*_cuda.md "$OUT"/*_cuda.md; do
  [ -f "$md" ] || continue
  echo "targets of $(basename "$md"):"
  grep -E '^- (PASS|FAIL|n/a)' "$md"
done
rm -f "$OUT/pytest-bench.tmp"
archive && rm -rf "$RES"
echo "files in \$OUT: $(cd "$OUT" && echo *)"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
