#!/bin/bash
# From the baseline with c_loc 0.3 (else as the continued run of run.sh): does a lighter L_loc keep the accuracy?
RUN="${RUN:-../runs/ed_cloc03}" exec "$(dirname "$0")/run.sh" --arch resnet20 --editable \
  --init assets/resnet20_baseline.safetensors --editor rmsprop --editor-lr 1e-4 --c-loc 0.3 --lr 1e-4 --weight-decay 0 \
  --warmup-epochs 0.2 --schedule constant
