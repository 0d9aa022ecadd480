"""Rebuild assets/cifar10_train_sample.npz: a fixed, class-balanced sample of CIFAR-10 training images.

It stands in for the training set where none is loaded (no data root): fine-tuning's replay and the
anchors that keep edits local. 200 images per class, chosen by a seeded permutation of the 50,000.

    EDITLAB_DATA=../shared/data/cifar10 PYTHONPATH=. python tools/make_train_sample.py
"""
import numpy as np

from editcore.core.data import TRAIN_SAMPLE_PATH, load_cifar10

PER_CLASS, SEED = 200, 0
train = load_cifar10("train")
labels = train.labels.numpy()
order = np.random.default_rng(SEED).permutation(len(labels))
rows = np.sort(np.concatenate([order[labels[order] == c][:PER_CLASS] for c in range(10)]))
np.savez_compressed(TRAIN_SAMPLE_PATH, images=train.images[rows].numpy(), labels=labels[rows].astype(np.uint8),
                    indices=rows.astype(np.int32))
print(f"wrote {TRAIN_SAMPLE_PATH} ({TRAIN_SAMPLE_PATH.stat().st_size / 1e6:.2f} MB, {len(rows)} training images, "
      f"{PER_CLASS} per class, seed {SEED})")
