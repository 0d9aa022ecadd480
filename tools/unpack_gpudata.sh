#!/usr/bin/env bash
# Unpack the CIFAR-10 carried to a lent GPU machine as .gpudata/a and .gpudata/b (tools/pack_cifar.py pack ...)
# into /tmp/cifar and export EDITLAB_DATA=/tmp/cifar. Sourced by tools/gpu_run.sh and tools/gpu_check.sh.
mkdir -p /tmp/cifar/cifar-10-batches-py
for part in .gpudata/a/*.lz .gpudata/b/*.lz; do
  d=$(mktemp -d); cp "$part" "${part%.lz}.labels.npy" "$d/"
  python3 tools/pack_cifar.py unpack "$d" --out /tmp/cifar/cifar-10-batches-py &
done
wait
cp .gpudata/b/batches.meta /tmp/cifar/cifar-10-batches-py/
ls -la /tmp/cifar/cifar-10-batches-py
export EDITLAB_DATA=/tmp/cifar
