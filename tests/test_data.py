"""Data: the python-layout loader, its errors, the data-root choice, the embedded sample, transforms."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from editcore import DataError, augment, load_cifar10, load_sample, load_train_sample, normalize, resolve_data_root
from editcore.core.data import BATCH_DIR, TEST_BATCHES, TRAIN_BATCHES


def write_batch(path, n, seed):
    """A batch file in the CIFAR-10 python layout: rows of 3072 bytes (R plane, G plane, B plane)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:
        pickle.dump({"batch_label": "synthetic", "data": data, "labels": labels}, fh)
    return data, labels


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    monkeypatch.delenv("EDITLAB_DATA", raising=False)
    root = tmp_path / "cifar10"
    written = {name: write_batch(root / BATCH_DIR / name, 6, seed) for seed, name in enumerate(TRAIN_BATCHES + TEST_BATCHES)}
    return root, written


def test_loader_reads_the_python_layout(data_root):
    root, written = data_root
    test = load_cifar10("test", root)
    data, labels = written["test_batch"]
    assert test.images.dtype == torch.uint8 and test.images.shape == (6, 3, 32, 32)
    assert test.labels.dtype == torch.int64 and test.labels.tolist() == labels
    assert test.indices.tolist() == list(range(6))
    # Pixel (row 2, col 5) of image 3: channel c lives at c*1024 + row*32 + col in the flat row.
    assert [int(test.images[3, c, 2, 5]) for c in range(3)] == [int(data[3, c * 1024 + 2 * 32 + 5]) for c in range(3)]

    train = load_cifar10("train", root)
    assert len(train) == 30
    assert train.labels.tolist() == sum((written[name][1] for name in TRAIN_BATCHES), [])


def test_loader_accepts_the_batch_folder_itself(data_root):
    root, written = data_root
    assert load_cifar10("test", root / BATCH_DIR).labels.tolist() == written["test_batch"][1]


def test_missing_root_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("EDITLAB_DATA", raising=False)
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=str(missing)) as info:
        load_cifar10("test", missing)
    assert "download-cifar10" in str(info.value)


def test_missing_batch_names_the_file(data_root):
    root, _ = data_root
    (root / BATCH_DIR / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3.*missing"):
        load_cifar10("train", root)


@pytest.mark.parametrize("content", [b"this is not a pickle", pickle.dumps({"data": np.zeros((2, 5), np.uint8)}),
                                     pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 12]})])
def test_corrupt_batch_names_the_file(data_root, content):
    root, _ = data_root
    batch = root / BATCH_DIR / "test_batch"
    batch.write_bytes(content)
    with pytest.raises(DataError, match=f"{batch}.*corrupt"):
        load_cifar10("test", root)


def test_resolve_data_root_prefers_the_flag_then_the_environment(data_root, tmp_path, monkeypatch):
    root, _ = data_root
    assert resolve_data_root(None) is None  # neither: the embedded sample
    monkeypatch.setenv("EDITLAB_DATA", str(root))
    assert resolve_data_root(None) == root / BATCH_DIR
    assert load_cifar10("test").source == "cifar10-test"
    other = tmp_path / "other"
    write_batch(other / BATCH_DIR / "test_batch", 2, seed=9)
    assert resolve_data_root(other) == other / BATCH_DIR
    monkeypatch.setenv("EDITLAB_DATA", str(tmp_path / "gone"))
    with pytest.raises(DataError, match="gone"):
        resolve_data_root(None)


def test_without_a_root_test_is_the_sample_and_train_is_refused(monkeypatch):
    monkeypatch.delenv("EDITLAB_DATA", raising=False)
    assert load_cifar10("test").source == "cifar10-test-sample"
    with pytest.raises(DataError, match="EDITLAB_DATA"):
        load_cifar10("train")
    with pytest.raises(ValueError):
        load_cifar10("validation")


def test_embedded_sample_is_test_images_0_to_999(sample):
    assert sample.images.dtype == torch.uint8 and sample.images.shape == (1000, 3, 32, 32)
    assert sample.indices.tolist() == list(range(1000))
    assert sample.labels.min() >= 0 and sample.labels.max() <= 9
    assert torch.bincount(sample.labels, minlength=10).min() > 50  # all classes present
    assert sample.labels[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]  # the start of CIFAR-10's test labels


def test_shipped_training_sample_loads_without_a_root_and_is_class_balanced(monkeypatch):
    monkeypatch.delenv("EDITLAB_DATA", raising=False)
    train = load_train_sample()
    assert train.source == "cifar10-train-sample"
    assert train.images.dtype == torch.uint8 and train.images.shape == (2000, 3, 32, 32)
    assert torch.bincount(train.labels, minlength=10).tolist() == [200] * 10
    # Distinct training images, stored in training-index order (assets/README.md).
    assert bool((train.indices.diff() > 0).all()) and 0 <= int(train.indices.min()) and int(train.indices.max()) < 50000


def test_normalize_uses_the_training_statistics():
    gray = torch.full((1, 3, 2, 2), 128, dtype=torch.uint8)
    out = normalize(gray)
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([(128 / 255 - 0.4914) / 0.2470, (128 / 255 - 0.4822) / 0.2435,
                                                         (128 / 255 - 0.4465) / 0.2616]))


def test_augment_is_a_padded_crop_or_its_mirror():
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out = augment(images, torch.Generator().manual_seed(1))
    assert out.shape == images.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(len(images)):
        crops = [padded[i, :, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out[i], c) or torch.equal(out[i], c.flip(2)) for c in crops)
    assert torch.equal(augment(images, torch.Generator().manual_seed(1)), out)
