#!/usr/bin/env bash
# The GPU path check on a lent machine (device tool): unpack the carried parts of CIFAR-10 when .gpudata is there
# (the checks use the full test split once both parts are unpacked, else the embedded sample), then
# tools/gpu_check.py. Results: $OUT/gpu_check.json.
#   carry: [".gpudata/a"] (a first call; the whole pack is too big for one)   command: bash tools/gpu_check.sh
set -u
export PYTHONUNBUFFERED=1
nvidia-smi -L
if [ -d .gpudata ]; then source tools/unpack_gpudata.sh; fi
python3 tools/gpu_check.py --device cuda "$@" 2>&1 | tee "${OUT:-/tmp}/gpu_check.log"
