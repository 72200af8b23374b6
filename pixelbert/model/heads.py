"""Output heads on the encoder: pooler, MLM (tied to the word embeddings), ITM and the optional
image-text contrastive projections."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pixelbert.config import ModelConfig
from pixelbert.model.encoder import ACTIVATIONS


class Pooler(nn.Module):
    """tanh(dense([CLS])), as BERT's pooler."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.dense(cls_hidden))


class PredictionTransform(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(self.act(self.dense(x)))


class MLMPrediction(nn.Module):
    """BERT's `cls.predictions`: transform, then a decoder tied to the word embedding.

    The decoder weight is the word-embedding Parameter, passed in at call time rather than
    held here: one owner keeps ZeRO-3's partitioning and checkpoint loading simple (a Parameter
    shared by two modules broke ZeRO-3 resume), and ZeRO-3 gathers it on access.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        return F.linear(self.transform(hidden), decoder_weight, self.bias)


class MLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.predictions = MLMPrediction(cfg)

    def forward(self, hidden: torch.Tensor, decoder_weight: torch.Tensor) -> torch.Tensor:
        return self.predictions(hidden, decoder_weight)


class ContrastiveHead(nn.Module):
    """Image-text contrastive (ITC) projections, as ALBEF's: the [CLS] state of a text-only
    pass and of an image-only pass, each projected to `dim` and scaled to unit length. Their
    dot product is the cheap similarity a retrieval shortlist ranks by; `scale` (a learned
    inverse temperature, from 1/0.07 as in CLIP, at most 100) sharpens it for the loss."""

    MAX_SCALE = 100.0

    def __init__(self, hidden_size: int, dim: int):
        super().__init__()
        self.text_proj = nn.Linear(hidden_size, dim)
        self.image_proj = nn.Linear(hidden_size, dim)
        self.log_scale = nn.Parameter(torch.tensor([math.log(1 / 0.07)]))  # 1-d: ZeRO-3 partitions it like a bias

    def text(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(cls_hidden).float(), dim=-1)

    def image(self, cls_hidden: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(cls_hidden).float(), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.log_scale.float().clamp(max=math.log(self.MAX_SCALE)).exp()[0]
