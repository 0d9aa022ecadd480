"""A correction session on your own classifier and your own images: a torchvision model + an ImageFolder.

`open_folder_setup` checks and loads everything a lab or `evaluate-edits` needs, in an order that fails
early and keeps nothing on failure: the image folder exists, the class names (a class file, else the weights
enum's, else the folder names) agree with the weights' class count, the weights fit the architecture, then
the images (unreadable files skipped and counted) and the anchors (a folder, else a seeded share of the
images that is then kept out of the held-out set).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..core.checkpoint import Checkpoint, load_checkpoint, read_card
from ..core.data import ImageSet
from ..core.domain import CIFAR10, Domain
from ..core.images import folder_class_names, load_image_folder, read_class_file, split_anchors
from ..core.torchvision_models import IMAGENET_MEAN, IMAGENET_STD, load_model, run_as

EDITCORE = "editcore:"  # --model editcore:ARCH --weights CHECKPOINT: an editcore checkpoint on your images
ANCHOR_SHARE = 0.2  # of the image folder set apart as anchors when no anchor folder is given
ANCHOR_SEED = 0


def load_editcore_model(spec: str, weights: str | Path, classes: tuple[str, ...] | None,
                        device: torch.device | str) -> Checkpoint:
    """An editcore checkpoint through the same door ('editcore:resnet20'): its card's classes and preprocessing
    (CIFAR-10's for every checkpoint editcore trains) unless a class file renames its classes."""
    path = Path(weights)
    checkpoint = load_checkpoint(path, device)
    arch = spec[len(EDITCORE):]
    if arch and checkpoint.card["arch"] != arch:
        raise ValueError(f"{path.name} holds a {checkpoint.card['arch']}, not a {arch}")
    n_classes = [m for m in checkpoint.model.modules() if isinstance(m, nn.Linear)][-1].out_features
    names = classes or tuple(checkpoint.card.get("classes") or CIFAR10.classes)
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names but {path.name} has {n_classes} classes")
    preprocessing = checkpoint.card.get("preprocessing") or CIFAR10.preprocessing()
    checkpoint.model.domain = Domain(tuple(names), **preprocessing)
    checkpoint.card.update(model_source="editcore", run_as=run_as(checkpoint.model), source=str(path),
                           sha256=hashlib.sha256(path.read_bytes()).hexdigest(), classes=list(names),
                           preprocessing=checkpoint.model.domain.preprocessing())
    return checkpoint


def exported_card(weights: str | Path, spec: str) -> dict | None:
    """The card of a `spec` model that EditLab exported (`EditSession.export_weights`), else None."""
    try:
        card = read_card(weights)
    except (ValueError, FileNotFoundError):  # not safetensors, or weights without a card
        return None
    return card if card.get("arch") == spec and {"classes", "preprocessing"} <= card.keys() else None


@dataclass
class FolderSetup:
    checkpoint: Checkpoint
    heldout: ImageSet  # the browse and held-out set
    anchors: ImageSet  # what the local editor keeps its edits away from; fine-tuning's replay
    notes: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)  # the command-line flags that open the same again


def open_folder_setup(model: str, weights: str | Path, images: str | Path, anchors: str | Path | None = None,
                      classes_file: str | Path | None = None, weights_enum: str | None = None,
                      preprocessing: dict | None = None, device: torch.device | str = "cpu",
                      anchor_share: float = ANCHOR_SHARE, seed: int = ANCHOR_SEED) -> FolderSetup:
    """Raises DataError (folders, class file), FileNotFoundError or ValueError (weights) with the reason."""
    images, notes = Path(images), []
    folders = folder_class_names(images)
    if anchors is not None:
        folder_class_names(anchors)  # a missing anchor folder is refused before the weights are read
    named = read_class_file(classes_file) if classes_file else None
    if model.startswith(EDITCORE):
        checkpoint = load_editcore_model(model, weights, named, device)
    else:
        exported = exported_card(weights, model)
        if exported is not None and not (weights_enum or named):
            # an edit EditLab exported: opened with what its card says (class order, weights enum or preprocessing)
            weights_enum, named, preprocessing = exported.get("weights_enum"), tuple(exported["classes"]), exported["preprocessing"]
        checkpoint = load_model(model, weights, named or (None if weights_enum else folders), weights_enum,
                                preprocessing, device)
        if exported is not None:  # its edit history travels on
            checkpoint.card.update({key: exported[key] for key in ("edited_from", "edits") if key in exported})
    domain = checkpoint.model.domain
    heldout, skipped = load_image_folder(images, domain, f"images:{images.name}")
    if skipped:
        notes.append(f"{len(skipped)} file(s) in {images} are not readable images and were skipped "
                     f"(e.g. {skipped[0]})")
    if anchors is not None:
        anchor_set, anchor_skipped = load_image_folder(anchors, domain, f"anchors:{Path(anchors).name}")
        if anchor_skipped:
            notes.append(f"{len(anchor_skipped)} file(s) in {anchors} are not readable images and were skipped")
    else:
        heldout, anchor_set = split_anchors(heldout, anchor_share, seed)
        notes.append(f"No anchor folder: {len(anchor_set):,} of the {len(heldout) + len(anchor_set):,} images "
                     f"(a seeded {anchor_share:.0%}) are the local editor's anchors and are not scored as held-out")
    notes.append(f"{checkpoint.card['arch']} runs as {checkpoint.card['run_as']}")
    flags = ["--model", model, "--weights", str(weights), "--images", str(images)]
    flags += ["--anchors", str(anchors)] if anchors is not None else []
    flags += ["--classes", str(classes_file)] if classes_file else []
    if weights_enum:
        flags += ["--weights-enum", weights_enum]
    elif preprocessing and not model.startswith(EDITCORE):
        flags += ["--image-size", str(preprocessing["size"]), "--resize", str(preprocessing["resize"]),
                  "--mean", *map(str, preprocessing["mean"]), "--std", *map(str, preprocessing["std"])]
    return FolderSetup(checkpoint, heldout.to(device), anchor_set.to(device), notes, flags)


