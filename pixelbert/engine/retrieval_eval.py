"""Retrieval evaluation: every image's pairs scored by the ITM head (all of them, or those of
two-way shortlists by the contrastive similarity), recalls both ways, and the fold protocol of
COCO's 1K test.

Each image is read once, in loader workers (decoded there by PIL, or a batch at a time by
DALI), and its CNN features are reused for all of its pairs; on several ranks image i is on
rank i mod world size and the score rows are merged. An image that cannot be read is counted
and leaves the ranking with its texts.
"""
from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader

from pixelbert import evaluation
from pixelbert.data.errors import SKIP_REASONS, BadSample
from pixelbert.data.formats import Record
from pixelbert.data.images import load_encoded, load_image, pad_images
from pixelbert.data.skips import SkipCounter
from pixelbert.engine.data import with_text
from pixelbert.engine.distributed import DistInfo, all_reduce_sum
from pixelbert.engine.eval_setup import EvalSetup, check_readable
from pixelbert.engine.preemption import loader_worker_init
from pixelbert.fileio import write_atomic

RANKED_MATCHES = 10  # per image and per text in the rankings file: enough for R@10


def evaluate_retrieval(model, setup: EvalSetup, records: list[Record], split: str, skips: SkipCounter) -> dict:
    """Recalls of the split (and, with task.retrieval_folds, the folds' average), with what the
    ranking covered; each image's and each text's best matches go to the rankings file."""
    with torch.no_grad():
        ranked = retrieval_scores(model, setup, records, skips)
    report = ranking_report(ranked.scores, ranked.img_of_text, setup.cfg.task.shortlist, ranked.whole,
                            warn=setup.dist.is_main)
    if setup.cfg.task.retrieval_folds:
        report["folds"] = fold_reports(ranked, setup.cfg.task)
    rankings_file = Path(setup.cfg.train.output_dir) / f"retrieval_{split}{setup.results_suffix}_rankings.json"
    if setup.dist.is_main:
        write_atomic(rankings_file, json.dumps(best_matches(ranked)))
    report["rankings_file"] = str(rankings_file)
    return report


