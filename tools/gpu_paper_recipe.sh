#!/usr/bin/env bash
# Issue 10 on a lent GPU, across sessions: the paper's editable training from scratch (`--recipe paper`) beside
# a baseline trained from scratch with the same outer recipe (Adam 1e-3, no decay or schedule, clip 10, 200
# epochs, early stopping on 2,000 held-out training images), both on the one GPU for BUDGET seconds. Each run
# resumes from the state carried in .gpustate/ when there is one; the states (written every EVERY steps and
# at each epoch, atomically, so the deadline's kill loses at most EVERY steps), each run's best epoch so far
# as a checkpoint with its card, the weights as every SNAP_EVERY-th epoch ended (NAME_epN.safetensors + card,
# for equal-epoch comparisons) and the logs come back in $OUT.
#
# Prepare here, then run (device tool):
#   python tools/pack_cifar.py pack ...       # .gpudata/a and .gpudata/b, as for tools/gpu_run.sh
#   mkdir -p .gpustate && cp RUN/*.state.safetensors RUN/*.state.json .gpustate/   # a later session only
#   carry: [".gpudata/b", ".gpustate"]   command: BUDGET=420 bash tools/gpu_paper_recipe.sh   # a carried earlier
# A run of tools/paper_runs.sh continues here the same way: its runs/NAME/state.safetensors (+ .json) copied to
# .gpustate/paper_editable.state.* (RUNS=paper_editable trains that one alone); put the returned state back.
# The packed CIFAR-10 (98 MiB) is more than one call may carry (64 MiB with the tree): see docs/SCALING.md.
# Then keep $OUT's *.state.* for the next session and score the checkpoints here (docs/RESULTS.md, issue 10).
# CPU check of this script (tests/test_tools.py runs it on the embedded sample): DEVICE=cpu BUDGET=60 OUT=/tmp/o \
#   START="--train-subset 512 --epochs 2 --val-size 128 --val-edits 4" bash tools/gpu_paper_recipe.sh
set -u
export PYTHONUNBUFFERED=1
OUT="${OUT:?set OUT, the folder whose files come back}"
DEVICE="${DEVICE:-cuda}" BUDGET="${BUDGET:-420}" EVERY="${EVERY:-100}" START="${START:-}" SNAP_EVERY="${SNAP_EVERY:-5}"
PY="${PYTHON:-python3}" RUNS="${RUNS:-paper_editable paper_baseline}"
# The carried pack is unpacked on the GPU machine only: a CPU check (the test) must not unpack a local .gpudata.
if [ "$DEVICE" != cpu ]; then nvidia-smi -L; [ -d .gpudata ] && source tools/unpack_gpudata.sh; fi
# On the GPU the full CIFAR-10 is required; a CPU check may run on the embedded sample (no data root).
if [ -n "${EDITLAB_DATA:-}" ]; then DATA=(--data-root "$EDITLAB_DATA");
elif [ "$DEVICE" = cpu ]; then DATA=();
else echo "no CIFAR-10: carry .gpudata (tools/pack_cifar.py) or set EDITLAB_DATA" >&2; exit 2; fi
STATES="${STATE_DIR:-.gpustate}"  # carried in, read and written here
mkdir -p "$STATES"
# The device copy has no .git: pass the commit in, e.g. `EDITLAB_GIT_COMMIT=$(git rev-parse HEAD) bash ...`
export EDITLAB_GIT_COMMIT="${EDITLAB_GIT_COMMIT:-unknown}"

epoch_ended() {  # STATE: the epoch it was written at the end of, else nothing (the state's own metadata, not its
  # sidecar, so a copy taken as the state is replaced is judged by what it holds)
  "$PY" - "$1" <<'PY' 2>/dev/null
import json, sys
from safetensors import safe_open
state = dict(json.loads(safe_open(sys.argv[1], "pt").metadata()["train_state"])["state"]["dict"])
progress = {k: v["value"] for k, v in state["progress"]["dict"]}
print(progress["epoch"] if progress["batch"] == 0 else "")
PY
}

snapshot() {  # NAME: keep a copy of its state when an epoch that is a multiple of SNAP_EVERY has just ended
  local state=$STATES/$1.state.safetensors copy=$STATES/$1.copy.safetensors seen=$STATES/$1.seen epoch
  [ -f "$state" ] && [ "$state" -nt "$seen" ] || return  # look only at a state written since the last look
  touch "$seen"
  cp "$state" "$copy" 2>/dev/null || return
  epoch=$(epoch_ended "$copy")
  if [ -n "$epoch" ] && [ "$epoch" -gt 0 ] && [ $((epoch % SNAP_EVERY)) -eq 0 ]; then
    mv "$copy" "$STATES/$1.ep$epoch.state.safetensors"
  else rm -f "$copy"; fi
}

run() {  # NAME, then the flags that start it (ignored when its state is carried: a resumed run keeps its own)
  local name=$1 state=$STATES/$1.state.safetensors; shift
  if [ -f "$state" ]; then set -- --resume "$state"; else set -- "$@" $START --state "$state"; fi
  # SIGINT first: Python stops at once; the state on disk is the last complete one either way.
  timeout -s INT -k 10 "$BUDGET" "$PY" -m editcore train "$@" --device "$DEVICE" "${DATA[@]}" \
    --state-every-steps "$EVERY" --out "$STATES/$name.final.safetensors" >>"$OUT/$name.log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null; do snapshot "$name"; sleep 1; done
  wait "$pid"
  echo "$name: training exited with $? (124: stopped at the deadline, to be resumed)" >>"$OUT/$name.log"
  snapshot "$name"
  for snap in "$STATES/$name".ep*.state.safetensors; do  # the weights as every SNAP_EVERY-th epoch ended
    [ -f "$snap" ] || continue
    local epoch=${snap##*.ep}; epoch=${epoch%%.*}
    "$PY" -m editcore train --resume "$snap" --checkpoint-from-state --latest "${DATA[@]}" \
      --out "$OUT/${name}_ep$epoch.safetensors" >>"$OUT/$name.log" 2>&1 && rm "$snap"
  done
  "$PY" -m editcore train --resume "$state" --checkpoint-from-state "${DATA[@]}" \
    --out "$OUT/$name.safetensors" >>"$OUT/$name.log" 2>&1
  rm -f "$STATES/$name.seen"
  cp "$STATES/$name".state.* "$OUT/"
  tail -3 "$OUT/$name.log"
}

for name in $RUNS; do case $name in
  paper_editable) run paper_editable --recipe paper & ;;
  paper_baseline) run paper_baseline --optimizer adam --lr 1e-3 --weight-decay 0 --schedule constant --warmup-epochs 0 \
    --clip-grad-norm 10 --epochs 200 --val-size 2000 --patience 20 & ;;
  *) echo "unknown run $name (paper_editable, paper_baseline)" >&2 ;;
esac; done
wait
ls -la "$OUT"
