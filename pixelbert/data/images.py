"""Image decoding, aspect-preserving resize, normalisation and batch padding."""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadSample



@dataclass(frozen=True)
class PixelNorm:
    """The input normalisation a CNN's weights were trained with: (pixel - mean) / std per RGB
    channel, on 0-255 pixels (data.pixel_mean / data.pixel_std)."""
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def apply(self, pixels: torch.Tensor) -> torch.Tensor:
        """float [3, h, w] RGB pixels in 0-255 -> normalised."""
        return (pixels - torch.tensor(self.mean).view(3, 1, 1)) / torch.tensor(self.std).view(3, 1, 1)

    def undo(self, image: torch.Tensor) -> torch.Tensor:
        """Normalised [3, h, w] -> RGB pixels in 0-255 (float)."""
        return image * torch.tensor(self.std).view(3, 1, 1) + torch.tensor(self.mean).view(3, 1, 1)


# torchvision's ImageNet weights (and the engine's default): mean (0.485, 0.456, 0.406) and
# std (0.229, 0.224, 0.225) of 0-1 pixels, scaled to 0-255 in float32 as the engine always has:
# the inputs stay bit-identical (the tiny run's ITM escape is that sensitive).
IMAGENET_NORM = PixelNorm(*(tuple((torch.tensor(stat) * 255).tolist())
                            for stat in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))))
# Sizes no photo has: refused from the header, before a decoder allocates for them.
MAX_SIDE = 16384
MAX_ASPECT = 20.0
# After resizing, each side must span two stride-32 feature cells (one pooled pixel cell).
MIN_RESIZED_SIDE = 33
# EXIF orientations 5-8 rotate by 90 degrees: the stored width is the upright height.
TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


def resize_size(h: int, w: int, shorter: int, longer: int) -> tuple[int, int]:
    """Detectron's rule: shorter side -> `shorter`, unless the longer side would pass `longer`,
    then longer side -> `longer`; aspect ratio kept, sides rounded half up and at least 1."""
    scale = shorter / min(h, w)
    if max(h, w) * scale > longer:
        scale = longer / max(h, w)
    return max(1, math.floor(h * scale + 0.5)), max(1, math.floor(w * scale + 0.5))


def read_image_bytes(path: str | Path) -> bytes:
    """The file's bytes; a missing or empty file is a BadSample."""
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise BadSample("missing_file", path) from None
    if not data:
        raise BadSample("empty_file", path)
    return data


def open_checked(data: bytes, where: str | Path, shorter: int, longer: int) -> Image.Image:
    """Parse the header of an encoded image (no pixel decoding yet) and refuse what cannot
    become a usable training image: not an image, or a size that is absurd or too small."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if isinstance(e, UnidentifiedImageError):
            raise BadSample("not_an_image", where, "not a known image format") from None
        raise BadSample("bad_size", where, str(e)) from None
    except OSError as e:  # a header cut short, e.g. a file truncated inside it
        raise BadSample("truncated", where, str(e)) from None
    height, width = upright_size(img)
    if max(height, width) > MAX_SIDE or max(height, width) > MAX_ASPECT * min(height, width):
        raise BadSample("bad_size", where, f"{width}x{height}")
    if min(resize_size(height, width, shorter, longer)) < MIN_RESIZED_SIDE:
        raise BadSample("bad_size", where, f"{width}x{height} is too small once resized")
    return img


def upright_size(img: Image.Image) -> tuple[int, int]:
    """(height, width) of the image once its EXIF orientation is applied, from the header."""
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a broken EXIF block: PIL's exif_transpose will ignore it too
        orientation = 1
    if orientation in TRANSPOSING_ORIENTATIONS:
        return img.width, img.height
    return img.height, img.width


def decode_rgb(img: Image.Image, where: str | Path) -> Image.Image:
    """Decode the pixels, upright them (EXIF) and convert to 8-bit RGB."""
    try:
        img.load()
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports a short file as OSError
        raise BadSample("truncated", where, str(e)) from None
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit grayscale: PIL's convert("RGB") clips at 255 instead of scaling.
        img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).clip(0, 255).astype(np.uint8))
    return img.convert("RGB")  # grayscale, CMYK, palette, RGBA -> RGB


def load_image(path: str | Path, shorter: int, longer: int, norm: PixelNorm) -> torch.Tensor:
    """Decode, upright (EXIF), RGB, resize (bilinear, antialiased) and normalise (`norm`): float32 [3, h, w].

    Raises BadSample (with its reason) for a file that cannot give a usable image.
    """
    img = decode_rgb(open_checked(read_image_bytes(path), path, shorter, longer), path)
    new_h, new_w = resize_size(img.height, img.width, shorter, longer)
    # PIL's bilinear filter widens its support when shrinking, i.e. it is antialiased.
    img = img.resize((new_w, new_h), resample=Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1)
    return norm.apply(pixels).contiguous()


def load_encoded(path: str | Path, shorter: int, longer: int) -> np.ndarray:
    """The file's bytes (1-D uint8) for a batch decoder such as DALI, after the header checks
    `load_image` makes: the decoder then meets only files PIL would also have tried."""
    data = read_image_bytes(path)
    open_checked(data, path, shorter, longer)  # header only, no pixel decoding
    return np.frombuffer(data, dtype=np.uint8)


def pad_images(images: list[torch.Tensor], multiple: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack [3, h, w] images into [B, 3, H, W], H and W the largest sides rounded up to
    `multiple`, zero-padded at the bottom/right; also return the valid (h, w) as int64 [B, 2]."""
    sizes = torch.tensor([img.shape[-2:] for img in images], dtype=torch.int64)
    height, width = (int(math.ceil(int(v) / multiple) * multiple) for v in sizes.max(dim=0).values)
    batch = images[0].new_zeros((len(images), 3, height, width))
    for i, img in enumerate(images):
        batch[i, :, :img.shape[1], :img.shape[2]] = img
    return batch, sizes
