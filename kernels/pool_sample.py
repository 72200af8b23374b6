"""pool_sample in Triton: rows `index` of max_pool2d(feat, 2) (+ a type vector), in one pass.

Each sampled cell reads only its own 2x2 window: the pooled map is never materialised, and feat
is read through its four strides, so NCHW and channels-last inputs are both read in place.
The backward recomputes each window's arg-max from feat (no saved indices) and copies the row
gradient to that one element; windows of distinct cells do not overlap, so plain stores suffice.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pixelbert.reference import overwritten_rows_grad

from ._utils import flat_index, launch_device, num_warps_for, output_rows, row_offsets


@triton.jit
def _decode_cells(index_ptr, rows, row_mask, cells_per_image, pooled_w):
    """(image, top row, left column) in feat of each sampled cell's window, as int64."""
    cell = tl.load(index_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    image = cell // cells_per_image
    in_image = cell - image * cells_per_image
    pooled_row = in_image // pooled_w
    pooled_col = in_image - pooled_row * pooled_w
    return image, 2 * pooled_row, 2 * pooled_col


@triton.jit
def _window_max(feat_ptr, corner, stride_h, stride_w, mask):
    """Max (fp32) of each 2x2 window at `corner`, and its position 0..3 in the scan order
    (0,0), (0,1), (1,0), (1,1).

    max_pool2d's rule (CPU and CUDA): a value replaces the current maximum when it is strictly
    greater or NaN, so the first of tied maxima wins and a NaN (the last one) always wins.
    """
    best = tl.load(feat_ptr + corner, mask=mask, other=0.0).to(tl.float32)
    best_pos = tl.zeros(best.shape, dtype=tl.int32)
    for pos in tl.static_range(1, 4):
        value = tl.load(feat_ptr + corner + (pos // 2) * stride_h + (pos % 2) * stride_w,
                        mask=mask, other=0.0).to(tl.float32)
        take = (value > best) | (value != value)
        best = tl.where(take, value, best)
        best_pos = tl.where(take, pos, best_pos)
    return best, best_pos


@triton.jit
def _pool_sample_fwd(feat_ptr, index_ptr, type_ptr, out_ptr, out_row_ptr,
                     n_rows, channels, cells_per_image, pooled_w,
                     stride_b, stride_c, stride_h, stride_w, out_row_stride,
                     HAS_TYPE: tl.constexpr, HAS_OUT_ROW: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    # Program (i, j): sampled rows i*BLOCK_N.. and channels j*BLOCK_C..
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < n_rows
    col_mask = cols < channels
    mask = row_mask[:, None] & col_mask[None, :]

    image, top, left = _decode_cells(index_ptr, rows, row_mask, cells_per_image, pooled_w)
    corner = (image * stride_b + top * stride_h + left * stride_w)[:, None] \
        + cols.to(tl.int64)[None, :] * stride_c
    value, _ = _window_max(feat_ptr, corner, stride_h, stride_w, mask)
    if HAS_TYPE:
        value += tl.load(type_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]

    dest = row_offsets(rows, row_mask, out_row_ptr, out_row_stride, HAS_OUT_ROW)
    tl.store(out_ptr + dest[:, None] + cols[None, :], value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pool_sample_bwd(feat_ptr, index_ptr, grad_ptr, grad_row_ptr, grad_feat_ptr, type_partial_ptr,
                     n_rows, channels, cells_per_image, pooled_w,
                     stride_b, stride_c, stride_h, stride_w,
                     gfeat_stride_b, gfeat_stride_c, gfeat_stride_h, gfeat_stride_w,
                     grad_row_stride, grad_col_stride,
                     HAS_GRAD_ROW: tl.constexpr, FEAT_GRAD: tl.constexpr, TYPE_GRAD: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr):
    row_block = tl.program_id(0)
    rows = row_block * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = rows < n_rows
    col_mask = cols < channels
    mask = row_mask[:, None] & col_mask[None, :]

    src = row_offsets(rows, row_mask, grad_row_ptr, grad_row_stride, HAS_GRAD_ROW)
    grad = tl.load(grad_ptr + src[:, None] + cols.to(tl.int64)[None, :] * grad_col_stride,
                   mask=mask, other=0.0)
    if FEAT_GRAD:
        image, top, left = _decode_cells(index_ptr, rows, row_mask, cells_per_image, pooled_w)
        corner = (image * stride_b + top * stride_h + left * stride_w)[:, None] \
            + cols.to(tl.int64)[None, :] * stride_c
        _, arg = _window_max(feat_ptr, corner, stride_h, stride_w, mask)
        # The gradient is copied, not computed: it lands on the arg-max element unchanged.
        dest = (image * gfeat_stride_b)[:, None] + cols.to(tl.int64)[None, :] * gfeat_stride_c \
            + (top[:, None] + arg // 2) * gfeat_stride_h + (left[:, None] + arg % 2) * gfeat_stride_w
        tl.store(grad_feat_ptr + dest, grad.to(grad_feat_ptr.dtype.element_ty), mask=mask)
    if TYPE_GRAD:
        # This program's partial column sum; the [row blocks, C] partials are summed afterwards.
        partial = tl.sum(grad.to(tl.float32), axis=0)
        tl.store(type_partial_ptr + row_block.to(tl.int64) * channels + cols, partial, mask=col_mask)


def _blocks(n_rows: int, channels: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_C): up to 128 channels per program, ~2,048 elements per tile."""
    block_c = min(triton.next_power_of_2(channels), 128)
    block_n = max(2, min(2048 // block_c, triton.next_power_of_2(max(n_rows, 1))))
    return block_n, block_c


def _geometry(feat: torch.Tensor) -> tuple[int, int]:
    """(cells per image, pooled width) of the 2x2/stride-2 pooled grid (odd edges dropped)."""
    height, width = feat.shape[2], feat.shape[3]
    return (height // 2) * (width // 2), width // 2


class _PoolSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat, index, type_embedding, out, out_index):
        index = flat_index(index)
        n_rows, channels = index.numel(), feat.shape[1]
        rows, row_map = output_rows(n_rows, channels, feat.dtype, feat.device, out, out_index)
        type_arg = feat if type_embedding is None else type_embedding.contiguous()  # feat: unused
        cells_per_image, pooled_w = _geometry(feat)
        block_n, block_c = _blocks(n_rows, channels)
        if n_rows:
            grid = (triton.cdiv(n_rows, block_n), triton.cdiv(channels, block_c))
            with launch_device(feat):
                _pool_sample_fwd[grid](
                    feat, index, type_arg,
                    rows, row_map if row_map is not None else index,
                    n_rows, channels, cells_per_image, pooled_w, *feat.stride(), rows.stride(0),
                    HAS_TYPE=type_embedding is not None, HAS_OUT_ROW=row_map is not None,
                    BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps_for(block_n * block_c))
        ctx.save_for_backward(feat, index, row_map)
        ctx.type_dtype = None if type_embedding is None else type_embedding.dtype
        if out is not None:
            ctx.mark_dirty(out)  # an in-place write: the overwritten rows of `out` get no gradient
        return rows

    @staticmethod
    def backward(ctx, grad):
        feat, index, row_map = ctx.saved_tensors
        need_feat, _, need_type, need_out, _ = ctx.needs_input_grad
        n_rows, channels = index.numel(), feat.shape[1]
        block_n, block_c = _blocks(n_rows, channels)
        row_blocks = triton.cdiv(n_rows, block_n)
        grad_feat = torch.zeros_like(feat) if need_feat else None  # keeps feat's memory format
        type_partial = (torch.zeros(row_blocks, channels, dtype=torch.float32, device=grad.device)
                        if need_type else None)
        if n_rows and (need_feat or need_type):
            cells_per_image, pooled_w = _geometry(feat)
            with launch_device(feat):
                _pool_sample_bwd[(row_blocks, triton.cdiv(channels, block_c))](
                    feat, index, grad, row_map if row_map is not None else index,
                    grad_feat if need_feat else feat, type_partial if need_type else feat,
                    n_rows, channels, cells_per_image, pooled_w, *feat.stride(),
                    *(grad_feat if need_feat else feat).stride(), *grad.stride(),
                    HAS_GRAD_ROW=row_map is not None, FEAT_GRAD=need_feat, TYPE_GRAD=need_type,
                    BLOCK_N=block_n, BLOCK_C=block_c, num_warps=num_warps_for(block_n * block_c))
        grad_type = type_partial.sum(0).to(ctx.type_dtype) if need_type else None
        grad_out = overwritten_rows_grad(grad, row_map) if need_out else None
        return grad_feat, None, grad_type, grad_out, None


def pool_sample(feat: torch.Tensor, index: torch.Tensor,
                type_embedding: Optional[torch.Tensor] = None, *,
                out: Optional[torch.Tensor] = None,
                out_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows `index` of max_pool2d(feat, 2) flattened to [B*Hp*Wp, C] (+ type_embedding [C]).

    Returns [N, C] in feat's dtype, or writes row i to out[out_index[i]] and returns `out`.
    Arguments are checked by pixelbert.ops (see pixelbert.reference.pool_sample).
    """
    return _PoolSample.apply(feat, index, type_embedding, out, out_index)
