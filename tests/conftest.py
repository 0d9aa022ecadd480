"""Shared fixtures: a tiny smooth StagedNet for unit tests, a briefly trained ResNet-20 on the sample."""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from editcore import EditableModel, ImageSet, TrainConfig, load_sample, train
from editcore.core.models import StagedNet

# One torch thread for the whole run, here and in the processes tests start (they inherit the variable). On
# this project's 2-core machines other jobs share the cores, and two threads that wait on each other cost
# ~4x the CPU and wall time of one (the shipped-model drawdown test: 49 s vs 11 s CPU for 10 edits,
# docs/PERFORMANCE.md "tests"); the results are the same.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


# The files that take the most CPU (bench/suite_times.py, docs/PERFORMANCE.md "tests") go to the two workers first
# (pytest.ini: --no-loadscope-reorder keeps this order), so that the last file to finish is a short one:
# pytest-xdist's own order (most tests first) started the heaviest file late and left a core idle at the end.
HEAVIEST_FIRST = ("test_shipped_models.py", "test_session.py", "test_nae.py", "test_cli.py", "test_tools.py",
                  "test_training.py", "test_app_api.py", "test_own_model.py", "test_app_handlers.py")


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's own order stays


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Commands run in-process (`measure --threads 2`, say) set the thread count for the process; restore it."""
    yield
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


N_CLASSES = 10


class TinyNet(StagedNet):
    """stem -> body -> head on 3x8x8 inputs. tanh instead of ReLU keeps it smooth, so finite
    differences have no kinks to trip over; batch norm is there because edits must run it in eval mode."""

    stage_names = ("stem", "body", "head")

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh())
        self.body = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Tanh())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, N_CLASSES))


def make_tiny(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyNet:
    torch.manual_seed(seed)
    model = TinyNet()
    # Non-trivial running statistics, so eval-mode batch norm differs from train mode.
    model.body[1].running_mean.uniform_(-0.2, 0.2)
    model.body[1].running_var.uniform_(0.5, 1.5)
    return model.to(dtype).eval()


def tiny_images(n: int = 40, seed: int = 0) -> ImageSet:
    """n random 3x8x8 uint8 images with random labels: training data for TinyNet."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8)
    return ImageSet(images, torch.randint(0, N_CLASSES, (n,), generator=gen), torch.arange(n), "synthetic")


@pytest.fixture
def tiny():
    """A fresh TinyNet wrapped as editable at its 'body' stage, and a batch of 8 inputs."""
    model = make_tiny()
    inputs = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return EditableModel(model, "body"), inputs


@pytest.fixture(scope="session")
def sample():
    return load_sample()


@pytest.fixture(scope="session")
def resnet20(sample):
    """ResNet-20 after one short epoch on the embedded sample: real weights and batch-norm statistics."""
    config = TrainConfig(arch="resnet20", epochs=1, batch_size=100, seed=0)
    model, _, _ = train(config, sample, None, "cpu", log=lambda *_: None)
    return model.eval()
