"""Data side of Pixel-BERT: sources, tokenizer, masking, images, datasets and samplers."""
