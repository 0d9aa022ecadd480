#!/usr/bin/env bash
# Fine-tuning fixer at a smaller lr than the H200 run's 0.01, same seeded edits (first 100), M=2000.
set -u
cd "$(dirname "$0")/../../.."  # the repository
export EDITLAB_DATA=../shared/data/cifar10 OMP_NUM_THREADS=1
B=assets/resnet20_baseline.safetensors
C="--n-edits 100 --seed 0 --heldout-size 2000 --json --device cpu"
.venv/bin/python -m editcore evaluate-edits --checkpoint $B --fixer finetune --finetune-lr 0.001 $C > runs/cpu/fix_finetune_lr1e-3.out 2> runs/cpu/fix_finetune_lr1e-3.log &
.venv/bin/python -m editcore evaluate-edits --checkpoint $B --fixer finetune --finetune-lr 0.01 $C > runs/cpu/fix_finetune_lr1e-2.out 2> runs/cpu/fix_finetune_lr1e-2.log &
wait
