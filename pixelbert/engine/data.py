"""From the config's data section to a sharded, resumable training loader."""
from __future__ import annotations

from pathlib import Path

from pixelbert.config import Config
from pixelbert.data.dataset import PretrainDataset, collate
from pixelbert.data.formats import Record, read_coco_captions
from pixelbert.data.sampler import StepBatchSampler, build_pretrain_loader
from pixelbert.data.synthetic import ensure_synthetic
from pixelbert.data.tokenizer import TextTokenizer, build_tokenizer
from pixelbert.engine.distributed import DistInfo, barrier

READERS = {"coco_captions": read_coco_captions}


def read_records(cfg: Config, dist: DistInfo) -> list[Record]:
    """The training records of every configured source, or of the embedded synthetic set."""
    data = cfg.data
    if not data.train:
        root = Path(data.synthetic_dir)
        if dist.is_main:  # one rank writes the set; the others wait for it
            ensure_synthetic(root, data.synthetic_images, data.synthetic_seed)
        barrier()
        return read_coco_captions(root / "annotations" / "captions_train.json", root / "images")
    records: list[Record] = []
    for i, source in enumerate(data.train):
        for key in ("annotations", "images"):
            if not Path(getattr(source, key)).exists():
                raise FileNotFoundError(
                    f"data.train[{i}].{key}: {getattr(source, key)} does not exist. To train on the "
                    "embedded synthetic set instead, leave data.train empty (override data.train=[]).")
        records.extend(READERS[source.format](source.annotations, source.images))
    if not records:
        raise ValueError("data.train: the configured sources hold no image-text pairs")
    return records


def build_pretrain_data(cfg: Config, dist: DistInfo) -> tuple[PretrainDataset, TextTokenizer]:
    records = read_records(cfg, dist)
    captions = [r.text for r in records]
    cache = Path(cfg.train.output_dir) / "tokenizer"
    if dist.is_main:  # train (or check) the cached vocabulary once, then every rank reads it
        build_tokenizer(cfg.data, captions, cache, cfg.model.vocab_size, cfg.data.tokenizer_cache)
    barrier()
    tokenizer = build_tokenizer(cfg.data, captions, cache, cfg.model.vocab_size)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                         f"{cfg.model.vocab_size}: raise model.vocab_size")
    if cfg.data.max_text_len > cfg.model.max_position_embeddings:
        raise ValueError(f"data.max_text_len ({cfg.data.max_text_len}) exceeds "
                         f"model.max_position_embeddings ({cfg.model.max_position_embeddings})")
    return PretrainDataset(records, tokenizer, cfg.data), tokenizer


def build_train_loader(dataset: PretrainDataset, tokenizer: TextTokenizer, cfg: Config,
                       dist: DistInfo, start_step: int):
    """Micro-batches of this rank from optimiser step `start_step + 1` on, forever."""
    sampler = StepBatchSampler(len(dataset), cfg.micro_batch_size, cfg.grad_accum_steps,
                               dist.world_size, dist.rank, cfg.train.seed, start_step=start_step)
    return build_pretrain_loader(dataset, sampler, cfg.data, collate)
