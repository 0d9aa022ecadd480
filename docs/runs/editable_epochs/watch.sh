#!/bin/bash
# After each finished epoch of the run in this folder, write its weights to epN.safetensors (+ card).
cd "$(dirname "$0")/../../.."  # the repository
R="${RUN:-../runs/ed_cont}"  # the run folder, outside the repository
while kill -0 $(cat "$R"/pid) 2>/dev/null; do
  sleep 10
  n=$(python3 -c "
import json
d = dict(json.load(open('$R/state.json'))['state']['dict'])
p = {k: v['value'] for k, v in d['progress']['dict']}
print(p['epoch'] if p['batch'] == 0 else 0)" 2>/dev/null)
  if [ -n "$n" ] && [ "$n" -gt 0 ] && [ ! -f "$R"/ep$n.safetensors ]; then
    OMP_NUM_THREADS=1 .venv/bin/python -m editcore train --resume "$R"/state.safetensors --checkpoint-from-state \
      --data-root ../shared/data/cifar10 --out "$R"/ep$n.safetensors >>"$R"/watch.log 2>&1
  fi
done
