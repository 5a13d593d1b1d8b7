"""Image files <-> tensors (Pillow) and grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class ImageError(ValueError):
    """An input file is not a usable RGB image."""


def load_image(path: Path, size: int, *, notices: list[str] | None = None) -> Tensor:
    """Read an RGB image as (3, size, size) float in [0, 1], center-cropped and resized.

    Grayscale and RGBA inputs are refused (a silent conversion would change what is edited); the
    error says how to convert. A non-square or differently sized image is center-cropped to a square
    and resized, with a notice appended to ``notices``.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"no such image file: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            img = ImageOps.exif_transpose(im)  # as a viewer shows it (a phone photo's orientation tag)
            mode = img.mode
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageError(f"{path} is not a readable image ({type(exc).__name__})") from None
    if mode != "P" and len(img.getbands()) <= 2:  # L, LA, 1, I, I;16*, F: one band of values (+ alpha)
        raise ImageError(f"{path} is a grayscale image (mode {mode}); flowgrad edits RGB images — "
                         "convert it first, e.g. Image.open(p).convert('RGB').save(q)")
    if mode in ("RGBA", "PA") or "transparency" in img.info:
        raise ImageError(f"{path} has an alpha channel or a transparent colour (mode {mode}); flatten it onto a "
                         "background and save as RGB first")
    if mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    if (w, h) != (size, size):
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        if notices is not None:
            notices.append(f"{path.name}: {w}x{h} center-cropped and resized to {size}x{size}")
    arr = np.asarray(img, dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_pil(image: Tensor) -> Image.Image:
    arr = (image.detach().float().clamp(0, 1).cpu().permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(arr)


def save_image(image: Tensor, path: Path) -> None:
    """Save a (3, H, W) image in [0, 1] as PNG."""
    to_pil(image).save(path)


def make_grid(images: Tensor, nrow: int, pad: int = 2, scale: int = 1) -> Tensor:
    """(N, 3, H, W) -> one (3, H', W') grid image with white padding."""
    n, c, h, w = images.shape
    if scale > 1:
        images = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        h, w = h * scale, w * scale
    rows = (n + nrow - 1) // nrow
    grid = torch.ones(c, rows * (h + pad) + pad, nrow * (w + pad) + pad)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = \
            images[i].detach().float().cpu().clamp(0, 1)
    return grid


def save_grid(images: Tensor, path: Path, nrow: int = 8, scale: int = 1) -> None:
    save_image(make_grid(images, nrow, scale=scale), Path(path))
