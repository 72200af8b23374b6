"""Multi-head attention cores over padded batches.

`padded_attention` takes q, k, v as [B, heads, L, head_dim] and a key padding mask [B, L]
(True = real token). Backends: `sdpa` (torch's scaled_dot_product_attention, which picks the
flash / memory-efficient / cuDNN kernels on a GPU) and `math` (an explicit softmax, the
reference). The packed-sequence (varlen) path is added beside this.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("sdpa", "math")


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor,
                     *, dropout_p: float = 0.0, backend: str = "auto") -> torch.Tensor:
    if backend in ("auto", "sdpa"):
        # Boolean mask, True = attend; broadcast over heads and queries.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :],
                                              dropout_p=dropout_p)
    if backend == "math":
        return math_attention(q, k, v, key_mask, dropout_p=dropout_p)
    raise ValueError(f"unknown attention backend {backend!r}; choose from {ATTENTION_BACKENDS} or 'auto'")


def attention_probs(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) with padded keys excluded: [B, heads, Lq, Lk]."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1)


def math_attention(q, k, v, key_mask, *, dropout_p: float = 0.0) -> torch.Tensor:
    probs = attention_probs(q, k, key_mask)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v
