"""Published annotation formats -> `Record`s.

One reader per format, each `(annotation file(s), image folder(s)[, split]) -> list[Record]`:
COCO captions, Visual Genome region descriptions, VQA v2, NLVR2 jsonl and Karpathy-split JSON.
Readers check the layout and name the file (line, entry, key) in every error; they do not
open images and do not drop empty texts: the loader counts those as skipped records.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from pixelbert.data.errors import DataError
from pixelbert.fileio import write_atomic


@dataclass
class Record:
    """One example of any source; the fields that do not apply to its format stay None.

    `image_id` tells which records share an image (records of one image are grouped into one
    CNN pass); for NLVR2 it is the pair's identifier without the sentence number.
    """
    image: str                                # image path ("" for NLVR2, which has `images`)
    image_id: int | str
    text: str                                 # caption, region phrase, question or statement
    images: Optional[tuple[str, str]] = None  # NLVR2: left and right image
    question_id: Optional[int] = None         # VQA
    answers: Optional[list[str]] = None       # VQA: the ten answer strings (None on test splits)
    label: Optional[bool] = None              # NLVR2
    identifier: Optional[str] = None          # NLVR2: split-set-pair-sentence
    size: Optional[tuple[int, int]] = None    # (height, width) when the annotations give it
    coco_id: Optional[int] = None             # the COCO image id, when the image is COCO's (data.exclude)


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
        raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def read_coco_captions(annotations: str | Path, images: str | Path) -> list[Record]:
    """Read a COCO captions file (`captions_train2014.json` layout), one Record per caption.

    Image paths are `images / file_name`; `size` is (height, width) where the image entry gives
    both; records keep the file's annotation order.
    """
    annotations, images = Path(annotations), Path(images)
    if not annotations.is_file():
        raise FileNotFoundError(
            f"COCO captions file not found: {annotations}. To train on the embedded synthetic "
            f"set instead, leave data.train empty (data.train=[]).")
    raw = _top(read_json(annotations), annotations, "COCO captions", ("images", "annotations"))
    files, sizes = {}, {}
    for i, image in enumerate(raw["images"]):
        image_id = _get(image, "id", annotations, f"images[{i}]")
        files[image_id] = _get(image, "file_name", annotations, f"images[{i}]")
        if "height" in image and "width" in image:
            sizes[image_id] = (int(image["height"]), int(image["width"]))
    records = []
    for i, ann in enumerate(raw["annotations"]):
        image_id = _get(ann, "image_id", annotations, f"annotations[{i}]")
        if image_id not in files:
            raise DataError(f"{annotations}: annotation {ann.get('id')} refers to image_id "
                            f"{image_id}, which is not in 'images'")
        # COCO captions carry stray spaces and newlines.
        records.append(Record(image=str(images / files[image_id]), image_id=int(image_id),
                              text=_text(_get(ann, "caption", annotations, f"annotations[{i}]")),
                              size=sizes.get(image_id), coco_id=int(image_id)))
    return records


def read_vg_regions(annotations: str | Path, images: str | Path,
                    image_data: Optional[str | Path] = None) -> list[Record]:
    """Read Visual Genome `region_descriptions.json`, one Record per region phrase.

    `images` is a folder or several joined with "," (VG ships `VG_100K` and `VG_100K_2`); the
    image of id N is `N.jpg` in the first folder that has it. Records of an image found in no
    folder keep the first folder's path (the loader counts them as missing files), but when not
    one image is found the folders are wrong: FileNotFoundError. With VG's `image_data.json`
    (`image_data`), records of the images VG took from COCO carry its `coco_id`.
    """
    coco_ids = read_vg_coco_ids(image_data) if image_data else {}
    annotations = Path(annotations)
    raw = read_json(annotations)
    if not isinstance(raw, list):
        got = f"an object with {', '.join(map(repr, list(raw)[:8]))}" if isinstance(raw, dict) \
            else f"a {type(raw).__name__}"
        raise DataError(f"{annotations}: not a Visual Genome region descriptions file (needs a "
                        f"top-level list of {{'id', 'regions'}} entries, got {got})")
    folders = [Path(f.strip()) for f in str(images).split(",") if f.strip()]
    if not folders:
        raise FileNotFoundError(f"{annotations}: no Visual Genome image folder given")
    where: dict[str, Path] = {}  # "N.jpg" -> the first folder holding it; one listing per folder
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"Visual Genome image folder not found: {folder}")
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.endswith(".jpg"):
                    where.setdefault(entry.name, folder)
    records, found = [], False
    for i, entry in enumerate(raw):
        image_id = _get(entry, "id", annotations, f"entry {i}")
        name = f"{image_id}.jpg"
        found = found or name in where
        path = str(where.get(name, folders[0]) / name)
        for j, region in enumerate(_get(entry, "regions", annotations, f"entry {i}")):
            phrase = _get(region, "phrase", annotations, f"entry {i} (id {image_id}) region {j}")
            records.append(Record(image=path, image_id=image_id, text=_text(phrase),
                                  coco_id=coco_ids.get(image_id)))
    if records and not found:
        raise FileNotFoundError(f"{annotations}: none of its images (N.jpg by image id) is in "
                                f"{', '.join(map(str, folders))}")
    return records


def read_vqa(questions: str | Path, annotations_or_None: Optional[str | Path],
             images: str | Path) -> list[Record]:
    """Read VQA v2 questions joined on `question_id` with their annotations, one Record per question.

    `answers` are the ten annotators' answers in order (None when `annotations_or_None` is None
    or "", as for the test split). Images are COCO-named:
    `images / COCO_{data_subtype}_{image_id:012d}.jpg`, except that test-dev's questions
    ("test-dev2015") are on test2015 images, named so.
    """
    questions, images = Path(questions), Path(images)
    raw = _top(read_json(questions), questions, "VQA questions", ("data_subtype", "questions"))
    subtype = "test2015" if raw["data_subtype"] == "test-dev2015" else raw["data_subtype"]
    answers: Optional[dict[int, list[str]]] = None
    if annotations_or_None:
        annotations = Path(annotations_or_None)
        ann_raw = _top(read_json(annotations), annotations, "VQA annotations", ("annotations",))
        answers, ann_images = {}, {}
        for i, ann in enumerate(ann_raw["annotations"]):
            qid = _get(ann, "question_id", annotations, f"annotations[{i}]")
            where = f"annotation of question_id {qid}"
            ann_images[qid] = _get(ann, "image_id", annotations, where)
            answers[qid] = [_get(a, "answer", annotations, f"{where}, answer {k}")
                            for k, a in enumerate(_get(ann, "answers", annotations, where))]
    records = []
    for i, q in enumerate(raw["questions"]):
        qid = _get(q, "question_id", questions, f"questions[{i}]")
        image_id = _get(q, "image_id", questions, f"question_id {qid}")
        text = _text(_get(q, "question", questions, f"question_id {qid}"))
        if answers is not None:
            if qid not in answers:
                raise DataError(f"{annotations_or_None}: no annotation for question_id {qid} of "
                                f"{questions}")
            if ann_images[qid] != image_id:
                raise DataError(f"{annotations_or_None}: question_id {qid} has image_id "
                                f"{ann_images[qid]}, but {questions} says {image_id}")
        records.append(Record(image=str(images / f"COCO_{subtype}_{int(image_id):012d}.jpg"),
                              image_id=image_id, text=text, question_id=qid,
                              answers=None if answers is None else answers[qid], coco_id=int(image_id)))
    orphans = [] if answers is None else sorted(answers.keys() - {r.question_id for r in records})
    if orphans:
        raise DataError(f"{annotations_or_None}: annotation of question_id {orphans[0]} has no "
                        f"question in {questions} ({len(orphans)} such annotations)")
    return records


def read_nlvr2(jsonl: str | Path, images: str | Path) -> list[Record]:
    """Read an NLVR2 jsonl file (`train.json`, `dev.json`, ...), one Record per statement.

    `identifier` is split-set-pair-sentence; the pair's images are
    `{split}-{set}-{pair}-img0.png` and `-img1.png` in `images / directory` (train) or `images`.
    `image_id` is the pair (the identifier without its sentence number), `label` a bool.
    """
    jsonl, images = Path(jsonl), Path(images)
    try:
        lines = jsonl.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FileNotFoundError(f"annotation file not found: {jsonl}") from None
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{jsonl}: invalid JSON on line {number} column {e.colno}: {e.msg}") from None
        where = f"line {number}"
        identifier = str(_get(obj, "identifier", jsonl, where))
        parts = identifier.split("-")
        if len(parts) != 4:
            raise DataError(f"{jsonl}: {where}: identifier {identifier!r} is not "
                            f"split-set-pair-sentence (as in 'train-10171-0-0')")
        label = _get(obj, "label", jsonl, where)
        if label not in ("True", "False"):
            raise DataError(f"{jsonl}: {where}: label must be \"True\" or \"False\", got {label!r}")
        pair = identifier.rsplit("-", 1)[0]
        folder = images / str(obj["directory"]) if "directory" in obj else images
        records.append(Record(image="", image_id=pair, text=_text(_get(obj, "sentence", jsonl, where)),
                              images=(str(folder / f"{pair}-img0.png"), str(folder / f"{pair}-img1.png")),
                              label=label == "True", identifier=identifier))
    return records


def read_vg_coco_ids(image_data: str | Path) -> dict[int, int]:
    """VG image id -> COCO image id, from VG's `image_data.json` (a list of `{"image_id",
    "coco_id", ...}`; `coco_id` is null for the images not from COCO)."""
    path = Path(image_data)
    raw = read_json(path)
    if not isinstance(raw, list):
        raise DataError(f"{path}: not a Visual Genome image_data file (needs a top-level list of "
                        f"{{'image_id', 'coco_id', ...}} entries, got a {type(raw).__name__})")
    coco_ids = {}
    for i, entry in enumerate(raw):
        coco_id = _get(entry, "coco_id", path, f"entry {i}")
        if coco_id is not None:
            coco_ids[_get(entry, "image_id", path, f"entry {i}")] = int(coco_id)
    return coco_ids


KARPATHY_SPLITS = ("train", "val", "test", "restval")


def read_karpathy(json: str | Path, images: str | Path, split: str) -> list[Record]:
    """Read a Karpathy-split file (`dataset_coco.json`, `dataset_flickr30k.json`), one Record per
    sentence of the images in `split` ("train", "val", "test", "restval" or several joined with
    "+", e.g. "train+restval").

    Paths are `images / filepath / filename` (COCO) or `images / filename` (Flickr30K, no
    `filepath`); `image_id` is `cocoid` where given, else `imgid`.
    """
    path, images = Path(json), Path(images)
    raw = _top(read_json(path), path, "Karpathy split", ("images",))
    entries = raw["images"]
    present = sorted({_get(e, "split", path, f"images[{i}]") for i, e in enumerate(entries)},
                     key=lambda s: ((KARPATHY_SPLITS + (s,)).index(s), s))
    wanted = split.split("+")
    for name in wanted:
        if name not in present:
            kind = "not a Karpathy split name" if name not in KARPATHY_SPLITS else "not in this file"
            raise DataError(f"{path}: split {name!r} ({kind}; asked for {split!r}); the file has "
                            f"{', '.join(present) or 'no images'}")
    records = []
    for i, entry in enumerate(entries):
        if entry["split"] not in wanted:
            continue
        where = f"images[{i}]"
        filename = _get(entry, "filename", path, where)
        image = images / entry["filepath"] / filename if "filepath" in entry else images / filename
        image_id = entry["cocoid"] if "cocoid" in entry else _get(entry, "imgid", path, where)
        for j, sentence in enumerate(_get(entry, "sentences", path, where)):
            text = _get(sentence, "raw", path, f"{where} ({filename}) sentence {j}")
            records.append(Record(image=str(image), image_id=image_id, text=_text(text),
                                  coco_id=int(entry["cocoid"]) if "cocoid" in entry else None))
    return records


def _top(raw: Any, path: Path, what: str, keys: tuple[str, ...]) -> dict:
    """`raw` if it is an object with `keys`; otherwise a ValueError naming the file and the key."""
    if not isinstance(raw, dict):
        raise DataError(f"{path}: not a {what} file (needs a top-level object with "
                        f"{', '.join(map(repr, keys))}, got a {type(raw).__name__})")
    for key in keys:
        if key not in raw:
            raise DataError(f"{path}: not a {what} file: no top-level {key!r} (it has "
                            f"{', '.join(map(repr, list(raw)[:8])) or 'no keys'})")
    return raw


def _get(obj: Any, key: str, path: Path, where: str) -> Any:
    """`obj[key]`; a missing key (or an entry that is not an object) names the file and entry."""
    if not isinstance(obj, dict):
        raise DataError(f"{path}: {where} is not an object")
    if key not in obj:
        raise DataError(f"{path}: {where} has no {key!r}")
    return obj[key]


def _text(value: Any) -> str:
    """Stripped text; a non-string becomes "" so the loader counts it as an empty text."""
    return value.strip() if isinstance(value, str) else ""


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write `obj` as JSON with a fixed layout (same object -> same bytes)."""
    write_atomic(path, json.dumps(obj, ensure_ascii=False, separators=(",", ":")))
