"""From the config's data section to a sharded, resumable training loader."""
from __future__ import annotations

import dataclasses
import json
import os
from functools import partial
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np
from PIL import Image

from pixelbert.config import CAPTION_FORMATS, Config, SourceConfig
from pixelbert.data import formats
from pixelbert.data.dataset import GroupedRecords, PretrainDataset, collate, group_by_image
from pixelbert.data.errors import DataError
from pixelbert.data.formats import Record
from pixelbert.data.packed import PackedList
from pixelbert.data.images import upright_size
from pixelbert.data.sampler import StepBatchSampler, build_loader, build_pretrain_loader
from pixelbert.engine.preemption import loader_worker_init
from pixelbert.data.synthetic import ensure_synthetic
from pixelbert.data.tasks import AnswerVocabulary, TaskDataset, collate_task
from pixelbert.data.tokenizer import RUN_FOLDER_FILES, VOCAB_FILE, TextTokenizer, build_tokenizer, run_tokenizer
from pixelbert.engine.decoding import build_decoder
from pixelbert.engine.distributed import DistInfo, log, on_main
from pixelbert.engine.record_cache import records_folder, shared_records
from pixelbert.fileio import write_atomic

ANSWERS_FILE = "answers.txt"  # a VQA run's answer vocabulary, one answer per line, in head order
HEADER_READERS = 16  # threads reading image headers: file-system latency, not CPU, bounds it


def read_source(source: SourceConfig) -> list[Record]:
    """The records of one configured source, read by its format's reader."""
    if source.format == "coco_captions":
        return formats.read_coco_captions(source.annotations, source.images)
    if source.format == "vg_regions":
        return formats.read_vg_regions(source.annotations, source.images, source.image_data or None)
    if source.format == "karpathy":
        return formats.read_karpathy(source.annotations, source.images, source.split)
    if source.format == "vqa":
        return formats.read_vqa(source.questions, source.annotations or None, source.images)
    if source.format == "nlvr2":
        return formats.read_nlvr2(source.annotations, source.images)
    raise DataError(f"unknown data source format {source.format!r}")


def check_source_paths(source: SourceConfig, where: str) -> None:
    keys = ("questions", "annotations", "images") if source.format == "vqa" else ("annotations", "images",
                                                                                  "image_data")
    for key in keys:
        value = getattr(source, key)
        paths = value.split(",") if key == "images" and source.format == "vg_regions" else [value]
        for path in filter(None, paths):
            if not Path(path).exists():
                raise FileNotFoundError(
                    f"{where}.{key}: {path} does not exist. To train on the embedded synthetic "
                    "set instead, leave data.train empty (override data.train=[]).")


def held_out_coco_ids(cfg: Config) -> set[int]:
    """The COCO ids of data.exclude's images."""
    held: set[int] = set()
    for i, source in enumerate(cfg.data.exclude):
        check_source_paths(source, f"data.exclude[{i}]")
        ids = {r.coco_id for r in read_source(source) if r.coco_id is not None}
        if not ids:
            raise DataError(f"data.exclude[{i}] ({source.annotations or source.questions}) names no COCO "
                            "image (a Flickr30K Karpathy file has no cocoid): it holds nothing out")
        held |= ids
    return held


def without_held_out(per_source: list[list[Record]], cfg: Config,
                     say: Callable[[str], None]) -> list[list[Record]]:
    """data.train's records (per source) minus those of data.exclude's COCO images."""
    if not cfg.data.exclude:
        return per_source
    held = held_out_coco_ids(cfg)
    kept = [[r for r in records if r.coco_id not in held] for records in per_source]
    removed = [len(records) - len(left) for records, left in zip(per_source, kept)]
    images = {r.coco_id for records in per_source for r in records if r.coco_id in held}
    say(f"data.exclude holds out {len(held)} COCO images: removed {sum(removed)} training records "
        f"of {len(images)} of them (per source: {removed})")
    return kept


