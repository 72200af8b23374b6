"""embed_layernorm in Triton: layer_norm(word[ids] + position[pos] (+ type[tt])), fused.

Forward: each program gathers a few rows from the three tables, sums them and normalises in
fp32, stores the rows in the tables' dtype and saves mean/rstd (fp32) for the backward, which
re-gathers the rows instead of saving the [rows, D] sum.

Backward: one kernel computes dX (fp32) and per-program partial rows of dweight/dbias; the
embedding gradients are then segmented sums of dX rows by id. Ids are sorted (torch), so every
table row has exactly one writer and the result is deterministic: no atomics, which matters
because repeated ids (padding, [CLS], a handful of positions and types) are the common case.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from pixelbert.reference import overwritten_rows_grad

from ._utils import (flat_index, launch_device, num_warps_for, output_rows,
                     reduction_programs, row_offsets, unit_column_stride)

# The most rows one program of the scatter sums before its partial sum is combined with the
# other chunks of the same id: bounds the serial work of a program when one id has 90k rows.
CHUNK_ROWS = 256


@triton.jit
def _embedding_sum(word_ptr, pos_ptr, type_ptr, word_ids_ptr, pos_ids_ptr, type_ids_ptr,
                   rows, row_mask, cols, mask, word_stride, pos_stride, type_stride,
                   HAS_TYPE: tl.constexpr):
    """word[id] + position[pos] (+ type[tt]) of each row, in fp32 (0 where masked off)."""
    word_id = tl.load(word_ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    pos_id = tl.load(pos_ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    x = tl.load(word_ptr + (word_id * word_stride)[:, None] + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32) + tl.load(pos_ptr + (pos_id * pos_stride)[:, None] + cols[None, :],
                                   mask=mask, other=0.0).to(tl.float32)
    if HAS_TYPE:
        type_id = tl.load(type_ids_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        x += tl.load(type_ptr + (type_id * type_stride)[:, None] + cols[None, :],
                     mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _embed_layernorm_fwd(word_ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr,
                         weight_ptr, bias_ptr, out_ptr, out_row_ptr, mean_ptr, rstd_ptr,
                         n_rows, dim, word_stride, pos_stride, type_stride, out_row_stride, eps,
                         HAS_TYPE: tl.constexpr, HAS_OUT_ROW: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program i: rows i*BLOCK_R.., each whole (BLOCK_D >= D) so mean/variance need no second pass.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < n_rows
    col_mask = cols < dim
    mask = row_mask[:, None] & col_mask[None, :]

    x = _embedding_sum(word_ptr, pos_ptr, type_ptr, word_ids_ptr, pos_ids_ptr, type_ids_ptr,
                       rows, row_mask, cols, mask, word_stride, pos_stride, type_stride, HAS_TYPE)
    mean = tl.sum(x, axis=1) / dim
    centered = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=1) / dim + eps)
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    bias = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = centered * rstd[:, None] * weight[None, :] + bias[None, :]

    dest = row_offsets(rows, row_mask, out_row_ptr, out_row_stride, HAS_OUT_ROW)
    tl.store(out_ptr + dest[:, None] + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _embed_layernorm_bwd(word_ids_ptr, pos_ids_ptr, type_ids_ptr, word_ptr, pos_ptr, type_ptr,
                         weight_ptr, mean_ptr, rstd_ptr, grad_ptr, grad_row_ptr,
                         dx_ptr, dweight_partial_ptr, dbias_partial_ptr,
                         n_rows, dim, rows_per_program, word_stride, pos_stride, type_stride,
                         grad_row_stride, grad_col_stride,
                         HAS_TYPE: tl.constexpr, HAS_GRAD_ROW: tl.constexpr, STORE_DX: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # Program i: rows [i*rows_per_program, (i+1)*rows_per_program), BLOCK_R at a time; its
    # dweight/dbias contributions accumulate in registers and land in partial row i.
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    weight = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dweight = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for offset in range(0, rows_per_program, BLOCK_R):
        rows = program * rows_per_program + offset + tl.arange(0, BLOCK_R)
        row_mask = rows < n_rows
        mask = row_mask[:, None] & col_mask[None, :]

        x = _embedding_sum(word_ptr, pos_ptr, type_ptr, word_ids_ptr, pos_ids_ptr, type_ids_ptr,
                           rows, row_mask, cols, mask, word_stride, pos_stride, type_stride,
                           HAS_TYPE)
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        src = row_offsets(rows, row_mask, grad_row_ptr, grad_row_stride, HAS_GRAD_ROW)
        dy = tl.load(grad_ptr + src[:, None] + cols.to(tl.int64)[None, :] * grad_col_stride,
                     mask=mask, other=0.0).to(tl.float32)
        dweight += dy * x_hat
        dbias += dy
        if STORE_DX:
            # dx = rstd * (w*dy - mean(w*dy) - x_hat * mean(w*dy * x_hat)), along D.
            wdy = dy * weight[None, :]
            mean_wdy = tl.sum(wdy, axis=1) / dim
            mean_wdy_xhat = tl.sum(wdy * x_hat, axis=1) / dim
            dx = (wdy - mean_wdy[:, None] - x_hat * mean_wdy_xhat[:, None]) * rstd[:, None]
            tl.store(dx_ptr + rows.to(tl.int64)[:, None] * dim + cols[None, :], dx, mask=mask)
    partial = program.to(tl.int64) * dim + cols
    tl.store(dweight_partial_ptr + partial, tl.sum(dweight, axis=0), mask=col_mask)
    tl.store(dbias_partial_ptr + partial, tl.sum(dbias, axis=0), mask=col_mask)


@triton.jit
def _segment_sum(src_ptr, src_row_ptr, bounds_ptr, dst_ptr, dst_row_ptr,
                 dim, src_row_stride, dst_row_stride,
                 HAS_SRC_ROW: tl.constexpr, HAS_DST_ROW: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """dst[dst_row[s]] = sum over k in [bounds[s], bounds[s+1]) of src[src_row[k]], in fp32.

    Program (s, j): segment s, columns j*BLOCK_D.. (src_row/dst_row default to the identity).
    Each destination row has one writer, so the store needs no atomics.
    """
    segment = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < dim
    start = tl.load(bounds_ptr + segment)
    end = tl.load(bounds_ptr + segment + 1)
    total = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
    for first in range(start, end, BLOCK_R):
        ks = first + tl.arange(0, BLOCK_R)
        k_mask = ks < end
        src_rows = ks
        if HAS_SRC_ROW:
            src_rows = tl.load(src_row_ptr + ks, mask=k_mask, other=0)
        total += tl.load(src_ptr + (src_rows.to(tl.int64) * src_row_stride)[:, None] + cols[None, :],
                         mask=k_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
    dst_row = segment
    if HAS_DST_ROW:
        dst_row = tl.load(dst_row_ptr + segment)
    tl.store(dst_ptr + dst_row.to(tl.int64) * dst_row_stride + cols,
             tl.sum(total, axis=0).to(dst_ptr.dtype.element_ty), mask=col_mask)


def _launch_segment_sum(src, src_rows, bounds, dst, dst_rows):
    """Run _segment_sum over len(bounds) - 1 segments of `src` rows (see its docstring)."""
    segments, dim = bounds.numel() - 1, src.shape[1]
    mean_rows = triton.cdiv(src_rows.numel() if src_rows is not None else src.shape[0], segments)
    block_r = max(2, min(16, triton.next_power_of_2(mean_rows)))  # short runs: few idle lanes
    block_d = min(triton.next_power_of_2(dim), 256)
    _segment_sum[(segments, triton.cdiv(dim, block_d))](
        src, src_rows if src_rows is not None else bounds, bounds, dst,
        dst_rows if dst_rows is not None else bounds, dim, src.stride(0), dst.stride(0),
        HAS_SRC_ROW=src_rows is not None, HAS_DST_ROW=dst_rows is not None,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps_for(block_r * block_d))


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    """CSR bounds [0, c0, c0+c1, ...] (int32) of consecutive runs of `counts` items."""
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)


def _embedding_grad(dx: torch.Tensor, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Gradient of `table` for rows[i] = table[ids[i]]: the dX rows of each id summed (fp32),
    cast to the table's dtype; rows no id refers to are zero."""
    grad = torch.zeros_like(table)
    if ids.numel() == 0:
        return grad
    sorted_ids, order = torch.sort(ids, stable=True)
    unique_ids, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    chunks = (counts + CHUNK_ROWS - 1) // CHUNK_ROWS
    n_chunks = int(chunks.sum())
    if n_chunks == unique_ids.numel():  # no id has more than CHUNK_ROWS rows: one pass
        _launch_segment_sum(dx, order, _offsets(counts), grad, unique_ids)
        return grad
    # Long runs are split into chunks of CHUNK_ROWS sorted rows; pass 1 sums each chunk into a
    # partial row, pass 2 sums the (consecutive) partial rows of each id into the table row.
    segment_of_chunk = torch.repeat_interleave(torch.arange(counts.numel(), device=ids.device),
                                               chunks, output_size=n_chunks)
    first_chunk = chunks.cumsum(0) - chunks
    chunk_start = ((counts.cumsum(0) - counts)[segment_of_chunk]
                   + (torch.arange(n_chunks, device=ids.device) - first_chunk[segment_of_chunk])
                   * CHUNK_ROWS)
    chunk_bounds = torch.cat([chunk_start, chunk_start.new_full((1,), ids.numel())]).to(torch.int32)
    partial = torch.empty(n_chunks, dx.shape[1], dtype=torch.float32, device=dx.device)
    _launch_segment_sum(dx, order, chunk_bounds, partial, None)
    _launch_segment_sum(partial, None, _offsets(chunks), grad, unique_ids)
    return grad


