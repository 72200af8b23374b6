"""Running a model over an evaluation split: the task reports (VQA, NLVR2, retrieval) and the
pre-training validation losses. `python -m pixelbert.evaluate` and the training loop's
`train.eval_every` both come here, so a number logged in training is the number the CLI gives.

An image that cannot be read is never replaced by another record (training does that; an
evaluation must answer for every record): it is counted in a SkipCounter and each task decides
what it means for its metric. Images are decoded as in training: by PIL in the loader workers,
or, when data.decoder picks DALI, as file bytes from the workers decoded a batch at a time on
the device (EvalSetup.decoder).

On several ranks the work is split: VQA, NLVR2 and the pre-training losses by batch (batch b
on rank b mod world size, the batches one rank would make), retrieval by image; predictions,
losses and skips are then merged so that every rank holds the whole split's report, the one a
single rank gives. Under ZeRO-3 (EvalSetup.equal_passes) every forward pass gathers parameters
collectively, so each rank makes as many passes as the busiest one: a rank with less to do, or
with a batch or image it cannot read, makes filler passes whose outputs are dropped.
"""
from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader

from pixelbert import evaluation
from pixelbert.config import Config
from pixelbert.data.dataset import PretrainDataset, collate, group_by_image
from pixelbert.data.errors import SKIP_REASONS, BadSample
from pixelbert.data.formats import Record, read_json
from pixelbert.data.images import load_encoded, load_image, pad_images
from pixelbert.data.skips import SkipCounter, TooManyBadRecords, summary
from pixelbert.data.tasks import AnswerVocabulary, TaskDataset, collate_task
from pixelbert.data.tokenizer import TextTokenizer
from pixelbert.engine.batches import BatchPreparer, to_device
from pixelbert.engine.data import caption_records, read_task_records, task_sources, with_text
from pixelbert.engine.decoding import build_decoder
from pixelbert.engine.distributed import DistInfo, all_reduce_sum, gather_objects
from pixelbert.engine.metrics import MetricsWindow, window_means
from pixelbert.fileio import write_atomic


