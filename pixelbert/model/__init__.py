"""Pixel-BERT: a CNN over raw pixels and a BERT encoder over [CLS] text [SEP] pixels."""
from pixelbert.model.pixelbert import IGNORE_INDEX, LoadReport, PixelBert

__all__ = ["PixelBert", "LoadReport", "IGNORE_INDEX"]
