"""Triton kernels of the fused ops, installed as `pixelbert.kernels` (the `triton` backend).

`pool_sample` and `embed_layernorm` take the arguments of their definitions in
pixelbert.reference and are autograd-aware (Triton forward and backward kernels inside a
torch.autograd.Function). pixelbert.ops checks the arguments and dispatches here; call them
through it. They run CUDA tensors, or CPU tensors in Triton's interpreter when TRITON_INTERPRET=1
is set before this package is imported.
"""
from .embed_layernorm import embed_layernorm
from .pool_sample import pool_sample

__all__ = ["pool_sample", "embed_layernorm"]
