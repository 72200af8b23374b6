"""Image decoding, aspect-preserving resize, normalisation and batch padding."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resize_size(h: int, w: int, shorter: int, longer: int) -> tuple[int, int]:
    """Detectron's rule: shorter side -> `shorter`, unless the longer side would pass `longer`,
    then longer side -> `longer`; aspect ratio kept, sides rounded half up and at least 1."""
    scale = shorter / min(h, w)
    if max(h, w) * scale > longer:
        scale = longer / max(h, w)
    return max(1, math.floor(h * scale + 0.5)), max(1, math.floor(w * scale + 0.5))


def load_image(path: str | Path, shorter: int, longer: int) -> torch.Tensor:
    """Decode, upright (EXIF), RGB, resize (bilinear, antialiased) and normalise: float32 [3, h, w]."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")  # grayscale, CMYK, palette -> RGB
    new_h, new_w = resize_size(img.height, img.width, shorter, longer)
    # PIL's bilinear filter widens its support when shrinking, i.e. it is antialiased.
    img = img.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
    return ((pixels - mean) / std).contiguous()


def pad_images(images: list[torch.Tensor], multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [3, h, w] images into [B, 3, H, W], H and W the largest sides rounded up to
    `multiple`, zero-padded at the bottom/right; also return the valid (h, w) as int64 [B, 2]."""
    sizes = torch.tensor([img.shape[-2:] for img in images], dtype=torch.int64)
    height, width = (int(math.ceil(int(v) / multiple) * multiple) for v in sizes.max(dim=0).values)
    batch = images[0].new_zeros((len(images), 3, height, width))
    for i, img in enumerate(images):
        batch[i, :, :img.shape[1], :img.shape[2]] = img
    return batch, sizes