@dataclass
class PretrainSources:
    """What the run keeps of the pre-training groups besides the packed dataset: each image's
    source and aspect ratio for the sampler, the sources' weights, and the start-up counts.
    Arrays, not the groups: the main process would otherwise hold millions of objects (Visual
    Genome's phrases) on every rank for the whole run."""
    source_ids: np.ndarray  # [images] int
    aspect_ratios: np.ndarray  # [images] height / width (1.0 where unknown)
    weights: list[float]
    captions: int
    empty_text_skips: list[tuple[str, str]]


def read_split(cfg: Config, split: str, sources: list[SourceConfig],
               say: Callable[[str], None]) -> list[list[Record]]:
    """The records of each of `split`'s sources (training: minus data.exclude's images)."""
    per_source = []
    for i, source in enumerate(sources):
        check_source_paths(source, f"data.{split}[{i}]")
        per_source.append(read_source(source))
    return without_held_out(per_source, cfg, say) if split == "train" else per_source


def split_sources(cfg: Config, split: str, dist: DistInfo, task: Optional[str] = None) -> list[SourceConfig]:
    """The configured sources of `split` ("train" or "val"), or the synthetic set's for `task`
    (by default the config's), which the main rank writes first while the others wait."""
    task = task or cfg.train.task
    configured = cfg.data.train if split == "train" else cfg.data.val
    if not configured:
        on_main(dist, lambda: ensure_synthetic(Path(cfg.data.synthetic_dir), cfg.data.synthetic_images,
                                               cfg.data.synthetic_seed) and None)
    elif task == "pretrain":
        for i, source in enumerate(configured):
            if source.format not in CAPTION_FORMATS:
                raise DataError(f"data.{split}[{i}].format={source.format!r} has no captions to pre-train "
                                f"on (MLM + ITM take {CAPTION_FORMATS}); it is a fine-tuning format")
    return named_sources(cfg, split, task)


def named_sources(cfg: Config, split: str, task: Optional[str] = None) -> list[SourceConfig]:
    """The configured sources of `split`, or the synthetic set's (as `split_sources`, without
    writing the set: for a rank on its own once it exists)."""
    configured = cfg.data.train if split == "train" else cfg.data.val
    if configured:
        return configured
    if cfg.data.train:  # the synthetic set's val split would stand in for the real data's
        raise DataError(f"data.val is empty while data.train names sources: the {split} split would be the "
                        "synthetic set's, not your data's; name data.val's sources")
    root, source = Path(cfg.data.synthetic_dir), SYNTHETIC_SOURCES[task or cfg.train.task][split]
    rooted = {k: str(root / getattr(source, k)) if getattr(source, k) else ""
              for k in ("annotations", "questions", "images")}
    return [SourceConfig(format=source.format, split=source.split, **rooted)]


def header_size(path: str) -> Optional[tuple[int, int]]:
    """(height, width) from the file's header, or None when it cannot be read (the loader
    will count that file as a skip when it meets it)."""
    try:
        with Image.open(path) as img:
            return upright_size(img)
    except Exception:  # any unreadable file: aspect grouping just treats it as square
        return None


