"""Evaluate a fine-tuned run on its task's evaluation split.

    python -m pixelbert.evaluate --config RUN/config.json --checkpoint RUN [--split val] [key=value ...]

VQA writes the official results file (`[{"question_id", "answer"}]`) and, when the split has
annotations, the official accuracy; NLVR2 reports accuracy and consistency; retrieval ranks
every text for every image and every image for every text (the backbone runs once per image,
its pixel features are cached, pairs are scored in batches and sharded across ranks when
launched with several), optionally only a shortlist per image (`task.shortlist=k`). Results go
to stdout and `RUN/eval_<task>_<split>.json`.
"""
from __future__ import annotations

import argparse
import os
from collections import Counter
import json
import sys
from pathlib import Path

import torch

from pixelbert import evaluation
from pixelbert.config import ConfigError, load_config
from pixelbert.data.errors import SKIP_REASONS, BadSample
from pixelbert.data.formats import read_json
from pixelbert.data.images import load_image, pad_images
from pixelbert.data.skips import SkipCounter, TooManyBadRecords, summary
from pixelbert.data.tasks import AnswerVocabulary, TaskDataset, collate_task
from pixelbert.data.tokenizer import run_tokenizer
from pixelbert.engine.data import ANSWERS_FILE, read_task_records, task_sources
from pixelbert.engine.distributed import DistInfo, all_reduce_sum, configure_accelerator, init_distributed
from pixelbert.engine.weights import load_weights
from pixelbert.fileio import write_atomic
from pixelbert.model.tasks import build_model

EVAL_BATCH = 32  # items per forward pass


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def batches(dataset: TaskDataset, pad_id: int, pad_multiple: int, device: torch.device, skips: SkipCounter):
    """Batches of the dataset's readable records, in order. A record whose image cannot be read
    is counted in `skips` and left out; what that means for the metric is the caller's call."""
    items = []
    for index in range(len(dataset)):
        try:
            items.append(dataset[(index, index)])
            skips.add([], 1)
        except BadSample as bad:
            skips.add([(bad.reason, str(bad))], 1)
        if items and (len(items) == EVAL_BATCH or index == len(dataset) - 1):
            yield to_device(collate_task(items, pad_id, pad_multiple), device)
            items = []


def evaluate_vqa(model, cfg, records, tokenizer, answers: AnswerVocabulary, out_dir: Path, split: str,
                 device: torch.device, skips: SkipCounter) -> dict:
    """The official results file and, with annotations, the official accuracy of that file. A
    question whose image cannot be read gets the most frequent training answer (the file must
    answer every question); `fallback_answers` counts them."""
    dataset = TaskDataset("vqa", records, tokenizer, cfg.data, answers=answers, replace_bad=False)
    predictions: dict[int, str] = {}
    for batch in batches(dataset, tokenizer.pad_id, cfg.data.pad_multiple, device, skips):
        best = model.logits(batch).argmax(dim=1).tolist()
        predictions.update({qid: answers.answers[a] for qid, a in zip(batch["question_ids"], best)})
    check_readable(skips, cfg)
    unanswered = [r.question_id for r in records if r.question_id not in predictions]
    predictions.update({q: answers.answers[0] for q in unanswered})
    results_file = out_dir / f"vqa_{split}_results.json"
    write_atomic(results_file, json.dumps([{"question_id": q, "answer": a} for q, a in predictions.items()]))
    report: dict = {"results_file": str(results_file), "questions": len(predictions),
                    "fallback_answers": len(unanswered)}
    annotations = vqa_annotations(cfg, split)
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


def vqa_annotations(cfg, split: str) -> list[dict]:
    """The `annotations` lists of the split's VQA annotation files (none for a test split)."""
    sources = task_sources(cfg, split, DistInfo(0, 1, 0, torch.device("cpu")))
    return [a for s in sources if s.annotations for a in read_json(s.annotations)["annotations"]]


def evaluate_nlvr2(model, cfg, records, tokenizer, device: torch.device, skips: SkipCounter,
                   train_records=()) -> dict:
    """Accuracy and consistency, beside two blind baselines: the majority label, and with
    `train_records` the statement prior (each sentence's majority label in training). Over the
    statements whose two images can be read (the others are counted in `skips`)."""
    dataset = TaskDataset("nlvr2", records, tokenizer, cfg.data, replace_bad=False)
    predictions, labels = {}, {}
    for batch in batches(dataset, tokenizer.pad_id, cfg.data.pad_multiple, device, skips):
        predicted = model.logits(batch).argmax(dim=1).tolist()
        for identifier, p, label in zip(batch["identifiers"], predicted, batch["nlvr2_labels"].tolist()):
            predictions[identifier], labels[identifier] = bool(p), bool(label)
    check_readable(skips, cfg)
    report = evaluation.nlvr2_accuracy(predictions, labels)
    report["statements"] = len(labels)
    report["majority_label_baseline"] = 100.0 * max(sum(labels.values()), len(labels) - sum(labels.values())) / len(labels)
    if train_records:
        sentences = {r.identifier: r.text for r in records}
        report["statement_prior_baseline"] = evaluation.nlvr2_statement_prior(
            ((r.text, r.label) for r in train_records), labels, sentences)
    return report


