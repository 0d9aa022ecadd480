#!/usr/bin/env bash
# Make the tree a device call sends small enough to carry the packed CIFAR-10 beside it, and put it back.
# A call sends the tracked files plus its carried paths, 64 MiB in all. The tracked tree is ~57 MiB (run states,
# scored weights, anchor statistics, docs), and one half of the pack is ~50 MiB (docs/SCALING.md). The GPU scripts
# need editcore/, tools/, the baseline checkpoint and the test sample (~4.5 MB).
#   tools/device_tree.sh shrink    untrack the rest in the index only (files stay) and exclude it; prints the size
#   tools/device_tree.sh restore   the index as HEAD has it, the exclusions removed (run it before any commit)
set -eu
cd "$(dirname "$0")/.."
DROP=(runs docs tests bench app assets/anchor_stats assets/cifar10_train_sample.npz assets/cifar10_nae.npz
      assets/resnet20_editable.safetensors assets/resnet20_matchranks.safetensors assets/resnet20_editable_paper.safetensors
      assets/resnet20_scratch_baseline.safetensors assets/resnet20_scratch_editable.safetensors)
EXCLUDE=.git/info/exclude MARK="# device_tree.sh shrink"
case ${1:-} in
shrink)
  git diff --cached --quiet || { echo "the index holds staged changes: commit or unstage them first" >&2; exit 1; }
  git rm -r -q --cached "${DROP[@]}"
  mkdir -p .git/info
  { echo "$MARK"; printf '/%s\n' "${DROP[@]}"; } >>"$EXCLUDE"
  (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null | tail -1 ;;
restore)
  git reset -q
  [ -f "$EXCLUDE" ] && sed -i "/^$MARK\$/,\$d" "$EXCLUDE"
  git status --short ;;
*) echo "usage: tools/device_tree.sh shrink|restore" >&2; exit 2 ;;
esac
