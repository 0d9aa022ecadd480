#!/usr/bin/env bash
# Issue 20 on this CPU: the paper's editable training from scratch (`--recipe paper`) and a baseline trained
# from scratch with the same outer recipe, in the background, resumable across sessions and machines.
#
# Each run lives in runs/NAME/. Git tracks its resumable state, runs/NAME/state.safetensors (+ state.json), and
# the weights of every fifth epoch, runs/NAME/scored/NAME_epN.safetensors (+ card): commit them before a session
# stops (`save`) and the next session, on any machine, resumes from the state (`start`) and scores those epochs.
# Not tracked: train.log, and epN.state.safetensors, the state as each epoch ended (the weights come from it:
# `train --resume runs/NAME/epN.state.safetensors --checkpoint-from-state --latest`).
# Remove runs/NAME once the run has finished and its checkpoint ships in assets/.
#
#   tools/paper_runs.sh start NAME...   start (or resume) each run on THREADS torch threads (default 1)
#   tools/paper_runs.sh status          each run's progress and whether it is running
#   tools/paper_runs.sh save            git add each run's latest state and every fifth epoch's weights (then commit)
#   tools/paper_runs.sh stop [NAME...]  stop the named runs, or every run (a state keeps all but the last EVERY steps)
#   tools/paper_runs.sh score NAME N    score epoch N of run NAME on bench/locality.py (R, C; N=100 each; the paper's
#                                       RMSProp at lr 1e-3, RMSProp at 1e-4 and the local editor): the same seeded
#                                       edits for every run and epoch -> docs/runs/paper_runs/NAME_epN.json (+ .log)
#   tools/paper_runs.sh paper NAME N... epochs N of run NAME under the paper's editor (RMSProp lr 1e-3, the run's layers or
#                                       $LAYERS), the issue's measure: evaluate-edits --protocol other --n-edits 200 --seed 11
#                                       on the embedded sample -> docs/runs/paper_runs/NAME[_LAYERS]_epN_paper_editor.json
# Runs: editable (the paper's recipe, edits on the architecture's default layer3), baseline (same outer
# recipe, no edit terms), editable_layer2 (edits and their scoring on layer2; its baseline is `baseline`, scored
# with LAYERS=layer2), baseline_layer2 (the baseline again, its validation edits on layer2: not needed for that).
cd "$(dirname "$0")/.."
DATA="${EDITLAB_DATA:-../shared/data/cifar10}"
THREADS="${THREADS:-1}" EVERY="${EVERY:-50}"
OUTER=(--optimizer adam --lr 1e-3 --weight-decay 0 --schedule constant --warmup-epochs 0 --clip-grad-norm 10
       --epochs 200 --val-size 2000 --patience 20)

flags() {  # the flags that start run $1 (a resumed run keeps its own)
  case $1 in
    editable) echo --recipe paper ;;
    editable_layer2) echo --recipe paper --editable-prefix layer2 ;;
    baseline) echo "${OUTER[@]}" ;;
    baseline_layer2) echo "${OUTER[@]}" --editable-prefix layer2 ;;
    *) echo "unknown run $1 (editable, baseline, editable_layer2, baseline_layer2)" >&2; return 2 ;;
  esac
}

running() { [ -f "runs/$1/pid" ] && kill -0 "$(cat "runs/$1/pid")" 2>/dev/null; }

start() {
  local name=$1 dir=runs/$1 start_flags
  start_flags=$(flags "$name") || exit 2
  if running "$name"; then echo "$name: already running (pid $(cat "$dir/pid"))"; return; fi
  mkdir -p "$dir"
  local args
  if [ -f "$dir/state.safetensors" ]; then args=(--resume "$dir/state.safetensors")
  else read -r -a args <<<"$start_flags"; args+=(--seed 0 --state "$dir/state.safetensors"); fi
  OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS PYTHONUNBUFFERED=1 nohup .venv/bin/python -m editcore train \
    "${args[@]}" --device cpu --data-root "$DATA" --state-every-steps "$EVERY" --out "$dir/final.safetensors" \
    >>"$dir/train.log" 2>&1 &
  echo $! >"$dir/pid"
  nohup bash "$0" _snapshots "$name" >/dev/null 2>&1 &
  echo "$name: ${args[*]:0:2}... pid $(cat "$dir/pid"), log $dir/train.log"
}

snapshots() {  # while run $1 trains, keep a copy of its state as each epoch ends
  local dir=runs/$1
  while running "$1"; do
    # The epoch's state is replaced EVERY steps later (~25 s at two threads): look often, but only at a new state.
    sleep 2
    [ "$dir/state.json" -nt "$dir/.snapshot_seen" ] || continue
    touch "$dir/.snapshot_seen"
    local n
    n=$(progress "$dir" | awk '$2 == 0 {print $1}')
    if [ -n "$n" ] && [ "$n" -gt 0 ] && [ ! -f "$dir/ep$n.state.safetensors" ]; then
      cp "$dir/state.safetensors" "$dir/ep$n.state.safetensors.tmp" && mv "$dir/ep$n.state.safetensors.tmp" "$dir/ep$n.state.safetensors"
    fi
  done
}