def nlvr2_train(cfg, split: str, dist: DistInfo) -> list:
    """The training statements for the statement-prior baseline (none when they are missing)."""
    try:
        return read_task_records(cfg, "train", dist)
    except FileNotFoundError as e:
        print(f"no statement-prior baseline: {e}", file=sys.stderr)
        return []


class ImageReader:
    """Loads evaluation images one at a time and remembers which cannot be read, as a code per
    image (0 readable, else 1 + the SKIP_REASONS index) that ranks can merge with a max."""

    def __init__(self, paths: list[str], cfg):
        self.paths, self.cfg = paths, cfg
        self.unreadable = torch.zeros(len(paths), dtype=torch.int64)

    def __call__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(pixels [1, 3, H, W], sizes [1, 2]) of image `index`, or None when it cannot be read."""
        try:
            image = load_image(self.paths[index], self.cfg.data.image_shorter, self.cfg.data.image_longer)
        except BadSample as bad:
            self.unreadable[index] = 1 + SKIP_REASONS.index(bad.reason)
            return None
        return pad_images([image], self.cfg.data.pad_multiple)

    def count(self, skips: SkipCounter) -> None:
        """Every image as an attempt, every unreadable one as a skip."""
        skips.add([(SKIP_REASONS[code - 1], f"{SKIP_REASONS[code - 1]}: {path}")
                   for path, code in zip(self.paths, self.unreadable.tolist()) if code], len(self.paths))


def retrieval_scores(model, cfg, records, tokenizer, dist: DistInfo, shortlist: int,
                     skips: SkipCounter) -> tuple[torch.Tensor, list[int]]:
    """scores [images, texts] (-inf outside each image's shortlist) and the image of each text,
    over the images that can be read and their texts (the others are counted in `skips`)."""
    images = sorted({r.image for r in records})
    image_index = {path: i for i, path in enumerate(images)}
    img_of_text = [image_index[r.image] for r in records]
    texts = [torch.as_tensor(tokenizer.encode(r.text, cfg.data.max_text_len)) for r in records]
    length = max(len(t) for t in texts)
    input_ids = torch.full((len(texts), length), tokenizer.pad_id, dtype=torch.int64)
    for n, ids in enumerate(texts):
        input_ids[n, :len(ids)] = ids
    attention_mask = (input_ids != tokenizer.pad_id).long()
    attention_mask[:, 0] = 1
    scores = torch.full((len(images), len(texts)), float("-inf"), dtype=torch.float64)
    read = ImageReader(images, cfg)
    candidates = shortlist_texts(model, read, input_ids.to(dist.device), attention_mask.to(dist.device), shortlist)
    for i in range(dist.rank, len(images), dist.world_size):  # this rank's share of the images
        image = read(i)
        if image is None:
            continue
        pixels, sizes = image[0].to(dist.device), image[1]
        feat = model.pixel_embeddings.features(pixels)  # once per image, reused for all its pairs
        rows = candidates[i] if candidates is not None else torch.arange(len(texts))
        for start in range(0, len(rows), EVAL_BATCH * 8):
            chunk = rows[start:start + EVAL_BATCH * 8]
            batch = to_device({"images": pixels, "image_sizes": sizes, "input_ids": input_ids[chunk],
                               "attention_mask": attention_mask[chunk],
                               "token_type_ids": torch.zeros_like(input_ids[chunk]),
                               "pair_image": torch.zeros(len(chunk), dtype=torch.long)}, dist.device)
            scores[i, chunk] = model.scores(batch, feat).double().cpu()
    if dist.world_size > 1:  # every rank filled its own rows; the others hold -inf
        finite = torch.isfinite(scores)
        total = all_reduce_sum(torch.where(finite, scores, torch.zeros_like(scores)).to(dist.device)).cpu()
        seen = all_reduce_sum(finite.double().to(dist.device)).cpu() > 0
        scores = torch.where(seen, total, torch.full_like(total, float("-inf")))
        unreadable = read.unreadable.to(dist.device)
        torch.distributed.all_reduce(unreadable, op=torch.distributed.ReduceOp.MAX)
        read.unreadable = unreadable.cpu()
    read.count(skips)
    check_readable(skips, cfg)
    return readable_only(scores, img_of_text, read.unreadable == 0)


def readable_only(scores: torch.Tensor, img_of_text: list[int], readable: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The scores of the readable images and of the texts that describe them."""
    new_index = (torch.cumsum(readable, 0) - 1).tolist()
    texts = [n for n, image in enumerate(img_of_text) if readable[image]]
    return scores[readable][:, texts], [new_index[img_of_text[n]] for n in texts]


def shortlist_texts(model, read: ImageReader, input_ids, attention_mask, k: int):
    """Per image, the k texts most similar by a cheap score (cosine of the mean word embedding
    of the text and the mean pixel token of the image), or None for full ranking. An
    unreadable image gets no shortlist (its row is dropped later)."""
    if k <= 0 or k >= len(input_ids):
        return None
    words = model.embeddings.word_embeddings(input_ids) * attention_mask[..., None]
    text_vectors = torch.nn.functional.normalize(words.sum(1) / attention_mask.sum(1, keepdim=True), dim=1)
    picks = []
    for i in range(len(read.paths)):
        image = read(i)
        if image is None:
            picks.append(torch.zeros(0, dtype=torch.long))
            continue
        tokens, mask = model.pixel_embeddings(image[0].to(input_ids.device), image[1], sample=False)
        image_vector = torch.nn.functional.normalize(tokens[mask].mean(0), dim=0)
        picks.append((text_vectors @ image_vector).topk(k).indices.cpu())
    return picks


def evaluate_task(model, cfg, records, tokenizer, answers, split: str, dist: DistInfo,
                  skips: SkipCounter) -> dict:
    """The report of the run's task on `records`; unreadable images are counted in `skips`."""
    task, run_dir = cfg.train.task, Path(cfg.train.output_dir)
    with torch.no_grad():
        if task == "vqa":
            return evaluate_vqa(model, cfg, records, tokenizer, answers, run_dir, split, dist.device, skips)
        if task == "nlvr2":
            return evaluate_nlvr2(model, cfg, records, tokenizer, dist.device, skips, nlvr2_train(cfg, split, dist))
        scores, img_of_text = retrieval_scores(model, cfg, records, tokenizer, dist, cfg.task.shortlist, skips)
    report = evaluation.retrieval_recall(scores, img_of_text)
    report["mode"] = f"shortlist top {cfg.task.shortlist}" if cfg.task.shortlist else "full ranking"
    report["images"], report["texts"] = scores.shape
    report["chance_r1"] = 100.0 / scores.shape[0]
    return report


def check_readable(skips: SkipCounter, cfg) -> None:
    """Stop when more of the split than data.max_bad_fraction could not be read (it has been
    read in full: the fraction is final, no warm-up), or when none of it could."""
    skipped, attempts = skips.totals()
    if sum(skipped.values()) == attempts:
        raise TooManyBadRecords(f"none of the {attempts} records could be read: {summary(skipped)}. "
                                f"Examples: {'; '.join(e for shown in skips.examples.values() for e in shown)}")
    skips.check(skipped, attempts, cfg.data.max_bad_fraction, min_attempts=0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's config.json")
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoints/ folder, step_N folder or weights file")
    parser.add_argument("--split", default="val", help="data.val (or the synthetic set's evaluation split)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    task = cfg.train.task
    if task == "pretrain":
        print("error: evaluate a fine-tuned run (train.task vqa, nlvr2 or retrieval)", file=sys.stderr)
        return 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched on several ranks: shard retrieval
        configure_accelerator()
        dist = init_distributed()
    else:  # one process: no process group (it would hold a port in the caller's process)
        dist = DistInfo(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    run_dir = Path(cfg.train.output_dir)
    try:
        tokenizer = run_tokenizer(cfg.data, run_dir)
        answers = AnswerVocabulary.load(run_dir / ANSWERS_FILE) if task == "vqa" else None
        cfg.model.backbone_weights = None  # the checkpoint holds the CNN
        model = build_model(cfg, len(answers.answers) if answers else None)
        load_weights(model, args.checkpoint)
        records = read_task_records(cfg, args.split, dist)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.to(dist.device).eval()
    skips = SkipCounter()  # every rank reads what it counts (retrieval merges first): no sum
    try:
        report = evaluate_task(model, cfg, records, tokenizer, answers, args.split, dist, skips)
    except TooManyBadRecords as e:  # the data, not the model: its own exit code, as in training
        print(f"error: {e}", file=sys.stderr)
        return 3
    skipped, attempts = skips.totals()
    if skipped and dist.is_main:
        examples = "; ".join(e for shown in skips.examples.values() for e in shown)
        print(f"unreadable images skipped: {summary(skipped)} (of {attempts} read). Examples: {examples}",
              file=sys.stderr)
    report.update(task=task, split=args.split, checkpoint=str(args.checkpoint), skipped=skipped)
    if dist.is_main:
        print(json.dumps(report, indent=2))
        write_atomic(run_dir / f"eval_{task}_{args.split}.json", json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
