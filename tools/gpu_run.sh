#!/usr/bin/env bash
# The measured run on a lent GPU machine (device tool): unpack the carried CIFAR-10, run the pipeline.
# Carried: .gpudata/a and .gpudata/b (tools/pack_cifar.py pack ...). Results: $OUT/results.tar, $OUT/pipeline.log
set -u
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, safetensors, tqdm; print('torch', torch.__version__, torch.cuda.is_available())"
source tools/unpack_gpudata.sh
# The device copy has no .git: pass the commit in, e.g. `EDITLAB_GIT_COMMIT=$(git rev-parse HEAD) bash tools/gpu_run.sh`
export EDITLAB_GIT_COMMIT="${EDITLAB_GIT_COMMIT:-unknown}"
python3 tools/paper_pipeline.py --scale full --device cuda --work /tmp/work --out "$OUT" --deadline-s "${DEADLINE:-510}" 2>&1 | tee "$OUT/pipeline.log"
