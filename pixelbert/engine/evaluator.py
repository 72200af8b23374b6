"""Running a model over an evaluation split: the task reports (VQA and NLVR2 here, retrieval in
`retrieval_eval`) and the pre-training validation losses. `python -m pixelbert.evaluate` and the training loop's
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
from functools import lru_cache, partial
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader

from pixelbert import evaluation
from pixelbert.config import Config
from pixelbert.data.dataset import PretrainDataset, collate, group_by_image
from pixelbert.data.formats import Record, read_json
from pixelbert.data.skips import SkipCounter
from pixelbert.data.tasks import TaskDataset, collate_task
from pixelbert.engine.data import named_sources, read_split, run_records, split_sources, task_records, with_text
from pixelbert.engine.distributed import DistInfo, gather_objects, on_main
from pixelbert.engine.eval_setup import EvalSetup, check_readable
from pixelbert.engine.metrics import MetricsWindow, window_means
from pixelbert.engine.preemption import loader_worker_init
from pixelbert.engine.retrieval_eval import evaluate_retrieval
from pixelbert.fileio import write_atomic


def read_eval_records(cfg: Config, split: str, dist: DistInfo, limit: int = 0) -> Sequence[Record]:
    """The split's records (data.val, or the synthetic set's), the first `limit` when > 0; read
    by the main rank into the run's records-eval-<split>/ and opened by every rank there
    (record_cache.py), the empty ones included (each task counts them)."""
    task = cfg.train.task
    sources = split_sources(cfg, split, dist, task)

    def read() -> tuple[list[Record], dict]:
        notes: list[str] = []
        per_source = read_split(cfg, split, sources, notes.append)
        records = [r for s in per_source for r in s] if task == "pretrain" else task_records(cfg, split, per_source)
        return records, {"notes": notes}
    records = run_records(cfg, f"records-eval-{split}", sources, {"task": task, "split": split}, read, dist)[0]
    return records[:limit] if limit > 0 else records


def evaluate(model, setup: EvalSetup, records: list[Record], split: str, skips: SkipCounter) -> dict:
    """The report of the run's task on `records` (model in eval mode, no gradients)."""
    task = setup.cfg.train.task
    if task == "retrieval":
        return evaluate_retrieval(model, setup, records, split, skips)
    with torch.no_grad():
        if task == "pretrain":
            return pretrain_losses(model, setup, records, skips)
        if task == "vqa":
            return evaluate_vqa(model, setup, records, split, skips)
        return evaluate_nlvr2(model, setup, records, skips, nlvr2_train(setup.cfg, setup.dist))


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
                        worker_init_fn=loader_worker_init(setup.cfg.train.stop_signals),
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
    # The annotation files are read by the main rank alone; every rank gets its report.
    accuracy = on_main(setup.dist, lambda: vqa_accuracy_report(cfg, split, predictions, asked, answers.answers[0]))
    return {**report, **(accuracy or {})}


def vqa_accuracy_report(cfg: Config, split: str, predictions: dict[int, str], asked: set[int],
                        majority: str) -> dict:
    """The official accuracy of `predictions` on the `asked` questions, and two blind baselines:
    the most frequent training answer (`majority`), and per question type its most frequent
    training answer (what a model that ignores the image can reach). {} without annotations."""
    annotations = [a for a in vqa_annotations(cfg, split) if a["question_id"] in asked]
    if not annotations:
        return {}
    report = evaluation.vqa_accuracy(predictions, annotations)
    report["majority_answer_baseline"] = evaluation.vqa_accuracy(
        {q: majority for q in predictions}, annotations)["overall"]
    by_type = type_answers(tuple(source_files(cfg, "train")))
    prior = {a["question_id"]: by_type.get(a["question_type"], majority) for a in annotations}
    report["question_type_prior_baseline"] = evaluation.vqa_accuracy(prior, annotations)["overall"]
    return report


def source_files(cfg: Config, split: str) -> list[tuple[str, int, int]]:
    """(path, size, modification time) of each VQA annotation file of the split."""
    sources = named_sources(cfg, split)  # the main rank alone: no collective step here
    return [(s.annotations, Path(s.annotations).stat().st_size, Path(s.annotations).stat().st_mtime_ns)
            for s in sources if s.annotations]


@lru_cache(maxsize=2)
def type_answers(files: tuple[tuple[str, int, int], ...]) -> dict[str, str]:
    """Per question type, its most frequent training answer (normalised) in the annotation
    `files`: read once per process, not at every validation."""
    by_type: dict[str, Counter] = {}
    for path, _, _ in files:
        for a in read_json(path)["annotations"]:
            by_type.setdefault(a["question_type"], Counter())[evaluation.normalize_answer(a["multiple_choice_answer"])] += 1
    return {kind: counts.most_common(1)[0][0] for kind, counts in by_type.items()}


def vqa_annotations(cfg: Config, split: str) -> list[dict]:
    """The `annotations` lists of the split's VQA annotation files (none for a test split)."""
    return [a for path, _, _ in source_files(cfg, split) for a in read_json(path)["annotations"]]


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
    """The training statements for the statement-prior baseline (none when they are missing):
    read once into the run (read_eval_records), not at every validation."""
    try:
        return with_text(read_eval_records(cfg, "train", dist))[0]
    except FileNotFoundError as e:
        print(f"no statement-prior baseline: {e}", file=sys.stderr)
        return []