def add_folder_arguments(parser) -> None:
    """The flags that open your own model and images (the app and `evaluate-edits` share them)."""
    group = parser.add_argument_group("your own model and images (instead of a checkpoint and CIFAR-10)")
    group.add_argument("--model", default=None, metavar="torchvision:ARCH",
                       help="a torchvision classification architecture, e.g. torchvision:resnet18 (needs --weights and "
                            "--images); editcore:ARCH opens an editcore checkpoint (--weights) the same way")
    group.add_argument("--weights", default=None, metavar="FILE",
                       help="its weights: .safetensors, or a .pth/.pt state dict (read with torch.load(weights_only=True): "
                            "a file holding pickled objects is refused); the class count is the weights'")
    group.add_argument("--images", default=None, metavar="DIR",
                       help="an ImageFolder (DIR/<class name>/<images>, any size and format Pillow reads) to browse and "
                            "score on")
    group.add_argument("--anchors", default=None, metavar="DIR",
                       help="images in the same layout that the local editor keeps its edits away from (default: a "
                            f"seeded {ANCHOR_SHARE * 100:.0f}%% of --images, then not scored as held-out)")
    group.add_argument("--classes", default=None, metavar="FILE",
                       help="class names, one a line in the model's output order (default: the weights enum's, else "
                            "the folder names, sorted)")
    group.add_argument("--weights-enum", default=None, metavar="ENUM",
                       help="the torchvision weights these are (e.g. ResNet18_Weights.IMAGENET1K_V1): its resize, crop, "
                            "mean, std and class names are used")
    group.add_argument("--image-size", type=int, default=224, help="without --weights-enum: centre crop side (224)")
    group.add_argument("--resize", type=int, default=None,
                       help="without --weights-enum: shorter side before the crop (default: image size * 256/224)")
    group.add_argument("--mean", type=float, nargs=3, default=list(IMAGENET_MEAN), metavar=("R", "G", "B"),
                       help="without --weights-enum: normalisation mean (ImageNet's)")
    group.add_argument("--std", type=float, nargs=3, default=list(IMAGENET_STD), metavar=("R", "G", "B"),
                       help="without --weights-enum: normalisation std (ImageNet's)")


def folder_setup_from_args(args, device: torch.device | str) -> FolderSetup | None:
    """`open_folder_setup` from the flags of `add_folder_arguments`; None without --model. ValueError for flags
    that do not go together."""
    given = [flag for flag in ("weights", "images", "anchors", "classes", "weights_enum") if getattr(args, flag)]
    if args.model is None:
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} needs --model torchvision:ARCH")
        return None
    missing = [flag for flag in ("weights", "images") if not getattr(args, flag)]
    if missing:
        raise ValueError(f"--model needs --{' and --'.join(missing)}")
    resize = args.resize or round(args.image_size * 256 / 224)
    preprocessing = {"size": args.image_size, "resize": resize, "mean": tuple(args.mean),
                     "std": tuple(args.std), "interpolation": "bilinear"}
    return open_folder_setup(args.model, args.weights, args.images, args.anchors, args.classes, args.weights_enum,
                             preprocessing, device)
