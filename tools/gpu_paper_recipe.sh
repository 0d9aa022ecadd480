#!/usr/bin/env bash
# Issue 10 on a lent GPU, across sessions: the paper's editable training from scratch (`--recipe paper`) beside
# a baseline trained from scratch with the same outer recipe (Adam 1e-3, no decay or schedule, clip 10, 200
# epochs, early stopping on 2,000 held-out training images), both on the one GPU for BUDGET seconds. Each run
# resumes from the state carried in .gpustate/ when there is one; the states (written every EVERY steps and
# at each epoch, atomically, so the deadline's kill loses at most EVERY steps), each run's best epoch so far
# as a checkpoint with its card, and the logs come back in $OUT.
#
# Prepare here, then run (device tool):
#   python tools/pack_cifar.py pack ...       # .gpudata/a and .gpudata/b, as for tools/gpu_run.sh
#   mkdir -p .gpustate && cp RUN/*.state.safetensors RUN/*.state.json .gpustate/   # a later session only
#   carry: [".gpudata", ".gpustate"]   command: BUDGET=420 bash tools/gpu_paper_recipe.sh
# Then keep $OUT's *.state.* for the next session and score the checkpoints here (docs/RESULTS.md, issue 10).
# CPU check of this script (tests/test_tools.py runs it on the embedded sample): DEVICE=cpu BUDGET=60 OUT=/tmp/o \
#   START="--train-subset 512 --epochs 2 --val-size 128 --val-edits 4" bash tools/gpu_paper_recipe.sh
set -u
export PYTHONUNBUFFERED=1
OUT="${OUT:?set OUT, the folder whose files come back}"
DEVICE="${DEVICE:-cuda}" BUDGET="${BUDGET:-420}" EVERY="${EVERY:-100}" START="${START:-}"
PY="${PYTHON:-python3}"
if [ "$DEVICE" != cpu ]; then nvidia-smi -L; fi
if [ -d .gpudata/a ] && [ -d .gpudata/b ]; then source tools/unpack_gpudata.sh; fi
# On the GPU the full CIFAR-10 is required; a CPU check may run on the embedded sample (no data root).
if [ -n "${EDITLAB_DATA:-}" ]; then DATA=(--data-root "$EDITLAB_DATA");
elif [ "$DEVICE" = cpu ]; then DATA=();
else echo "no CIFAR-10: carry .gpudata (tools/pack_cifar.py) or set EDITLAB_DATA" >&2; exit 2; fi
STATES="${STATE_DIR:-.gpustate}"  # carried in, read and written here
mkdir -p "$STATES"
# The device copy has no .git: pass the commit in, e.g. `EDITLAB_GIT_COMMIT=$(git rev-parse HEAD) bash ...`
export EDITLAB_GIT_COMMIT="${EDITLAB_GIT_COMMIT:-unknown}"

run() {  # NAME, then the flags that start it (ignored when its state is carried: a resumed run keeps its own)
  local name=$1 state=$STATES/$1.state.safetensors; shift
  if [ -f "$state" ]; then set -- --resume "$state"; else set -- "$@" $START --state "$state"; fi
  # SIGINT first: Python stops at once; the state on disk is the last complete one either way.
  timeout -s INT -k 10 "$BUDGET" "$PY" -m editcore train "$@" --device "$DEVICE" "${DATA[@]}" \
    --state-every-steps "$EVERY" --out "$STATES/$name.final.safetensors" >>"$OUT/$name.log" 2>&1
  echo "$name: training exited with $? (124: stopped at the deadline, to be resumed)" >>"$OUT/$name.log"
  "$PY" -m editcore train --resume "$state" --checkpoint-from-state "${DATA[@]}" \
    --out "$OUT/$name.safetensors" >>"$OUT/$name.log" 2>&1
  cp "$STATES/$name".state.* "$OUT/"
  tail -3 "$OUT/$name.log"
}

run paper_editable --recipe paper &
run paper_baseline --optimizer adam --lr 1e-3 --weight-decay 0 --schedule constant --warmup-epochs 0 \
  --clip-grad-norm 10 --epochs 200 --val-size 2000 --patience 20 &
wait
ls -la "$OUT"
