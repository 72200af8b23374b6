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
from pixelbert.data.formats import read_json
from pixelbert.data.images import load_image, pad_images
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


def batches(dataset: TaskDataset, pad_id: int, pad_multiple: int, indices: range, device: torch.device):
    for start in range(indices.start, indices.stop, EVAL_BATCH):
        items = [dataset[(i, i)] for i in range(start, min(start + EVAL_BATCH, indices.stop))]
        yield to_device(collate_task(items, pad_id, pad_multiple), device)


def evaluate_vqa(model, cfg, records, tokenizer, answers: AnswerVocabulary, out_dir: Path, split: str,
                 device: torch.device) -> dict:
    dataset = TaskDataset("vqa", records, tokenizer, cfg.data, answers=answers)
    predictions: dict[int, str] = {}
    for batch in batches(dataset, tokenizer.pad_id, cfg.data.pad_multiple, range(len(dataset)), device):
        best = model.logits(batch).argmax(dim=1).tolist()
        predictions.update({qid: answers.answers[a] for qid, a in zip(batch["question_ids"], best)})
    results_file = out_dir / f"vqa_{split}_results.json"
    write_atomic(results_file, json.dumps([{"question_id": q, "answer": a} for q, a in predictions.items()]))
    report: dict = {"results_file": str(results_file), "questions": len(predictions)}
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


def evaluate_nlvr2(model, cfg, records, tokenizer, device: torch.device, train_records=()) -> dict:
    """Accuracy and consistency, beside two blind baselines: the majority label, and with
    `train_records` the statement prior (each sentence's majority label in training)."""
    dataset = TaskDataset("nlvr2", records, tokenizer, cfg.data)
    predictions, labels = {}, {}
    for batch in batches(dataset, tokenizer.pad_id, cfg.data.pad_multiple, range(len(dataset)), device):
        predicted = model.logits(batch).argmax(dim=1).tolist()
        for identifier, p, label in zip(batch["identifiers"], predicted, batch["nlvr2_labels"].tolist()):
            predictions[identifier], labels[identifier] = bool(p), bool(label)
    report = evaluation.nlvr2_accuracy(predictions, labels)
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


def retrieval_scores(model, cfg, records, tokenizer, dist: DistInfo, shortlist: int) -> tuple[torch.Tensor, list[int]]:
    """scores [images, texts] (-inf outside each image's shortlist) and the image of each text."""
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
    candidates = shortlist_texts(model, cfg, images, input_ids.to(dist.device),
                                 attention_mask.to(dist.device), shortlist)
    for i in range(dist.rank, len(images), dist.world_size):  # this rank's share of the images
        pixels, sizes = pad_images([load_image(images[i], cfg.data.image_shorter, cfg.data.image_longer)],
                                   cfg.data.pad_multiple)
        pixels = pixels.to(dist.device)
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
    return scores, img_of_text


def shortlist_texts(model, cfg, images, input_ids, attention_mask, k: int):
    """Per image, the k texts most similar by a cheap score (cosine of the mean word embedding
    of the text and the mean pixel token of the image), or None for full ranking."""
    if k <= 0 or k >= len(input_ids):
        return None
    words = model.embeddings.word_embeddings(input_ids) * attention_mask[..., None]
    text_vectors = torch.nn.functional.normalize(words.sum(1) / attention_mask.sum(1, keepdim=True), dim=1)
    picks = []
    for path in images:
        pixels, sizes = pad_images([load_image(path, cfg.data.image_shorter, cfg.data.image_longer)],
                                   cfg.data.pad_multiple)
        tokens, mask = model.pixel_embeddings(pixels.to(input_ids.device), sizes, sample=False)
        image_vector = torch.nn.functional.normalize(tokens[mask].mean(0), dim=0)
        picks.append((text_vectors @ image_vector).topk(k).indices.cpu())
    return picks


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
    with torch.no_grad():
        if task == "vqa":
            report = evaluate_vqa(model, cfg, records, tokenizer, answers, run_dir, args.split, dist.device)
        elif task == "nlvr2":
            report = evaluate_nlvr2(model, cfg, records, tokenizer, dist.device, nlvr2_train(cfg, args.split, dist))
        else:
            scores, img_of_text = retrieval_scores(model, cfg, records, tokenizer, dist, cfg.task.shortlist)
            report = evaluation.retrieval_recall(scores, img_of_text)
            report["mode"] = f"shortlist top {cfg.task.shortlist}" if cfg.task.shortlist else "full ranking"
            report["images"], report["texts"] = scores.shape
            report["chance_r1"] = 100.0 / scores.shape[0]
    report.update(task=task, split=args.split, checkpoint=str(args.checkpoint))
    if dist.is_main:
        print(json.dumps(report, indent=2))
        write_atomic(run_dir / f"eval_{task}_{args.split}.json", json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
