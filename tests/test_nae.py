"""CIFAR-10-NAE: split, adversarial filtration, storage, rank distribution, and the CLI around them."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from editcore import ImageSet, load_checkpoint, save_checkpoint
from editcore.cli import main
from editcore.core.data import MEAN, STD, load_cifar10
from editcore.core.models import create_model
from editcore.experiments.nae import (HELDOUT, NAE_POOL, build_nae_set, heldout_part, load_nae, pool_part,
                                      rank_distribution, rank_histogram, save_nae, true_label_ranks)


class LookupModel(nn.Module):
    """Predicts `table[k]` for an image whose pixels all equal k: fixed answers, whatever the batching."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.as_tensor(table)

    def forward(self, x):
        k = torch.round((x[:, 0, 0, 0] * STD[0] + MEAN[0]) * 255).long()
        return nn.functional.one_hot(self.table[k], 10).float() * 5.0


def constant_images(labels, first_index=5000) -> ImageSet:
    n = len(labels)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).clone()
    return ImageSet(images, torch.as_tensor(labels), torch.arange(first_index, first_index + n), "cifar10-test")


def test_rank_distribution_smooths_zeroes_rank_0_and_renormalises():
    # histogram [0, 2, 1, 0, 0] * kernel -> [0.5, 1.0, 0.8, 0.4, 0.1]; rank 0 zeroed; sum 2.3
    probs = rank_distribution(torch.tensor([1, 1, 2]), classes=5)
    assert probs == pytest.approx([0.0, 1.0 / 2.3, 0.8 / 2.3, 0.4 / 2.3, 0.1 / 2.3])
    # the kernel is truncated at the edge, not folded back: rank 9 alone -> 0.1, 0.2, 0.4 on ranks 7-9
    assert rank_distribution(torch.tensor([9])) == pytest.approx([0] * 7 + [1 / 7, 2 / 7, 4 / 7])
    with pytest.raises(ValueError):
        rank_distribution(torch.tensor([], dtype=torch.long))


def test_true_label_ranks_count_the_classes_scoring_higher():
    table = [3, 3, 3]
    model = LookupModel(table)  # logits: 5 for class 3, 0 elsewhere
    ranks = true_label_ranks(model, constant_images([3, 0, 9]).images, torch.tensor([3, 0, 9]), "cpu")
    assert ranks.tolist() == [0, 1, 1]
    assert rank_histogram(ranks) == [1, 2] + [0] * 8


def test_build_nae_set_keeps_exactly_the_images_every_filter_gets_wrong():
    labels = [0, 1, 2, 3, 4, 5]
    pool = constant_images(labels)
    filters = [LookupModel([9, 9, 9, 9, 4, 5]),   # wrong on 0-3
               LookupModel([0, 9, 9, 9, 4, 9]),   # wrong on 1, 2, 3, 5
               LookupModel([9, 9, 9, 9, 9, 5])]   # wrong on 0-4
    nae = build_nae_set(filters, pool, "cpu", batch_size=4)
    assert nae.indices.tolist() == [5001, 5002, 5003]
    assert nae.labels.tolist() == [1, 2, 3]
    assert torch.equal(nae.images, pool.images[1:4]) and nae.source == "cifar10-nae"
    assert len(build_nae_set(filters + [LookupModel(labels)], pool, "cpu")) == 0


def test_split_is_disjoint_covers_the_test_set_and_keeps_the_exact_images_held_out(sample):
    test = ImageSet(torch.zeros(10000, 3, 1, 1, dtype=torch.uint8), torch.zeros(10000, dtype=torch.long),
                    torch.arange(10000), "cifar10-test")
    held, pool = heldout_part(test), pool_part(test)
    assert HELDOUT == (0, 5000) and NAE_POOL == (5000, 10000)
    assert set(held.indices.tolist()).isdisjoint(pool.indices.tolist())
    assert len(held) + len(pool) == 10000
    assert set(range(1000)) <= set(held.indices.tolist())
    assert len(heldout_part(sample)) == 1000 and len(pool_part(sample)) == 0


