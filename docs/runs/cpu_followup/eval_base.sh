#!/usr/bin/env bash
set -u
cd "$(dirname "$0")/../../.."  # the repository
export EDITLAB_DATA=../shared/data/cifar10 OMP_NUM_THREADS=1
B=assets/resnet20_baseline.safetensors
C="--n-edits 200 --seed 0 --heldout-size 2000 --json --device cpu"
.venv/bin/python -m editcore evaluate-edits --checkpoint $B --editor rmsprop --lr 1e-4 $C > runs/cpu/eval_base_rmsprop.out 2> runs/cpu/eval_base_rmsprop.log
.venv/bin/python -m editcore evaluate-edits --checkpoint $B --protocol nae --editor rmsprop --lr 1e-4 $C > runs/cpu/nae_base_rmsprop.out 2> runs/cpu/nae_base_rmsprop.log
