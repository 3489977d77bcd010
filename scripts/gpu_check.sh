#!/usr/bin/env bash
# The GPU check in one go (docs/benchmarks.md, "GPU"), run from the repository root on a machine
# with a CUDA GPU, python3 with torch and torchvision, and no network:
#
#   1. installs the wheels carried in wheels/gpu/ (scripts/fetch_gpu_wheels.sh makes them) into a
#      target folder on PYTHONPATH, next to the machine's own torch; Fashion-MNIST from there too;
#   2. prints and records the versions (python, torch, CUDA, cuDNN, GPU, driver);
#   3. runs the cuda tests (tests/test_cuda.py; pytest-xdist's 4 workers where it is installed);
#   4. the per-layer benchmark at R-50 shapes on CUDA (tools/benchmark_norms.py --device cuda --r50);
#   5. the end-to-end timing of Faster R-CNN R-50-FPN at 800 px, 2 images, for BN, FrozenBN,
#      EvalNorm, MABN, GN, GhostBN (tools/benchmark.py --device cuda): s/iter and peak GPU memory as
#      ratios to BN, inference s/image as ratios to FrozenBN, host syncs per iteration;
#   6. writes gpu_check.json, gpu_check.md (the report), cuda_tests.xml, e2e_ratios.png and
#      gpu_check.log (everything printed) to the output folder.
#
# Every step runs even if an earlier one failed (its exit status is in the report); the script
# exits non-zero if any step failed. About 5 minutes on one H200; the steps' time limits add up to
# 9.3 minutes, so that a hung step still leaves the report and the log inside a 10-minute slot (a
# dry run on a slow CPU gets three times as long).
#
# Usage: scripts/gpu_check.sh [OUTPUT_DIR] [--cpu-dry-run] [--no-install]
#   OUTPUT_DIR     default: $OUT if set, else output/gpu_check
#   --cpu-dry-run  the same steps on the CPU at tiny sizes (no GPU needed; the cuda tests must all
#                  skip): checks the script, the benchmarks' CUDA-aware code paths and the report
#   --no-install   use the interpreter's own packages (e.g. the project's .venv) instead of the wheels
# Environment: PYTHON (default python3), WHEELS (default wheels/gpu), SITE (default /tmp/d2_bnstats_site)
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

OUTPUT=""
DRY=0
INSTALL=1
for arg in "$@"; do
    case "$arg" in
        --cpu-dry-run) DRY=1 ;;
        --no-install) INSTALL=0 ;;
        -*) echo "unknown option $arg" >&2; exit 2 ;;
        *) OUTPUT=$arg ;;
    esac
done
OUTPUT=${OUTPUT:-${OUT:-output/gpu_check}}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-wheels/gpu}
SITE=${SITE:-/tmp/d2_bnstats_site}
mkdir -p "$OUTPUT"
OUTPUT=$(cd "$OUTPUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
exec > >(tee -a "$OUTPUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

STEPS="$WORK/steps.tsv"
FAILED=0
step() {  # step NAME LIMIT_SECONDS COMMAND...: run it, record exit status and seconds
    local name=$1 limit=$2 start status
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), limit ${limit} s): $*"
    start=$(date +%s)
    timeout --kill-after=10 "$(( limit * (DRY ? 3 : 1) ))" "$@"
    status=$?
    printf '%s\t%s\t%s\n' "$name" "$status" "$(( $(date +%s) - start ))" >>"$STEPS"
    [[ $status -eq 0 ]] || { FAILED=1; echo "=== $name FAILED (exit $status)"; }
    return 0
}

if [[ $INSTALL -eq 1 ]]; then
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        step install 60 "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$WHEELS"/*.whl
        export PYTHONPATH="$ROOT:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "no wheels in $WHEELS (make them with scripts/fetch_gpu_wheels.sh and carry that folder)"
        printf 'install\t1\t0\n' >>"$STEPS"
        FAILED=1
    fi
else
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
[[ -d "$WHEELS/fashion-mnist" && -z "${FASHION_MNIST_DIR:-}" ]] && export FASHION_MNIST_DIR="$ROOT/$WHEELS/fashion-mnist"

step environment 30 "$PYTHON" -m bnstats_lab.benchmark.gpu_check environment "$WORK/environment.json"
cat "$WORK/environment.json" 2>/dev/null && echo
nvidia-smi 2>/dev/null | head -15

PYTEST=("$PYTHON" -m pytest -p no:cacheprovider -m cuda tests/test_cuda.py -q -rfEx --junitxml="$WORK/cuda_tests.xml")
if [[ $DRY -eq 0 ]] && "$PYTHON" -c "import xdist" 2>/dev/null; then
    PYTEST+=(-n 4)
fi
step cuda_tests 210 "${PYTEST[@]}"

if [[ $DRY -eq 1 ]]; then
    DEVICE=cpu
    LAYER_ARGS=(--quick --norms BN EvalNorm MABN GhostBN)
    # R-50 at 64 px, a few proposals and RoIs (the 4conv box head over the RoIs is most of an
    # iteration's work), two rounds of one iteration, one memory worker, one thread (on a busy
    # machine more threads spin): every step of the GPU run, in seconds
    E2E_ARGS=(--repeats 2 --iters 1 --warmup 1 --num-batches 1 --memory-iters 1 --inference-images 1
              --memory-norms BN --threads 1
              INPUT.MIN_SIZE_TRAIN "(64,)" INPUT.MAX_SIZE_TRAIN 96 INPUT.MIN_SIZE_TEST 64 INPUT.MAX_SIZE_TEST 96
              MODEL.RPN.POST_NMS_TOPK_TRAIN 32 MODEL.RPN.POST_NMS_TOPK_TEST 16 MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE 8
              TEST.DETECTIONS_PER_IMAGE 8)
else
    DEVICE=cuda
    LAYER_ARGS=(--r50)
    E2E_ARGS=(--repeats 5 --iters 5 --warmup 3 --num-batches 2 --memory-iters 2 --inference-images 4)
fi
step layers 80 "$PYTHON" tools/benchmark_norms.py --device "$DEVICE" "${LAYER_ARGS[@]}" --json "$WORK/layers.json"
step e2e 180 "$PYTHON" tools/benchmark.py --device "$DEVICE" --archs frcnn_r50 --ims-per-batch 2 \
    --norms BN FrozenBN EvalNorm MABN GN GhostBN --no-precise-bn --output "$WORK/e2e" "${E2E_ARGS[@]}"

"$PYTHON" - "$STEPS" "$WORK/steps.json" <<'EOF'
import json, sys
rows = [line.rstrip("\n").split("\t") for line in open(sys.argv[1])]
json.dump({n: {"status": int(s), "seconds": int(t)} for n, s, t in rows}, open(sys.argv[2], "w"), indent=1)
EOF
REPORT=("$PYTHON" -m bnstats_lab.benchmark.gpu_check report "$WORK" "$OUTPUT")
[[ $DRY -eq 1 ]] && REPORT+=(--dry-run)
"${REPORT[@]}" || { FAILED=1; echo "=== report: the cuda tests did not pass (in a dry run: not all skipped)"; }
cp "$WORK/cuda_tests.xml" "$OUTPUT/cuda_tests.xml" 2>/dev/null
cp "$WORK/e2e/ratios.png" "$OUTPUT/e2e_ratios.png" 2>/dev/null
echo "=== done: $(ls "$OUTPUT" | tr '\n' ' ')(exit $FAILED)"
exec 1>&- 2>&-  # let tee write the log's last lines before the script ends
sleep 1
exit $FAILED