def file_stamp(path: str) -> Optional[list[int]]:
    """[bytes, modification time in ns] of a file, None when it is not there: a cached header
    size is trusted only while its file keeps this stamp (an image replaced in place is read again)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def complete_sizes(grouped: GroupedRecords, cache: Path) -> None:
    """Give every group an image size for aspect grouping: the annotations' when they have one,
    else its header's, read once (in threads) and cached in `cache` with the file's stamp."""
    missing = [g for g in grouped.groups if g.size is None]
    if not missing:
        return
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    paths = list(dict.fromkeys(g.image for g in missing))
    with ThreadPoolExecutor(HEADER_READERS) as pool:
        stamps = dict(zip(paths, pool.map(file_stamp, paths)))
        # entries of an older cache (a bare size, no stamp) are read again
        todo = [p for p in paths if not isinstance(known.get(p), dict) or known[p]["stamp"] != stamps[p]]
        if todo:
            for path, size in zip(todo, pool.map(header_size, todo)):
                known[path] = {"size": size, "stamp": stamps[path]}
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(cache, json.dumps(known))
    for group in missing:
        size = known[group.image]["size"]
        group.size = tuple(size) if size else None


def build_pretrain_data(cfg: Config, dist: DistInfo, *, encoded_images: bool = False
                        ) -> tuple[PretrainDataset, TextTokenizer, PretrainSources]:
    """The pre-training dataset (its records read once, by the main rank: record_cache.py),
    the run's tokenizer, and what the sampler needs."""
    run_dir = Path(cfg.train.output_dir)
    sources = split_sources(cfg, "train", dist, "pretrain")

    def read_groups() -> tuple[list, dict]:
        notes: list[str] = []
        grouped = group_by_image(read_split(cfg, "train", sources, notes.append))
        if not grouped.groups:
            raise DataError("data.train: the configured sources hold no image-text pairs")
        if cfg.data.aspect_grouping_window > 1:
            complete_sizes(grouped, run_dir / "image_sizes.json")
        return grouped.groups, {
            "source_ids": [g.source for g in grouped.groups], "aspect_ratios": grouped.aspect_ratios.tolist(),
            "captions": sum(len(g.texts) for g in grouped.groups),
            "empty_text_skips": grouped.empty_text_skips(), "notes": notes}
    settings = {"task": "pretrain", "sizes": cfg.data.aspect_grouping_window > 1}
    groups, meta = run_records(cfg, "records", sources, settings, read_groups, dist)
    tokenizer = run_vocabulary(cfg, (text for group in groups for text in group.texts), dist)
    sampling = PretrainSources(np.asarray(meta["source_ids"], dtype=np.int64), np.asarray(meta["aspect_ratios"]),
                               [s.weight for s in cfg.data.train] or [1.0], meta["captions"],
                               [tuple(skip) for skip in meta["empty_text_skips"]])
    return PretrainDataset(groups, tokenizer, cfg.data, encoded_images=encoded_images), tokenizer, sampling


def run_records(cfg: Config, name: str, sources: list[SourceConfig], settings: dict,
                read: Callable[[], tuple[list, dict]], dist: DistInfo) -> tuple[PackedList, dict]:
    """Records and their meta, read by `read` on the main rank or found from an earlier start
    (or, with data.records_cache, another run) in the run's `name` folder or the cache's entry
    (record_cache.py), memory-mapped on every rank."""
    settings = {**settings, "exclude": [dataclasses.asdict(s) for s in cfg.data.exclude]}
    place = partial(records_folder, cfg.data.records_cache, cfg.train.output_dir, name)
    records, meta, folder, fresh = shared_records(place, settings, sources + list(cfg.data.exclude), read, dist)
    for note in meta["notes"]:
        log(dist, note)
    log(dist, f"{name}: {len(records)} items {'read and packed into' if fresh else 'reused from'} {folder}")
    return records, meta


def run_vocabulary(cfg: Config, texts: Iterable[str], dist: DistInfo) -> TextTokenizer:
    """data.tokenizer, or the vocabulary the main rank trains on `texts` (or finds cached): every
    rank then reads the run's copy. A resumed run keeps the vocabulary it has, even when its
    captions or settings changed since: its checkpoint's embeddings follow those ids."""
    own = Path(cfg.train.output_dir) / "tokenizer"
    if cfg.train.resume and not cfg.data.tokenizer and (own / VOCAB_FILE).is_file():
        log(dist, f"train.resume: keeping the run's vocabulary ({own}), whose ids the checkpoint's embeddings follow")
    else:  # the main rank trains (or checks) the cached vocabulary; its error, if any, stops every rank
        on_main(dist, lambda: build_tokenizer(cfg.data, texts, own, cfg.model.vocab_size,
                                              cfg.data.tokenizer_cache) and None)
    return fitting(run_tokenizer(cfg.data, cfg.train.output_dir), cfg)


