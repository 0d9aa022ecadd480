#!/usr/bin/env bash
# Unpack whichever parts of the packed CIFAR-10 were carried to a lent GPU machine (.gpudata/a, .gpudata/b:
# tools/pack_cifar.py pack ...) into /tmp/cifar, which stays while the machine is warm. The whole pack (98 MiB)
# is more than one call may carry with the tree (64 MiB), so one call brings a and the next b (docs/SCALING.md).
# Exports EDITLAB_DATA=/tmp/cifar once all six batches are there. Sourced by the tools/gpu_*.sh scripts.
mkdir -p /tmp/cifar/cifar-10-batches-py
for part in .gpudata/*/*.lz; do
  [ -e "$part" ] || continue
  d=$(mktemp -d); cp "$part" "${part%.lz}.labels.npy" "$d/"
  python3 tools/pack_cifar.py unpack "$d" --out /tmp/cifar/cifar-10-batches-py &
done
wait
cp .gpudata/*/batches.meta /tmp/cifar/cifar-10-batches-py/ 2>/dev/null
ls -la /tmp/cifar/cifar-10-batches-py
missing=""
for name in batches.meta data_batch_1 data_batch_2 data_batch_3 data_batch_4 data_batch_5 test_batch; do
  [ -f "/tmp/cifar/cifar-10-batches-py/$name" ] || missing="$missing $name"
done
if [ -z "$missing" ]; then export EDITLAB_DATA=/tmp/cifar; else echo "CIFAR-10 not complete yet, missing:$missing" >&2; fi
