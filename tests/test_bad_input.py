"""Bad input at the decoder: every broken file a crawl contains is a BadSample with its reason;
every unusual but valid file decodes upright, in RGB, at the right size."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from pixelbert.data.errors import SKIP_REASONS, BadSample
from pixelbert.data.images import IMAGENET_NORM, load_image, resize_size
from tests.bad_files import write_bad, write_good

SHORTER, LONGER = 64, 128


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng()
    return write_good(root / "good", rng), write_bad(root / "bad", rng)


def test_every_bad_file_is_a_bad_sample_with_its_reason(files):
    _, bad = files
    for name, (path, reason) in bad.items():
        with pytest.raises(BadSample) as caught:
            load_image(path, SHORTER, LONGER, IMAGENET_NORM)
        assert caught.value.reason == reason, name
        assert str(path) in str(caught.value)  # the message names the file


def test_unknown_skip_reason_is_refused():
    assert "truncated" in SKIP_REASONS
    with pytest.raises(ValueError, match="unknown skip reason"):
        BadSample("cosmic_ray", "x.jpg")


def upright_rgb(path) -> np.ndarray:
    """What the decoder should see: PIL's own upright 8-bit RGB reading of the file."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)
        if img.mode.startswith("I"):
            img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8))
        return np.asarray(img.convert("RGB"))


def test_unusual_valid_files_decode_upright_rgb(files):
    good, _ = files
    for name, path in good.items():
        expected = upright_rgb(path)
        img = load_image(path, SHORTER, LONGER, IMAGENET_NORM)
        assert img.dtype == torch.float32 and img.shape == (3, *resize_size(*expected.shape[:2], SHORTER, LONGER)), name
        # Undo the normalisation and compare with PIL's upright RGB resized the same way.
        pixels = IMAGENET_NORM.undo(img).permute(1, 2, 0).numpy()
        reference = np.asarray(Image.fromarray(expected).resize((img.shape[2], img.shape[1]),
                                                                Image.Resampling.BILINEAR), dtype=np.float32)
        assert np.abs(pixels - reference).max() < 0.01, name


def test_exif_rotation_and_16_bit_png_are_not_mangled(files):
    good, _ = files
    rotated = load_image(good["exif_rotated"], SHORTER, LONGER, IMAGENET_NORM)
    assert rotated.shape[1] > rotated.shape[2]  # stored landscape, shown portrait
    deep = load_image(good["png16"], SHORTER, LONGER, IMAGENET_NORM)
    # PIL's plain convert("RGB") clips 16-bit values to white; scaled, the picture keeps contrast.
    assert deep.std() > 0.3 and (deep < deep.max() - 0.5).float().mean() > 0.5