def fitting(tokenizer: TextTokenizer, cfg: Config) -> TextTokenizer:
    """`tokenizer`, when the model's embedding has a row for each of its ids."""
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size is "
                        f"{cfg.model.vocab_size}: raise model.vocab_size")
    return tokenizer


def build_train_loader(dataset: PretrainDataset, sources: PretrainSources, cfg: Config,
                       dist: DistInfo, start_step: int):
    """Micro-batches of this rank from optimiser step `start_step + 1` on, forever. A micro-batch
    holds train_micro_batch_size_per_gpu / data.captions_per_image images."""
    sampler = StepBatchSampler(
        len(dataset), cfg.micro_batch_size // cfg.data.captions_per_image, cfg.grad_accum_steps,
        dist.world_size, dist.rank, cfg.train.seed, start_step=start_step,
        source_ids=sources.source_ids, source_weights=sources.weights,
        aspect_ratios=sources.aspect_ratios, aspect_window=cfg.data.aspect_grouping_window)
    return build_pretrain_loader(dataset, sampler, cfg.data, collate, loader_worker_init(cfg.train.stop_signals))


# ---- fine-tuning data --------------------------------------------------------------------------

# The synthetic set's files for each task (data.train / data.val empty), relative to its folder.
SYNTHETIC_SOURCES = {
    "pretrain": {split: SourceConfig(format="coco_captions", annotations=f"annotations/captions_{split}.json",
                                     images="images") for split in ("train", "val")},
    "vqa": {split: SourceConfig(format="vqa", questions=f"annotations/vqa_questions_{split}.json",
                                annotations=f"annotations/vqa_annotations_{split}.json", images="images")
            for split in ("train", "val")},
    "nlvr2": {"train": SourceConfig(format="nlvr2", annotations="annotations/nlvr2_train.jsonl",
                                    images="nlvr2/train"),
              "val": SourceConfig(format="nlvr2", annotations="annotations/nlvr2_val.jsonl", images="nlvr2/dev")},
    "retrieval": {"train": SourceConfig(format="karpathy", annotations="annotations/dataset_synthetic.json",
                                        images=".", split="train+restval"),
                  "val": SourceConfig(format="karpathy", annotations="annotations/dataset_synthetic.json",
                                      images=".", split="test")},
}


def task_records(cfg: Config, split: str, per_source: list[list[Record]]) -> list[Record]:
    records = [r for source_records in per_source for r in source_records]
    if not any(r.text.strip() for r in records):
        raise DataError(f"data.{split}: no {cfg.train.task} records with text")
    return records


def with_text(records: list[Record]) -> tuple[list[Record], list[tuple[str, str]]]:
    """(the records with a non-empty text, an ("empty_text", message) skip for each other one)."""
    kept = [r for r in records if r.text.strip()]
    skips = [("empty_text", f"empty text: {describe(r)}") for r in records if not r.text.strip()]
    return kept, skips


def describe(record: Record) -> str:
    """Where a record comes from, for skip messages."""
    key = record.question_id if record.question_id is not None else record.identifier or record.image_id
    return f"{record.images or record.image} ({key})"


def run_dir_of(path: str | Path, default: Optional[Path] = None) -> Path:
    """The run folder holding a checkpoint path (the path or the first parent with a tokenizer/
    folder); `default` when there is none (or, without one, an error)."""
    path = Path(path).resolve()
    for candidate in (path, *path.parents):
        if (candidate / "tokenizer" / "vocab.txt").is_file():
            return candidate
    if default is not None:
        return default
    raise FileNotFoundError(f"no tokenizer/vocab.txt in {path} or its parents: task.init_from must be "
                            "inside the pre-training run folder (or set data.tokenizer)")


