#!/bin/bash
# Continue the shipped editable-trained ResNet-20 (2 epochs, RMSProp editor, c_loc 1) for more epochs, 1 thread,
# resumable; a watcher writes each finished epoch's weights to epN.safetensors.
cd "$(dirname "$0")/../../.."  # the repository
R="${RUN:-../runs/ed_cont}"  # the run folder, outside the repository
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
if [ -f "$R"/state.json ]; then
  .venv/bin/python -m editcore train --resume "$R"/state.safetensors --data-root ../shared/data/cifar10 --out "$R"/final.safetensors >>"$R"/train.log 2>>"$R"/train.err &
else
  .venv/bin/python -m editcore train --arch resnet20 --editable --init assets/resnet20_editable.safetensors \
    --editor rmsprop --editor-lr 9.738e-5 --c-loc 1.0 --lr 1e-4 --weight-decay 0 --warmup-epochs 0 --schedule constant \
    --epochs 10 --device cpu --data-root ../shared/data/cifar10 --state "$R"/state.safetensors --state-every-steps 50 \
    --out "$R"/final.safetensors >>"$R"/train.log 2>>"$R"/train.err &
fi
echo $! > "$R"/pid
