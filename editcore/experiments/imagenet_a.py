"""ImageNet-A (Hendrycks et al., 2021) for users who have it: a folder loader and an NAE edit hook.

ImageNet-A is `imagenet-a/<wnid>/*.jpg` over 200 ImageNet classes; a 1000-way ImageNet classifier is
scored on those 200 only, by keeping its logits at `INDICES_IN_1K` (the 200 classes in ImageNet-A's
sorted-wnid order, as in the official eval.py). No ImageNet-A results were run in this project.

For edits, a torchvision ResNet becomes a `StagedNet` whose last stage returns the 200 ImageNet-A
logits; images stay uint8 (N,3,224,224) so the CIFAR pipeline (`data.normalize`, HeldOutEvaluator,
evaluate_edits) runs unchanged: the first stage turns its CIFAR-normalised input into ImageNet's.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.data import MEAN as CIFAR_MEAN, STD as CIFAR_STD, DataError, ImageSet
from ..core.models import StagedNet

# The 200 ImageNet-A wnids, sorted (ImageNet-A class i = WNIDS[i]), and each one's ImageNet-1k index.
# Source: the official ImageNet-A evaluation (github.com/hendrycks/natural-adv-examples, eval.py:
# `thousand_k_to_200` / `indices_in_1k`); the wnid list as published alongside it.
WNIDS = tuple("""
    n01498041 n01531178 n01534433 n01558993 n01580077 n01614925 n01616318 n01631663 n01641577 n01669191
    n01677366 n01687978 n01694178 n01698640 n01735189 n01770081 n01770393 n01774750 n01784675 n01819313
    n01820546 n01833805 n01843383 n01847000 n01855672 n01882714 n01910747 n01914609 n01924916 n01944390
    n01985128 n01986214 n02007558 n02009912 n02037110 n02051845 n02077923 n02085620 n02099601 n02106550
    n02106662 n02110958 n02119022 n02123394 n02127052 n02129165 n02133161 n02137549 n02165456 n02174001
    n02177972 n02190166 n02206856 n02219486 n02226429 n02231487 n02233338 n02236044 n02259212 n02268443
    n02279972 n02280649 n02281787 n02317335 n02325366 n02346627 n02356798 n02361337 n02410509 n02445715
    n02454379 n02486410 n02492035 n02504458 n02655020 n02669723 n02672831 n02676566 n02690373 n02701002
    n02730930 n02777292 n02782093 n02787622 n02793495 n02797295 n02802426 n02814860 n02815834 n02837789
    n02879718 n02883205 n02895154 n02906734 n02948072 n02951358 n02980441 n02992211 n02999410 n03014705
    n03026506 n03124043 n03125729 n03187595 n03196217 n03223299 n03250847 n03255030 n03291819 n03325584
    n03355925 n03384352 n03388043 n03417042 n03443371 n03444034 n03445924 n03452741 n03483316 n03584829
    n03590841 n03594945 n03617480 n03666591 n03670208 n03717622 n03720891 n03721384 n03724870 n03775071
    n03788195 n03804744 n03837869 n03840681 n03854065 n03888257 n03891332 n03935335 n03982430 n04019541
    n04033901 n04039381 n04067472 n04086273 n04099969 n04118538 n04131690 n04133789 n04141076 n04146614
    n04147183 n04179913 n04208210 n04235860 n04252077 n04252225 n04254120 n04270147 n04275548 n04310018
    n04317175 n04344873 n04347754 n04355338 n04366367 n04376876 n04389033 n04399382 n04442312 n04456115
    n04482393 n04507155 n04509417 n04532670 n04540053 n04554684 n04562935 n04591713 n04606251 n07583066
    n07695742 n07697313 n07697537 n07714990 n07718472 n07720875 n07734744 n07749582 n07753592 n07760859
    n07768694 n07831146 n09229709 n09246464 n09472597 n09835506 n11879895 n12057211 n12144580 n12267677
""".split())
INDICES_IN_1K = (
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89,
    90, 94, 96, 97, 99, 105, 107, 108, 110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234,
    235, 254, 277, 283, 287, 291, 295, 298, 301, 306, 307, 308, 309, 310, 311, 313, 314, 315, 317, 319,
    323, 324, 326, 327, 330, 334, 335, 336, 347, 361, 363, 372, 378, 386, 397, 400, 401, 402, 404, 407,
    411, 416, 417, 420, 425, 428, 430, 437, 438, 445, 456, 457, 461, 462, 470, 472, 483, 486, 488, 492,
    496, 514, 516, 528, 530, 539, 542, 543, 549, 552, 557, 561, 562, 569, 572, 573, 575, 579, 589, 606,
    607, 609, 614, 626, 627, 640, 641, 642, 643, 658, 668, 677, 682, 684, 687, 701, 704, 719, 736, 746,
    749, 752, 758, 763, 765, 768, 773, 774, 776, 779, 780, 786, 792, 797, 802, 803, 804, 813, 815, 820,
    823, 831, 833, 835, 839, 845, 847, 850, 859, 862, 870, 879, 880, 888, 890, 897, 900, 907, 913, 924,
    932, 933, 934, 937, 943, 945, 947, 951, 954, 956, 957, 959, 971, 972, 980, 981, 984, 986, 987, 988,
)
assert len(WNIDS) == len(INDICES_IN_1K) == 200 and list(WNIDS) == sorted(WNIDS) and list(INDICES_IN_1K) == sorted(INDICES_IN_1K)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
SIZE = 224  # centre crop; the shorter side is first resized to 256 (the official eval transform)


def class_folders(root: str | Path) -> tuple[list[str], list[str]]:
    """(ImageNet-A wnid folders present, other folders) under `root`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"ImageNet-A folder {root} does not exist (expected {root}/<wnid>/*.jpg)")
    names = sorted(p.name for p in root.iterdir() if p.is_dir())
    known = set(WNIDS)
    return [n for n in names if n in known], [n for n in names if n not in known]