def _row_blocks(dim: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_D): whole rows (BLOCK_D >= D), a few of them when D is small."""
    block_d = triton.next_power_of_2(dim)
    return max(2, min(16, 4096 // block_d)), block_d


class _EmbedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, word, position, token_type, weight, bias, out,
                input_ids, position_ids, token_type_ids, out_index, eps):
        has_type = token_type is not None
        ids, pos_ids = flat_index(input_ids), flat_index(position_ids)
        type_ids = flat_index(token_type_ids) if has_type else ids
        word_t, pos_t = unit_column_stride(word), unit_column_stride(position)
        type_t = unit_column_stride(token_type) if has_type else word_t
        weight_c, bias_c = weight.contiguous(), bias.contiguous()
        n_rows, dim = ids.numel(), word.shape[1]
        rows, row_map = output_rows(n_rows, dim, word.dtype, word.device, out, out_index)
        mean = torch.empty(n_rows, dtype=torch.float32, device=word.device)
        rstd = torch.empty_like(mean)
        block_r, block_d = _row_blocks(dim)
        if n_rows:
            with launch_device(word):
                _embed_layernorm_fwd[(triton.cdiv(n_rows, block_r),)](
                    ids, pos_ids, type_ids, word_t, pos_t, type_t, weight_c, bias_c,
                    rows, row_map if row_map is not None else ids, mean, rstd,
                    n_rows, dim, word_t.stride(0), pos_t.stride(0), type_t.stride(0),
                    rows.stride(0), eps, HAS_TYPE=has_type, HAS_OUT_ROW=row_map is not None,
                    BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps_for(block_r * block_d))
        ctx.save_for_backward(ids, pos_ids, type_ids, word_t, pos_t, type_t, weight_c, mean, rstd,
                              row_map)
        ctx.has_type, ctx.norm_dtypes = has_type, (weight.dtype, bias.dtype)
        if out is not None:
            ctx.mark_dirty(out)  # an in-place write: the overwritten rows of `out` get no gradient
            return out
        return rows.view(*input_ids.shape, dim)

    @staticmethod
    def backward(ctx, grad):
        ids, pos_ids, type_ids, word, pos, token_type, weight, mean, rstd, row_map = ctx.saved_tensors
        need_word, need_pos, need_type, need_weight, need_bias, need_out = ctx.needs_input_grad[:6]
        n_rows, dim = ids.numel(), word.shape[1]
        grad_rows = grad.reshape(-1, dim)  # [rows, D] (a view even of an expanded grad), or
        # the [M, D] buffer, read through row_map
        store_dx = need_word or need_pos or need_type
        dx = torch.empty(n_rows if store_dx else 0, dim, dtype=torch.float32, device=grad.device)
        block_r, block_d = _row_blocks(dim)
        row_blocks = max(1, triton.cdiv(n_rows, block_r))
        blocks_per_program = triton.cdiv(row_blocks, reduction_programs(grad.device, row_blocks))
        programs = triton.cdiv(row_blocks, blocks_per_program)
        dweight_partial = torch.zeros(programs, dim, dtype=torch.float32, device=grad.device)
        dbias_partial = torch.zeros_like(dweight_partial)
        with launch_device(grad):
            if n_rows:
                _embed_layernorm_bwd[(programs,)](
                    ids, pos_ids, type_ids, word, pos, token_type, weight, mean, rstd,
                    grad_rows, row_map if row_map is not None else ids,
                    dx, dweight_partial, dbias_partial,
                    n_rows, dim, blocks_per_program * block_r, word.stride(0), pos.stride(0),
                    token_type.stride(0), *grad_rows.stride(),
                    HAS_TYPE=ctx.has_type, HAS_GRAD_ROW=row_map is not None, STORE_DX=store_dx,
                    BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps_for(block_r * block_d))
            grads = [_embedding_grad(dx, table_ids, table) if needed else None
                     for needed, table_ids, table in ((need_word, ids, word), (need_pos, pos_ids, pos),
                                                      (need_type, type_ids, token_type))]
        weight_dtype, bias_dtype = ctx.norm_dtypes
        grad_weight = dweight_partial.sum(0).to(weight_dtype) if need_weight else None
        grad_bias = dbias_partial.sum(0).to(bias_dtype) if need_bias else None
        grad_out = overwritten_rows_grad(grad, row_map) if need_out else None
        return (*grads, grad_weight, grad_bias, grad_out, None, None, None, None, None)


def embed_layernorm(input_ids: torch.Tensor, position_ids: torch.Tensor,
                    token_type_ids: Optional[torch.Tensor], word_embeddings: torch.Tensor,
                    position_embeddings: torch.Tensor, token_type_embeddings: Optional[torch.Tensor],
                    weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-12, *,
                    out: Optional[torch.Tensor] = None,
                    out_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """layer_norm(word[input_ids] + pos[position_ids] (+ type[token_type_ids])) -> [..., D].

    Computed in fp32, returned in the word table's dtype; with `out` [M, D], row i of the
    flattened result goes to out[out_index[i]] and `out` is returned. Arguments are checked by
    pixelbert.ops (see pixelbert.reference.embed_layernorm).
    """
    return _EmbedLayerNorm.apply(word_embeddings, position_embeddings, token_type_embeddings,
                                 weight, bias, out, input_ids, position_ids,
                                 token_type_ids if token_type_embeddings is not None else None,
                                 out_index, float(eps))
