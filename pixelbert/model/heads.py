"""Output heads on the encoder: pooler, MLM (tied to the word embeddings) and ITM."""
from __future__ import annotations

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
