"""Requests to a trained model: VQA's answers to a question about an image, NLVR2's verdict on a
statement about two images, or how well each of some texts matches an image (the ITM head of a
retrieval run, or of a pre-training run, zero-shot).

    python -m pixelbert.predict --config RUN/config.json --checkpoint RUN \
        --image IMG --text "what colour is the circle?" [--top 5]                      # VQA
    python -m pixelbert.predict ... --image LEFT --image RIGHT --text "STATEMENT"      # NLVR2
    python -m pixelbert.predict ... --image IMG --text "a red circle" --text "two squares"  # retrieval, pre-training
    python -m pixelbert.predict ... --image IMG --text "a [MASK] circle on the left"      # pre-training: fill in
    python -m pixelbert.predict ... --requests requests.jsonl [--out replies.jsonl]     # many, batched

Each image goes through what evaluation does to it (decoded as data.decoder says: by PIL in
the loader workers, or by DALI a batch at a time on the model's device; upright, resized to
data.image_shorter / data.image_longer, the run's normalisation; every valid pixel, no
sampling) and each text through the run's tokenizer (cut at data.max_text_len: `truncated`
lists the texts that were). A reply holds:
- vqa: `answers`, the `--top` best, each with its `score`: the sigmoid of its logit, the
  head's estimate of the VQA soft score (0-1; it was trained on them with BCE);
- nlvr2: `true_probability` (softmax over the head's two classes) and `answer`;
- retrieval and pretrain: `texts`, best match first, each with its `score` (the ITM logit
  margin, which retrieval evaluation ranks by) and `match_probability` (its sigmoid);
- pretrain, for a text that holds [MASK]: `fills`, for each [MASK] in order, the MLM head's
  `--top` word pieces ("##" continues a word) with their probabilities (over the tokenizer's
  vocabulary), given the image and the rest of the text (only a pre-training run has the head:
  other tasks refuse such a text).

One request (`--image`, `--text`) prints its reply as one JSON object, with the `decoder`,
`load_ms` (reading, decoding, tokenizing) and `model_ms` (the forward pass, the first one: it
warms up; with `--repeat N`, `warm_model_ms` is the median of the N - 1 after it); a request
the task cannot take ends with the reason and exit code 2. `--requests FILE` reads one JSON
object per line, `{"id": ..., "image": PATH or "images": [LEFT, RIGHT], "text": TEXT or
"texts": [...]}` (`id` defaults to the line number), reads the images in data.num_workers
loader processes (PIL decodes them there, DALI each batch's after) and answers
train.eval_batch_size requests per forward pass. Replies go out one JSON line per request, in
the file's order, each with its `id`: to `--out` (written whole, atomically) or
stdout. A request that cannot be answered (an unreadable image, the wrong number of images or
texts, an empty text) gets `{"id", "error"}` and is counted in the summary on stderr; exit code
3 when none could be answered.

`--checkpoint` takes what evaluation takes (a run folder, its checkpoints/ folder, a step_N/
folder or a weights file, such as `pixelbert.tools.export`'s); every tensor of the task's model
must be in it. The tokenizer and VQA's `answers.txt` are the run's: the run folder the
checkpoint is in (an exported folder is one), else train.output_dir.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from pixelbert.config import Config, load_config
from pixelbert.data.errors import BadSample
from pixelbert.data.images import load_encoded, load_image
from pixelbert.data.tasks import AnswerVocabulary, collate_task
from pixelbert.data.tokenizer import MASK, TextTokenizer, run_tokenizer
from pixelbert.engine.batches import decode_images, to_device
from pixelbert.engine.data import ANSWERS_FILE, run_dir_of
from pixelbert.engine.decoding import build_decoder
from pixelbert.engine.weights import load_trained
from pixelbert.fileio import write_atomic
from pixelbert.model.tasks import build_model
from pixelbert.tools.export import DTYPES

DEFAULT_TOP = 5


@dataclass
class Request:
    images: list[str]
    texts: list[str]
    id: Any = None
    problem: str = ""  # why a line of a --requests file is not a request ("": it is one)


def check_request(task: str, request: Request) -> None:
    """A clear error (ValueError) unless the task can take the request's images and texts."""
    if request.problem:
        raise ValueError(request.problem)
    images, texts = request.images, request.texts
    wanted_images = 2 if task == "nlvr2" else 1
    if len(images) != wanted_images:
        raise ValueError(f"{task} takes {wanted_images} image(s), got {len(images)}" +
                         (" (the statement's left and right image)" if task == "nlvr2" else ""))
    if task in ("vqa", "nlvr2") and len(texts) != 1:
        raise ValueError(f"{task} takes one text (the {'question' if task == 'vqa' else 'statement'}), "
                         f"got {len(texts)}")
    if not texts:
        raise ValueError(f"{task} takes at least one text")
    if any(not isinstance(text, str) or not text.strip() for text in texts):
        raise ValueError("a text is empty")
    if task != "pretrain" and any(MASK in text for text in texts):
        raise ValueError(f"a text holds {MASK}: a pre-training run's MLM head fills it in; a {task} run has none")


