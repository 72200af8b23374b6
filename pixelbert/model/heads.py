"""Output heads on the encoder: pooler, MLM (tied to the word embeddings) and ITM."""
from __future__ import annotations

import torch
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
    """BERT's `cls.predictions`: transform, then a decoder whose weight is the word embedding."""

    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = PredictionTransform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Tied as Hugging Face ties it: one Parameter owned by both modules, so ZeRO-3 gathers
        # it for whichever module runs.
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(hidden)) + self.bias


class MLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.predictions = MLMPrediction(cfg, word_embeddings)

    def forward(self, hidden):
        return self.predictions(hidden)
