"""Argument checks of the fused ops, shared by every backend (pixelbert.ops runs them once).

The shape, dtype and device checks are cheap and always on. The checks that read index
values (range, uniqueness) need a device sync, so they run only in debug mode
(`PIXELBERT_DEBUG=1`): without them a bad index is undefined behaviour in a fast backend.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

INDEX_DTYPES = (torch.int32, torch.int64)
# What the fast backends compute in (accumulating in fp32); the reference takes any float.
FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def debug_mode() -> bool:
    return os.environ.get("PIXELBERT_DEBUG", "0") not in ("", "0")


def _fail(op: str, message: str) -> None:
    raise ValueError(f"{op}: {message}")


def _check_index_tensor(op: str, name: str, index: torch.Tensor, device: torch.device) -> None:
    if index.dtype not in INDEX_DTYPES:
        _fail(op, f"{name} must be int32 or int64, got {index.dtype}")
    if index.device != device:
        _fail(op, f"{name} is on {index.device}, expected {device}")


def _check_unique_in_range(op: str, name: str, index: torch.Tensor, limit: int) -> None:
    if index.numel() == 0:
        return
    low, high = int(index.min()), int(index.max())
    if low < 0 or high >= limit:
        _fail(op, f"{name} holds values in [{low}, {high}], outside [0, {limit})")
    if torch.unique(index).numel() != index.numel():
        _fail(op, f"{name} holds duplicate values")


def check_out(op: str, rows: int, dim: int, dtype: torch.dtype, device: torch.device,
              out: Optional[torch.Tensor], out_index: Optional[torch.Tensor]) -> None:
    """`out` [M, dim] with unit column stride, and out_index [rows] of unique rows of `out`."""
    if (out is None) != (out_index is None):
        _fail(op, "out and out_index go together")
    if out is None:
        return
    if out.dim() != 2 or out.shape[1] != dim:
        _fail(op, f"out must be [M, {dim}], got {tuple(out.shape)}")
    if out.dtype != dtype or out.device != device:
        _fail(op, f"out is {out.dtype} on {out.device}, expected {dtype} on {device}")
    if out.stride(1) != 1:
        _fail(op, "out must have unit stride along its last dimension")
    _check_index_tensor(op, "out_index", out_index, device)
    if out_index.shape != (rows,):
        _fail(op, f"out_index must be [{rows}], got {tuple(out_index.shape)}")
    if debug_mode():
        _check_unique_in_range(op, "out_index", out_index, out.shape[0])


def check_pool_sample(feat: torch.Tensor, index: torch.Tensor, type_embedding: Optional[torch.Tensor],
                      out: Optional[torch.Tensor], out_index: Optional[torch.Tensor]) -> None:
    op = "pool_sample"
    if feat.dim() != 4:
        _fail(op, f"feat must be [B, C, H, W], got {tuple(feat.shape)}")
    if not feat.is_floating_point():
        _fail(op, f"feat must be a floating-point tensor, got {feat.dtype}")
    batch, channels, height, width = feat.shape
    if height < 2 or width < 2:
        _fail(op, f"feat of {height}x{width} has no 2x2 window")
    _check_index_tensor(op, "index", index, feat.device)
    if index.dim() != 1:
        _fail(op, f"index must be 1-D, got {tuple(index.shape)}")
    if type_embedding is not None and (type_embedding.shape != (channels,)
                                       or type_embedding.device != feat.device):
        _fail(op, f"type_embedding must be [{channels}] on {feat.device}, got "
                  f"{tuple(type_embedding.shape)} on {type_embedding.device}")
    check_out(op, index.shape[0], channels, feat.dtype, feat.device, out, out_index)
    if debug_mode():
        _check_unique_in_range(op, "index", index, batch * (height // 2) * (width // 2))


def check_embed_layernorm(input_ids: torch.Tensor, position_ids: torch.Tensor,
                          token_type_ids: Optional[torch.Tensor], word: torch.Tensor,
                          position: torch.Tensor, token_type: Optional[torch.Tensor],
                          weight: torch.Tensor, bias: torch.Tensor,
                          out: Optional[torch.Tensor], out_index: Optional[torch.Tensor]) -> None:
    op = "embed_layernorm"
    if word.dim() != 2 or not word.is_floating_point():
        _fail(op, f"word_embeddings must be a float [V, D] table, got {word.dtype} {tuple(word.shape)}")
    dim, device = word.shape[1], word.device
    if token_type is not None and token_type_ids is None:
        _fail(op, "token_type_embeddings given without token_type_ids")
    tables = {"position_embeddings": position, "token_type_embeddings": token_type}
    for name, table in tables.items():
        if table is not None and (table.dim() != 2 or table.shape[1] != dim or table.device != device):
            _fail(op, f"{name} must be [*, {dim}] on {device}, got {tuple(table.shape)} on {table.device}")
    for name, vec in {"weight": weight, "bias": bias}.items():
        if vec.shape != (dim,) or vec.device != device:
            _fail(op, f"{name} must be [{dim}] on {device}, got {tuple(vec.shape)} on {vec.device}")
    ids = {"input_ids": input_ids, "position_ids": position_ids}
    if token_type is not None:
        ids["token_type_ids"] = token_type_ids
    for name, tensor in ids.items():
        _check_index_tensor(op, name, tensor, device)
        if tensor.shape != input_ids.shape:
            _fail(op, f"{name} has shape {tuple(tensor.shape)}, input_ids {tuple(input_ids.shape)}")
    check_out(op, input_ids.numel(), dim, word.dtype, device, out, out_index)
    if debug_mode():
        limits = {"input_ids": word.shape[0], "position_ids": position.shape[0]}
        if token_type is not None:
            limits["token_type_ids"] = token_type.shape[0]
        for name, limit in limits.items():
            values = ids[name]
            if values.numel() and (int(values.min()) < 0 or int(values.max()) >= limit):
                _fail(op, f"{name} holds values outside [0, {limit})")