def parse_request(line: str, number: int) -> Request:
    """A request of a --requests file (line `number`, from 1); ValueError when it is not one."""
    try:
        fields = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(fields, dict):
        raise ValueError("not a JSON object")
    as_list = lambda one, many: [fields[one]] if one in fields else fields.get(many, [])  # noqa: E731
    images, texts = as_list("image", "images"), as_list("text", "texts")
    if not isinstance(images, list) or not isinstance(texts, list) or \
            not all(isinstance(path, str) for path in images):
        raise ValueError('"images" and "texts" must be lists ("image" and "text": one string)')
    return Request(images, texts, fields.get("id", number))


class RequestItems(Dataset):
    """Each request as a task item (its images decoded, or with `encoded` their file bytes for
    a batch decoder; its texts tokenized: as TaskDataset makes them for evaluation), or
    {"bad": (kind, message)} when it cannot be answered (kind: "invalid_request", or the
    image's skip reason)."""

    def __init__(self, requests: list[Request], cfg: Config, task: str, tokenizer: TextTokenizer,
                 encoded: bool = False):
        self.requests, self.data, self.task, self.tokenizer = requests, cfg.data, task, tokenizer
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.requests)

    def __getitem__(self, index: int) -> dict:
        request, data = self.requests[index], self.data
        try:
            check_request(self.task, request)
            pixels = [(path, load_encoded(path, data.image_shorter, data.image_longer) if self.encoded else
                       load_image(path, data.image_shorter, data.image_longer, data.pixel_norm()))
                      for path in request.images]
        except ValueError as e:
            return {"bad": ("invalid_request", str(e)), "index": index}
        except BadSample as bad:
            return {"bad": (bad.reason, f"the image cannot be used ({bad})"), "index": index}
        ids = [torch.as_tensor(self.tokenizer.encode(text, data.max_text_len)) for text in request.texts]
        # NLVR2: the statement with each of its two images, two pairs.
        return {"images": pixels, "texts": ids * len(pixels) if self.task == "nlvr2" else ids,
                "skips": [], "attempts": 1, "index": index}


def collate_requests(items: list[dict], pad_id: int, pad_multiple: int) -> dict:
    """The answerable items as one task batch (None when none is) with their request indices,
    and the others' (index, (kind, message))."""
    good = [item for item in items if "bad" not in item]
    return {"batch": collate_task(good, pad_id, pad_multiple) if good else None,
            "indices": [item["index"] for item in good],
            "bad": [(item["index"], item["bad"]) for item in items if "bad" in item]}