def test_save_and_load_round_trip_without_pickle(tmp_path):
    nae = constant_images([1, 2, 2, 7])
    path = save_nae(tmp_path / "nae.npz", nae, {"command": "test"})
    loaded = load_nae(path)
    assert torch.equal(loaded.images, nae.images) and torch.equal(loaded.labels, nae.labels)
    assert torch.equal(loaded.indices, nae.indices) and loaded.source == "cifar10-nae"
    card = json.loads(path.with_suffix(".json").read_text())
    assert card["command"] == "test" and card["n_images"] == 4
    assert card["per_class"] == [0, 1, 2, 0, 0, 0, 0, 1, 0, 0]
    with np.load(path, allow_pickle=False) as npz:
        assert {npz[k].dtype for k in npz.files} == {np.dtype(np.uint8), np.dtype(np.int64)}
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, images=np.array([{"a": 1}], dtype=object), labels=np.zeros(1), indices=np.zeros(1))
    with pytest.raises(ValueError):
        load_nae(pickled)
    with pytest.raises(FileNotFoundError, match="build-nae"):
        load_nae(tmp_path / "missing.npz")


def small_checkpoint(path, arch, seed=0):
    torch.manual_seed(seed)
    return save_checkpoint(path, create_model(arch), {"arch": arch, "seed": seed})


@pytest.mark.parametrize("archs", [["resnet20", "resnet32"], ["resnet20", "resnet20", "resnet20"]])
def test_build_nae_refuses_too_few_filters_or_architectures(tmp_path, archs):
    paths = [str(small_checkpoint(tmp_path / f"f{i}.safetensors", arch, i)) for i, arch in enumerate(archs)]
    with pytest.raises(SystemExit, match="at least 3 filter models of at least 2 architectures"):
        main(["build-nae", "--filters", *paths, "--out", str(tmp_path / "nae.npz")])
    assert not (tmp_path / "nae.npz").exists()


@pytest.fixture
def sample_nae(tmp_path, sample, resnet20):
    """A tiny NAE file from the embedded sample: the first 8 images the short-trained ResNet-20 gets wrong
    (a test stand-in: the real set comes from the pool, test 5000-9999, which the sample lacks)."""
    wrong = build_nae_set([resnet20], sample, "cpu")
    path = save_nae(tmp_path / "nae.npz", wrong.subset(torch.arange(8)), {"command": "test fixture"})
    ckpt = save_checkpoint(tmp_path / "base.safetensors", resnet20, {"arch": "resnet20", "editable_prefix": "layer3"})
    return path, ckpt


def run_json(capsys, *args) -> tuple[dict, str]:
    assert main(list(map(str, args))) == 0
    captured = capsys.readouterr()
    return json.loads(captured.out.strip().splitlines()[-1]), captured.err


