"""The `ext` backend of the fused ops: autograd wrappers around the extension pixelbert._C.

The kernels are in csrc/pool_sample.cpp and csrc/embed_layernorm.cpp (C++/OpenMP, CPU tensors)
and csrc/*_cuda.cu (CUDA tensors, when the extension is built with CUDA). pixelbert.ops checks the
arguments (pixelbert.op_checks) before calling these; the C++ layer checks shapes, dtypes and
devices again and never reads out of bounds. reference.py is the definition of correct.

With an output buffer (`out`, `out_index`) a call is an in-place write, as for the reference:
`out` is returned, and its overwritten rows pass no gradient back to what `out` was before.
Outside autograd (no grad mode, or no input that requires grad) the kernels are called directly.
"""
from __future__ import annotations

from typing import Optional

import torch

from pixelbert import _C
from pixelbert.reference import overwritten_rows_grad


def _autograd(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _wrote(out: torch.Tensor) -> None:
    """Count a write into `out` outside autograd as an in-place op (autograd's saved-tensor
    check then catches a stale use of it, as after any in-place torch op)."""
    torch.autograd.graph.increment_version(out)


def _channels_last(feat: torch.Tensor) -> bool:
    """Whether feat's gradient is laid out channels-last (as feat is, dense or a strided view)."""
    if feat.is_contiguous():
        return False
    if feat.is_contiguous(memory_format=torch.channels_last):
        return True
    return feat.stride(1) < feat.stride(3) < feat.stride(2)


class _PoolSample(torch.autograd.Function):
    @staticmethod
    def forward(ctx, feat, index, type_embedding, out, out_index):
        # The window arg-max (uint8 [N, C]) is kept for the backward instead of feat itself.
        result, argmax = _C.pool_sample_forward(feat, index, type_embedding, out, out_index,
                                                ctx.needs_input_grad[0])
        if out is not None:
            ctx.mark_dirty(out)
        ctx.save_for_backward(index, argmax, out_index)
        ctx.feat_shape = tuple(feat.shape)
        ctx.channels_last = _channels_last(feat)
        return result

    @staticmethod
    def backward(ctx, grad):
        index, argmax, out_index = ctx.saved_tensors
        need_feat, _, need_type, need_out, _ = ctx.needs_input_grad
        grad_feat, grad_type = _C.pool_sample_backward(
            grad, index, argmax, out_index, ctx.feat_shape, ctx.channels_last, need_feat, need_type)
        grad_out = overwritten_rows_grad(grad, out_index) if need_out else None
        return grad_feat, None, grad_type, grad_out, None


class _EmbedLayerNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input_ids, position_ids, token_type_ids, word, position, token_type,
                weight, bias, eps, out, out_index):
        result, mean, rstd = _C.embed_layernorm_forward(
            input_ids, position_ids, token_type_ids, word, position, token_type, weight, bias,
            eps, out, out_index)
        if out is not None:
            ctx.mark_dirty(out)
        # The summed rows are not kept: the backward gathers them again from the tables.
        ctx.save_for_backward(input_ids, position_ids, token_type_ids, word, position, token_type,
                              weight, bias, mean, rstd, out_index)
        return result

    @staticmethod
    def backward(ctx, grad):
        (input_ids, position_ids, token_type_ids, word, position, token_type, weight, bias,
         mean, rstd, out_index) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = _C.embed_layernorm_backward(
            grad, input_ids, position_ids, token_type_ids, word, position, token_type, weight,
            bias, mean, rstd, out_index, needs[3], needs[4], needs[5], needs[6], needs[7])
        grad_out = overwritten_rows_grad(grad, out_index) if needs[9] else None
        return (None, None, None, *grads, None, grad_out, None)


def pool_sample(feat: torch.Tensor, index: torch.Tensor,
                type_embedding: Optional[torch.Tensor] = None, *,
                out: Optional[torch.Tensor] = None,
                out_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rows `index` of max_pool2d(feat, 2) flattened to [B*Hp*Wp, C] (+ type_embedding).

    feat [B, C, H, W] fp32/fp16/bf16 in any strided layout (channels-last is read in place);
    index [N] int32/int64 of unique cells b*Hp*Wp + r*Wp + c (Hp = H // 2, Wp = W // 2);
    type_embedding [C] or None. Returns [N, C], or writes row i to out[out_index[i]] (out
    [M, C], unit column stride) and returns `out`. One pass reads only the sampled windows; the
    backward puts each row's gradient on its window's arg-max (ties and NaN as max_pool2d), in a
    gradient laid out like feat, and sums the rows (fp32) for type_embedding.
    """
    if _autograd(feat, type_embedding, out):
        return _PoolSample.apply(feat, index, type_embedding, out, out_index)
    result, _ = _C.pool_sample_forward(feat, index, type_embedding, out, out_index, False)
    if out is not None:
        _wrote(out)
    return result


def embed_layernorm(input_ids: torch.Tensor, position_ids: torch.Tensor,
                    token_type_ids: Optional[torch.Tensor], word_embeddings: torch.Tensor,
                    position_embeddings: torch.Tensor,
                    token_type_embeddings: Optional[torch.Tensor], weight: torch.Tensor,
                    bias: torch.Tensor, eps: float = 1e-12, *, out: Optional[torch.Tensor] = None,
                    out_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """layer_norm(word[input_ids] + pos[position_ids] (+ type[token_type_ids])) -> [..., D].

    ids of one shape [...], int32/int64; tables [*, D] of one dtype (fp32/fp16/bf16); weight and
    bias [D]. Each row is gathered, summed and normalised in fp32 in one pass and stored in the
    tables' dtype. With `out` [M, D] and `out_index` [ids.numel()], row i of the flattened result
    is written to out[out_index[i]] and `out` is returned. The backward accumulates the table,
    weight and bias gradients in fp32, race-free however often an id repeats.
    """
    if _autograd(word_embeddings, position_embeddings, token_type_embeddings, weight, bias, out):
        return _EmbedLayerNorm.apply(input_ids, position_ids, token_type_ids, word_embeddings,
                                     position_embeddings, token_type_embeddings, weight, bias,
                                     eps, out, out_index)
    result, _, _ = _C.embed_layernorm_forward(
        input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings,
        token_type_embeddings, weight, bias, eps, out, out_index)
    if out is not None:
        _wrote(out)
    return result
