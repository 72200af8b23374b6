"""Evaluate a run on its task's evaluation split.

    python -m pixelbert.evaluate --config RUN/config.json --checkpoint RUN [--split val] [key=value ...]

VQA writes the official results file (`[{"question_id", "answer"}]`) and, when the split has
annotations, the official accuracy; NLVR2 reports accuracy and consistency; retrieval ranks
every text for every image and every image for every text (the backbone runs once per image,
its pixel features are cached and pairs are scored in batches), or only the pairs of two-way
shortlists by the contrastive similarity (`task.shortlist=k`, for a model trained with
`task.contrastive_weight` > 0), and with `task.retrieval_folds=5` also COCO's "1K test" (the
recalls averaged over five folds of the 5K split, each ranked alone); a pre-training run reports its MLM and ITM loss and accuracy on
the split's captions. A checkpoint must hold every tensor of the config's model: a head left at
random would be evaluated as if trained. Launched on several ranks (`deepspeed --num_gpus N --module
pixelbert.evaluate ...`) the ranks split the work and report what one rank would. Results go
to stdout and `RUN/eval_<task>_<split>.json`; with `--out DIR` (a run folder that is read-only,
or shared), that file, VQA's results file (retrieval's rankings file) and the split's packed records (unless
`data.records_cache` holds them) go to DIR instead. The work itself is
`pixelbert.engine.evaluator`, which training's `train.eval_every` runs too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from pixelbert.config import ConfigError, load_config
from pixelbert.data.errors import plain_message
from pixelbert.data.skips import SkipCounter, TooManyBadRecords, summary
from pixelbert.data.tasks import AnswerVocabulary
from pixelbert.data.tokenizer import run_tokenizer
from pixelbert.engine.data import ANSWERS_FILE
from pixelbert.engine.distributed import (DistInfo, configure_accelerator, exit_process, init_distributed, on_main,
                                          shutdown_distributed)
from pixelbert.engine.eval_setup import EvalSetup, eval_decoder
from pixelbert.engine.evaluator import evaluate, read_eval_records
from pixelbert.engine.launch_env import launched_world_size
from pixelbert.engine.weights import load_trained
from pixelbert.fileio import write_atomic
from pixelbert.model.tasks import build_model


def main(argv=None) -> int:
    try:
        return run(argv)
    finally:
        shutdown_distributed()


def run(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's config.json")
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoints/ folder, step_N folder or weights file")
    parser.add_argument("--split", default="val", help="data.val (or the synthetic set's evaluation split)")
    parser.add_argument("--out", default=None, help="folder for the report, VQA's results file, retrieval's rankings and the split's "
                        "records (default: the run folder, train.output_dir)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    task = cfg.train.task
    if launched_world_size(os.environ) > 1:  # launched on several ranks: they split the work
        configure_accelerator()
        dist = init_distributed()
    else:  # one process: no process group (it would hold a port in the caller's process)
        dist = DistInfo(0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    run_dir = Path(cfg.train.output_dir)  # the run's tokenizer and answers are read from here
    out_dir = Path(args.out) if args.out else run_dir
    cfg.train.output_dir = str(out_dir)  # what the evaluation writes goes here
    try:
        on_main(dist, lambda: check_writable(out_dir))
    except OSError as e:
        print(f"error: cannot write the evaluation's outputs to {out_dir} ({e}): pass --out DIR", file=sys.stderr)
        return 2
    try:
        tokenizer = run_tokenizer(cfg.data, run_dir)
        answers = AnswerVocabulary.load(run_dir / ANSWERS_FILE) if task == "vqa" else None
        # The checkpoint holds the CNN.
        model = build_model(cfg, len(answers.answers) if answers else None, backbone_weights=False)
        load_trained(model, args.checkpoint, task)
        records = read_eval_records(cfg, args.split, dist)
        decoder, decoder_name = eval_decoder(cfg, dist.device)
    except ConfigError as e:  # data.decoder=dali without DALI, records on a folder other ranks cannot see
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:  # a missing path, a source of the wrong kind
        print(f"error: {e}", file=sys.stderr)
        return 2
    model.to(dist.device).eval()
    skips = SkipCounter()  # the whole split's on every rank: evaluate merges the ranks' skips
    try:
        start = time.perf_counter()
        setup = EvalSetup(cfg, tokenizer, dist, answers, decoder=decoder)
        report = evaluate(model, setup, records, args.split, skips)
        report["eval_s"] = time.perf_counter() - start  # the evaluation itself: no start-up, no model loading
        report["decoder"] = decoder_name
    except TooManyBadRecords as e:  # the data, not the model: its own exit code, as in training
        print(f"error: {plain_message(e)}", file=sys.stderr)
        return 3
    skipped, attempts = skips.totals()
    if skipped and dist.is_main:
        examples = "; ".join(e for shown in skips.examples.values() for e in shown)
        print(f"records skipped (unreadable image or empty text): {summary(skipped)} (of {attempts} read). "
              f"Examples: {examples}",
              file=sys.stderr)
    report.update(task=task, split=args.split, checkpoint=str(args.checkpoint), skipped=skipped)
    if dist.is_main:
        print(json.dumps(report, indent=2))
        write_atomic(out_dir / f"eval_{task}_{args.split}.json", json.dumps(report, indent=2))
    return 0


def check_writable(folder: Path) -> None:
    """Raise OSError unless files can be made in `folder` (made if missing)."""
    folder.mkdir(parents=True, exist_ok=True)
    tempfile.TemporaryFile(dir=folder).close()


if __name__ == "__main__":
    exit_process(main())
