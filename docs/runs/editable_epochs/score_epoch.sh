#!/bin/bash
# Score epoch N of the run in $RUN on the locality benchmark, with the same seeded edits as every row of
# RESULTS.md's editable-training sections: RUN/epN.safetensors (+ card) is copied to RUN/loc/NAME_epN and
# bench/locality.py writes RUN/loc/curve_epN.json (+ .log). Usage: RUN=../runs/ed_cloc03 score_epoch.sh N NAME
cd "$(dirname "$0")/../../.."  # the repository
R="${RUN:?set RUN to the run folder}"
N="${1:?epoch number}"
NAME="${2:?a model name prefix, e.g. cloc03}"
mkdir -p "$R"/loc
cp "$R"/ep$N.safetensors "$R"/loc/${NAME}_ep$N.safetensors
cp "$R"/ep$N.json "$R"/loc/${NAME}_ep$N.json
OMP_NUM_THREADS=1 .venv/bin/python bench/locality.py --data-root ../shared/data/cifar10 \
  --checkpoint "$R"/loc/${NAME}_ep$N.safetensors \
  --corrections-of assets/resnet20_baseline.safetensors --corrections-of assets/resnet20_editable.safetensors \
  --protocols R C --n 100 --threads 1 --method rmsprop@layer3,lr=1e-4 --method local@layer3.0.conv1 \
  --json "$R"/loc/curve_ep$N.json > "$R"/loc/curve_ep$N.log 2>&1