def best_matches(ranked: "RankedPairs", top: int = RANKED_MATCHES) -> dict:
    """The `top` best-scored texts of each image and images of each text, by the scores the
    recalls are computed from (with a shortlist, among its pairs only), best first. Texts and
    images are named by their index in `texts` and `images`."""
    scores = ranked.scores if ranked.whole is None else ranked.scores.masked_fill(~ranked.whole, float("-inf"))

    def best(rows: torch.Tensor, key: str) -> list[list[dict]]:
        # topk, not a sort: COCO's 5K test has 125M pairs, whose int64 sort order alone is 1 GB.
        values, indices = rows.topk(min(top, rows.shape[1]), dim=1)
        return [[{key: n, "score": v} for v, n in zip(row_values, row_indices) if math.isfinite(v)]
                for row_values, row_indices in zip(values.tolist(), indices.tolist())]
    return {"images": ranked.images, "texts": [{"text": text, "image": image}
                                               for text, image in zip(ranked.texts, ranked.img_of_text)],
            "image_to_text": best(scores, "text"), "text_to_image": best(scores.T, "image")}


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
        size = (self.data.image_shorter, self.data.image_longer)
        try:
            image = load_encoded(self.paths[index], *size) if self.encoded else \
                load_image(self.paths[index], *size, self.data.pixel_norm())
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
        """(index, pixels on the device, sizes) of each readable image of this rank's share, in
        order; with equal_passes, a blank pass (None, a blank image, its size) in place of each
        unreadable one, then one for each pass it is short of the busiest rank: the n-th pass of
        every rank is then the n-th image of its share, or a blank."""
        data, setup = self.setup.cfg.data, self.setup
        share = setup.my_share(len(self.paths))
        loader = DataLoader(EvalImages(self.paths, data, encoded=setup.decoder is not None), batch_size=None,
                            sampler=list(share), num_workers=data.num_workers, pin_memory=torch.cuda.is_available(),
                            worker_init_fn=loader_worker_init(setup.cfg.train.stop_signals))
        made = 0
        pending: list[tuple[int, object]] = []  # (index, file bytes or None: unreadable) for the next decoder call
        for index, *image in loader:
            if isinstance(image[0], int):
                self.unreadable[index] = image[0]
                if setup.decoder is not None:
                    pending.append((index, None))  # its blank keeps its place among the pending images
                elif setup.equal_passes:
                    made += 1
                    yield self.blank()
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
        for _ in range(setup.filler_passes(len(self.paths), made)):
            yield self.blank()

    def blank(self):
        """A pass without an image: (None, the smallest image the CNN's grid takes, its size)."""
        setup, multiple = self.setup, self.setup.cfg.data.pad_multiple
        side = -(-64 // multiple) * multiple
        return None, torch.zeros(1, 3, side, side, device=setup.dist.device, dtype=setup.float_dtype), \
            torch.tensor([[side, side]])

    def decode(self, pending: list[tuple[int, object]]):
        """(index, pixels, sizes) of each image of `pending` the decoder reads, each cut to its own
        padded size as PIL's path pads it; the others marked unreadable (with equal_passes, a
        blank pass in their place)."""
        setup, multiple = self.setup, self.setup.cfg.data.pad_multiple
        readable = [(index, encoded) for index, encoded in pending if encoded is not None]
        out = setup.decoder([encoded for _, encoded in readable]) if readable else None
        failed = {readable[position][0]: reason for position, reason, _ in out.failed} if out else {}
        for index, reason in failed.items():
            self.unreadable[index] = skip_code(reason)
        row = 0
        for index, encoded in pending:
            if encoded is None or index in failed:
                if setup.equal_passes:
                    yield self.blank()
                continue
            height, width = (-(-int(side) // multiple) * multiple for side in out.sizes[row])
            pixels = out.images[row:row + 1, :, :height, :width]
            yield index, pixels.to(setup.dist.device, setup.float_dtype), out.sizes[row:row + 1]
            row += 1

    def count(self, skips: SkipCounter) -> None:
        """Every image as an attempt, every unreadable one as a skip."""
        skips.add([(SKIP_REASONS[code - 1], f"{SKIP_REASONS[code - 1]}: {path}")
                   for path, code in zip(self.paths, self.unreadable.tolist()) if code], len(self.paths))


@dataclass
class RankedPairs:
    """A retrieval evaluation's scores, over the images that could be read and their texts."""
    scores: torch.Tensor  # [images, texts] float32 (the model's scores, exactly); -inf for the pairs no shortlist took
    img_of_text: list[int]  # the image (row) of each text
    fold_of_image: torch.Tensor  # [images] each image's fold (task.retrieval_folds; all 0 without)
    images: list[str]  # each row's image path
    texts: list[str]  # each column's text
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
    # float32 holds the model's scores exactly: at COCO's 5K test (125M pairs) this is 0.5 GB per rank
    scores = torch.full((len(images), len(texts)), float("-inf"), dtype=torch.float32)
    read = ImageReader(images, setup)
    chosen, whole, in_fold = None, None, None
    if cfg.task.shortlist:
        similarity = contrastive_similarity(model, setup, read, input_ids, attention_mask)
        whole = two_way_shortlist(similarity, cfg.task.shortlist)
        chosen = whole
        if cfg.task.retrieval_folds:
            in_fold = fold_shortlists(similarity, fold_of_image, torch.as_tensor(img_of_text), cfg.task.shortlist)
            chosen = whole | in_fold
    shares = [setup.share_of(rank, len(images)) for rank in range(dist.world_size)] if setup.equal_passes else None
    plan = scoring_plan(chosen, len(texts), 8 * cfg.train.eval_batch_size, shares)
    for n, (i, pixels, sizes) in enumerate(read):  # i None: a blank pass (equal_passes)
        feat = model.pixel_embeddings.features(pixels)  # once per image, reused for all its pairs
        for chunk, keep in plan(n, i):
            batch = setup.to_device({"images": pixels, "image_sizes": sizes, "input_ids": input_ids[chunk],
                                     "attention_mask": attention_mask[chunk],
                                     "token_type_ids": torch.zeros_like(input_ids[chunk]),
                                     "pair_image": torch.zeros(len(chunk), dtype=torch.long)})
            pair_scores = model.scores(batch, feat)
            if keep:
                scores[i, chunk] = pair_scores.float().cpu()
    if dist.world_size > 1:  # every rank filled its own rows; the others hold -inf
        # Each pair was scored on its image's rank alone: a sum of the others' zeros is exact, and
        # the pairs nobody scored are known to all (the unscored shortlist, unreadable images).
        scores.masked_fill_(torch.isinf(scores), 0.0)
        scores = all_reduce_sum(scores.to(dist.device)).cpu()
        merge_unreadable(read, dist)
        scored = (read.unreadable == 0)[:, None] & (chosen if chosen is not None else True)
        scores.masked_fill_(~scored, float("-inf"))
    read.count(skips)
    check_readable(skips, cfg)
    return readable_only(RankedPairs(scores, img_of_text, fold_of_image, images, [r.text for r in records], whole,
                                     in_fold), read.unreadable == 0)


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


def scoring_plan(chosen: Optional[torch.Tensor], texts: int, per_pass: int, shares: Optional[list[range]]
                 ) -> Callable[[int, Optional[int]], list[tuple[torch.Tensor, bool]]]:
    """(pass number, image or None) -> the scorer calls of that pass: (text rows, whether to keep
    their scores). An image's rows (every text, or those its row of `chosen` takes) go in calls of
    at most `per_pass`. With `shares` (equal_passes: every rank's images, in the order it reads
    them, a blank pass in place of an unreadable one), the n-th pass of every rank makes as many
    calls as the busiest rank's n-th pass, the extra ones one pair whose score is dropped: all
    ranks make the same calls, and no list is scored at the longest list's length."""
    def calls_of(i: Optional[int]) -> list[tuple[torch.Tensor, bool]]:
        if i is None:
            return []
        rows = torch.arange(texts) if chosen is None else chosen[i].nonzero().flatten()
        return [(chunk, True) for chunk in rows.split(per_pass)]
    if shares is None:
        return lambda n, i: calls_of(i)
    listed = torch.full((sum(map(len, shares)),), texts) if chosen is None else chosen.sum(dim=1)
    needed = (-(-listed // per_pass)).tolist()  # the calls of each image
    busiest = [max((needed[share[n]] for share in shares if n < len(share)), default=0)
               for n in range(max(map(len, shares)))]
    filler = (torch.zeros(1, dtype=torch.long), False)

    def plan(n: int, i: Optional[int]) -> list[tuple[torch.Tensor, bool]]:
        calls = calls_of(i)
        return calls + [filler] * ((busiest[n] if n < len(busiest) else 0) - len(calls))
    return plan


def readable_only(ranked: RankedPairs, readable: torch.Tensor) -> RankedPairs:
    """The pairs of the readable images and of the texts that describe them."""
    new_index = (torch.cumsum(readable, 0) - 1).tolist()
    texts = [n for n, image in enumerate(ranked.img_of_text) if readable[image]]
    cut = lambda pairs: None if pairs is None else pairs[readable][:, texts]  # noqa: E731
    return RankedPairs(cut(ranked.scores), [new_index[ranked.img_of_text[n]] for n in texts],
                       ranked.fold_of_image[readable], [path for path, kept in zip(ranked.images, readable) if kept],
                       [ranked.texts[n] for n in texts], cut(ranked.whole), cut(ranked.in_fold))


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
