"""Fine-tuning models: Pixel-BERT with a VQA, NLVR2 or retrieval head.

Each is a PixelBert (same parameter names, so a pre-training checkpoint loads into it) without
the pre-training heads it does not use, plus its own head. No pixel sampling: fine-tuning
keeps every valid pixel, as the paper does.
"""
from __future__ import annotations

import dataclasses
import torch
import torch.nn.functional as F
from torch import nn

from pixelbert.config import ModelConfig
from pixelbert.model.contrastive import ContrastiveHead, contrastive_loss
from pixelbert.model.pixelbert import PixelBert

PAIR_KEYS = ("input_ids", "attention_mask", "token_type_ids", "pair_image", "sample_seeds")


def mlp_head(in_features: int, hidden: int, out_features: int, eps: float) -> nn.Sequential:
    """Linear -> GELU -> LayerNorm -> Linear: the 2-layer MLP of the task heads."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps),
                         nn.Linear(hidden, out_features))


def select_pairs(batch: dict, index: torch.Tensor) -> dict:
    """The batch restricted to the pairs `index` (its images unchanged)."""
    return {k: (v[index] if k in PAIR_KEYS and torch.is_tensor(v) else v) for k, v in batch.items()}


class PixelBertForVQA(PixelBert):
    """[CLS] -> pooler -> 2-layer MLP -> one logit per answer; BCE against soft targets."""

    def __init__(self, cfg: ModelConfig, num_answers: int):
        super().__init__(cfg)
        del self.cls, self.itm_head
        self.vqa_head = mlp_head(cfg.hidden_size, 2 * cfg.hidden_size, num_answers, cfg.layer_norm_eps)
        self._init_transformer_weights(self.vqa_head)
        self._init_heads(self.vqa_head)

    def logits(self, batch: dict) -> torch.Tensor:
        return self.vqa_head(self.pooler(self.encode(batch, sample_pixels=False).cls_rows())).float()

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        logits = self.logits(batch)
        targets = batch["vqa_targets"].float()
        # Summed over answers (x num_answers), as UNITER and ViLT do: per-answer means are tiny.
        loss = F.binary_cross_entropy_with_logits(logits, targets) * targets.shape[1]
        score = targets.gather(1, logits.argmax(dim=1, keepdim=True)).sum()
        return {"loss": loss, "vqa_loss": loss.detach(), "vqa_correct": score.detach(),
                "vqa_count": torch.tensor(len(targets), device=logits.device)}


class PixelBertForNLVR2(PixelBert):
    """The statement with each image: two sequences, their [CLS] rows concatenated -> MLP -> 2."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        del self.cls, self.itm_head
        self.nlvr2_head = mlp_head(2 * cfg.hidden_size, 2 * cfg.hidden_size, 2, cfg.layer_norm_eps)
        self._init_transformer_weights(self.nlvr2_head)
        self._init_heads(self.nlvr2_head)

    def logits(self, batch: dict) -> torch.Tensor:
        cls = self.pooler(self.encode(batch, sample_pixels=False).cls_rows())
        return self.nlvr2_head(cls.reshape(-1, 2 * cls.shape[-1])).float()  # pairs 2b, 2b+1

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        logits = self.logits(batch)
        labels = batch["nlvr2_labels"]
        loss = F.cross_entropy(logits, labels)
        return {"loss": loss, "nlvr2_loss": loss.detach(),
                "nlvr2_correct": (logits.argmax(-1) == labels).sum().detach(),
                "nlvr2_count": torch.tensor(len(labels), device=logits.device)}


