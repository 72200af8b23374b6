"""Fine-tuning examples: VQA, NLVR2 and image-text retrieval, and their batching.

Items are keyed by `(index, sample_seed)` like pre-training items (the same step-indexed
sampler drives them), one record per item. A batch holds each distinct image once (images that
several records share, such as the image of many VQA questions, go through the CNN once) and a
list of (image, text) pairs, `pair_image[n]` naming the image of pair n:
- VQA: one pair per question; targets are soft scores over the answer vocabulary.
- NLVR2: two pairs per statement, (left image, statement) and (right image, statement).
- Retrieval: one positive pair per item and `negatives` pairs of the same image with texts of
  other images; the model keeps the hardest of those.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .dataset import read_first_good
from .errors import BadSample, DataError
from .formats import Record
from .images import load_encoded, load_image, pad_images
from .packed import PackedList

# VQA soft score of an answer given by k of the ten annotators: min(1, k * 0.3), i.e. 0, 0.3,
# 0.6, 0.9 and 1.0 for 0-4+ (the usual approximation of the official leave-one-out metric).
VQA_SCORE_PER_ANNOTATOR = 0.3


class AnswerVocabulary:
    """The answers a VQA head can give: normalised answers seen at least `min_count` times."""

    def __init__(self, answers: list[str]):
        if not answers:
            raise DataError("the answer vocabulary is empty: lower task.min_answer_count")
        self.answers = answers
        self.index = {a: i for i, a in enumerate(answers)}

    @classmethod
    def build(cls, records: list[Record], min_count: int) -> "AnswerVocabulary":
        from pixelbert.evaluation import normalize_answer
        counts = Counter(normalize_answer(a) for r in records for a in (r.answers or ()))
        kept = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
        return cls(kept)

    def targets(self, answers: list[str]) -> torch.Tensor:
        """Soft target [len(vocabulary)] from one question's ten answers."""
        from pixelbert.evaluation import normalize_answer
        target = torch.zeros(len(self.answers))
        for answer, count in Counter(normalize_answer(a) for a in answers).items():
            if answer in self.index:
                target[self.index[answer]] = min(1.0, count * VQA_SCORE_PER_ANNOTATOR)
        return target

    def save(self, path: str | Path) -> None:
        from pixelbert.fileio import write_atomic
        write_atomic(path, "".join(a + "\n" for a in self.answers))

    @classmethod
    def load(cls, path: str | Path) -> "AnswerVocabulary":
        return cls(Path(path).read_text(encoding="utf-8").splitlines())


class TaskDataset(Dataset):
    """One record per item, with its image(s) decoded and its text(s) tokenized."""

    def __init__(self, task: str, records: list[Record], tokenizer, data_cfg, *,
                 answers: AnswerVocabulary | None = None, negatives: int = 0,
                 encoded_images: bool = False, replace_bad: bool = True):
        """`encoded_images`: hand out the file bytes for a batch decoder such as DALI instead
        of decoded pixels (as `PretrainDataset` does). `replace_bad`: a record whose image
        cannot be read is counted and replaced by a random other one (training); without it
        the item is `{"bad": (reason, message)}` for the caller to count (evaluation, where
        every record answers for itself)."""
        if not records:
            raise DataError(f"{task}: no records")
        if task == "vqa" and answers is None:
            raise ValueError("VQA needs an answer vocabulary")
        self.task, self.tokenizer, self.cfg = task, tokenizer, data_cfg
        # Shared by forked loader workers, not copied (packed.py).
        self.records = records if isinstance(records, PackedList) else PackedList(records)
        self.answers, self.negatives, self.encoded_images = answers, negatives, encoded_images
        self.replace_bad = replace_bad
        if task == "retrieval":
            self.images = sorted({r.image for r in records})
            self.image_ids = {path: i for i, path in enumerate(self.images)}  # the same on every rank
            if len(self.images) < 2:
                raise DataError("retrieval needs texts of at least two images")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        rng = np.random.default_rng(seed)
        if self.replace_bad:
            record, images, skips = read_first_good(
                lambda i: self._read_images(self.records[i]), index, rng, len(self.records))
        else:
            try:
                record, images, skips = index, self._read_images(self.records[index]), []
            except BadSample as bad:
                return {"bad": (bad.reason, str(bad))}
        record = self.records[record]
        item: dict[str, Any] = {"images": images, "skips": skips, "attempts": len(skips) + 1}
        encode = lambda text: torch.as_tensor(self.tokenizer.encode(text, self.cfg.max_text_len))  # noqa: E731
        if self.task == "vqa":
            item.update(texts=[encode(record.text)], question_id=record.question_id,
                        target=self.answers.targets(record.answers) if record.answers is not None else None)
        elif self.task == "nlvr2":
            item.update(texts=[encode(record.text)] * 2, label=int(bool(record.label)), identifier=record.identifier)
        else:
            negatives = self._negatives(record, rng)
            item.update(texts=[encode(r.text) for r in [record, *negatives]],
                        text_images=[self.image_ids[r.image] for r in [record, *negatives]])
        return item

    def _read_images(self, record: Record) -> list[tuple[str, torch.Tensor | np.ndarray]]:
        paths = list(record.images) if record.images else [record.image]
        if not record.text.strip():  # training drops these up front; evaluation meets them here
            raise BadSample("empty_text", paths[0])
        if self.encoded_images:
            return [(p, load_encoded(p, self.cfg.image_shorter, self.cfg.image_longer)) for p in paths]
        return [(p, load_image(p, self.cfg.image_shorter, self.cfg.image_longer, self.cfg.pixel_norm())) for p in paths]

    def _negatives(self, record: Record, rng: np.random.Generator) -> list[Record]:
        """`negatives` records of other images than `record`'s."""
        found = []
        while len(found) < self.negatives:  # rejection: another image's text, cheap to find
            other = self.records[int(rng.integers(len(self.records)))]
            if other.image != record.image:
                found.append(other)
        return found