@dataclass
class EvalSetup:
    """What an evaluation needs beside the model and the records."""
    cfg: Config
    tokenizer: TextTokenizer
    dist: DistInfo
    answers: Optional[AnswerVocabulary] = None  # VQA's answer vocabulary
    float_dtype: torch.dtype = torch.float32  # the model's dtype: training may run in bf16
    results_suffix: str = ""  # VQA results file: vqa_<split><suffix>_results.json
    equal_passes: bool = False  # ZeRO-3: the same number of forward passes on every rank
    decoder: Optional[Callable] = None  # DALI's batch decoder (eval_decoder); None: PIL in the workers

    def my_share(self, count: int) -> range:
        """The indices (of batches, or of images) this rank evaluates."""
        return range(self.dist.rank, count, self.dist.world_size)

    def filler_passes(self, count: int, made: int) -> int:
        """How many passes to add to the `made` real ones so that this rank makes as many as a
        rank with a full share of `count` (0 unless equal_passes)."""
        return -(-count // self.dist.world_size) - made if self.equal_passes else 0

    def merge_skips(self, skips: SkipCounter) -> None:
        """Add the other ranks' skips to this rank's, so every rank judges the whole split."""
        mine = (dict(skips.counts), skips.attempts, skips.examples)
        for rank, (counts, attempts, examples) in enumerate(gather_objects(mine)):
            if rank != self.dist.rank:
                skips.merge(counts, attempts, examples)

    def to_device(self, batch: dict) -> dict:
        return to_device(batch, self.dist.device, self.float_dtype)

    def decode(self, batch: dict, skips: SkipCounter) -> Optional[dict]:
        """A loader batch with pixels: as it is, or with its file bytes decoded by `decoder`, an
        image that does not decode counted in `skips` and left out with its pairs (None when
        nothing is left)."""
        if "encoded" not in batch:
            return batch
        return BatchPreparer(self.dist.device, self.float_dtype, skips, self.decoder).decode(batch)


def eval_decoder(cfg: Config, device: torch.device) -> tuple[Optional[Callable], str]:
    """data.decoder's choice for evaluation, sized for its largest call: a batch of
    train.eval_batch_size NLVR2 items (two images each) or a pre-training micro-batch."""
    return build_decoder(cfg.data, device, max(2 * cfg.train.eval_batch_size, cfg.micro_batch_size))


def read_eval_records(cfg: Config, split: str, dist: DistInfo, limit: int = 0) -> list[Record]:
    """The split's records (data.val, or the synthetic set's), the first `limit` when > 0."""
    if cfg.train.task == "pretrain":
        records = [r for source in caption_records(cfg, split, dist) for r in source]
    else:
        records = read_task_records(cfg, split, dist)
    return records[:limit] if limit > 0 else records


def evaluate(model, setup: EvalSetup, records: list[Record], split: str, skips: SkipCounter) -> dict:
    """The report of the run's task on `records` (model in eval mode, no gradients)."""
    task = setup.cfg.train.task
    with torch.no_grad():
        if task == "pretrain":
            return pretrain_losses(model, setup, records, skips)
        if task == "vqa":
            return evaluate_vqa(model, setup, records, split, skips)
        if task == "nlvr2":
            return evaluate_nlvr2(model, setup, records, skips, nlvr2_train(setup.cfg, setup.dist))
        ranked = retrieval_scores(model, setup, records, skips)
    report = ranking_report(ranked.scores, ranked.img_of_text, setup.cfg.task.shortlist, ranked.whole,
                            warn=setup.dist.is_main)
    if setup.cfg.task.retrieval_folds:
        report["folds"] = fold_reports(ranked, setup.cfg.task)
    return report


def check_readable(skips: SkipCounter, cfg: Config) -> None:
    """Stop when more of the split than data.max_bad_fraction could not be read (it has been
    read in full: the fraction is final, no warm-up), or when none of it could."""
    skipped, attempts = skips.totals()
    if sum(skipped.values()) == attempts:
        raise TooManyBadRecords(f"none of the {attempts} records could be read: {summary(skipped)}. "
                                f"Examples: {'; '.join(e for shown in skips.examples.values() for e in shown)}")
    skips.check(skipped, attempts, cfg.data.max_bad_fraction, min_attempts=0)


# ---- pre-training ------------------------------------------------------------------------------

def pretrain_losses(model, setup: EvalSetup, records: list[Record], skips: SkipCounter) -> dict:
    """MLM and ITM loss and accuracy on the split's captions, every draw (masks, negatives) fixed
    by the record's index so every evaluation sees the same batches. All valid pixels are used
    (the model samples only in training mode). An unreadable image is replaced, as in training
    (a loss needs a batch, not an answer per record), and counted."""
    cfg = setup.cfg
    grouped = group_by_image([records])
    dataset = PretrainDataset(grouped.groups, setup.tokenizer, cfg.data, encoded_images=setup.decoder is not None)
    images_per_batch = max(1, cfg.micro_batch_size // cfg.data.captions_per_image)
    starts = range(0, len(dataset), images_per_batch)

    def batch_at(b: int) -> dict:
        items = [dataset[(i, i)] for i in range(starts[b], min(starts[b] + images_per_batch, len(dataset)))]
        return collate(items, setup.tokenizer.pad_id, cfg.data.pad_multiple, cfg.data.itm_negative_probability)

    window = MetricsWindow(setup.dist.device)
    made = 0
    for b in setup.my_share(len(starts)):
        batch = batch_at(b)
        skips.add(batch["skips"], batch["attempts"])
        batch = setup.decode(batch, skips)  # the dataset replaced a file it could not read; DALI drops one it cannot decode
        if batch is not None:
            made += 1
            window.add(model(setup.to_device(batch)), samples=len(batch["input_ids"]),
                       images=len(batch["image_sizes"]))
    fillers = setup.filler_passes(len(starts), made)
    if fillers > 0:  # the first batch that decodes, the same on every rank
        filler = next((batch for batch in (setup.decode(batch_at(b), SkipCounter()) for b in range(len(starts)))
                       if batch is not None), None)
        for _ in range(fillers if filler is not None else 0):
            model(setup.to_device(filler))
    setup.merge_skips(skips)
    skips.add(grouped.empty_text_skips(), len(grouped.empty_texts))  # every rank found them all
    check_readable(skips, cfg)
    totals: Counter[str] = Counter()  # a rank may have had no batch: merge sums by key, not by position
    for part in gather_objects(window.local_totals()):
        totals.update(part)
    means = window_means(totals)
    return {"images": len(dataset), **{k: v for k, v in means.items() if k == "loss" or k.endswith(("_loss", "_acc"))}}


# ---- VQA and NLVR2 ----------------------------------------------------------------------------

def task_outputs(dataset: TaskDataset, setup: EvalSetup, skips: SkipCounter, forward):
    """(batch, forward(batch)) for each batch of the readable records of this rank's share, in
    order, decoded in data.num_workers loader processes. A record that cannot be read is counted
    in `skips` and left out; what that means for the metric is the caller's call. With
    equal_passes, a batch with nothing readable and each batch this rank has fewer than the
    busiest one are filler passes (the split's first readable record) whose outputs are dropped."""
    data, size = setup.cfg.data, setup.cfg.train.eval_batch_size
    batches = [[(i, i) for i in range(start, min(start + size, len(dataset)))]
               for start in range(0, len(dataset), size)]
    loader = DataLoader(dataset, batch_sampler=[batches[b] for b in setup.my_share(len(batches))],
                        num_workers=data.num_workers, pin_memory=torch.cuda.is_available(),
                        collate_fn=partial(collate_readable, pad_id=setup.tokenizer.pad_id,
                                           pad_multiple=data.pad_multiple))
    made = 0
    for out in loader:
        skips.add(out["bad"], out["count"])
        batch = setup.decode(out["batch"], skips) if out["batch"] is not None else None
        if batch is not None:
            batch = setup.to_device(batch)
            made += 1
            yield batch, forward(batch)
    fillers = setup.filler_passes(len(batches), made)
    if fillers > 0:
        filler = first_readable(dataset, setup)
        for _ in range(fillers if filler is not None else 0):  # None: no rank read anything
            forward(filler)


def first_readable(dataset: TaskDataset, setup: EvalSetup) -> Optional[dict]:
    """The split's first readable record as a one-item batch on the device (None if none is):
    the same on every rank."""
    for i in range(len(dataset)):
        item = dataset[(i, i)]
        if "bad" not in item:
            batch = setup.decode(collate_task([item], setup.tokenizer.pad_id, setup.cfg.data.pad_multiple),
                                 SkipCounter())
            if batch is not None:
                return setup.to_device(batch)
    return None


def collate_readable(items: list[dict], pad_id: int, pad_multiple: int) -> dict:
    """Evaluation's collate: the readable items as one task batch (None when none is), the
    (reason, message) of the others, and how many items there were."""
    readable = [item for item in items if "bad" not in item]
    return {"batch": collate_task(readable, pad_id, pad_multiple) if readable else None,
            "bad": [item["bad"] for item in items if "bad" in item], "count": len(items)}


def evaluate_vqa(model, setup: EvalSetup, records: list[Record], split: str, skips: SkipCounter) -> dict:
    """The official results file and, with annotations, the official accuracy of that file. A
    question whose image cannot be read gets the most frequent training answer (the file must
    answer every question); `fallback_answers` counts them."""
    cfg, answers = setup.cfg, setup.answers
    dataset = TaskDataset("vqa", records, setup.tokenizer, cfg.data, answers=answers, replace_bad=False,
                          encoded_images=setup.decoder is not None)
    predictions: dict[int, str] = {}
    for batch, logits in task_outputs(dataset, setup, skips, model.logits):
        best = logits.argmax(dim=1).tolist()
        predictions.update({qid: answers.answers[a] for qid, a in zip(batch["question_ids"], best)})
    predictions = {q: a for part in gather_objects(predictions) for q, a in part.items()}
    setup.merge_skips(skips)
    check_readable(skips, cfg)
    unanswered = [r.question_id for r in records if r.question_id not in predictions]
    predictions.update({q: answers.answers[0] for q in unanswered})
    results_file = Path(cfg.train.output_dir) / f"vqa_{split}{setup.results_suffix}_results.json"
    if setup.dist.is_main:
        write_atomic(results_file, json.dumps([{"question_id": q, "answer": a} for q, a in predictions.items()]))
    report: dict = {"results_file": str(results_file), "questions": len(predictions),
                    "fallback_answers": len(unanswered)}
    asked = {r.question_id for r in records}  # all of the split, or the first records of it
    annotations = [a for a in vqa_annotations(cfg, split) if a["question_id"] in asked]
    if annotations:
        report.update(evaluation.vqa_accuracy(predictions, annotations))
        # Two blind baselines: the most frequent training answer, and per question type its most
        # frequent training answer (what a model that ignores the image can reach).
        majority = answers.answers[0]
        report["majority_answer_baseline"] = evaluation.vqa_accuracy(
            {q: majority for q in predictions}, annotations)["overall"]
        by_type: dict[str, Counter] = {}
        for a in vqa_annotations(cfg, "train"):
            by_type.setdefault(a["question_type"], Counter())[evaluation.normalize_answer(a["multiple_choice_answer"])] += 1
        prior = {a["question_id"]: by_type.get(a["question_type"], Counter({majority: 1})).most_common(1)[0][0]
                 for a in annotations}
        report["question_type_prior_baseline"] = evaluation.vqa_accuracy(prior, annotations)["overall"]
    return report


def vqa_annotations(cfg: Config, split: str) -> list[dict]:
    """The `annotations` lists of the split's VQA annotation files (none for a test split)."""
    sources = task_sources(cfg, split, DistInfo(0, 1, 0, torch.device("cpu")))
    return [a for s in sources if s.annotations for a in read_json(s.annotations)["annotations"]]


def evaluate_nlvr2(model, setup: EvalSetup, records: list[Record], skips: SkipCounter,
                   train_records=()) -> dict:
    """Accuracy and consistency, beside two blind baselines: the majority label, and with
    `train_records` the statement prior (each sentence's majority label in training). Over the
    statements whose two images can be read (the others are counted in `skips`)."""
    dataset = TaskDataset("nlvr2", records, setup.tokenizer, setup.cfg.data, replace_bad=False,
                          encoded_images=setup.decoder is not None)
    predictions, labels = {}, {}
    for batch, logits in task_outputs(dataset, setup, skips, model.logits):
        predicted = logits.argmax(dim=1).tolist()
        for identifier, p, label in zip(batch["identifiers"], predicted, batch["nlvr2_labels"].tolist()):
            predictions[identifier], labels[identifier] = bool(p), bool(label)
    merged = gather_objects((predictions, labels))
    predictions = {k: v for part, _ in merged for k, v in part.items()}
    labels = {k: v for _, part in merged for k, v in part.items()}
    setup.merge_skips(skips)
    check_readable(skips, setup.cfg)
    report = evaluation.nlvr2_accuracy(predictions, labels)
    report["statements"] = len(labels)
    report["majority_label_baseline"] = 100.0 * max(sum(labels.values()), len(labels) - sum(labels.values())) / len(labels)
    if train_records:
        sentences = {r.identifier: r.text for r in records}
        report["statement_prior_baseline"] = evaluation.nlvr2_statement_prior(
            ((r.text, r.label) for r in train_records), labels, sentences)
    return report


def nlvr2_train(cfg: Config, dist: DistInfo) -> list:
    """The training statements for the statement-prior baseline (none when they are missing)."""
    try:
        return with_text(read_task_records(cfg, "train", dist))[0]
    except FileNotFoundError as e:
        print(f"no statement-prior baseline: {e}", file=sys.stderr)
        return []


# ---- retrieval --------------------------------------------------------------------------------

def skip_code(reason: str) -> int:
    """An unreadable image's reason as a number ranks can merge with a max (0: readable)."""
    return 1 + SKIP_REASONS.index(reason)


class EvalImages(torch.utils.data.Dataset):
    """Evaluation images by index, read in loader workers: (index, pixels [1, 3, H, W], sizes
    [1, 2]) decoded by PIL, or with `encoded` (index, file bytes) for the batch decoder; for a
    file that cannot be read, (index, its skip_code)."""

    def __init__(self, paths: list[str], data, encoded: bool = False):
        self.paths, self.data, self.encoded = paths, data, encoded

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        load = load_encoded if self.encoded else load_image
        try:
            image = load(self.paths[index], self.data.image_shorter, self.data.image_longer)
        except BadSample as bad:
            return index, skip_code(bad.reason)
        return (index, image) if self.encoded else (index, *pad_images([image], self.data.pad_multiple))


class ImageReader:
    """This rank's share of the evaluation images, each read once, in order, in data.num_workers
    loader processes (then, with a batch decoder, decoded a batch at a time); remembers which
    cannot be read (a skip_code per image, 0 when readable)."""

    def __init__(self, paths: list[str], setup: EvalSetup):
        self.paths, self.setup = paths, setup
        self.unreadable = torch.zeros(len(paths), dtype=torch.int64)

    def __iter__(self):
        """(index, pixels on the device, sizes) of each readable image of this rank's share; with
        equal_passes, then (None, a blank image, its size) for each pass it is short of the
        busiest rank (its own unreadable images included)."""
        data, setup = self.setup.cfg.data, self.setup
        share = setup.my_share(len(self.paths))
        loader = DataLoader(EvalImages(self.paths, data, encoded=setup.decoder is not None), batch_size=None,
                            sampler=list(share), num_workers=data.num_workers, pin_memory=torch.cuda.is_available())
        made = 0
        pending: list[tuple[int, object]] = []  # (index, file bytes) for the next decoder call
        for index, *image in loader:
            if isinstance(image[0], int):
                self.unreadable[index] = image[0]
            elif len(image) == 1:  # file bytes (the loader made them a tensor)
                pending.append((index, image[0]))
            else:
                made += 1
                yield index, image[0].to(setup.dist.device, setup.float_dtype), image[1]
            if pending and len(pending) == setup.decoder.max_batch_size:
                for decoded in self.decode(pending):
                    made += 1
                    yield decoded
                pending = []
        for decoded in self.decode(pending) if pending else ():
            made += 1
            yield decoded
        side = -(-64 // data.pad_multiple) * data.pad_multiple  # the smallest image the CNN's grid takes
        for _ in range(setup.filler_passes(len(self.paths), made)):
            yield None, torch.zeros(1, 3, side, side, device=setup.dist.device, dtype=setup.float_dtype), \
                torch.tensor([[side, side]])

    def decode(self, pending: list[tuple[int, object]]):
        """(index, pixels, sizes) of each image of `pending` the decoder reads, each cut to its own
        padded size as PIL's path pads it; the others marked unreadable."""
        setup, multiple = self.setup, self.setup.cfg.data.pad_multiple
        out = setup.decoder([encoded for _, encoded in pending])
        failed = {position: reason for position, reason, _ in out.failed}
        for position, reason in failed.items():
            self.unreadable[pending[position][0]] = skip_code(reason)
        decoded = [index for position, (index, _) in enumerate(pending) if position not in failed]
        for row, index in enumerate(decoded):
            height, width = (-(-int(side) // multiple) * multiple for side in out.sizes[row])
            pixels = out.images[row:row + 1, :, :height, :width]
            yield index, pixels.to(setup.dist.device, setup.float_dtype), out.sizes[row:row + 1]

    def count(self, skips: SkipCounter) -> None:
        """Every image as an attempt, every unreadable one as a skip."""
        skips.add([(SKIP_REASONS[code - 1], f"{SKIP_REASONS[code - 1]}: {path}")
                   for path, code in zip(self.paths, self.unreadable.tolist()) if code], len(self.paths))


@dataclass
class RankedPairs:
    """A retrieval evaluation's scores, over the images that could be read and their texts."""
    scores: torch.Tensor  # [images, texts] float64; -inf for the pairs no shortlist took
    img_of_text: list[int]  # the image (row) of each text
    fold_of_image: torch.Tensor  # [images] each image's fold (task.retrieval_folds; all 0 without)
    whole: Optional[torch.Tensor] = None  # [images, texts] bool: the split's shortlists (None: every pair)
    in_fold: Optional[torch.Tensor] = None  # [images, texts] bool: each fold's own shortlists


def retrieval_scores(model, setup: EvalSetup, records: list[Record], skips: SkipCounter) -> RankedPairs:
    """Every pair's ITM score (or, with task.shortlist, the shortlisted pairs': the split's and,
    with task.retrieval_folds, each fold's), over the images that can be read and their texts
    (the others are counted in `skips`)."""
    cfg, dist, tokenizer = setup.cfg, setup.dist, setup.tokenizer
    records, empty = with_text(records)  # an empty caption cannot be ranked: counted, left out
    skips.add(empty, len(empty))
    images = list(dict.fromkeys(r.image for r in records))  # in the split's order: the folds follow it
    image_index = {path: i for i, path in enumerate(images)}
    img_of_text = [image_index[r.image] for r in records]
    fold_of_image = image_folds(len(images), cfg.task.retrieval_folds)
    texts = [torch.as_tensor(tokenizer.encode(r.text, cfg.data.max_text_len)) for r in records]
    length = max(len(t) for t in texts)
    input_ids = torch.full((len(texts), length), tokenizer.pad_id, dtype=torch.int64)
    for n, ids in enumerate(texts):
        input_ids[n, :len(ids)] = ids
    attention_mask = (input_ids != tokenizer.pad_id).long()
    attention_mask[:, 0] = 1
    scores = torch.full((len(images), len(texts)), float("-inf"), dtype=torch.float64)
    read = ImageReader(images, setup)
    everything = torch.arange(len(texts))
    rows_of, whole, in_fold = (lambda i: everything), None, None
    if cfg.task.shortlist:
        similarity = contrastive_similarity(model, setup, read, input_ids, attention_mask)
        whole = two_way_shortlist(similarity, cfg.task.shortlist)
        chosen = whole
        if cfg.task.retrieval_folds:
            in_fold = fold_shortlists(similarity, fold_of_image, torch.as_tensor(img_of_text), cfg.task.shortlist)
            chosen = whole | in_fold
        rows_of = scoring_rows(chosen, setup.equal_passes)
    pairs_per_pass = 8 * cfg.train.eval_batch_size
    for i, pixels, sizes in read:  # i None: a filler pass (equal_passes), its scores dropped
        feat = model.pixel_embeddings.features(pixels)  # once per image, reused for all its pairs
        rows = rows_of(i)
        for start in range(0, len(rows), pairs_per_pass):
            chunk = rows[start:start + pairs_per_pass]
            batch = setup.to_device({"images": pixels, "image_sizes": sizes, "input_ids": input_ids[chunk],
                                     "attention_mask": attention_mask[chunk],
                                     "token_type_ids": torch.zeros_like(input_ids[chunk]),
                                     "pair_image": torch.zeros(len(chunk), dtype=torch.long)})
            pair_scores = model.scores(batch, feat)
            if i is not None:
                scores[i, chunk] = pair_scores.double().cpu()
    if dist.world_size > 1:  # every rank filled its own rows; the others hold -inf
        finite = torch.isfinite(scores)
        total = all_reduce_sum(torch.where(finite, scores, torch.zeros_like(scores)).to(dist.device)).cpu()
        seen = all_reduce_sum(finite.double().to(dist.device)).cpu() > 0
        scores = torch.where(seen, total, torch.full_like(total, float("-inf")))
        merge_unreadable(read, dist)
    read.count(skips)
    check_readable(skips, cfg)
    return readable_only(RankedPairs(scores, img_of_text, fold_of_image, whole, in_fold), read.unreadable == 0)


def image_folds(count: int, folds: int) -> torch.Tensor:
    """Each of `count` images' fold: `folds` contiguous runs of the split's order whose sizes
    differ by at most one (COCO's 1K test: the 5K test's images 0-999, 1000-1999, ...)."""
    if folds > count:
        raise ValueError(f"task.retrieval_folds={folds} needs at least {folds} images; the split has {count}")
    return torch.arange(count) * max(folds, 1) // max(count, 1)


def merge_unreadable(read: "ImageReader", dist: DistInfo) -> None:
    """Every rank learns which of all the images the others could not read."""
    unreadable = read.unreadable.to(dist.device)
    torch.distributed.all_reduce(unreadable, op=torch.distributed.ReduceOp.MAX)
    read.unreadable = unreadable.cpu()


def contrastive_similarity(model, setup: EvalSetup, read: "ImageReader", input_ids: torch.Tensor,
                           attention_mask: torch.Tensor) -> torch.Tensor:
    """[images, texts] similarity of the contrastive vectors; -inf on the rows of unreadable
    images. A first pass over this rank's images computes their vectors (merged over the ranks,
    with which images could not be read); every rank embeds every text."""
    dist, per_pass = setup.dist, 8 * setup.cfg.train.eval_batch_size
    text = torch.cat([model.text_vectors(*(t.to(dist.device) for t in chunk)).cpu()
                      for chunk in zip(input_ids.split(per_pass), attention_mask.split(per_pass))])
    image = torch.zeros(len(read.paths), text.shape[1])
    cls_id = input_ids[:1, :1].to(dist.device)
    for i, pixels, sizes in read:
        vector = model.image_vectors(pixels, sizes, model.pixel_embeddings.features(pixels), cls_id)
        if i is not None:
            image[i] = vector[0].cpu()
    if dist.world_size > 1:
        image = all_reduce_sum(image.to(dist.device)).cpu()
        merge_unreadable(read, dist)
    return (image @ text.T).masked_fill((read.unreadable != 0)[:, None], float("-inf"))


def two_way_shortlist(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """[images, texts] bool: each image's k nearest texts and each text's k nearest images
    (ALBEF's two-way shortlist), among the readable images (rows that are not -inf)."""
    readable = torch.isfinite(similarity).any(dim=1)
    chosen = torch.zeros_like(similarity, dtype=torch.bool)
    if not readable.any():
        return chosen
    chosen.scatter_(1, similarity.topk(min(k, similarity.shape[1]), dim=1).indices, True)
    chosen.scatter_(0, similarity.topk(min(k, int(readable.sum())), dim=0).indices, True)
    return chosen & readable[:, None]


def fold_shortlists(similarity: torch.Tensor, fold_of_image: torch.Tensor, img_of_text: torch.Tensor,
                    k: int) -> torch.Tensor:
    """[images, texts] bool: each fold's two-way shortlists among its own images and texts, the
    lists an evaluation of that fold alone would make."""
    chosen = torch.zeros_like(similarity, dtype=torch.bool)
    for fold in range(int(fold_of_image.max()) + 1):
        rows = (fold_of_image == fold).nonzero().flatten()
        columns = (fold_of_image[img_of_text] == fold).nonzero().flatten()
        chosen[rows[:, None], columns] = two_way_shortlist(similarity[rows][:, columns], k)
    return chosen


def scoring_rows(chosen: torch.Tensor, equal_passes: bool) -> Callable[[Optional[int]], torch.Tensor]:
    """Image index -> the text rows to score with it. Under equal_passes every image, and a
    filler pass (None), gets as many rows as the longest list (repeats of its own rows, whose
    scores are the same), so that all ranks make the same passes."""
    rows = [chosen[i].nonzero().flatten() for i in range(len(chosen))]
    if not equal_passes:
        return lambda i: rows[i]
    texts = chosen.shape[1]
    longest = max(1, max(len(r) for r in rows))
    padded = [r[torch.arange(longest) % len(r)] if len(r) else torch.arange(longest) % texts for r in rows]
    return lambda i: padded[i] if i is not None else torch.arange(longest) % texts


def readable_only(ranked: RankedPairs, readable: torch.Tensor) -> RankedPairs:
    """The pairs of the readable images and of the texts that describe them."""
    new_index = (torch.cumsum(readable, 0) - 1).tolist()
    texts = [n for n, image in enumerate(ranked.img_of_text) if readable[image]]
    cut = lambda pairs: None if pairs is None else pairs[readable][:, texts]  # noqa: E731
    return RankedPairs(cut(ranked.scores), [new_index[ranked.img_of_text[n]] for n in texts],
                       ranked.fold_of_image[readable], cut(ranked.whole), cut(ranked.in_fold))


def ranking_report(scores: torch.Tensor, img_of_text: list[int], shortlist: int,
                   chosen: Optional[torch.Tensor], warn: bool = False) -> dict:
    """Recalls of `scores` over the `chosen` pairs (None: all), and what the ranking covered."""
    if chosen is not None:
        scores = scores.masked_fill(~chosen, float("-inf"))
    report = evaluation.retrieval_recall(scores, img_of_text)
    report["mode"] = f"shortlist top {shortlist}" if shortlist else "full ranking"
    # A pair outside the shortlists cannot be found: the share of true pairs inside bounds both recalls.
    if shortlist:
        images, texts = scores.shape
        matched = scores[torch.as_tensor(img_of_text), torch.arange(len(img_of_text))]
        report["shortlist_coverage"] = 100.0 * torch.isfinite(matched).double().mean().item()
        # Two random lists: a true pair is missed by both with probability (1 - k/T)(1 - k/I).
        report["shortlist_chance_coverage"] = 100.0 * (1 - max(0, 1 - shortlist / texts) * max(0, 1 - shortlist / images))
        chance = report["shortlist_chance_coverage"]
        if warn and chance < 50 and report["shortlist_coverage"] < 2 * chance:
            print(f"warning: the shortlists hold {report['shortlist_coverage']:.1f}% of the true pairs, "
                  f"random ones {chance:.1f}%: the contrastive similarity is "
                  "barely trained and these recalls understate the model; evaluate with task.shortlist=0",
                  file=sys.stderr)
    report["images"], report["texts"] = scores.shape
    report["pairs_scored"] = int(torch.isfinite(scores).sum())
    report["chance_r1"] = 100.0 / scores.shape[0]
    return report


def fold_reports(ranked: RankedPairs, task) -> dict:
    """task.retrieval_folds' protocol (COCO's 1K test): each fold ranked only among its own
    images and texts (with its own shortlists), and the recalls averaged over the folds."""
    each = []
    for fold in range(task.retrieval_folds):
        rows = (ranked.fold_of_image == fold).nonzero().flatten()
        if not len(rows):
            raise ValueError(f"retrieval fold {fold} has no readable image")
        row_of = {int(image): n for n, image in enumerate(rows)}
        columns = [t for t, image in enumerate(ranked.img_of_text) if image in row_of]
        pick = lambda pairs: None if pairs is None else pairs[rows][:, columns]  # noqa: E731
        each.append(ranking_report(pick(ranked.scores), [row_of[ranked.img_of_text[t]] for t in columns],
                                   task.shortlist, pick(ranked.in_fold)))
    averaged = [key for key, value in each[0].items() if isinstance(value, float) and key != "chance_r1"]
    return {"count": task.retrieval_folds, "mean": {key: sum(r[key] for r in each) / len(each) for key in averaged},
            "each": each}
