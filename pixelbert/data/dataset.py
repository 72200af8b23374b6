"""Pre-training examples (MLM + ITM) and their batching.

Every random choice of an item comes from the seed that travels with its index, so an item,
and a batch of items, is the same whichever process, worker or resume point builds it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .formats import Record
from .images import load_image, pad_images
from .masking import IGNORE_INDEX, mask_tokens
from .tokenizer import TextTokenizer


class PretrainDataset(Dataset):
    """Items keyed by `(index, sample_seed)`: an image with its caption (ITM label 1, MLM-masked)
    or, with probability `data.itm_negative_probability`, with another image's caption
    (ITM label 0, masked alike, no MLM targets)."""

    def __init__(self, records: list[Record], tokenizer: TextTokenizer, data_cfg):
        if not records:
            raise ValueError("PretrainDataset needs at least one record")
        if data_cfg.itm_negative_probability > 0 and len({r.image_id for r in records}) < 2:
            raise ValueError("ITM negatives need captions of at least two different images")
        self.records = records
        self.tokenizer = tokenizer
        self.cfg = data_cfg

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, seed = key
        rng = np.random.default_rng(seed)
        record = self.records[index]
        matched = bool(rng.random() >= self.cfg.itm_negative_probability)
        text = record.text if matched else self._other_caption(record.image_id, rng)
        ids = self.tokenizer.encode(text, self.cfg.max_text_len)
        # Every caption is corrupted alike, so [MASK] tokens cannot tell the ITM head which
        # pairs are negatives; only matched pairs keep MLM targets.
        ids, labels = mask_tokens(ids, rng, self.tokenizer, self.cfg.mlm_probability)
        if not matched:
            labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        return {
            "image": load_image(record.image, self.cfg.image_shorter, self.cfg.image_longer),
            "input_ids": torch.as_tensor(np.asarray(ids, dtype=np.int64)),
            "mlm_labels": torch.as_tensor(labels),
            "itm_label": int(matched),
            "pixel_seed": int(rng.integers(2**31)),
        }

    def _other_caption(self, image_id: int, rng: np.random.Generator) -> str:
        # Rejection sampling: cheap, since a random record rarely shares the image.
        while True:
            other = self.records[int(rng.integers(len(self.records)))]
            if other.image_id != image_id:
                return other.text


def collate(items: list[dict[str, Any]], pad_id: int, pad_multiple: int) -> dict[str, torch.Tensor]:
    """Items -> the pre-training batch (bind pad_id and pad_multiple with functools.partial,
    as `sampler.build_pretrain_loader` does, to get a picklable DataLoader collate_fn).

    images float32 [B, 3, H, W] (H, W multiples of pad_multiple, zero-padded bottom/right),
    image_sizes int64 [B, 2] (valid h, w), input_ids / attention_mask / token_type_ids /
    mlm_labels int64 [B, L] (L the longest text; padding: pad_id / 0 / 0 / -100),
    itm_labels int64 [B] (1 matched), sample_seeds int64 [B] (per-item pixel-sampling seeds).
    """
    images, image_sizes = pad_images([it["image"] for it in items], pad_multiple)
    length = max(len(it["input_ids"]) for it in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.int64)
    mlm_labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.int64)
    attention_mask = torch.zeros((len(items), length), dtype=torch.int64)
    for i, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[i, :n] = it["input_ids"]
        mlm_labels[i, :n] = it["mlm_labels"]
        attention_mask[i, :n] = 1
    return {
        "images": images,
        "image_sizes": image_sizes,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "token_type_ids": torch.zeros_like(input_ids),
        "mlm_labels": mlm_labels,
        "itm_labels": torch.tensor([it["itm_label"] for it in items], dtype=torch.int64),
        "sample_seeds": torch.tensor([it["pixel_seed"] for it in items], dtype=torch.int64),
    }