class PixelBertForRetrieval(PixelBert):
    """Image-text matching score from the ITM head (pre-trained, kept). Training: each item is
    one image with its positive text and `negatives` other texts; all are scored without
    gradient, and the loss (ITM cross-entropy) takes the positive and the `hard_negatives`
    highest-scoring negatives, as the paper does.

    With `contrastive_weight` > 0 (not in the paper; ALBEF's ITC) the model also learns a cheap
    similarity for shortlisting at evaluation: a ContrastiveHead on text-only and image-only
    passes of the same encoder, trained with an in-batch contrastive loss added at that weight."""

    def __init__(self, cfg: ModelConfig, negatives: int, hard_negatives: int,
                 contrastive_weight: float = 0.0, contrastive_dim: int = 256):
        super().__init__(cfg)
        del self.cls
        self.negatives, self.hard_negatives = negatives, hard_negatives
        self.contrastive_weight = contrastive_weight
        self.contrastive = ContrastiveHead(cfg.hidden_size, contrastive_dim) if contrastive_weight > 0 else None
        if self.contrastive is not None:
            for proj in (self.contrastive.text_proj, self.contrastive.image_proj):
                self._init_transformer_weights(proj)
                self._init_heads(proj)

    def pair_logits(self, batch: dict, feat: torch.Tensor | None = None) -> torch.Tensor:
        """ITM logits [N, 2] of every pair of the batch."""
        return self.itm_logits(self.encode(batch, sample_pixels=False, feat=feat))

    def scores(self, batch: dict, feat: torch.Tensor | None = None) -> torch.Tensor:
        """Matching score of every pair of the batch (match_scores)."""
        return self.match_scores(self.encode(batch, sample_pixels=False, feat=feat))

    # ---- the contrastive similarity (contrastive_weight > 0) -------------------------------
    def text_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Unit vectors [T, dim] of texts alone: the [CLS] state of a text-only encoder pass."""
        return self._head().text(self.encode_text(input_ids, attention_mask)[:, 0])

    def image_vectors(self, images: torch.Tensor, image_sizes: torch.Tensor, feat: torch.Tensor,
                      cls_id: torch.Tensor) -> torch.Tensor:
        """Unit vectors [I, dim] of images alone: the [CLS] state of the stream `[CLS] pixels`
        (every valid pixel, no text). `cls_id`: a [1, 1] tensor holding the [CLS] token id."""
        count = len(image_sizes)
        ids = cls_id.reshape(1, 1).expand(count, 1)
        image_only = {"images": images, "image_sizes": image_sizes, "input_ids": ids,
                      "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
                      "pair_image": torch.arange(count, device=ids.device)}
        return self._head().image(self.encode(image_only, sample_pixels=False, feat=feat).cls_rows())

    def _head(self) -> ContrastiveHead:
        if self.contrastive is None:
            raise ValueError("this retrieval model has no contrastive head: train it with task.contrastive_weight > 0")
        return self.contrastive

    def batch_contrastive_loss(self, batch: dict, feat: torch.Tensor) -> torch.Tensor:
        """The image-text contrastive loss of the batch (of the global batch on several ranks):
        its images and all of its texts, each item's first text the positive."""
        input_ids = batch["input_ids"]
        positives = torch.arange(0, len(input_ids), 1 + self.negatives, device=input_ids.device)
        text = self.text_vectors(input_ids, batch["attention_mask"])
        image = self.image_vectors(batch["images"], batch["image_sizes"], feat, input_ids[:1, :1])
        return contrastive_loss(text, image, self.contrastive.scale(), input_ids, batch["attention_mask"], positives,
                                batch["text_image"].to(input_ids.device), batch["image_ids"].to(input_ids.device))

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["images"]
        if self.cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        feat = self.pixel_embeddings.features(images)  # once, shared by every pass
        per_item = 1 + self.negatives
        items = len(batch["input_ids"]) // per_item
        with torch.no_grad():
            scores = self.scores(batch, feat.detach()).view(items, per_item)
        hardest = scores[:, 1:].topk(self.hard_negatives, dim=1).indices + 1  # negatives start at 1
        chosen = torch.cat([torch.zeros(items, 1, dtype=torch.long, device=hardest.device), hardest], 1)
        rows = (chosen + torch.arange(items, device=chosen.device)[:, None] * per_item).flatten()
        logits = self.pair_logits(select_pairs(batch, rows.to(batch["input_ids"].device)), feat)
        labels = (chosen == 0).long().flatten().to(logits.device)
        itm_loss = F.cross_entropy(logits, labels)
        out = {"itm_loss": itm_loss.detach(),
               # The positive outscored every negative of its image (rank 1 among 1 + negatives).
               "rank1_correct": (scores[:, 0] > scores[:, 1:].max(dim=1).values).sum(),
               "rank1_count": torch.tensor(items, device=logits.device)}
        loss = itm_loss
        if self.contrastive is not None:
            itc_loss = self.batch_contrastive_loss(batch, feat)
            loss = loss + self.contrastive_weight * itc_loss
            out["itc_loss"] = itc_loss.detach()
        return {"loss": loss, **out}


def build_model(cfg, num_answers: int | None = None, *, backbone_weights: bool = True) -> PixelBert:
    """The model of `cfg.train.task`; its CNN with `model.backbone_weights` loaded, or (with
    backbone_weights=False: the caller loads weights that hold the CNN) at initialisation."""
    task, model_cfg = cfg.train.task, cfg.model
    if not backbone_weights:
        model_cfg = dataclasses.replace(model_cfg, backbone_weights=None)
    if task == "pretrain":
        return PixelBert(model_cfg)
    if task == "vqa":
        return PixelBertForVQA(model_cfg, num_answers)
    if task == "nlvr2":
        return PixelBertForNLVR2(model_cfg)
    return PixelBertForRetrieval(model_cfg, cfg.task.negatives, cfg.task.hard_negatives,
                                 cfg.task.contrastive_weight, cfg.task.contrastive_dim)
