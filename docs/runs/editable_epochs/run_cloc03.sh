#!/bin/bash
# From the baseline with c_loc 0.3 (else as the continued run): does a lighter L_loc keep the accuracy?
# Resumable; a watcher (watch.sh) writes each finished epoch's weights to epN.safetensors.
cd "$(dirname "$0")/../../.."  # the repository
R="${RUN:-../runs/ed_cloc03}"  # the run folder, outside the repository
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
if [ -f "$R"/state.json ]; then
  .venv/bin/python -m editcore train --resume "$R"/state.safetensors --data-root ../shared/data/cifar10 --out "$R"/final.safetensors >>"$R"/train.log 2>>"$R"/train.err &
else
  .venv/bin/python -m editcore train --arch resnet20 --editable --init assets/resnet20_baseline.safetensors \
    --editor rmsprop --editor-lr 1e-4 --c-loc 0.3 --lr 1e-4 --weight-decay 0 --warmup-epochs 0.2 --schedule constant \
    --epochs 10 --device cpu --data-root ../shared/data/cifar10 --state "$R"/state.safetensors --state-every-steps 50 \
    --out "$R"/final.safetensors >>"$R"/train.log 2>>"$R"/train.err &
fi
echo $! > "$R"/pid
