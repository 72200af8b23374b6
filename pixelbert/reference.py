"""The plain-PyTorch definitions of the engine's fused ops.

These are the definition of correct: every fast backend is tested against them, and tests
and benchmarks import them from here (never from a copy).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def place_rows(rows: torch.Tensor, out: Optional[torch.Tensor],
               out_index: Optional[torch.Tensor]) -> torch.Tensor:
    """`rows` [N, D] as the result, or written to rows `out_index` of `out` [M, D] (returned).

    The out-buffer form lets the embedding ops fill a packed sequence buffer in place; autograd
    sees an in-place write, so the overwritten rows of `out` get no gradient.
    """
    if out is None:
        return rows
    return out.index_copy_(0, out_index.long(), rows.to(out.dtype))


def overwritten_rows_grad(grad: torch.Tensor, out_index: torch.Tensor) -> torch.Tensor:
    """The gradient `place_rows` passes back to `out` as it was: `grad` with the overwritten rows
    zeroed (what autograd derives for index_copy_; the fast backends return it explicitly)."""
    return grad.index_fill(0, out_index.long(), 0)


def pool_sample(feat: torch.Tensor, index: torch.Tensor,
                type_embedding: Optional[torch.Tensor] = None, *,
                out: Optional[torch.Tensor] = None, out_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows `index` of the 2x2/stride-2 max-pooled map, flattened to [B*Hp*Wp, C].

    feat [B, C, H, W] (any memory format); index [N] int, flat positions b*Hp*Wp + r*Wp + c.
    Returns [N, C] (+ type_embedding [C], broadcast to every row), or writes row i to
    out[out_index[i]] and returns `out` when an output buffer is given.
    """
    channels = feat.shape[1]
    pooled = F.max_pool2d(feat, 2).flatten(2).transpose(1, 2).reshape(-1, channels)
    rows = pooled[index.long()]
    rows = rows if type_embedding is None else rows + type_embedding
    return place_rows(rows, out, out_index)


def embed_layernorm(input_ids: torch.Tensor, position_ids: torch.Tensor,
                    token_type_ids: Optional[torch.Tensor], word_embeddings: torch.Tensor,
                    position_embeddings: torch.Tensor, token_type_embeddings: Optional[torch.Tensor],
                    weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-12, *,
                    out: Optional[torch.Tensor] = None, out_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """layer_norm(word[input_ids] + pos[position_ids] (+ type[token_type_ids])) -> [..., D].

    With an output buffer `out` [M, D], row i of the flattened result goes to out[out_index[i]]
    and `out` is returned.
    """
    summed = F.embedding(input_ids, word_embeddings) + F.embedding(position_ids, position_embeddings)
    if token_type_embeddings is not None:
        if token_type_ids is None:
            raise ValueError("embed_layernorm: token_type_embeddings given without token_type_ids")
        summed = summed + F.embedding(token_type_ids, token_type_embeddings)
    normed = F.layer_norm(summed, (summed.shape[-1],), weight, bias, eps)
    return normed if out is None else place_rows(normed.reshape(-1, normed.shape[-1]), out, out_index)


def valid_pooled_index(valid_sizes: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """Flat indices b*Hp*Wp + r*Wp + c of every valid cell, image by image, row-major.

    valid_sizes: int [B, 2], the valid (rows, cols) of each image's pooled grid.
    """
    rows = torch.arange(grid_h, device=valid_sizes.device)
    cols = torch.arange(grid_w, device=valid_sizes.device)
    inside = ((rows[None, :, None] < valid_sizes[:, 0, None, None])
              & (cols[None, None, :] < valid_sizes[:, 1, None, None]))
    return inside.flatten().nonzero().squeeze(1)