def task_tokenizer(cfg: Config, texts: Iterable[str], dist: DistInfo) -> TextTokenizer:
    """The pre-training run's vocabulary when fine-tuning from one (the ids must match its
    embeddings), else data.tokenizer, else one trained on the task's texts; kept in the run."""
    if not (cfg.task.init_from and not cfg.data.tokenizer):
        return run_vocabulary(cfg, texts, dist)
    cache = Path(cfg.train.output_dir) / "tokenizer"
    source = run_dir_of(cfg.task.init_from) / "tokenizer"

    def copy_vocabulary() -> None:
        if source.resolve() != cache.resolve():
            cache.mkdir(parents=True, exist_ok=True)
            for name in RUN_FOLDER_FILES:
                if (source / name).is_file():
                    write_atomic(cache / name, (source / name).read_text(encoding="utf-8"))
    on_main(dist, copy_vocabulary)
    return fitting(run_tokenizer(cfg.data, cfg.train.output_dir), cfg)


@dataclass
class TrainingData:
    """What the training loop needs from the data side, whatever the task."""
    description: str
    make_loader: Callable[[int], Any]  # start step -> an endless loader of this rank's micro-batches
    tokenizer: TextTokenizer
    decoder: Optional[object] = None  # the batch decoder of encoded images (DALI), if any
    startup_skips: list[tuple[str, str]] = field(default_factory=list)
    startup_attempts: int = 0
    answers: Optional[AnswerVocabulary] = None  # VQA's answer vocabulary


def build_training_data(cfg: Config, dist: DistInfo) -> TrainingData:
    if cfg.train.task == "pretrain":
        decoder, decoder_name = build_decoder(cfg.data, dist.device,
                                              cfg.micro_batch_size // cfg.data.captions_per_image)
        dataset, tokenizer, sources = build_pretrain_data(cfg, dist, encoded_images=decoder is not None)
        return TrainingData(
            f"{len(dataset)} images with {sources.captions} captions, vocabulary of {tokenizer.vocab_size} "
            f"tokens, images decoded by {decoder_name}",
            lambda start: build_train_loader(dataset, sources, cfg, dist, start), tokenizer, decoder,
            sources.empty_text_skips, sources.captions + len(sources.empty_text_skips))
    sources = split_sources(cfg, "train", dist)

    def read_records() -> tuple[list, dict]:
        notes: list[str] = []
        every = task_records(cfg, "train", read_split(cfg, "train", sources, notes.append))
        kept, empty = with_text(every)
        return kept, {"empty_text_skips": empty, "attempts": len(every), "notes": notes}
    records, meta = run_records(cfg, "records", sources, {"task": cfg.train.task}, read_records, dist)
    tokenizer = task_tokenizer(cfg, (r.text for r in records), dist)
    answers = None
    if cfg.train.task == "vqa":
        answers_file = Path(cfg.train.output_dir) / ANSWERS_FILE
        on_main(dist, lambda: AnswerVocabulary.build(records, cfg.task.min_answer_count).save(answers_file))
        answers = AnswerVocabulary.load(answers_file)
    images_per_item = 2 if cfg.train.task == "nlvr2" else 1
    decoder, decoder_name = build_decoder(cfg.data, dist.device, cfg.micro_batch_size * images_per_item)
    dataset = TaskDataset(cfg.train.task, records, tokenizer, cfg.data, answers=answers,
                          negatives=cfg.task.negatives, encoded_images=decoder is not None)

    def make_loader(start_step: int):
        sampler = StepBatchSampler(len(dataset), cfg.micro_batch_size, cfg.grad_accum_steps,
                                   dist.world_size, dist.rank, cfg.train.seed, start_step=start_step)
        return build_loader(dataset, sampler, cfg.data, partial(
            collate_task, pad_id=tokenizer.pad_id, pad_multiple=cfg.data.pad_multiple),
            loader_worker_init(cfg.train.stop_signals))
    what = f", {len(answers.answers)} answers" if answers else ""
    return TrainingData(f"{cfg.train.task}: {len(records)} training records{what}, vocabulary of "
                        f"{tokenizer.vocab_size} tokens, images decoded by {decoder_name}",
                        make_loader, tokenizer, decoder,
                        startup_skips=[tuple(skip) for skip in meta["empty_text_skips"]],
                        startup_attempts=meta["attempts"], answers=answers)