def decode_requests(prepared: dict, decoder: Optional[Callable]) -> dict:
    """collate_requests' batch with its file bytes decoded by `decoder` (as it is when it holds
    pixels): a request with an image the decoder cannot read moves to `bad`, with the reason."""
    batch = prepared["batch"]
    if batch is None or "encoded" not in batch:
        return prepared
    decoded, failed = decode_images(batch, decoder)
    unreadable = {}  # the batch's item -> why
    for position, reason, detail in failed:
        for item in batch["pair_item"][batch["pair_image"] == position].unique().tolist():
            message = f"{reason}: {batch['image_keys'][position]}" + (f" ({detail})" if detail else "")
            unreadable.setdefault(item, (reason, f"the image cannot be used ({message})"))
    indices = prepared["indices"]
    return {"batch": decoded, "indices": [index for item, index in enumerate(indices) if item not in unreadable],
            "bad": prepared["bad"] + [(indices[item], why) for item, why in sorted(unreadable.items())]}


def request_batch(request: Request, cfg: Config, task: str, tokenizer: TextTokenizer,
                  decoder: Optional[Callable] = None) -> dict:
    """One request's model batch (on the CPU, or where `decoder` decodes); ValueError when it
    cannot be answered."""
    item = RequestItems([request], cfg, task, tokenizer, encoded=decoder is not None)[0]
    prepared = decode_requests(collate_requests([item], tokenizer.pad_id, cfg.data.pad_multiple), decoder)
    if prepared["bad"]:
        raise ValueError(prepared["bad"][0][1][1])
    return prepared["batch"]


def mask_fills(model, encoded, input_ids: torch.Tensor, tokenizer: TextTokenizer, top: int) -> list[list[list[dict]]]:
    """Each pair's fills: for each [MASK] of its text, in order, the MLM head's `top` word
    pieces with their probabilities: a softmax over the tokenizer's vocabulary (model.vocab_size
    may hold more rows than it has pieces; no text can hold those)."""
    masked = input_ids == tokenizer.mask_id
    fills: list[list[list[dict]]] = [[] for _ in range(len(input_ids))]
    if not masked.any():
        return fills
    logits = model.mlm_logits(encoded.text_rows(masked))[:, :tokenizer.vocab_size]
    best = torch.softmax(logits, dim=-1).topk(min(top, tokenizer.vocab_size), dim=-1)
    pairs = masked.nonzero()[:, 0].tolist()  # row-major, as text_rows takes the rows
    for pair, values, indices in zip(pairs, best.values.cpu(), best.indices.cpu()):
        fills[pair].append([{"token": tokenizer.piece(i), "probability": float(v)} for v, i in zip(values, indices)])
    return fills


def replies(model, task: str, batch: dict, requests: list[Request], answers: Optional[AnswerVocabulary],
            tokenizer: TextTokenizer, top: int) -> list[dict]:
    """The task's reply to each request of `batch` (see the module's docstring)."""
    if task == "vqa":
        best = torch.sigmoid(model.logits(batch).float()).topk(min(top, len(answers.answers)), dim=1)
        return [{"answers": [{"answer": answers.answers[int(i)], "score": float(s)} for s, i in zip(values, indices)]}
                for values, indices in zip(best.values.cpu(), best.indices.cpu())]
    if task == "nlvr2":
        true_probability = torch.softmax(model.logits(batch).float(), dim=1)[:, 1].cpu().tolist()
        return [{"true_probability": p, "answer": p > 0.5} for p in true_probability]
    if task == "retrieval":
        scores, fills = model.scores(batch), None
    else:  # pre-training: its ITM head ranks the texts as retrieval's does, its MLM head fills each [MASK]
        encoded = model.encode(batch, sample_pixels=False)
        scores, fills = model.match_scores(encoded), mask_fills(model, encoded, batch["input_ids"], tokenizer, top)
    scores, pair_item = scores.float().cpu(), batch["pair_item"].cpu()
    out = []
    for item, request in enumerate(requests):
        pairs = (pair_item == item).nonzero()[:, 0].tolist()
        order = scores[pairs].argsort(descending=True, stable=True).tolist()
        texts = []
        for n in order:
            score = scores[pairs[n]]
            texts.append({"text": request.texts[n], "score": float(score), "match_probability": float(torch.sigmoid(score))})
            if fills is not None and fills[pairs[n]]:
                texts[-1]["fills"] = fills[pairs[n]]
        out.append({"texts": texts})
    return out