def _load_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image  # only this loader needs Pillow

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = round(size * 256 / 224) / min(image.size)
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                             Image.Resampling.BILINEAR)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8).transpose(2, 0, 1)


def read_folder(root: str | Path, size: int = SIZE, source: str = "imagenet-a") -> ImageSet:
    """uint8 images (N,3,size,size), labels = ImageNet-1k indices, indices = position in sorted
    (wnid, file name) order. Folders that are not ImageNet-A wnids are skipped (see class_folders)."""
    known, _ = class_folders(root)
    index_of = dict(zip(WNIDS, INDICES_IN_1K))
    files = [(path, index_of[wnid]) for wnid in known for path in sorted((Path(root) / wnid).iterdir())
             if path.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise DataError(f"no images of the 200 ImageNet-A classes under {root} (expected <wnid>/*.jpg)")
    images = torch.from_numpy(np.stack([_load_image(path, size) for path, _ in files]))
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    return ImageSet(images, labels, torch.arange(len(files)), source)


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def load_imagenet_a(root: str | Path, size: int = SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(float images (N,3,224,224) with ImageNet normalisation, ImageNet-1k labels)."""
    images = read_folder(root, size)
    return imagenet_normalize(images.images), images.labels


def logits_to_200(logits: torch.Tensor) -> torch.Tensor:
    """1000-way ImageNet logits -> the 200 ImageNet-A classes (column i = WNIDS[i])."""
    return logits[..., list(INDICES_IN_1K)]


def labels_to_200(labels_1k: torch.Tensor) -> torch.Tensor:
    """ImageNet-1k labels of ImageNet-A classes -> 0..199; other classes are an error."""
    lookup = torch.full((1000,), -1, dtype=torch.long)
    lookup[list(INDICES_IN_1K)] = torch.arange(200)
    out = lookup[labels_1k.cpu()]
    if bool((out < 0).any()):
        raise ValueError("some labels are not ImageNet-A classes")
    return out.to(labels_1k.device)


class CifarToImageNetInput(nn.Module):
    """Undo data.normalize (CIFAR statistics) and apply ImageNet's: exact, no parameters."""

    def forward(self, x):
        cifar_mean, cifar_std, mean, std = (torch.tensor(v, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
                                            for v in (CIFAR_MEAN, CIFAR_STD, IMAGENET_MEAN, IMAGENET_STD))
        return (x * cifar_std + cifar_mean - mean) / std


class Head200(nn.Module):
    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.fc = fc

    def forward(self, x):
        return logits_to_200(self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)))


class StagedTorchvisionResNet(StagedNet):
    """A torchvision ResNet (resnet18/34/50/101/152, wide_resnet, resnext) as stages
    stem, layer1-4, head; it takes data.normalize'd uint8 images and returns the 200 ImageNet-A logits."""

    stage_names = ("stem", "layer1", "layer2", "layer3", "layer4", "head")

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.stem = nn.Sequential(CifarToImageNetInput(), resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        self.head = Head200(resnet.fc)


def torchvision_resnet(name: str) -> nn.Module:
    """torchvision's ImageNet weights for `name`, read from torch's cache only (never downloaded)."""
    from torchvision.models import get_model, get_model_weights

    weights = get_model_weights(name).DEFAULT
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    if not cached.is_file():
        raise DataError(f"{name} weights are not in torch's cache: put {weights.url} at {cached} "
                        f"(EditLab does not download them)")
    model = get_model(name, weights=None)
    # torchvision's own weights file, hash-checked against its name; weights_only refuses arbitrary objects.
    model.load_state_dict(torch.hub.load_state_dict_from_url(weights.url, progress=False, check_hash=True,
                                                             weights_only=True))
    return model.eval()


def as_nae_set(images: ImageSet) -> ImageSet:
    """The same images with 200-way labels, for StagedTorchvisionResNet and the edit protocol."""
    return ImageSet(images.images, labels_to_200(images.labels), images.indices, images.source)


def run_nae_edits(model: StagedNet, imagenet_a_dir: str | Path, heldout_dir: str | Path, editor, prefix: str = "layer4",
                  n_edits: int = 1000, seed: int = 0, max_steps: int = 10, heldout_size: int = 0, device="cpu",
                  progress=None) -> tuple[dict, list]:
    """The NAE protocol on ImageNet-A: edits to the true label of ImageNet-A images, drawdown (200-way
    error) on `heldout_dir` (same <wnid>/*.jpg layout, e.g. ImageNet validation images; other classes skipped)."""
    from ..core.edit import EditableModel
    from ..core.heldout import HeldOutEvaluator
    from .metrics import evaluate_edits

    nae_set = as_nae_set(read_folder(imagenet_a_dir))
    heldout = as_nae_set(read_folder(heldout_dir, source="imagenet-heldout"))
    if heldout_size and heldout_size < len(heldout):
        heldout = heldout.subset(torch.randperm(len(heldout), generator=torch.Generator().manual_seed(seed))[:heldout_size])
    model = model.to(device).eval()
    editable = EditableModel(model, prefix)
    evaluator = HeldOutEvaluator(editable, heldout.images.to(device), heldout.labels.to(device), batch_size=100)
    summary, records = evaluate_edits(editable, editor, evaluator, nae_set, n_edits=n_edits, seed=seed,
                                      max_steps=max_steps, targets="true", progress=progress)
    summary.update(protocol="nae", data="imagenet-a", n_nae=len(nae_set), heldout=str(heldout_dir), prefix=prefix,
                   editor=editor.name, editor_hparams=editor.hyperparameters())
    return summary, records
