"""Pre-training examples (MLM + ITM), grouped by image, and their batching.

An item is one image with up to `data.captions_per_image` of its captions: the CNN runs once
per image and every caption becomes an (image, caption) pair with its own mask and pixel
sample. ITM negatives are made in the batch: a pair keeps its caption and takes another
in-batch image. Every random choice of an item comes from the seed that travels with its
index, and every choice of a batch from its items' seeds, so an item, and a batch of items,
is the same whichever process, worker or resume point builds it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import BadSample, DataError
from .formats import Record
from .images import load_encoded, load_image, pad_images
from .masking import IGNORE_INDEX, mask_tokens
from .tokenizer import TextTokenizer
from .packed import PackedList
from .skips import TooManyBadRecords

# A bad image is replaced by a random other one; this many bad draws in a row means the
# data set itself is broken, which no amount of skipping fixes.
MAX_REPLACEMENTS = 16


@dataclass
class ImageGroup:
    """One image and the texts that describe it."""
    image: str
    texts: list[str]
    source: int = 0
    size: Optional[tuple[int, int]] = None  # (height, width) when the annotations give it


@dataclass
class GroupedRecords:
    groups: list[ImageGroup]
    empty_texts: list[str] = field(default_factory=list)  # where each dropped empty text was

    def empty_text_skips(self) -> list[tuple[str, str]]:
        """An ("empty_text", message) skip for each dropped empty text."""
        return [("empty_text", f"empty text: {where}") for where in self.empty_texts]

    @property
    def aspect_ratios(self) -> np.ndarray:
        """height / width of each group's image; 1.0 where the annotations give no size."""
        return np.array([g.size[0] / g.size[1] if g.size else 1.0 for g in self.groups])


def group_by_image(sources: list[list[Record]]) -> GroupedRecords:
    """Records of every source -> one group per (source, image file), in first-seen order.

    Empty or whitespace-only texts are dropped here, once, and listed for the skip counts.
    """
    groups: list[ImageGroup] = []
    empty: list[str] = []
    for source, records in enumerate(sources):
        by_image: dict[str, ImageGroup] = {}
        for record in records:
            group = by_image.get(record.image)
            if group is None:
                group = by_image[record.image] = ImageGroup(record.image, [], source, record.size)
                groups.append(group)
            if record.text.strip():
                group.texts.append(record.text)
            else:
                empty.append(f"{record.image} (image_id {record.image_id})")
    kept = [g for g in groups if g.texts]
    return GroupedRecords(kept, empty)


def read_first_good(read: Callable[[int], Any], index: int, rng: np.random.Generator,
                    size: int) -> tuple[int, Any, list[tuple[str, str]]]:
    """`read(index)`, or, while it raises BadSample, `read` of random other indices:
    (the index read, what it gave, the (reason, message) of every bad one met on the way)."""
    skips: list[tuple[str, str]] = []
    for _ in range(MAX_REPLACEMENTS):
        try:
            return index, read(index), skips
        except BadSample as bad:
            skips.append((bad.reason, str(bad)))
            index = int(rng.integers(size))
    raise TooManyBadRecords(f"{MAX_REPLACEMENTS} bad images in a row, the last: {skips[-1][1]}. "
                       "Check the data sources' image folders.")


class PretrainDataset(Dataset):
    """Items keyed by `(index, sample_seed)`: image group `index` with up to
    `captions_per_image` of its captions, each masked for MLM, with a per-pair seed for the
    ITM draw and one for the pixel sample. A bad image is counted and replaced."""

    def __init__(self, groups: Sequence[ImageGroup], tokenizer: TextTokenizer, data_cfg,
                 *, encoded_images: bool = False):
        """`encoded_images`: hand out the file bytes (`"encoded"`) for a batch decoder such as
        DALI instead of decoding here (`"image"`)."""
        if not groups:
            raise DataError("PretrainDataset needs at least one image with a caption")
        if data_cfg.itm_negative_probability > 0 and len(groups) < 2:
            raise DataError("ITM negatives need at least two different images")
        # One byte buffer, not Python objects: forked loader workers then share it instead of
        # copying every page they read (see packed.py).
        self.groups = groups if isinstance(groups, PackedList) else PackedList(groups)
        self.tokenizer = tokenizer
        self.cfg = data_cfg
        self.encoded_images = encoded_images

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        rng = np.random.default_rng(seed)
        index, image, skips = read_first_good(lambda i: self._read_image(self.groups[i].image),
                                              index, rng, len(self.groups))
        group = self.groups[index]
        count = min(self.cfg.captions_per_image, len(group.texts))
        chosen = rng.choice(len(group.texts), size=count, replace=False)
        input_ids, mlm_labels = [], []
        for t in sorted(chosen.tolist()):
            ids = self.tokenizer.encode(group.texts[t], self.cfg.max_text_len)
            masked, labels = mask_tokens(ids, rng, self.tokenizer, self.cfg.mlm_probability)
            input_ids.append(torch.as_tensor(masked))
            mlm_labels.append(torch.as_tensor(labels))
        return {
            ("encoded" if self.encoded_images else "image"): image,
            "image_key": group.image,
            "input_ids": input_ids,
            "mlm_labels": mlm_labels,
            "pair_seeds": rng.integers(2**31, size=(count, 2)).tolist(),  # (ITM draw, pixel sample)
            "skips": skips,
            "attempts": len(skips) + 1,
        }

    def _read_image(self, path: str):
        if self.encoded_images:
            return load_encoded(path, self.cfg.image_shorter, self.cfg.image_longer)
        return load_image(path, self.cfg.image_shorter, self.cfg.image_longer, self.cfg.pixel_norm())


