"""Helpers shared by the Triton kernels of pixelbert.kernels.

Both fused ops produce rows [N, D] that either form the result or are written to rows
`out_index` of an output buffer `out` (see pixelbert.reference.place_rows); the helpers here
implement that output form once, for the forward store and for the backward read of the rows'
gradient.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def row_offsets(rows, row_mask, row_map_ptr, row_stride, HAS_ROW_MAP: tl.constexpr):
    """int64 offsets of `rows` in a row-strided buffer, through the row map (out_index) if any."""
    if HAS_ROW_MAP:
        rows = tl.load(row_map_ptr + rows, mask=row_mask, other=0)
    # int64 before the multiply: a buffer of more than 2**31 elements must not wrap.
    return rows.to(tl.int64) * row_stride


def flat_index(index: torch.Tensor) -> torch.Tensor:
    """An int32/int64 index tensor as a contiguous 1-D tensor (a view when it already is one)."""
    return index.reshape(-1).contiguous()


def unit_column_stride(table: torch.Tensor) -> torch.Tensor:
    """`table` [R, D] with unit stride along D, as the kernels address it (a copy only if needed)."""
    return table if table.stride(-1) == 1 else table.contiguous()


def output_rows(n_rows: int, dim: int, dtype: torch.dtype, device: torch.device,
                out: Optional[torch.Tensor], out_index: Optional[torch.Tensor]):
    """(buffer the forward kernel writes, its row map or None): a new [n_rows, dim] tensor,
    or `out` with row i going to out[out_index[i]]."""
    if out is None:
        return torch.empty(n_rows, dim, dtype=dtype, device=device), None
    return out, flat_index(out_index)


def num_warps_for(elements: int) -> int:
    """Warps for a program handling `elements` values per tile: ~16 values per thread, 1 to 8 warps."""
    return max(1, min(8, elements // 512))


def launch_device(tensor: torch.Tensor):
    """Launch on `tensor`'s GPU (Triton launches on the current device), or nothing on the CPU."""
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def reduction_programs(device: torch.device, row_blocks: int) -> int:
    """Programs of a kernel that reduces rows into per-program partial rows: a few per
    multiprocessor to fill the GPU, never more than there are row blocks. The count depends only
    on the device and the row count, so the summation order, and the result, repeat run to run."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        per_device = 4 * _multiprocessors(index)
    else:  # the interpreter: any fixed count
        per_device = 64
    return max(1, min(row_blocks, per_device))
