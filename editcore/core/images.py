"""Pictures from disk as a model's uint8 images: one file (`decode_image`, also the app's uploads) or an
ImageFolder layout (`load_image_folder`: root/<class name>/<any image Pillow reads>).

A picture becomes a uint8 (3, size, size) image the way its `Domain` says (shorter side resized, centre
crop); what the gallery shows is exactly what the model sees. A file that is not a readable image is
skipped and counted, never fatal; a folder that does not exist or holds no image is a DataError.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .data import DataError, ImageSet
from .domain import CIFAR10, Domain

MAX_UPLOAD_PIXELS = 40_000_000
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # PIL's modes for 16-bit grey (PNG, TIFF)
RESAMPLING = {"lanczos": Image.Resampling.LANCZOS, "bilinear": Image.Resampling.BILINEAR,
              "bicubic": Image.Resampling.BICUBIC, "nearest": Image.Resampling.NEAREST}


class ImageError(ValueError):
    """An upload that is not a usable image; the message names the file and the reason."""


def decode_image(path: str | Path, domain: Domain = CIFAR10) -> torch.Tensor:
    """Any readable image file -> uint8 `domain.shape` RGB: transparency on white; the shorter side resized to
    `domain.resize`, then the centre square of `domain.size` (when they are equal: the centre square, resized).
    Raises ImageError for anything that is not a readable image."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if width * height > MAX_UPLOAD_PIXELS:
                raise ImageError(f"{path.name} is {width}x{height} pixels; the limit is {MAX_UPLOAD_PIXELS // 1_000_000} megapixels")
            image.draft("RGB", (4 * domain.resize, 4 * domain.resize))  # JPEG: decode at a reduced scale, much faster
            image = ImageOps.exif_transpose(image)
            if image.mode in SIXTEEN_BIT_MODES:  # convert("RGB") would clip at 255: almost white
                image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
            image = image.convert("RGB")
            resample = RESAMPLING[domain.interpolation]
            if domain.resize == domain.size:
                side = min(image.size)
                left, top = (image.width - side) // 2, (image.height - side) // 2
                image = image.crop((left, top, left + side, top + side))
                image = image.resize((domain.size, domain.size), resample)
            else:  # torchvision's Resize(resize) then CenterCrop(size)
                scale = domain.resize / min(image.size)
                image = image.resize((max(domain.resize, int(image.width * scale)),
                                      max(domain.resize, int(image.height * scale))), resample)
                left = int(round((image.width - domain.size) / 2))
                top = int(round((image.height - domain.size) / 2))
                image = image.crop((left, top, left + domain.size, top + domain.size))
            pixels = np.asarray(image, dtype=np.uint8)
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for damaged files; all mean "unreadable"
        reason = str(exc).replace(str(path), path.name)  # PIL names the server's (temporary) path
        raise ImageError(f"{path.name} is not a readable image ({type(exc).__name__}: {reason})") from None
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1).contiguous()


def folder_class_names(root: str | Path) -> tuple[str, ...]:
    """The class folders under an ImageFolder root, sorted (torchvision's ImageFolder order)."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist (expected {root}/<class name>/<image files>)")
    names = tuple(sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")))
    if not names:
        raise DataError(f"image folder {root} has no class folders (expected {root}/<class name>/<image files>)")
    return names


def read_class_file(path: str | Path) -> tuple[str, ...]:
    """Class names, one a line in the model's output order (blank lines ignored)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"class file {path} does not exist")
    try:
        names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"class file {path} is not readable UTF-8 text: {exc}") from None
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if len(names) < 2 or duplicates:
        raise DataError(f"class file {path} must list at least two distinct class names, one a line"
                        + (f" (repeated: {', '.join(duplicates[:5])})" if duplicates else f" (it has {len(names)})"))
    return names


def load_image_folder(root: str | Path, domain: Domain, source: str) -> tuple[ImageSet, list[str]]:
    """(images of root/<class>/<file> as `domain` makes them, labels = the folder's index in `domain.classes`;
    the files skipped, each 'class/file: reason'). Every class folder must name one of the domain's classes;
    files are read in sorted (class, file name) order, and `indices` number them in that order."""
    root = Path(root)
    folders = folder_class_names(root)
    unknown = [name for name in folders if name not in domain.classes]
    if unknown:
        raise DataError(f"image folder {root}: the class folder(s) {', '.join(unknown[:5])} are not among the model's "
                        f"{len(domain.classes)} class names (first: {', '.join(domain.classes[:5])}); name the folders "
                        "after the classes, or pass --classes FILE")
    images, labels, paths, skipped = [], [], [], []
    for name in folders:
        for path in sorted(p for p in (root / name).iterdir() if p.is_file()):
            try:
                images.append(decode_image(path, domain))
                labels.append(domain.classes.index(name))
                paths.append(str(path))
            except ImageError as exc:
                skipped.append(f"{name}/{exc}")
    if not images:
        raise DataError(f"image folder {root} holds no readable image ({len(skipped)} file(s) skipped"
                        + (f", e.g. {skipped[0]}" if skipped else "") + ")")
    n = len(images)
    return ImageSet(torch.stack(images), torch.tensor(labels, dtype=torch.long), torch.arange(n), source, paths), skipped


def split_anchors(images: ImageSet, share: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """(held-out, anchors): a seeded `share` of the rows (at least one, never all) set apart as anchors, the rest
    held out; both keep their order and `indices`."""
    if not 0 < share < 1:
        raise ValueError(f"the anchor share must be between 0 and 1, got {share}")
    if len(images) < 2:
        raise DataError(f"{len(images)} image(s) cannot be split into held-out images and anchors: pass --anchors DIR")
    n_anchors = min(len(images) - 1, max(1, round(share * len(images))))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    anchors = torch.zeros(len(images), dtype=torch.bool)
    anchors[order[:n_anchors]] = True
    return images.subset(torch.nonzero(~anchors).view(-1)), images.subset(torch.nonzero(anchors).view(-1))