@pytest.mark.slow
def test_evaluate_edits_nae_protocol_edits_to_true_labels(sample_nae, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EDITLAB_DATA", raising=False)
    nae_path, ckpt = sample_nae
    nae = load_nae(nae_path)
    records = tmp_path / "records.json"
    common = ["evaluate-edits", "--checkpoint", ckpt, "--device", "cpu", "--max-steps", 3, "--json"]
    summary, err = run_json(capsys, *common, "--protocol", "nae", "--nae", nae_path, "--n-edits", 20, "--records", records)
    assert "drawdown on the embedded sample" in err
    assert summary["protocol"] == "nae" and summary["targets"] == "true"
    assert summary["n_edits"] == 8 and summary["n_nae"] == 8  # all of them: fewer than --n-edits
    assert summary["n_heldout"] == 1000 - 8  # the sample minus the NAE images drawn from it
    true_label = dict(zip(nae.indices.tolist(), nae.labels.tolist()))
    edits = json.loads(records.read_text())
    assert sorted(r["index"] for r in edits) == sorted(true_label)
    assert all(r["target"] == true_label[r["index"]] for r in edits)
    random, _ = run_json(capsys, *common, "--n-edits", 2)
    assert random["protocol"] == "other" and random["targets"] == "other"  # the default: random targets != true label
    assert set(summary) == set(random) | {"nae", "n_nae"}


@pytest.mark.slow
def test_match_ranks_training_records_the_rank_distribution(sample_nae, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("EDITLAB_DATA", raising=False)
    nae_path, ckpt = sample_nae
    out = tmp_path / "matchranks.safetensors"
    code = main(["train", "--epochs", "1", "--editable", "--edit-targets", "match-ranks", "--nae", str(nae_path),
                 "--init", str(ckpt), "--train-subset", "128", "--batch-size", "64", "--max-steps", "2",
                 "--device", "cpu", "--out", str(out)])
    assert code == 0
    card = json.loads(out.with_suffix(".json").read_text())
    entry = card["match_ranks"]
    nae = load_nae(nae_path)
    expected = true_label_ranks(load_checkpoint(ckpt).model, nae.images, nae.labels, "cpu")
    assert entry["rank_histogram"] == rank_histogram(expected) and entry["rank_histogram"][0] == 0
    assert entry["rank_probs"] == pytest.approx(rank_distribution(expected))
    assert card["train_config"]["edit_targets"] == "match-ranks"
    assert card["train_config"]["rank_probs"] == pytest.approx(entry["rank_probs"])
    with pytest.raises(SystemExit, match="--editable"):
        main(["train", "--epochs", "1", "--edit-targets", "match-ranks", "--nae", str(nae_path),
              "--device", "cpu", "--out", str(tmp_path / "x.safetensors")])


# --- ImageNet-A loader and edit hook, on a synthetic folder (no real ImageNet data here) ---

def write_jpegs(root, wnids, per_class=2):
    from PIL import Image

    gen = np.random.default_rng(0)
    for wnid in wnids:
        (root / wnid).mkdir(parents=True)
        for i in range(per_class):
            pixels = gen.integers(0, 256, (30 + 10 * i, 50, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / wnid / f"{wnid}_{i}.jpg")
    return root


@pytest.fixture
def imagenet_a_folder(tmp_path):
    from editcore.experiments.imagenet_a import WNIDS

    root = write_jpegs(tmp_path / "imagenet-a", [WNIDS[0], WNIDS[38], WNIDS[199]])
    (root / "n00000000").mkdir()  # not an ImageNet-A class: skipped
    (root / WNIDS[0] / "README.txt").write_text("not an image")
    return root


def test_imagenet_a_mapping_is_the_official_200_classes():
    from editcore.experiments.imagenet_a import INDICES_IN_1K, WNIDS, labels_to_200, logits_to_200

    assert len(WNIDS) == len(set(WNIDS)) == 200 and len(INDICES_IN_1K) == 200
    mapping = dict(zip(WNIDS, INDICES_IN_1K))  # spot checks against ImageNet-1k's class order
    assert mapping["n01498041"] == 6 and mapping["n02099601"] == 207 and mapping["n12267677"] == 988
    assert logits_to_200(torch.arange(1000.0).view(1, -1)).view(-1).tolist() == list(INDICES_IN_1K)
    assert labels_to_200(torch.tensor([6, 207, 988])).tolist() == [0, 38, 199]
    with pytest.raises(ValueError):
        labels_to_200(torch.tensor([0]))


def test_imagenet_a_loader_reads_resizes_and_labels_a_synthetic_folder(imagenet_a_folder):
    from editcore.experiments.imagenet_a import class_folders, imagenet_normalize, load_imagenet_a, read_folder

    known, other = class_folders(imagenet_a_folder)
    assert len(known) == 3 and other == ["n00000000"]
    images = read_folder(imagenet_a_folder)
    assert images.images.shape == (6, 3, 224, 224) and images.images.dtype == torch.uint8
    assert images.labels.tolist() == [6, 6, 207, 207, 988, 988]
    normalized, labels = load_imagenet_a(imagenet_a_folder)
    assert torch.allclose(normalized, imagenet_normalize(images.images)) and torch.equal(labels, images.labels)


def test_imagenet_a_loader_centre_crops(tmp_path):
    from PIL import Image

    from editcore.experiments.imagenet_a import WNIDS, read_folder

    (tmp_path / WNIDS[0]).mkdir()
    stripes = np.zeros((200, 300, 3), dtype=np.uint8)
    stripes[:, :100, 0], stripes[:, 100:200, 1], stripes[:, 200:, 2] = 255, 255, 255  # red | green | blue
    Image.fromarray(stripes).save(tmp_path / WNIDS[0] / "stripes.png")
    image = read_folder(tmp_path).images[0].float()
    # resized to 384x256, the centre 224 columns are 80-303: mostly the green stripe (128-255)
    assert image[1].mean() > 0.5 * 255 and image[1].mean() > 2 * max(image[0].mean(), image[2].mean())


def tiny_torchvision_resnet():
    from torchvision.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    return ResNet(BasicBlock, [1, 1, 1, 1]).eval()  # random weights: no download, nothing cached


def test_staged_torchvision_resnet_matches_the_original_on_the_200_classes():
    from editcore.core.data import normalize
    from editcore.experiments.imagenet_a import StagedTorchvisionResNet, imagenet_normalize, logits_to_200

    resnet = tiny_torchvision_resnet()
    staged = StagedTorchvisionResNet(resnet).eval()
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        expected = logits_to_200(resnet(imagenet_normalize(images)))
        assert torch.allclose(staged(normalize(images)), expected, atol=1e-4)


@pytest.mark.slow
def test_imagenet_a_nae_edits_end_to_end_on_a_synthetic_folder(imagenet_a_folder, tmp_path):
    from editcore import create_editor
    from editcore.experiments.imagenet_a import WNIDS, StagedTorchvisionResNet, run_nae_edits

    heldout = write_jpegs(tmp_path / "heldout", [WNIDS[38], WNIDS[100]], per_class=2)
    summary, records = run_nae_edits(StagedTorchvisionResNet(tiny_torchvision_resnet()), imagenet_a_folder, heldout,
                                     create_editor("rmsprop"), n_edits=3, max_steps=2)
    assert summary["protocol"] == "nae" and summary["targets"] == "true" and summary["n_nae"] == 6
    assert summary["n_edits"] == 3 and summary["n_heldout"] == 4
    true_200 = {0: 0, 1: 0, 2: 38, 3: 38, 4: 199, 5: 199}  # row index -> ImageNet-A class
    assert all(r.target == true_200[r.index] for r in records)


def test_imagenet_a_edits_cli_never_downloads_weights(tmp_path, monkeypatch, capsys, imagenet_a_folder):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    code = main(["imagenet-a-edits", "--imagenet-a", str(imagenet_a_folder), "--heldout", str(imagenet_a_folder),
                 "--torchvision-model", "resnet18", "--device", "cpu"])
    assert code == 2 and "not in torch's cache" in capsys.readouterr().err


@pytest.mark.slow
def test_build_nae_end_to_end_on_a_synthetic_data_root(tmp_path, capsys, monkeypatch):
    """The whole command on a fake CIFAR-10 test batch (random pixels, untrained models), cut to 5120
    images so the pool (test 5000-5119) is small."""
    import pickle

    from editcore.experiments.nae import filter_predictions

    gen = np.random.default_rng(0)
    batch_dir = tmp_path / "cifar10" / "cifar-10-batches-py"
    batch_dir.mkdir(parents=True)
    labels = gen.integers(0, 10, 5120).tolist()
    with (batch_dir / "test_batch").open("wb") as fh:  # the python layout the loader reads
        pickle.dump({"data": gen.integers(0, 256, (5120, 3072), dtype=np.uint8), "labels": labels}, fh)
    filters = [str(small_checkpoint(tmp_path / f"f{i}.safetensors", arch, i))
               for i, arch in enumerate(["resnet20", "resnet32", "resnet20"])]
    reference = str(small_checkpoint(tmp_path / "ref.safetensors", "resnet20", 7))
    out = tmp_path / "nae.npz"
    argv = ["build-nae", "--filters", *filters, "--reference", reference, "--out", str(out),
            "--data-root", str(tmp_path / "cifar10"), "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", ["editcore", *argv])  # the card records the command line
    assert main(argv) == 0
    assert "NAE" in capsys.readouterr().out
    nae, card = load_nae(out), json.loads(out.with_suffix(".json").read_text())
    pool = pool_part(load_cifar10("test", tmp_path / "cifar10"))
    models = [load_checkpoint(path).model for path in filters]
    wrong_everywhere = (filter_predictions(models, pool, "cpu") != pool.labels).all(0)
    assert nae.indices.tolist() == pool.indices[wrong_everywhere].tolist()
    assert bool((nae.indices >= 5000).all()) and nae.labels.tolist() == [labels[i] for i in nae.indices.tolist()]
    assert card["n_pool"] == 120 and card["n_images"] == len(nae) and sum(card["per_class"]) == len(nae)
    assert card["split"]["heldout_test_indices"] == [0, 5000] and card["command"] == "python -m editcore " + " ".join(argv)
    assert [f["arch"] for f in card["filter_models"]] == ["resnet20", "resnet32", "resnet20"]
    (ref,) = card["reference_models"]
    assert sum(ref["true_label_rank_histogram"]) == len(nae)
    assert ref["nae_accuracy"] == pytest.approx(ref["true_label_rank_histogram"][0] / len(nae))