def collate_task(items: list[dict[str, Any]], pad_id: int, pad_multiple: int) -> dict[str, Any]:
    """Items -> a batch: each distinct image once (`images`, `image_sizes`, `image_keys`; or,
    for items of encoded bytes, `encoded`, the list for the batch decoder), the pairs
    (`pair_image`, `pair_item`, `input_ids`, `attention_mask`, `token_type_ids`) item by item,
    and the task's targets: `vqa_targets` [B, answers] and `question_ids`; `nlvr2_labels` [B] (pairs
    2b and 2b+1 are item b's two images); for retrieval item b's pairs are b*(1+neg) ... (the
    first one the positive), `text_image` [N] holds the dataset-wide id of the image each of
    those texts was written for and `image_ids` [K] that of each batch image. Bookkeeping:
    `skips`, `attempts`."""
    keys: dict[str, int] = {}
    pixels: list[torch.Tensor] = []
    image_ids: dict[int, int] = {}  # retrieval: batch image -> dataset-wide image id
    pair_image, pair_item, texts = [], [], []
    for index, item in enumerate(items):
        item_images = []
        for key, image in item["images"]:
            if key not in keys:
                keys[key] = len(pixels)
                pixels.append(image)
            item_images.append(keys[key])
        if "text_images" in item:
            image_ids[item_images[0]] = item["text_images"][0]  # the positive's image is the item's
        if len(item_images) == 1:
            item_images = item_images * len(item["texts"])  # VQA, retrieval: one image, all texts
        pair_image.extend(item_images)
        pair_item.extend([index] * len(item["texts"]))
        texts.extend(item["texts"])
    length = max(len(t) for t in texts)
    input_ids = torch.full((len(texts), length), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros_like(input_ids)
    for n, ids in enumerate(texts):
        input_ids[n, :len(ids)] = ids
        attention_mask[n, :len(ids)] = 1
    batch: dict[str, Any] = {
        "pair_image": torch.tensor(pair_image), "pair_item": torch.tensor(pair_item),
        "input_ids": input_ids, "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "image_keys": list(keys), "skips": [s for it in items for s in it["skips"]],
        "attempts": sum(it["attempts"] for it in items),
    }
    if isinstance(pixels[0], np.ndarray):
        batch["encoded"] = pixels
    else:
        batch["images"], batch["image_sizes"] = pad_images(pixels, pad_multiple)
    if "target" in items[0]:
        batch["question_ids"] = [it["question_id"] for it in items]
        if items[0]["target"] is not None:
            batch["vqa_targets"] = torch.stack([it["target"] for it in items])
    if "label" in items[0]:
        batch["nlvr2_labels"] = torch.tensor([it["label"] for it in items])
        batch["identifiers"] = [it["identifier"] for it in items]
    if "text_images" in items[0]:  # retrieval: dataset-wide ids of each text's image and of each batch image
        batch["text_image"] = torch.tensor([image for it in items for image in it["text_images"]])
        batch["image_ids"] = torch.tensor([image_ids[i] for i in range(len(pixels))])
    return batch
