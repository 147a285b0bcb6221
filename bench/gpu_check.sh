#!/usr/bin/env bash
# The one prepared run for a lent GPU machine (an H200 here): install, run the tests on CUDA, then
# the full benchmark. Its logs (gpu.txt, install.log, tests.log, accuracy.txt, bench-*.log), CSV and
# PNGs are written to a work folder; on exit the CSVs are copied to $OUT and everything is packed
# into $OUT/gpu-check.tgz (the device tool brings back at most 8 files). Planned to end within 8
# minutes on an H200: each step has its own cap (560 s in all, under the device tool's 600 s per
# command), and the suite's --max-minutes stops starting new cases in time to write what it measured.
# Usage, from the repository root on that machine: bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
FINAL=${OUT:-/tmp/fastdin-gpu-check}
OUT=$(mktemp -d)
mkdir -p "$FINAL"
trap 'cp "$OUT"/*.csv "$FINAL"/ 2>/dev/null; tar czf "$FINAL/gpu-check.tgz" -C "$OUT" .' EXIT
started=$SECONDS
step() { echo "== $1 ($((SECONDS - started)) s in)"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)" \
    | tee -a "$OUT/gpu.txt"

step "install"
if ! python3 -m pip install --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1; then
    tail -20 "$OUT/install.log"
    exit 1
fi
# No registry is reachable there: DeepCTR-Torch, the peer, runs only if its wheel was carried in bench/wheels/.
if compgen -G "bench/wheels/*.whl" > /dev/null; then
    python3 -m pip install --no-deps bench/wheels/*.whl >> "$OUT/install.log" 2>&1 || echo "peer wheels did not install"
fi

step "tests on CUDA"
# the sm_90 and sm_80 build checks are for machines without a GPU; here every kernel test compiles for real.
# The kernels' own tests first, one line per test, unbuffered: if the cap stops the run, what ran is in the log.
timeout 100 python3 -u -m pytest -v tests/test_attention_packed_kernel.py tests/test_attention_kernel.py \
    tests/test_dice_kernel.py tests/test_attention_dice_train.py tests --ignore=tests/test_sm90_builds.py \
    -k "not sm90 and not sm80" > "$OUT/tests.log" 2>&1
echo "tests rc=$? (124: stopped by the cap)"
echo "passed $(grep -c ' PASSED' "$OUT/tests.log"), failed $(grep -c ' FAILED' "$OUT/tests.log"), errors $(grep -c ' ERROR' "$OUT/tests.log")"
grep -E ' (FAILED|ERROR)' "$OUT/tests.log" | head -20
tail -2 "$OUT/tests.log"

step "packed backward tile sizes"
# BLOCK_M_BWD was chosen from sm_90 builds (spills); this weighs it against the per-tile work
timeout 50 python3 bench/packed_tiles.py --rounds 2 --out-dir "$OUT" > "$OUT/packed-tiles.log" 2>&1
echo "packed tiles rc=$?"
cat "$OUT/packed-tiles.log"

step "packed rows against the per-user kernels"
# the seed shape runs packed on an H200 only because its build fits (the bound does not say so)
timeout 45 python3 bench/packed_vs_per_user.py --out-dir "$OUT" > "$OUT/packed-vs-per-user.log" 2>&1
echo "packed vs per-user rc=$?"
cat "$OUT/packed-vs-per-user.log"

step "float32: the kernels against the torch path"
# auto sends fp32 with TF32 off to the torch path (the kernels' FMA products spill); this weighs that
timeout 25 python3 bench/fp32_paths.py --out-dir "$OUT" > "$OUT/fp32-paths.log" 2>&1
echo "fp32 paths rc=$?"
cat "$OUT/fp32-paths.log"

step "error per dtype, bf16 included"
timeout 35 python3 bench/accuracy.py > "$OUT/accuracy.txt" 2>&1
echo "accuracy rc=$?"
cat "$OUT/accuracy.txt"

step "pytest-benchmark path on CUDA (one case)"
timeout 30 python3 -m pytest -q bench -k "attention-sigmoid and bf16 and (eager or fastdin)" \
    --benchmark-columns=median,rounds > "$OUT/pytest-bench.log" 2>&1
echo "pytest bench rc=$?"
tail -2 "$OUT/pytest-bench.log"

# bf16 (autocast) is the headline: every case and implementation, torch.compile included.
step "bench bf16"
timeout 190 python3 -m fastdin.bench --dtypes bf16 --no-sweep --max-minutes 2.3 --out-dir "$OUT" \
    > "$OUT/bench-bf16.log" 2>&1
echo "bench bf16 rc=$?"
# The time-versus-T series, both dtypes, without compile (a compile per point would not fit).
step "bench sweep"
timeout 60 python3 -m fastdin.bench --dtypes bf16,fp32 --no-compile --out-dir "$OUT" \
    --cases sweep-T50,sweep-T100,sweep-T200,sweep-T500,sweep-T1000 > "$OUT/bench-sweep.log" 2>&1
echo "bench sweep rc=$?"
step "bench fp32"
timeout 25 python3 -m fastdin.bench --dtypes fp32 --no-compile --no-sweep --max-minutes 0.3 --out-dir "$OUT" \
    > "$OUT/bench-fp32.log" 2>&1
echo "bench fp32 rc=$?"

step "done"
tail -n 45 "$OUT/bench-bf16.log"
