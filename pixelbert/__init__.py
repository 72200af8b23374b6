"""PixelBERT engine: Pixel-BERT (arXiv 2004.00849) training with fused kernels and DeepSpeed."""
__version__ = "0.1.0"