weights() {  # run $1's weights as epoch $2 ended -> runs/$1/scored/$1_ep$2.safetensors (+ card)
  local dir=runs/$1
  mkdir -p "$dir/scored" docs/runs/paper_runs
  [ -f "$dir/scored/$1_ep$2.safetensors" ] && return
  [ -f "$dir/ep$2.state.safetensors" ] || { echo "no $dir/ep$2.state.safetensors" >&2; exit 2; }
  .venv/bin/python -m editcore train --resume "$dir/ep$2.state.safetensors" \
    --checkpoint-from-state --latest --out "$dir/scored/$1_ep$2.safetensors" --device cpu --data-root "$DATA" >/dev/null || exit 1
}

save() {  # git add each run's latest state, and the weights of every fifth epoch (1 MB each: the epN states stay
  # on the machine that trained them, and runs are compared at equal epochs, so a new machine needs these)
  for state in runs/*/ep*.state.safetensors; do
    [ -f "$state" ] || continue
    local name epoch
    name=$(basename "$(dirname "$state")"); epoch=${state##*/ep}; epoch=${epoch%%.*}
    [ $((epoch % 5)) -eq 0 ] && weights "$name" "$epoch"
  done
  git add -f runs/*/state.safetensors runs/*/state.json
  ls runs/*/scored/*_ep*.safetensors >/dev/null 2>&1 && git add -f runs/*/scored/*_ep*.safetensors runs/*/scored/*_ep*.json
  git status --short runs/
}

paper() {  # epoch $2 of run $1 under the paper's editor, the issue's measure (200 seeded R edits, embedded sample), with
  # edits on the run's layers or on $LAYERS (the baseline judged on layer2: LAYERS=layer2 -> baseline_layer2_epN)
  local name=$1 epoch=$2 dir=runs/$1 out=docs/runs/paper_runs prefix=${LAYERS:-$(layers "$1")} record=$1
  [ "$prefix" = "$(layers "$1")" ] || record=${1}_$prefix
  weights "$name" "$epoch"
  OMP_NUM_THREADS=1 .venv/bin/python -m editcore evaluate-edits --checkpoint "$dir/scored/${name}_ep$epoch.safetensors" \
    --editor rmsprop-paper --lr 1e-3 --editable-prefix "$prefix" --protocol other --n-edits 200 --seed 11 \
    --threads 1 --device cpu --json | tail -1 >"$out/${record}_ep${epoch}_paper_editor.json" || exit 1
  .venv/bin/python -c "import json, sys; d = json.load(open(sys.argv[1])); print(sys.argv[1], 'error', round(d['test_error'], 4), \
'drawdown', round(d['drawdown'], 4), 'success', d['success_rate'], 'steps', d['mean_steps'])" "$out/${record}_ep${epoch}_paper_editor.json"
}

score() {  # epoch $2 of run $1: its weights as that epoch ended, scored on the same edits as every other
  local name=$1 epoch=$2 dir=runs/$1 out=docs/runs/paper_runs
  weights "$name" "$epoch"
  OMP_NUM_THREADS=1 .venv/bin/python bench/locality.py --data-root "$DATA" --checkpoint "$dir/scored/${name}_ep$epoch.safetensors" \
    --corrections-of assets/resnet20_baseline.safetensors --corrections-of assets/resnet20_editable.safetensors \
    --protocols R C --n 100 --threads 1 --method "rmsprop-paper@$(layers "$name")" \
    --method "rmsprop@$(layers "$name"),lr=1e-4" --method "local@$(layers "$name").0.conv1" \
    --json "$out/${name}_ep$epoch.json" >"$out/${name}_ep$epoch.log" 2>&1 && tail -12 "$out/${name}_ep$epoch.log"
}

layers() { case $1 in *layer2) echo layer2 ;; *) echo layer3 ;; esac; }

progress() {  # "epochs_done batch_in_epoch step seconds finished" of the state in folder $1
  .venv/bin/python - "$1/state.json" <<'PY' 2>/dev/null
import json, sys
state = dict(json.load(open(sys.argv[1]))["state"]["dict"])
p = {k: v["value"] for k, v in state["progress"]["dict"]}
print(p["epoch"], p["batch"], p["step"], p["seconds"], state["finished"]["value"])
PY
}

case "${1:-}" in
  start) shift; [ $# -gt 0 ] || { echo "name the runs to start" >&2; exit 2; }; for n in "$@"; do start "$n"; done ;;
  _snapshots) snapshots "$2" ;;
  score) [ $# -eq 3 ] || { echo "score NAME EPOCH" >&2; exit 2; }; score "$2" "$3" ;;
  paper) [ $# -ge 3 ] || { echo "paper NAME EPOCH..." >&2; exit 2; }; name=$2; shift 2; for e in "$@"; do paper "$name" "$e"; done ;;
  status)
    for dir in runs/*/; do
      name=$(basename "$dir"); [ -f "$dir/state.json" ] || continue
      read -r epoch batch step seconds finished <<<"$(progress "$dir")"
      state=stopped; running "$name" && state=running
      echo "$name: $state, epoch $epoch done (+$batch steps), step $step, ${seconds}s trained, finished=$finished"
      grep -E "^epoch=|early stop|keeping" "$dir/train.log" 2>/dev/null | tail -2 | cut -c1-220
    done ;;
  save) save ;;
  stop)
    shift; names=("$@"); [ $# -gt 0 ] || names=($(ls runs))
    for name in "${names[@]}"; do running "$name" && kill "$(cat "runs/$name/pid")" && echo "stopped $name"; done ;;
  *) sed -n '2,19p' "$0"; exit 2 ;;
esac
