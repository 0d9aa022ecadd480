"""Rebuild assets/cifar10_test_sample.npz: CIFAR-10 test images 0-999 (the pixel-exact ones).

    EDITLAB_DATA=../shared/data/cifar10 python tools/make_sample.py
"""
import numpy as np

from editcore.core.data import SAMPLE_PATH, load_cifar10

N = 1000
test = load_cifar10("test")
np.savez_compressed(SAMPLE_PATH, images=test.images[:N].numpy(), labels=test.labels[:N].numpy().astype(np.uint8),
                    indices=np.arange(N, dtype=np.int32))
print(f"wrote {SAMPLE_PATH} ({SAMPLE_PATH.stat().st_size / 1e6:.2f} MB, test indices 0-{N - 1})")
