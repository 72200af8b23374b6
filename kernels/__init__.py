"""Triton kernels of the fused ops, installed as `pixelbert.kernels` (the kernels issue fills this in)."""
