"""Published annotation formats -> `Record`s."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixelbert.fileio import write_atomic


@dataclass
class Record:
    """One (image, text) example; `image_id` tells which records share an image."""
    image: str
    image_id: int
    text: str


def read_json(path: str | Path) -> Any:
    """Parse a JSON file; errors name the file (and the line/column for bad JSON)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {path}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def read_coco_captions(annotations: str | Path, images: str | Path) -> list[Record]:
    """Read a COCO captions file (`captions_train2014.json` layout), one Record per caption.

    Image paths are `images / file_name`; records keep the file's annotation order.
    """
    annotations, images = Path(annotations), Path(images)
    if not annotations.is_file():
        raise FileNotFoundError(
            f"COCO captions file not found: {annotations}. To train on the embedded synthetic "
            f"set instead, leave data.train empty (data.train=[]).")
    raw = read_json(annotations)
    if not isinstance(raw, dict) or not {"images", "annotations"} <= raw.keys():
        raise ValueError(f"{annotations}: not a COCO captions file (needs top-level 'images' and "
                         f"'annotations')")
    files = {image["id"]: image["file_name"] for image in raw["images"]}
    records = []
    for ann in raw["annotations"]:
        if ann["image_id"] not in files:
            raise ValueError(f"{annotations}: annotation {ann.get('id')} refers to image_id "
                             f"{ann['image_id']}, which is not in 'images'")
        # COCO captions carry stray spaces and newlines.
        records.append(Record(image=str(images / files[ann["image_id"]]),
                              image_id=int(ann["image_id"]), text=ann["caption"].strip()))
    return records


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write `obj` as JSON with a fixed layout (same object -> same bytes)."""
    write_atomic(path, json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