def collate(items: list[dict[str, Any]], pad_id: int, pad_multiple: int,
            itm_negative_probability: float = 0.5) -> dict[str, Any]:
    """Items -> the pre-training batch (bind the keyword values with functools.partial, as
    `sampler.build_pretrain_loader` does, to get a picklable DataLoader collate_fn).

    Images (K of them): images float32 [K, 3, H, W] (H, W multiples of pad_multiple,
    zero-padded bottom/right) and image_sizes int64 [K, 2] (valid h, w) — or, for items of
    encoded bytes, `encoded` (a list of K uint8 arrays) for the batch decoder to turn into
    those two. Pairs (N of them, item by item): pair_image int64 [N] (the image of each
    pair), input_ids / attention_mask / token_type_ids / mlm_labels int64 [N, L] (L the
    longest text; padding: pad_id / 0 / 0 / -100), itm_labels int64 [N] (1 matched),
    sample_seeds int64 [N] (pixel-sampling seeds). A pair drawn as a negative takes another
    in-batch image (one whose file differs) and loses its MLM targets; with no such image in
    the batch it stays matched. Bookkeeping: `image_keys` (the image files), `skips`
    (reason, message) and `attempts`.
    """
    pairs = [(i, ids, labels, seeds) for i, it in enumerate(items)
             for ids, labels, seeds in zip(it["input_ids"], it["mlm_labels"], it["pair_seeds"])]
    length = max(len(ids) for _, ids, _, _ in pairs)
    n = len(pairs)
    input_ids = torch.full((n, length), pad_id, dtype=torch.int64)
    mlm_labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((n, length), dtype=torch.int64)
    pair_image = torch.empty(n, dtype=torch.int64)
    itm_labels = torch.empty(n, dtype=torch.int64)
    sample_seeds = torch.empty(n, dtype=torch.int64)
    keys = [it["image_key"] for it in items]
    other_images = [[j for j, key in enumerate(keys) if key != own] for own in keys]
    for p, (i, ids, labels, (itm_seed, pixel_seed)) in enumerate(pairs):
        others = other_images[i]
        rng = np.random.default_rng(itm_seed)
        negative = bool(others) and rng.random() < itm_negative_probability
        pair_image[p] = others[int(rng.integers(len(others)))] if negative else i
        itm_labels[p] = 0 if negative else 1
        input_ids[p, :len(ids)] = ids
        attention_mask[p, :len(ids)] = 1
        if not negative:  # the caption does not describe a negative's image: nothing to predict
            mlm_labels[p, :len(ids)] = labels
        sample_seeds[p] = pixel_seed
    batch: dict[str, Any] = {
        "pair_image": pair_image,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "mlm_labels": mlm_labels,
        "itm_labels": itm_labels,
        "sample_seeds": sample_seeds,
        "image_keys": keys,
        "skips": [s for it in items for s in it["skips"]],
        "attempts": sum(it["attempts"] for it in items),
    }
    if "encoded" in items[0]:
        batch["encoded"] = [it["encoded"] for it in items]
    else:
        batch["images"], batch["image_sizes"] = pad_images([it["image"] for it in items], pad_multiple)
    return batch


# Batch entries with one row per pair, and (task batches) one row per item.
PAIR_ROWS = ("input_ids", "attention_mask", "token_type_ids", "mlm_labels", "itm_labels", "sample_seeds", "text_image")
ITEM_ROWS = ("vqa_targets", "question_ids", "nlvr2_labels", "identifiers")


def drop_images(batch: dict[str, Any], keep: torch.Tensor) -> dict[str, Any]:
    """The batch without the images where `keep` [K] is False and without every pair that
    uses them (a batch decoder found them undecodable). Image tensors must already be gone.

    A task batch (it has `pair_item`, the item of each pair) loses whole items: NLVR2's two
    images and a retrieval item's negatives only make sense together. An image only a dropped
    item used stays in the batch, unused: rare, and cheaper than cutting the decoded tensor."""
    pairs = keep[batch["pair_image"]]
    out = dict(batch, image_keys=[k for k, kept in zip(batch["image_keys"], keep.tolist()) if kept])
    if "pair_item" in batch:
        items = torch.ones(int(batch["pair_item"].max()) + 1, dtype=torch.bool)
        items[batch["pair_item"][~pairs]] = False
        pairs = items[batch["pair_item"]]
        out["pair_item"] = (torch.cumsum(items, 0) - 1)[batch["pair_item"][pairs]]
        for key in ITEM_ROWS:
            if key in batch:
                value = batch[key]
                out[key] = value[items] if torch.is_tensor(value) else \
                    [v for v, kept in zip(value, items.tolist()) if kept]
    for key in PAIR_ROWS:
        if key in batch:
            out[key] = batch[key][pairs]
    out["pair_image"] = (torch.cumsum(keep, 0) - 1)[batch["pair_image"][pairs]]
    if "image_ids" in batch:
        out["image_ids"] = batch["image_ids"][keep]
    return out


def padded_fraction(image_sizes: torch.Tensor, height: int, width: int) -> float:
    """Share of the padded image batch that is padding."""
    valid = float((image_sizes[:, 0] * image_sizes[:, 1]).sum())
    return 1.0 - valid / (len(image_sizes) * height * width)
