"""One request to a trained model: VQA's answers to a question about an image, NLVR2's verdict on
a statement about two images, or how well each of some texts matches an image (the ITM head of
a retrieval run, or of a pre-training run, zero-shot).

    python -m pixelbert.predict --config RUN/config.json --checkpoint RUN \
        --image IMG --text "what colour is the circle?" [--top 5]                      # VQA
    python -m pixelbert.predict ... --image LEFT --image RIGHT --text "STATEMENT"      # NLVR2
    python -m pixelbert.predict ... --image IMG --text "a red circle" --text "two squares"  # retrieval, pre-training

The image goes through what evaluation does to it (decoded by PIL, upright, resized to
data.image_shorter / data.image_longer, the run's normalisation; every valid pixel, no
sampling) and each text through the run's tokenizer (cut at data.max_text_len: `truncated`
says so). One JSON object goes to stdout:
- vqa: `answers`, the `--top` best, each with its `score`: the sigmoid of its logit, the
  head's estimate of the VQA soft score (0-1; it was trained on them with BCE);
- nlvr2: `true_probability` (softmax over the head's two classes) and `answer`;
- retrieval and pretrain: `texts`, best match first, each with its `score` (the ITM logit
  margin, which retrieval evaluation ranks by) and `match_probability` (its sigmoid);
and `load_ms` (decoding, tokenizing) and `model_ms` (the forward pass, the first one: it
warms up; with `--repeat N`, `warm_model_ms` is the median of the N - 1 after it).

`--checkpoint` takes what evaluation takes (a run folder, its checkpoints/ folder, a step_N/
folder or a weights file, such as `pixelbert.tools.export`'s); every tensor of the task's model
must be in it. The tokenizer and VQA's `answers.txt` are the run's: the run folder the
checkpoint is in (an exported folder is one), else train.output_dir. A request that cannot be
answered (an unreadable image, the wrong number of images or texts for the task, an empty text,
a checkpoint of another task) ends with a message and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from pixelbert.config import Config, load_config
from pixelbert.data.errors import BadSample
from pixelbert.data.images import load_image
from pixelbert.data.tasks import AnswerVocabulary, collate_task
from pixelbert.data.tokenizer import TextTokenizer, run_tokenizer
from pixelbert.engine.batches import to_device
from pixelbert.engine.data import ANSWERS_FILE, run_dir_of
from pixelbert.engine.weights import load_trained
from pixelbert.model.tasks import build_model
from pixelbert.tools.export import DTYPES

DEFAULT_TOP = 5


def check_request(task: str, images: list[str], texts: list[str]) -> None:
    """A clear error unless the task can take `images` and `texts`."""
    wanted_images = 2 if task == "nlvr2" else 1
    if len(images) != wanted_images:
        raise ValueError(f"{task} takes {wanted_images} --image, got {len(images)}" +
                         (" (the statement's left and right image)" if task == "nlvr2" else ""))
    if task in ("vqa", "nlvr2") and len(texts) != 1:
        raise ValueError(f"{task} takes one --text (the {'question' if task == 'vqa' else 'statement'}), "
                         f"got {len(texts)}")
    if not texts:
        raise ValueError(f"{task} takes at least one --text")
    if any(not text.strip() for text in texts):
        raise ValueError("a --text is empty")


def request_batch(cfg: Config, tokenizer: TextTokenizer, images: list[str], texts: list[str]) -> dict:
    """The model batch of one request, built as evaluation builds its batches (collate_task):
    each image once, and a pair per text (NLVR2: the statement with each of its two images)."""
    data = cfg.data
    pixels = [(path, load_image(path, data.image_shorter, data.image_longer, data.pixel_norm())) for path in images]
    ids = [torch.as_tensor(tokenizer.encode(text, data.max_text_len)) for text in texts]
    item = {"images": pixels, "texts": ids * len(images) if cfg.train.task == "nlvr2" else ids,
            "skips": [], "attempts": 1}
    return collate_task([item], tokenizer.pad_id, data.pad_multiple)


def answer(model, task: str, batch: dict, texts: list[str], answers: Optional[AnswerVocabulary], top: int) -> dict:
    """The task's reply to the request `batch` (see the module's docstring)."""
    if task == "vqa":
        scores = torch.sigmoid(model.logits(batch)[0].float())
        best = scores.topk(min(top, len(scores)))
        return {"answers": [{"answer": answers.answers[int(i)], "score": float(s)}
                            for s, i in zip(best.values, best.indices)]}
    if task == "nlvr2":
        true_probability = float(torch.softmax(model.logits(batch)[0].float(), dim=0)[1])
        return {"true_probability": true_probability, "answer": true_probability > 0.5}
    scores = model.scores(batch).float().cpu()
    order = scores.argsort(descending=True, stable=True).tolist()
    return {"texts": [{"text": texts[n], "score": float(scores[n]), "match_probability": float(torch.sigmoid(scores[n]))}
                      for n in order]}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that a timer read next includes it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def predict(args: argparse.Namespace) -> dict:
    cfg = load_config(args.config, args.override)
    task = cfg.train.task
    check_request(task, args.image, args.text)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    run_dir = run_dir_of(args.checkpoint, default=Path(cfg.train.output_dir))
    tokenizer = run_tokenizer(cfg.data, run_dir)
    answers = None
    if task == "vqa":
        if not (run_dir / ANSWERS_FILE).is_file():
            raise FileNotFoundError(f"{run_dir / ANSWERS_FILE} not found: a VQA run keeps its answer "
                                    "vocabulary there (the VQA head's outputs, in order)")
        answers = AnswerVocabulary.load(run_dir / ANSWERS_FILE)
    if task == "pretrain":  # zero-shot: the pre-training ITM head scores the pairs, as retrieval's does
        cfg.train.task = "retrieval"
    model = build_model(cfg, len(answers.answers) if answers else None, backbone_weights=False)
    load_trained(model, args.checkpoint, task)
    model.to(device, DTYPES[args.dtype]).eval()

    start = time.perf_counter()
    batch = to_device(request_batch(cfg, tokenizer, args.image, args.text), device, DTYPES[args.dtype])
    synchronize(device)
    loaded = time.perf_counter()
    model_ms = []
    with torch.inference_mode():
        for _ in range(args.repeat):
            started = time.perf_counter()
            reply = answer(model, task, batch, args.text, answers, args.top)
            synchronize(device)
            model_ms.append(1000 * (time.perf_counter() - started))
    timings = {"load_ms": 1000 * (loaded - start), "model_ms": model_ms[0]}
    if len(model_ms) > 1:  # the first call warms up (allocations, kernel choices); the others do not
        timings["warm_model_ms"] = statistics.median(model_ms[1:])
    limit = cfg.data.max_text_len - 2  # [CLS] and [SEP]
    return {"task": task, "images": args.image, **({"text": args.text[0]} if task in ("vqa", "nlvr2") else {}),
            **reply, "truncated": [text for text in args.text if len(tokenizer.tokenize(text)) > limit],
            "device": str(device), "dtype": args.dtype, **timings}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pixelbert.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's config.json")
    parser.add_argument("--checkpoint", required=True,
                        help="run folder, its checkpoints/ folder, a step_N/ folder or a weights file")
    parser.add_argument("--image", action="append", default=[], required=True,
                        help="image file (NLVR2: give it twice, left then right)")
    parser.add_argument("--text", action="append", default=[], required=True,
                        help="the question (VQA), the statement (NLVR2), or a text to match (repeat it)")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP, help=f"VQA: answers to list (default {DEFAULT_TOP})")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when there is one, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the model's dtype (default fp32)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the forward pass this many times: warm_model_ms is the median after the first")
    parser.add_argument("override", nargs="*", metavar="KEY=VALUE", help="config overrides, as for training")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top < 1 or args.repeat < 1:
        print("pixelbert.predict: error: --top and --repeat must be at least 1", file=sys.stderr)
        return 2
    try:
        reply = predict(args)
    except (FileNotFoundError, ValueError) as e:  # ConfigError and DataError are ValueErrors
        print(f"pixelbert.predict: error: {e}", file=sys.stderr)
        return 2
    except BadSample as e:
        print(f"pixelbert.predict: error: the image cannot be used ({e})", file=sys.stderr)
        return 2
    print(json.dumps(reply, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
