#!/usr/bin/env bash
# The GPU check: one script for a lent GPU machine (H100/H200, Python 3.12 with torch 2.11 + CUDA 13,
# no torchrec/fbgemm, no internet). Run from the repository root with the wheels of
# bench/prepare_gpu_wheels.sh carried in .whl/:
#
#   OUT=/some/dir bash bench/gpu_check.sh [--dry-run]
#
# Steps (each logged to $OUT/gpu_check.log, its status to $OUT/gpu_check.json; a failed step does
# not stop the later ones): nvidia-smi and versions; install the carried wheels into $SITE (the
# working tree itself is the recops source, on PYTHONPATH); the GPU-marked tests; then, under the
# suite's NVML monitor, DLRM training throughput on CUDA (Criteo Kaggle shape: 26 tables, 33.8M rows,
# dim 128, MLPerf-sized MLPs, batch up to 65536) and ONNX Runtime CUDA-EP inference vs torch eager.
# Files back in $OUT (at most 8, two folders deep): gpu_check.log, gpu_check.json, pytest_gpu.txt,
# results/{train_throughput,onnx_gpu,suite}.json and results/report.html (plots embedded).
# Re-render here with: recops bench --report-only --results-dir <copy of results/>.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to the output folder}
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
LOG=$OUT/gpu_check.log
RESULTS=$OUT/results
mkdir -p "$OUT"
STATUS=()

TRAIN_ARGS="--device cuda --max-rows 0 --embedding-dim 128 --dense-arch 512,256 --over-arch 1024,1024,512,256 \
--batch-sizes 8192,16384,32768,65536 --rounds 1 --min-seconds 2 --timeout 180"
ONNX_ARGS="--device cuda --max-rows 100000 --batch-sizes 1,64,1024,16384,65536 --min-seconds 1"

# step NAME TIMEOUT_S COMMAND...: run (or, with --dry-run, print) one step and record its exit status.
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*" | tee -a "$LOG"
  if [ "$DRY" = 1 ]; then
    STATUS+=("\"$name\": \"dry-run\"")
    return 0
  fi
  local start=$SECONDS
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$LOG"
  STATUS+=("\"$name\": $rc")
}

: >"$LOG"
step nvidia-smi 60 bash -c 'nvidia-smi && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv'
step install-wheels 180 bash -c "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
--target $SITE .whl/*.whl"
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE PYTHONWARNINGS=ignore
step versions 120 "$PY" -c "
import torch, fbgemm_gpu, torchrec, onnxruntime as ort
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available() and torch.cuda.get_device_name())
print('fbgemm_gpu', fbgemm_gpu.__version__, fbgemm_gpu.__variant__, '| torchrec', torchrec.__version__)
print('onnxruntime', ort.__version__, ort.get_available_providers())"
step pytest-gpu 150 bash -c "$PY -m pytest -m gpu -q -p no:cacheprovider \$(grep -l 'mark.gpu' tests/test_*.py) \
>$OUT/pytest_gpu.txt 2>&1; rc=\$?; tail -5 $OUT/pytest_gpu.txt; exit \$rc"
step benchmarks 420 "$PY" -m recops.bench.suite --only train_throughput,onnx_gpu --results-dir "$RESULTS" \
  --extra "train_throughput=$TRAIN_ARGS" --extra "onnx_gpu=$ONNX_ARGS"
# Keep within 8 files: report.html embeds the plots; the PNGs and REPORT.md are re-rendered from the JSON.
[ "$DRY" = 1 ] || rm -f "$RESULTS"/*.png "$RESULTS"/REPORT.md

joined=$(IFS=,; echo "${STATUS[*]}")
echo "{\"steps\": {${joined}}, \"train_args\": \"${TRAIN_ARGS}\", \"onnx_args\": \"${ONNX_ARGS}\"}" >"$OUT/gpu_check.json"
cat "$OUT/gpu_check.json"
