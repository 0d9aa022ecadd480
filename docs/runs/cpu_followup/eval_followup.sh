#!/usr/bin/env bash
# CPU follow-up: the CPU editable fine-tune on the same seeded edits as eval_base.sh (N=200, M=2000 held-out).
set -u
cd "$(dirname "$0")/../../.."  # the repository
export EDITLAB_DATA=../shared/data/cifar10 OMP_NUM_THREADS=1
E=runs/cpu/resnet20_editable_lr1e-4_cloc1.safetensors
C="--n-edits 200 --seed 0 --heldout-size 2000 --json --device cpu"
.venv/bin/python -m editcore evaluate-edits --checkpoint $E --editor rmsprop $C > runs/cpu/eval_ed_rmsprop_learned.out 2> runs/cpu/eval_ed_rmsprop_learned.log &
.venv/bin/python -m editcore evaluate-edits --checkpoint $E --protocol nae --editor rmsprop $C > runs/cpu/nae_ed_learned.out 2> runs/cpu/nae_ed_learned.log &
wait
