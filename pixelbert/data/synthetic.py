"""Embedded synthetic image-caption set: coloured shapes on a plain or noisy background.

    python -m pixelbert.data.synthetic --out DIR [--num-images N] [--seed S] [--val-fraction F]

writes COCO-named JPEGs to `DIR/images/`, COCO-captions JSON to
`DIR/annotations/captions_{train,val}.json`, the scene records behind them to
`DIR/annotations/scenes_{split}.json`, and `DIR/manifest.json` last.

Every caption word about colour, shape, size or layout is true of the pixels, so a model can
only fill a masked colour word by looking at the image. Each image is drawn from its own
generator seeded by (seed, image_id): the same seed gives byte-identical files, and image k
does not depend on how many images are made. Drawing and captioning are table-driven
(PALETTE, SHAPES, SIZES, POSITIONS, LAYOUTS, TEMPLATES) so further tasks (VQA questions,
NLVR2 pairs, region descriptions) can be derived from the same `Scene` records.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw

from .formats import read_json, write_json

MANIFEST = "manifest.json"
FORMAT_VERSION = 1  # bump when drawing or captions change, so cached sets are regenerated
CAPTIONS_PER_IMAGE = 5
SIDE_RANGE = (160, 400)  # width and height drawn independently: portrait and landscape
JPEG_QUALITY = 90

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 70, 220),
    "yellow": (245, 220, 30), "purple": (140, 50, 180), "orange": (245, 140, 20),
    "white": (250, 250, 250), "black": (15, 15, 15),
}
# Gray backgrounds stay clear of white and black shapes.
BACKGROUND_LEVELS = (80, 176)
NOISE_SIGMA = (5.0, 12.0)


def _ellipse(draw: ImageDraw.ImageDraw, box, fill) -> None:
    draw.ellipse(box, fill=fill)


def _rectangle(draw: ImageDraw.ImageDraw, box, fill) -> None:
    draw.rectangle(box, fill=fill)


def _triangle(draw: ImageDraw.ImageDraw, box, fill) -> None:
    x0, y0, x1, y1 = box
    draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _diamond(draw: ImageDraw.ImageDraw, box, fill) -> None:
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


# name -> (box width / height, drawer)
SHAPES: dict[str, tuple[float, Callable]] = {
    "circle": (1.0, _ellipse), "square": (1.0, _rectangle), "triangle": (1.0, _triangle),
    "diamond": (1.0, _diamond), "bar": (3.0, _rectangle),
}
# Longer box side as a fraction of the image's shorter side. Large tops out below 1/3, so a
# shape always fits in its cell of the 3x3 grid; the gap between the ranges keeps the words apart.
SIZES: dict[str, tuple[float, float]] = {"small": (0.10, 0.15), "large": (0.24, 0.30)}
# position word -> (row, column) cell of a 3x3 grid, and its caption phrase
POSITIONS: dict[str, tuple[int, int]] = {
    "left": (1, 0), "right": (1, 2), "top": (0, 1), "bottom": (2, 1), "center": (1, 1)}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the center"}
# Shapes share a row or a column, so every pair is in a left/right or above/below relation.
LAYOUTS: dict[int, list[tuple[str, ...]]] = {
    1: [("left",), ("right",), ("top",), ("bottom",), ("center",)],
    2: [("left", "right"), ("top", "bottom"), ("left", "center"), ("center", "right"),
        ("top", "center"), ("center", "bottom")],
    3: [("left", "center", "right"), ("top", "center", "bottom")],
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


@dataclass
class Shape:
    kind: str
    color: str
    size: str
    position: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, inclusive


@dataclass
class Scene:
    image_id: int
    file_name: str
    width: int
    height: int
    background: str  # "plain" or "noisy"
    background_level: int
    noise_sigma: float
    shapes: list[Shape]


def file_name(image_id: int) -> str:
    return f"synthetic_{image_id:012d}.jpg"


def sample_scene(image_id: int, rng: np.random.Generator) -> Scene:
    """Draw a scene description: image size, background, and 1-3 shapes in layout cells."""
    width, height = (int(v) for v in rng.integers(SIDE_RANGE[0], SIDE_RANGE[1] + 1, size=2))
    shorter = min(width, height)
    noisy = bool(rng.random() < 0.5)
    level = int(rng.integers(*BACKGROUND_LEVELS))
    sigma = float(rng.uniform(*NOISE_SIGMA)) if noisy else 0.0
    layouts = LAYOUTS[int(rng.integers(1, 4))]
    layout = layouts[int(rng.integers(len(layouts)))]
    colors = rng.choice(list(PALETTE), size=len(layout), replace=False)  # distinct: captions stay unambiguous
    shapes = []
    for position, color in zip(layout, colors):
        kind = str(rng.choice(list(SHAPES)))
        size = str(rng.choice(list(SIZES)))
        extent = rng.uniform(*SIZES[size]) * shorter
        aspect = SHAPES[kind][0]
        short_side = extent / max(aspect, 1.0)  # `extent` is the longer box side
        box_w, box_h = max(3, round(aspect * short_side)), max(3, round(short_side))
        row, col = POSITIONS[position]
        x0 = _place(rng, col, width, box_w)
        y0 = _place(rng, row, height, box_h)
        shapes.append(Shape(kind, str(color), size, position, (x0, y0, x0 + box_w - 1, y0 + box_h - 1)))
    return Scene(image_id, file_name(image_id), width, height, "noisy" if noisy else "plain",
                 level, round(sigma, 3), shapes)


def _place(rng: np.random.Generator, cell: int, side: int, length: int) -> int:
    """Start of a `length`-pixel span placed uniformly inside third `cell` of `side` pixels."""
    lo, hi = math.ceil(cell * side / 3), math.floor((cell + 1) * side / 3)  # pixels [lo, hi)
    return lo + int(rng.integers(hi - lo - length + 1))


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """Paint `scene`; `rng` supplies the background noise."""
    shape = (scene.height, scene.width)
    if scene.noise_sigma > 0:  # gray noise: one channel is a third of the cost of three
        noise = rng.standard_normal(shape, dtype=np.float32) * scene.noise_sigma
        pixels = np.clip(noise + scene.background_level, 0, 255).astype(np.uint8)
    else:
        pixels = np.full(shape, scene.background_level, dtype=np.uint8)
    image = Image.fromarray(pixels).convert("RGB")
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        SHAPES[s.kind][1](draw, s.box, PALETTE[s.color])
    return image


# ---- captions ---------------------------------------------------------------------------

def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _named(s: Shape, size: bool = True) -> str:
    return _a(f"{s.size} {s.color} {s.kind}" if size else f"{s.color} {s.kind}")


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _pick(scene: Scene, rng: np.random.Generator) -> Shape:
    return scene.shapes[int(rng.integers(len(scene.shapes)))]


def _there_is(scene, rng):
    s = _pick(scene, rng)
    return f"there is {_named(s, size=bool(rng.random() < 0.5))} {POSITION_PHRASES[s.position]}"


def _located(scene, rng):
    s = _pick(scene, rng)
    return f"{_named(s, size=False)} {POSITION_PHRASES[s.position]}"


def _count_list(scene, rng):
    n = len(scene.shapes)
    noun = "shape" if n == 1 else "shapes"
    return f"{NUMBER_WORDS[n]} {noun}: {_join([_named(s, size=False) for s in scene.shapes])}"


def _picture_of(scene, rng):
    lead = ("a picture of", "an image of", "a drawing of")[int(rng.integers(3))]
    return f"{lead} {_join([_named(s) for s in scene.shapes])}"


def _color_at(scene, rng):
    s = _pick(scene, rng)
    return f"the {s.kind} {POSITION_PHRASES[s.position]} is {s.color}"


def _background(scene, rng):
    return f"{_named(_pick(scene, rng))} on a {scene.background} background"


def _size_of(scene, rng):
    s = _pick(scene, rng)
    return f"the {s.color} {s.kind} is {s.size}"


def _relation(scene, rng):
    i, j = sorted(int(k) for k in rng.choice(len(scene.shapes), size=2, replace=False))
    first, second = scene.shapes[i], scene.shapes[j]  # layouts list shapes left->right, top->bottom
    horizontal = POSITIONS[first.position][0] == POSITIONS[second.position][0]
    a, b = _named(first), _named(second)
    if rng.random() < 0.5:
        return f"{a} {'on the left of' if horizontal else 'above'} {b}"
    return f"{b} {'to the right of' if horizontal else 'below'} {a}"


# template -> smallest shape count it needs
TEMPLATES: list[tuple[Callable[[Scene, np.random.Generator], str], int]] = [
    (_there_is, 1), (_located, 1), (_count_list, 1), (_picture_of, 1), (_color_at, 1),
    (_background, 1), (_size_of, 1), (_relation, 2),
]


def make_captions(scene: Scene, rng: np.random.Generator, k: int = CAPTIONS_PER_IMAGE) -> list[str]:
    """`k` captions from distinct templates, each naming at least one shape with its colour."""
    usable = [fn for fn, min_shapes in TEMPLATES if len(scene.shapes) >= min_shapes]
    chosen = rng.choice(len(usable), size=k, replace=False)
    return [usable[int(i)](scene, rng) for i in chosen]


# ---- files ------------------------------------------------------------------------------

def _make_image(seed: int, image_id: int) -> tuple[Scene, list[str], bytes]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, image_id]))
    scene = sample_scene(image_id, rng)
    captions = make_captions(scene, rng)
    buf = io.BytesIO()
    render(scene, rng).save(buf, format="JPEG", quality=JPEG_QUALITY)
    return scene, captions, buf.getvalue()


def split_ids(num_images: int, val_fraction: float) -> dict[str, list[int]]:
    """Image ids 1..N; the last round(N * val_fraction) form `val` (train keeps at least one)."""
    num_val = min(int(round(num_images * val_fraction)), num_images - 1)
    ids = list(range(1, num_images + 1))
    return {"train": ids[:num_images - num_val], "val": ids[num_images - num_val:]}


def generate(out_dir: str | Path, num_images: int, seed: int, val_fraction: float = 0.1) -> dict[str, Path]:
    """Write the set to `out_dir` and return the paths written (manifest last)."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    out_dir = Path(out_dir)
    manifest = out_dir / MANIFEST
    manifest.unlink(missing_ok=True)  # from here on the set counts as half-written
    image_dir, ann_dir = out_dir / "images", out_dir / "annotations"
    image_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {"images": image_dir}
    for split, ids in split_ids(num_images, val_fraction).items():
        images, annotations, scenes = [], [], []
        for image_id in ids:
            scene, captions, jpeg = _make_image(seed, image_id)
            (image_dir / scene.file_name).write_bytes(jpeg)
            images.append({"id": image_id, "file_name": scene.file_name,
                           "height": scene.height, "width": scene.width})
            for k, caption in enumerate(captions):  # ids unique across splits, as in COCO
                annotations.append({"id": (image_id - 1) * CAPTIONS_PER_IMAGE + k + 1,
                                    "image_id": image_id, "caption": caption})
            scenes.append(asdict(scene))
        info = {"description": f"pixelbert synthetic shapes ({split})", "version": FORMAT_VERSION,
                "seed": seed}
        paths[f"captions_{split}"] = ann_dir / f"captions_{split}.json"
        paths[f"scenes_{split}"] = ann_dir / f"scenes_{split}.json"
        write_json(paths[f"captions_{split}"], {"info": info, "images": images, "annotations": annotations})
        write_json(paths[f"scenes_{split}"], scenes)
    _remove_stale_images(image_dir, num_images)
    write_json(manifest, _manifest(num_images, seed, val_fraction))
    paths["manifest"] = manifest
    return paths


