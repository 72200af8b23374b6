"""Embedded synthetic set: coloured shapes on a plain or noisy background, in five formats.

    python -m pixelbert.data.synthetic --out DIR [--num-images N] [--seed S] [--val-fraction F]

writes, for each split (`train`, `val`: the last F of the image ids):

    DIR/images/COCO_synthetic_{id:012d}.jpg       the JPEGs (COCO naming, data_subtype "synthetic")
    DIR/annotations/captions_{split}.json         COCO captions (5 per image)
    DIR/annotations/scenes_{split}.json           the ground truth of every drawn scene
    DIR/annotations/region_descriptions_{split}.json   Visual Genome regions (shape boxes)
    DIR/vg/{vg_id}.jpg                            the VG image folder (links to images/); VG
                                                  numbers images its own way: vg_id = id + VG_ID_OFFSET
    DIR/annotations/image_data.json               VG's image list, each with its coco_id
    DIR/annotations/vqa_questions_{split}.json    VQA v2 questions ...
    DIR/annotations/vqa_annotations_{split}.json  ... and their ten answers
    DIR/annotations/nlvr2_{split}.jsonl           NLVR2 statements about image pairs
    DIR/nlvr2/train/{directory}/train-{set}-{pair}-img{0,1}.png,
    DIR/nlvr2/dev/dev-{set}-{pair}-img{0,1}.png   the NLVR2 pair images (links to JPEGs)
    DIR/annotations/dataset_synthetic.json        Karpathy split (train/restval/val/test)
    DIR/manifest.json                             written last: the set is complete

Every caption word, region phrase, VQA answer and NLVR2 label about colour, shape, size, count
or layout is computed from the scene that was drawn, so a model can only get it right by looking
at the pixels. Each image is drawn from its own generator seeded by (seed, image_id): the same
seed gives byte-identical files, and image k does not depend on how many images are made (its
file name neither: all images share one data_subtype). Drawing and texts are table-driven
(PALETTE, SHAPES, SIZES, POSITIONS, LAYOUTS, TEMPLATES, NLVR2_FAMILIES). The linked folders
(`vg/`, `nlvr2/`) are hard links where the file system allows, copies otherwise.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageDraw

from pixelbert.fileio import write_atomic
from .formats import read_json, write_json

MANIFEST = "manifest.json"
# Visual Genome's image ids differ from COCO's; its image_data.json maps them (data.exclude needs it).
VG_ID_OFFSET = 1_000_000
FORMAT_VERSION = 3  # bump when drawing, texts or layout change, so cached sets are regenerated
CAPTIONS_PER_IMAGE = 5
SIDE_RANGE = (160, 400)  # width and height drawn independently: portrait and landscape
JPEG_QUALITY = 90
DATA_SUBTYPE = "synthetic"  # COCO / VQA `data_subtype`: images are COCO_synthetic_{id:012d}.jpg

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
    """COCO naming, so VQA questions find the image: COCO_{data_subtype}_{image_id:012d}.jpg."""
    return f"COCO_{DATA_SUBTYPE}_{image_id:012d}.jpg"


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
    return _relation_phrase(*_two_shapes(scene, rng), rng)


def _two_shapes(scene: Scene, rng: np.random.Generator) -> tuple[Shape, Shape]:
    i, j = sorted(int(k) for k in rng.choice(len(scene.shapes), size=2, replace=False))
    return scene.shapes[i], scene.shapes[j]  # layouts list shapes left->right, top->bottom


def _relation_phrase(first: Shape, second: Shape, rng: np.random.Generator) -> str:
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


# ---- Visual Genome regions -------------------------------------------------------------

def _vg_box(box: tuple[int, int, int, int]) -> dict[str, int]:
    x0, y0, x1, y1 = box
    return {"x": x0, "y": y0, "width": x1 - x0 + 1, "height": y1 - y0 + 1}


def make_regions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, tuple[int, int, int, int]]]:
    """(phrase, box) for each shape ("a red circle", "a small blue bar", "the green square on the
    left", ...) and, with two or more shapes, one relation of two shapes over their joint box."""
    regions = []
    for s in scene.shapes:
        form = int(rng.integers(4))
        phrase = (_named(s, size=False), _named(s), f"the {s.color} {s.kind} {POSITION_PHRASES[s.position]}",
                  f"{s.size} {s.color} {s.kind}")[form]
        regions.append((phrase, s.box))
    if len(scene.shapes) >= 2:
        first, second = _two_shapes(scene, rng)
        box = (min(first.box[0], second.box[0]), min(first.box[1], second.box[1]),
               max(first.box[2], second.box[2]), max(first.box[3], second.box[3]))
        regions.append((_relation_phrase(first, second, rng), box))
    return regions


# ---- VQA --------------------------------------------------------------------------------

# A plausible wrong answer an inattentive annotator might give, per true answer.
NEAR_ANSWERS: dict[str, tuple[str, ...]] = {
    "red": ("orange", "purple"), "orange": ("red", "yellow"), "yellow": ("orange", "white"),
    "green": ("yellow", "blue"), "blue": ("purple", "green"), "purple": ("blue", "red"),
    "white": ("yellow", "gray"), "black": ("purple", "blue"),
    "left": ("center",), "right": ("center",), "top": ("center",), "bottom": ("center",),
    "center": ("left", "right", "top", "bottom"),
    "yes": ("no",), "no": ("yes",), "1": ("2",), "2": ("1", "3"), "3": ("2", "4"),
}
ANSWERS_PER_QUESTION = 10
DISSENT_PROBS = (0.6, 0.3, 0.1)  # P(0, 1, 2 of the ten annotators give a near answer)


def make_questions(scene: Scene, rng: np.random.Generator) -> list[dict]:
    """VQA questions of the scene with their true answer: colour, count, existence (yes/no
    balanced) and position; `answer_type` and `question_type` as VQA v2 labels them."""
    def q(question, answer, answer_type, question_type):
        return {"question": question, "answer": answer, "answer_type": answer_type,
                "question_type": question_type}

    shapes = scene.shapes
    kinds = Counter(s.kind for s in shapes)
    unique = [s for s in shapes if kinds[s.kind] == 1]
    if unique:  # "the circle" names one shape
        s = unique[int(rng.integers(len(unique)))]
        colour = q(f"what color is the {s.kind}?", s.color, "other", "what color is the")
    else:  # positions are distinct within a scene
        s = _pick(scene, rng)
        colour = q(f"what color is the shape {POSITION_PHRASES[s.position]}?", s.color, "other",
                   "what color is the")
    count = q("how many shapes are there?", str(len(shapes)), "number", "how many")
    drawn = {(s.color, s.kind) for s in shapes}
    if rng.random() < 0.5:
        s = _pick(scene, rng)
        color, kind, answer = s.color, s.kind, "yes"
    else:  # half the no's share a colour or a kind with a drawn shape: colour and shape must bind
        absent = [(c, k) for c in PALETTE for k in SHAPES if (c, k) not in drawn]
        near = [(c, k) for c, k in absent if any(c == s.color or k == s.kind for s in shapes)]
        pool = near if near and rng.random() < 0.5 else absent
        color, kind = pool[int(rng.integers(len(pool)))]
        answer = "no"
    exists = q(f"is there {_a(f'{color} {kind}')}?", answer, "yes/no", "is there a")
    s = _pick(scene, rng)
    where = q(f"where is the {s.color} {s.kind}?", s.position, "other", "where is the")
    return [colour, count, exists, where]


def ten_answers(answer: str, rng: np.random.Generator) -> list[str]:
    """Ten annotators' answers: all `answer` but for 0-2 of them giving a near answer, so the
    VQA soft score (min(#agreeing / 3, 1)) separates the true answer from a near one."""
    answers = [answer] * ANSWERS_PER_QUESTION
    dissent = int(rng.choice(len(DISSENT_PROBS), p=DISSENT_PROBS))
    for k in rng.choice(ANSWERS_PER_QUESTION, size=dissent, replace=False):
        near = NEAR_ANSWERS[answer]
        answers[int(k)] = near[int(rng.integers(len(near)))]
    return answers


# ---- NLVR2 ------------------------------------------------------------------------------

NLVR2_SPLITS = {"train": "train", "val": "dev"}  # our split -> NLVR2's split name
PAIRS_PER_SET = 2
SENTENCES_PER_PAIR = 2
NLVR2_DIRECTORIES = 10  # train pairs live in nlvr2/train/{set % 10 + 1}/, as NLVR2's train set


def _side_contains(left: Scene, right: Scene, rng):
    side = int(rng.integers(2))
    drawn = {(s.color, s.kind) for s in (left, right)[side].shapes}
    name = ("left", "right")[side]
    return [(f"the {name} image contains {_a(f'{c} {k}')}", (c, k) in drawn)
            for c in PALETTE for k in SHAPES]


def _both_contain(left: Scene, right: Scene, rng):
    both = {s.kind for s in left.shapes} & {s.kind for s in right.shapes}
    return [(f"both images contain {_a(k)}", k in both) for k in SHAPES]


def _neither_contains(left: Scene, right: Scene, rng):
    seen = {s.color for s in left.shapes + right.shapes}
    return [(f"neither image contains {_a(f'{c} shape')}", c not in seen) for c in PALETTE]


def _more_shapes(left: Scene, right: Scene, rng):
    n = {"left": len(left.shapes), "right": len(right.shapes)}
    return [(f"there are more shapes in the {a} image than in the {b} image", n[a] > n[b])
            for a, b in (("left", "right"), ("right", "left"))]


def _exactly(left: Scene, right: Scene, rng):
    counts = {len(left.shapes), len(right.shapes)}
    return [(f"one of the images contains exactly {NUMBER_WORDS[n]} {'shape' if n == 1 else 'shapes'}",
             n in counts) for n in NUMBER_WORDS]


# Each family lists its statements about a pair with their truth.
NLVR2_FAMILIES: list[Callable[[Scene, Scene, np.random.Generator], list[tuple[str, bool]]]] = [
    _side_contains, _both_contain, _neither_contains, _more_shapes, _exactly]


def nlvr2_statement(left: Scene, right: Scene, rng: np.random.Generator) -> tuple[str, bool]:
    """A statement about the pair and its truth; True and False with probability 1/2 each."""
    label = bool(rng.random() < 0.5)
    for f in rng.permutation(len(NLVR2_FAMILIES)):  # the first family that can say `label`
        options = [text for text, truth in NLVR2_FAMILIES[int(f)](left, right, rng) if truth == label]
        if options:
            return options[int(rng.integers(len(options)))], label
    raise AssertionError("unreachable: 'neither image contains' always has both labels")


def make_nlvr2(scenes: list[Scene], split: str, seed: int) -> list[dict]:
    """NLVR2 jsonl rows for `split`: each image is the left image of one pair (the right one drawn
    from the rest of the split), PAIRS_PER_SET pairs to a set, SENTENCES_PER_PAIR statements each.
    `left_url`/`right_url` name the source JPEG, as NLVR2's rows name theirs."""
    if len(scenes) < 2:
        return []
    rng = np.random.default_rng(np.random.SeedSequence([seed, 1 << 20, list(NLVR2_SPLITS).index(split)]))
    name, rows = NLVR2_SPLITS[split], []
    for p, left in enumerate(scenes):
        other = int(rng.integers(len(scenes) - 1))
        right = scenes[other + (other >= p)]
        set_id, pair = divmod(p, PAIRS_PER_SET)
        for sentence in range(SENTENCES_PER_PAIR):
            text, label = nlvr2_statement(left, right, rng)
            row = {"identifier": f"{name}-{set_id}-{pair}-{sentence}", "sentence": text,
                   "label": str(label), "left_url": f"images/{left.file_name}",
                   "right_url": f"images/{right.file_name}"}
            if split == "train":
                row["directory"] = set_id % NLVR2_DIRECTORIES + 1
            rows.append(row)
    return rows


def _nlvr2_links(out_dir: Path, rows: list[dict]) -> None:
    """Link each pair's images into nlvr2/{split}[/{directory}]/{pair}-img{0,1}.png."""
    for row in rows:
        pair = row["identifier"].rsplit("-", 1)[0]
        folder = out_dir / "nlvr2" / pair.split("-")[0]
        if "directory" in row:
            folder = folder / str(row["directory"])
        for k, url in enumerate((row["left_url"], row["right_url"])):
            target = folder / f"{pair}-img{k}.png"
            if not target.exists():  # the pair's other sentences share it
                folder.mkdir(parents=True, exist_ok=True)
                _link(out_dir / url, target)


def _link(src: Path, dst: Path) -> None:
    """Hard-link `dst` to `src`; copy where the file system cannot link."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# ---- Karpathy split ---------------------------------------------------------------------

def karpathy_split(split: str, image_id: int, position: int, count: int) -> str:
    """Karpathy split of an image: train images with id % 10 == 0 are `restval`; the first half
    of the val images `val`, the rest `test`."""
    if split == "train":
        return "restval" if image_id % 10 == 0 else "train"
    return "val" if position < (count + 1) // 2 else "test"


def _tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


# ---- files ------------------------------------------------------------------------------

@dataclass
class Drawn:
    """One image and every text derived from its scene."""
    scene: Scene
    captions: list[str]
    jpeg: bytes
    regions: list[tuple[str, tuple[int, int, int, int]]]
    questions: list[dict]  # make_questions entries with "answers": the ten annotators' answers


def _make_image(seed: int, image_id: int) -> Drawn:
    rng = np.random.default_rng(np.random.SeedSequence([seed, image_id]))
    scene = sample_scene(image_id, rng)
    captions = make_captions(scene, rng)
    buf = io.BytesIO()
    render(scene, rng).save(buf, format="JPEG", quality=JPEG_QUALITY)
    # Drawn after the pixels, so adding tasks never changes an image or its captions.
    regions = make_regions(scene, rng)
    questions = [{**q, "answers": ten_answers(q["answer"], rng)} for q in make_questions(scene, rng)]
    return Drawn(scene, captions, buf.getvalue(), regions, questions)


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
    image_dir, ann_dir, vg_dir = out_dir / "images", out_dir / "annotations", out_dir / "vg"
    image_dir.mkdir(parents=True, exist_ok=True)
    for linked in (vg_dir, out_dir / "nlvr2"):  # rebuilt from scratch: no stale links
        shutil.rmtree(linked, ignore_errors=True)
    vg_dir.mkdir()
    paths: dict[str, Path] = {"images": image_dir, "vg_images": vg_dir, "nlvr2_images": out_dir / "nlvr2"}
    karpathy, vg_image_data, sentence_id = [], [], 0
    for split, ids in split_ids(num_images, val_fraction).items():
        images, captions, scenes, regions, questions, answers = [], [], [], [], [], []
        drawn_scenes = []
        for position, image_id in enumerate(ids):
            drawn = _make_image(seed, image_id)
            scene = drawn.scene
            (image_dir / scene.file_name).write_bytes(drawn.jpeg)
            vg_id = image_id + VG_ID_OFFSET
            _link(image_dir / scene.file_name, vg_dir / f"{vg_id}.jpg")
            vg_image_data.append({"image_id": vg_id, "coco_id": image_id, "flickr_id": None,
                                  "width": scene.width, "height": scene.height, "url": f"vg/{vg_id}.jpg"})
            images.append({"id": image_id, "file_name": scene.file_name,
                           "height": scene.height, "width": scene.width})
            for k, caption in enumerate(drawn.captions):  # ids unique across splits, as in COCO
                captions.append({"id": (image_id - 1) * CAPTIONS_PER_IMAGE + k + 1,
                                 "image_id": image_id, "caption": caption})
            scenes.append(asdict(scene))
            drawn_scenes.append(scene)
            regions.append({"id": vg_id, "regions": [
                {"region_id": (image_id - 1) * 4 + k + 1, "image_id": vg_id, "phrase": phrase,
                 **_vg_box(box)} for k, (phrase, box) in enumerate(drawn.regions)]})
            for k, q in enumerate(drawn.questions):
                question_id = image_id * 1000 + k  # VQA's numbering
                questions.append({"image_id": image_id, "question": q["question"],
                                  "question_id": question_id})
                answers.append({
                    "question_type": q["question_type"], "answer_type": q["answer_type"],
                    "multiple_choice_answer": Counter(q["answers"]).most_common(1)[0][0],
                    "answers": [{"answer": a, "answer_confidence": "yes" if a == q["answer"] else "maybe",
                                 "answer_id": n + 1} for n, a in enumerate(q["answers"])],
                    "image_id": image_id, "question_id": question_id})
            karpathy.append({
                "filepath": image_dir.name, "filename": scene.file_name, "imgid": len(karpathy),
                "split": karpathy_split(split, image_id, position, len(ids)), "cocoid": image_id,
                "sentids": list(range(sentence_id, sentence_id + len(drawn.captions))),
                "sentences": [{"tokens": _tokens(c), "raw": c, "imgid": len(karpathy),
                               "sentid": sentence_id + k} for k, c in enumerate(drawn.captions)]})
            sentence_id += len(drawn.captions)
        info = {"description": f"pixelbert synthetic shapes ({split})", "version": FORMAT_VERSION,
                "seed": seed}
        vqa_head = {"info": info, "license": {}, "data_type": "mscoco", "data_subtype": DATA_SUBTYPE}
        nlvr2 = make_nlvr2(drawn_scenes, split, seed)
        files = {
            f"captions_{split}": (f"captions_{split}.json",
                                  {"info": info, "images": images, "annotations": captions}),
            f"scenes_{split}": (f"scenes_{split}.json", scenes),
            f"regions_{split}": (f"region_descriptions_{split}.json", regions),
            f"vqa_questions_{split}": (f"vqa_questions_{split}.json",
                                       {**vqa_head, "task_type": "Open-Ended", "questions": questions}),
            f"vqa_annotations_{split}": (f"vqa_annotations_{split}.json",
                                         {**vqa_head, "annotations": answers}),
        }
        for key, (name, obj) in files.items():
            paths[key] = ann_dir / name
            write_json(paths[key], obj)
        paths[f"nlvr2_{split}"] = ann_dir / f"nlvr2_{split}.jsonl"
        write_atomic(paths[f"nlvr2_{split}"],
                     "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in nlvr2))
        _nlvr2_links(out_dir, nlvr2)
    paths["vg_image_data"] = ann_dir / "image_data.json"
    write_json(paths["vg_image_data"], vg_image_data)
    paths["karpathy"] = ann_dir / "dataset_synthetic.json"
    write_json(paths["karpathy"], {"images": karpathy, "dataset": "synthetic"})
    _remove_stale_images(image_dir, num_images)
    write_json(manifest, _manifest(num_images, seed, val_fraction))
    paths["manifest"] = manifest
    return paths


def _remove_stale_images(image_dir: Path, num_images: int) -> None:
    """Drop images left by an earlier, larger set (or an older naming) so the folder matches the
    annotations."""
    keep = {file_name(i) for i in range(1, num_images + 1)}
    for pattern in (f"COCO_{DATA_SUBTYPE}_*.jpg", "synthetic_*.jpg"):  # the latter: FORMAT_VERSION 1
        for path in image_dir.glob(pattern):
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
    return [_scene(s) for s in read_json(Path(out_dir) / "annotations" / f"scenes_{split}.json")]


def _scene(raw: dict) -> Scene:
    return Scene(**{**raw, "shapes": [Shape(**{**sh, "box": tuple(sh["box"])}) for sh in raw["shapes"]]})


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
