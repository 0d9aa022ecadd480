"""Edit generalisation: does a fix carry over to small changes of the same image?

`augmented_views(image, seed)` makes a fixed set of 16 views of one uint8 image: 4 crops (4-pixel
zero padding, crop at a seeded offset), 1 horizontal flip, 4 small shifts (1-2 pixels, edges
replicated), 2 brightness and 2 contrast changes, 1 JPEG recompression (quality 75), 2 light
Gaussian noises. The seed fixes the offsets and the noise, so every image gets the same transforms
and a run is reproducible.

`generalization = frac(views predicted as the target after the fix) - frac(before)`.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

DEFAULT_VIEWS_SEED = 0
JPEG_QUALITY = 75


@dataclass(frozen=True)
class ViewSpec:
    name: str  # e.g. 'crop(+3,-1)': the transform and its parameters
    family: str  # crop, flip, shift, brightness, contrast, jpeg, noise
    apply: Callable[[torch.Tensor], torch.Tensor]  # uint8 (3,H,W) -> uint8 (3,H,W)
    # A pure move of the pixels: (dy, dx, flipped) as `crop_flip` names it (a shift's replicated edge aside).
    offset: tuple[int, int, bool] | None = None


def _crop(dy: int, dx: int, pad: int, mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Shift content by (dy, dx) pixels: pad, then crop the original size at the offset."""
    def apply(image: torch.Tensor) -> torch.Tensor:
        h, w = image.shape[1:]
        padded = torch.nn.functional.pad(image[None].float(), (pad, pad, pad, pad), mode=mode)[0]
        return padded[:, pad + dy : pad + dy + h, pad + dx : pad + dx + w].to(torch.uint8)
    return apply


def _affine(scale: float, around_mean: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    def apply(image: torch.Tensor) -> torch.Tensor:
        x = image.float()
        centre = x.mean() if around_mean else 0.0
        return ((x - centre) * scale + centre).round().clamp(0, 255).to(torch.uint8)
    return apply


def _jpeg(quality: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def apply(image: torch.Tensor) -> torch.Tensor:
        buffer = io.BytesIO()
        Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(buffer, format="JPEG", quality=quality)
        buffer.seek(0)
        decoded = np.asarray(Image.open(buffer).convert("RGB"))
        return torch.from_numpy(decoded.copy()).permute(2, 0, 1).to(image.device)
    return apply


def _noise(std: float, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def apply(image: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn(image.shape, generator=gen).to(image.device) * std
        return (image.float() + noise).round().clamp(0, 255).to(torch.uint8)
    return apply


def view_specs(seed: int = DEFAULT_VIEWS_SEED) -> list[ViewSpec]:
    """The 16 transforms for this seed, in a fixed order."""
    rng = np.random.default_rng(seed)
    crop_offsets = [(int(dy), int(dx)) for dy, dx in
                    rng.permutation([(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5) if max(abs(dy), abs(dx)) >= 2])[:4]]
    shift_offsets = [(int(dy), int(dx)) for dy, dx in
                     rng.permutation([(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if (dy, dx) != (0, 0)])[:4]]
    noise_seeds = rng.integers(0, 2**31 - 1, size=2)
    specs = [ViewSpec(f"crop({dy:+d},{dx:+d})", "crop", _crop(dy, dx, 4, "constant"), (dy, dx, False))
             for dy, dx in crop_offsets]
    specs.append(ViewSpec("hflip", "flip", lambda image: image.flip(-1), (0, 0, True)))
    specs += [ViewSpec(f"shift({dy:+d},{dx:+d})", "shift", _crop(dy, dx, 2, "replicate"), (dy, dx, False))
              for dy, dx in shift_offsets]
    specs += [ViewSpec(f"brightness(x{s})", "brightness", _affine(s, around_mean=False)) for s in (0.8, 1.2)]
    specs += [ViewSpec(f"contrast(x{s})", "contrast", _affine(s, around_mean=True)) for s in (0.7, 1.3)]
    specs.append(ViewSpec(f"jpeg(q{JPEG_QUALITY})", "jpeg", _jpeg(JPEG_QUALITY)))
    specs += [ViewSpec(f"noise(std{std})", "noise", _noise(std, int(s))) for std, s in zip((4.0, 8.0), noise_seeds)]
    return specs


def augmented_views(image: torch.Tensor, seed: int = DEFAULT_VIEWS_SEED) -> torch.Tensor:
    """uint8 (3,H,W) (or (1,3,H,W)) -> uint8 (V,3,H,W), V = 16, in `view_specs(seed)` order."""
    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"augmented_views takes one image, got a batch of {image.shape[0]}")
        image = image[0]
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"augmented_views needs a uint8 (3,H,W) image, got {image.dtype} {tuple(image.shape)}")
    return torch.stack([spec.apply(image) for spec in view_specs(seed)])


def view_families(seed: int = DEFAULT_VIEWS_SEED) -> list[str]:
    return [spec.family for spec in view_specs(seed)]


def generalization(before: torch.Tensor, after: torch.Tensor, target: int,
                   families: Sequence[str] | None = None) -> tuple[float, dict[str, float]]:
    """(overall, per family) of frac(after == target) - frac(before == target) over the views.

    before/after: predicted classes of the same views under the unfixed and the fixed model.
    """
    gained = (after.cpu() == target).float() - (before.cpu() == target).float()
    by_family: dict[str, float] = {}
    if families is not None:
        if len(families) != len(gained):
            raise ValueError(f"{len(families)} families for {len(gained)} views")
        for family in dict.fromkeys(families):
            rows = torch.tensor([f == family for f in families])
            by_family[family] = float(gained[rows].mean())
    return float(gained.mean()), by_family