def _remove_stale_images(image_dir: Path, num_images: int) -> None:
    """Drop images left by an earlier, larger set so the folder matches the annotations."""
    keep = {file_name(i) for i in range(1, num_images + 1)}
    for path in image_dir.glob("synthetic_*.jpg"):
        if path.name not in keep:
            path.unlink()


def _manifest(num_images: int, seed: int, val_fraction: float) -> dict:
    return {"format_version": FORMAT_VERSION, "num_images": num_images, "seed": seed,
            "val_fraction": val_fraction}


def ensure_synthetic(out_dir: str | Path, num_images: int, seed: int, val_fraction: float = 0.1) -> Path:
    """Return `out_dir`, generating the set unless a complete one with these parameters is there."""
    out_dir = Path(out_dir)
    try:
        current = read_json(out_dir / MANIFEST)
    except (FileNotFoundError, ValueError):
        current = None
    if current != _manifest(num_images, seed, val_fraction):
        generate(out_dir, num_images, seed, val_fraction)
    return out_dir


def load_scenes(out_dir: str | Path, split: str) -> list[Scene]:
    """Read `scenes_{split}.json` back into Scene records."""
    raw = read_json(Path(out_dir) / "annotations" / f"scenes_{split}.json")
    return [Scene(**{**s, "shapes": [Shape(**{**sh, "box": tuple(sh["box"])}) for sh in s["shapes"]]})
            for s in raw]


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = generate(args.out, args.num_images, args.seed, args.val_fraction)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
    print(f"{args.num_images} images in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
