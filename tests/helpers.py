"""Small models and batches shared by the tests."""
import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from pixelbert.config import ModelConfig
from pixelbert.model import IGNORE_INDEX


def tiny_config(**overrides) -> ModelConfig:
    cfg = ModelConfig(backbone="tiny", vocab_size=100, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=96, max_position_embeddings=32,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pixel_samples=5,
                      frozen_bn=False, freeze_stem=False)
    return dataclasses.replace(cfg, **overrides)


def random_batch(sizes, text_len=9, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    height = max(h for h, _ in sizes) + 32 - max(h for h, _ in sizes) % 32
    width = max(w for _, w in sizes) + 32 - max(w for _, w in sizes) % 32
    images = torch.zeros(len(sizes), 3, height, width)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
    ids = torch.randint(5, vocab, (len(sizes), text_len), generator=g)
    attention = torch.ones_like(ids)
    attention[0, -3:] = 0
    mlm = torch.full_like(ids, IGNORE_INDEX)
    mlm[:, 2] = ids[:, 2]
    return {"images": images, "image_sizes": torch.tensor(sizes), "input_ids": ids,
            "attention_mask": attention, "token_type_ids": torch.zeros_like(ids), "mlm_labels": mlm,
            "itm_labels": torch.randint(0, 2, (len(sizes),), generator=g),
            "sample_seeds": torch.randint(0, 2 ** 31, (len(sizes),), generator=g)}


class FailingDecoder:
    """A batch decoder that cannot read the images at the given positions."""

    def __init__(self, bad_positions):
        self.bad = set(bad_positions)

    def __call__(self, encoded):
        good = [i for i in range(len(encoded)) if i not in self.bad]
        return SimpleNamespace(images=torch.ones(len(good), 3, 64, 64), sizes=torch.full((len(good), 2), 64),
                               failed=[(i, "truncated", "cut short") for i in sorted(self.bad)])


def split_records(cfg, split: str, dist=None) -> list:
    """Each source's records of the config's `split`, read as training and evaluation read them
    (training: minus data.exclude's images), the notes printed."""
    from pixelbert.engine.data import read_split, split_sources
    from pixelbert.engine.distributed import DistInfo
    dist = dist or DistInfo(0, 1, 0, torch.device("cpu"))
    return read_split(cfg, split, split_sources(cfg, split, dist), print)


def eval_run(tmp_path: Path, synth: Path, task: str, *overrides: str) -> tuple[Path, list]:
    """A run folder to evaluate: the task's config on `synth`, a vocabulary, untrained weights."""
    from pixelbert.config import load_config
    from pixelbert.data.tasks import AnswerVocabulary
    from pixelbert.data.tokenizer import build_tokenizer
    from pixelbert.engine.data import ANSWERS_FILE
    from pixelbert.engine.distributed import DistInfo
    from pixelbert.model.tasks import build_model
    run = tmp_path / "run"
    cfg = load_config("configs/tiny.json", [f"train.output_dir={run}", f"data.synthetic_dir={synth}",
                                            "data.synthetic_images=40", f"train.task={task}",
                                            "model.backbone_weights=null", "data.image_shorter=64",
                                            "data.image_longer=128", *overrides])
    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    train, val = ([r for s in split_records(cfg, split, dist) for r in s] for split in ("train", "val"))
    build_tokenizer(cfg.data, [r.text for r in train + val], run / "tokenizer", 100)
    answers = AnswerVocabulary.build(train, 1) if task == "vqa" else None
    if answers:
        answers.save(run / ANSWERS_FILE)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    torch.save(build_model(cfg, len(answers.answers) if answers else None).state_dict(), run / "weights.pt")
    return run, val
