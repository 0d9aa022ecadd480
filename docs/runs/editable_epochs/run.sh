#!/bin/bash
# Editable training in the background on one thread, resumable across sessions; a watcher (watch.sh) writes
# each finished epoch's weights to epN.safetensors. With a state in $RUN it resumes; else it starts with the
# arguments given, by default the session-4 run: the shipped editable-trained ResNet-20 (2 epochs, RMSProp
# editor, c_loc 1) continued for more epochs. run_cloc03.sh passes its own.
cd "$(dirname "$0")/../../.."  # the repository
R="${RUN:-../runs/ed_cont}"  # the run folder, outside the repository
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
if [ -f "$R"/state.json ]; then
  .venv/bin/python -m editcore train --resume "$R"/state.safetensors --data-root ../shared/data/cifar10 --out "$R"/final.safetensors >>"$R"/train.log 2>>"$R"/train.err &
else
  [ $# -gt 0 ] || set -- --arch resnet20 --editable --init assets/resnet20_editable.safetensors \
    --editor rmsprop --editor-lr 9.738e-5 --c-loc 1.0 --lr 1e-4 --weight-decay 0 --warmup-epochs 0 --schedule constant
  .venv/bin/python -m editcore train "$@" \
    --epochs 10 --device cpu --data-root ../shared/data/cifar10 --state "$R"/state.safetensors --state-every-steps 50 \
    --out "$R"/final.safetensors >>"$R"/train.log 2>>"$R"/train.err &
fi
echo $! > "$R"/pid
