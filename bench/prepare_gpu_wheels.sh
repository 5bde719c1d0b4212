#!/usr/bin/env bash
# Download into .whl/ the wheels bench/gpu_check.sh installs on a lent GPU machine (Python 3.12,
# torch 2.11 + CUDA 13 preinstalled, no torchrec/fbgemm, no internet), and check they fit the
# 64 MiB a device call may carry (limit here: 60 MiB, leaving room for the working tree).
#
# Why these: `import torchrec` hard-fails without the `fbgemm_gpu` module (torchrec/distributed/types.py
# imports it). The CUDA fbgemm-gpu wheel is ~465 MB and cannot travel, so the CPU build stands in for
# the import (and the CPU TBE kernels); on the GPU the benchmark then runs torchrec's unsharded
# EmbeddingBagCollection on plain torch CUDA kernels. fbgemm/torchrec 1.6 pair with torch 2.11
# (FBGEMM's compatibility table: 1.5 <-> 2.10, one minor per torch release). tensordict (+ pyvers,
# orjson, importlib_metadata) is what `import torchrec` pulls beyond what that image already has
# (pyre-extensions, typing-inspect, mypy-extensions, tqdm, cloudpickle, torchmetrics are there).
# onnxruntime-gpu (~190-260 MB) does not fit: the ONNX CUDA-EP bench records itself as skipped.
#
# Usage (repository root): bash bench/prepare_gpu_wheels.sh    # WHL_DIR, WHL_LIMIT_MIB, PYTHON override
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHL_DIR:-.whl}
LIMIT_MIB=${WHL_LIMIT_MIB:-60}
PY=${PYTHON:-python3}
WHEELS=(fbgemm-gpu-cpu==1.6.0 torchrec==1.6.1 tensordict==0.12.0 pyvers==0.2.3 orjson==3.11.3 importlib-metadata==8.7.0)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

git check-ignore -q "$DEST/x.whl" || { echo "error: $DEST/ is not ignored by git; add '/$DEST/' to .gitignore" >&2; exit 2; }
rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${PLATFORMS[@]/#/--platform=}" -d "$DEST" "${WHEELS[@]}"
bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
ls -l "$DEST"
echo "total: $((bytes / 1024 / 1024)) MiB in $(ls "$DEST"/*.whl | wc -l) wheels (limit ${LIMIT_MIB} MiB)"
if [ "$bytes" -ge $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "error: the wheels exceed ${LIMIT_MIB} MiB; a device call carries 64 MiB with the working tree" >&2
  exit 1
fi