@dataclass
class Predictor:
    """A trained model with what its requests need: the run's config, tokenizer and answers."""
    cfg: Config
    task: str  # the run's: "pretrain" is answered by its ITM head, as retrieval is, and its MLM head
    model: torch.nn.Module
    tokenizer: TextTokenizer
    answers: Optional[AnswerVocabulary]
    device: torch.device
    dtype_name: str  # a key of DTYPES
    decoder: Optional[Callable]  # DALI's batch decoder (data.decoder); None: PIL in the loader workers
    decoder_name: str

    @classmethod
    def load(cls, config: str, checkpoint: str, overrides: list[str], device: Optional[str],
             dtype: str) -> "Predictor":
        cfg = load_config(config, overrides)
        task = cfg.train.task
        run_dir = run_dir_of(checkpoint, default=Path(cfg.train.output_dir))
        tokenizer = run_tokenizer(cfg.data, run_dir)
        answers = None
        if task == "vqa":
            if not (run_dir / ANSWERS_FILE).is_file():
                raise FileNotFoundError(f"{run_dir / ANSWERS_FILE} not found: a VQA run keeps its answer "
                                        "vocabulary there (the VQA head's outputs, in order)")
            answers = AnswerVocabulary.load(run_dir / ANSWERS_FILE)
        model = build_model(cfg, len(answers.answers) if answers else None, backbone_weights=False)
        load_trained(model, checkpoint, task)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.to(device, DTYPES[dtype]).eval()
        # A batch holds train.eval_batch_size requests: NLVR2's have two images.
        decoder, decoder_name = build_decoder(cfg.data, device, (2 if task == "nlvr2" else 1) * cfg.train.eval_batch_size)
        return cls(cfg, task, model, tokenizer, answers, device, dtype, decoder, decoder_name)

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    def answer(self, batch: dict, requests: list[Request], top: int) -> list[dict]:
        with torch.inference_mode():
            return replies(self.model, self.task, to_device(batch, self.device, self.dtype), requests,
                           self.answers, self.tokenizer, top)

    def truncated(self, texts: list[str]) -> list[str]:
        """The texts cut at data.max_text_len ([CLS] and [SEP] take two of it)."""
        return [text for text in texts if len(self.tokenizer.tokenize(text)) > self.cfg.data.max_text_len - 2]

    def synchronize(self) -> None:
        """Wait for the device's queued work, so that a timer read next includes it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def predict_one(predictor: Predictor, request: Request, top: int, repeat: int) -> dict:
    """The reply to one request, with its timings; ValueError when it cannot be answered."""
    start = time.perf_counter()
    batch = to_device(request_batch(request, predictor.cfg, predictor.task, predictor.tokenizer, predictor.decoder),
                      predictor.device, predictor.dtype)
    predictor.synchronize()
    loaded = time.perf_counter()
    model_ms = []
    for _ in range(repeat):
        started = time.perf_counter()
        reply = predictor.answer(batch, [request], top)[0]
        predictor.synchronize()
        model_ms.append(1000 * (time.perf_counter() - started))
    timings = {"load_ms": 1000 * (loaded - start), "model_ms": model_ms[0]}
    if len(model_ms) > 1:  # the first call warms up (allocations, kernel choices); the others do not
        timings["warm_model_ms"] = statistics.median(model_ms[1:])
    text = {"text": request.texts[0]} if predictor.task in ("vqa", "nlvr2") else {}
    return {"task": predictor.task, "images": request.images, **text, **reply,
            "truncated": predictor.truncated(request.texts), "device": str(predictor.device),
            "dtype": predictor.dtype_name, "decoder": predictor.decoder_name, **timings}


def predict_many(predictor: Predictor, requests: list[Request], top: int) -> tuple[list[dict], Counter]:
    """A reply per request, in order ({"id", "error"} for one that cannot be answered), and the
    count of each error. Images are read (PIL: decoded) in data.num_workers loader processes."""
    cfg, tokenizer = predictor.cfg, predictor.tokenizer
    items = RequestItems(requests, cfg, predictor.task, tokenizer, encoded=predictor.decoder is not None)
    loader = DataLoader(items, batch_size=cfg.train.eval_batch_size,
                        num_workers=cfg.data.num_workers, pin_memory=predictor.device.type == "cuda",
                        collate_fn=partial(collate_requests, pad_id=tokenizer.pad_id,
                                           pad_multiple=cfg.data.pad_multiple))
    out: list[Optional[dict]] = [None] * len(requests)
    errors: Counter = Counter()
    for part in loader:
        part = decode_requests(part, predictor.decoder)
        for index, (kind, message) in part["bad"]:
            out[index] = {"id": requests[index].id, "error": message}
            errors[kind] += 1
        if part["batch"] is not None:
            mine = [requests[index] for index in part["indices"]]
            for index, reply in zip(part["indices"], predictor.answer(part["batch"], mine, top)):
                out[index] = {"id": requests[index].id, **reply, "truncated": predictor.truncated(requests[index].texts)}
    return out, errors


def read_requests(path: str) -> list[Request]:
    """The requests of a --requests file, in order (blank lines skipped); a line that is not
    one is a Request with its `problem`, answered with an error like any other."""
    requests = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                try:
                    requests.append(parse_request(line, number))
                except ValueError as e:
                    requests.append(Request([], [], number, problem=f"line {number}: {e}"))
    return requests


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pixelbert.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="the run's config.json")
    parser.add_argument("--checkpoint", required=True,
                        help="run folder, its checkpoints/ folder, a step_N/ folder or a weights file")
    parser.add_argument("--image", action="append", default=[], help="image file (NLVR2: give it twice, left then right)")
    parser.add_argument("--text", action="append", default=[],
                        help="the question (VQA), the statement (NLVR2), or a text to match (repeat it)")
    parser.add_argument("--requests", help="a JSON-lines file of requests (instead of --image and --text)")
    parser.add_argument("--out", help="--requests: the JSON-lines file of replies (default stdout)")
    parser.add_argument("--top", type=int, default=DEFAULT_TOP,
                        help=f"VQA: answers to list; pre-training: word pieces per [MASK] (default {DEFAULT_TOP})")
    parser.add_argument("--device", default=None, help="torch device (default: cuda when there is one, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="the model's dtype (default fp32)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="one request: run the forward pass this many times (warm_model_ms: the median after the first)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for training")
    return parser


def usage_error(args: argparse.Namespace) -> Optional[str]:
    if args.top < 1 or args.repeat < 1:
        return "--top and --repeat must be at least 1"
    if args.requests and (args.image or args.text):
        return "give --requests or --image/--text, not both"
    if not args.requests and not args.image:
        return "give --image and --text (or --requests FILE)"
    if args.out and not args.requests:
        return "--out goes with --requests (one request prints its reply)"
    return None


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    problem = usage_error(args)
    if problem:
        print(f"pixelbert.predict: error: {problem}", file=sys.stderr)
        return 2
    try:
        if args.requests:
            requests = read_requests(args.requests)
        predictor = Predictor.load(args.config, args.checkpoint, args.overrides, args.device, args.dtype)
        if not args.requests:
            print(json.dumps(predict_one(predictor, Request(args.image, args.text), args.top, args.repeat), indent=2))
            return 0
    except (FileNotFoundError, ValueError) as e:  # ConfigError and DataError are ValueErrors
        print(f"pixelbert.predict: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    answered, errors = predict_many(predictor, requests, args.top)
    lines = "".join(json.dumps(reply) + "\n" for reply in answered)
    if args.out:
        write_atomic(args.out, lines)
    else:
        sys.stdout.write(lines)
    count = len(requests) - sum(errors.values())
    print(f"{count} of {len(requests)} requests answered in {time.perf_counter() - start:.1f} s "
          f"(images decoded by {predictor.decoder_name})"
          + (f"; not answered: {dict(errors)}" if errors else ""), file=sys.stderr)
    return 0 if count else 3


if __name__ == "__main__":
    sys.exit(main())
