"""What every evaluation needs beside the model and its records: the run's config, tokenizer,
ranks and decoder (EvalSetup), and the rule that stops one whose split cannot be read."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from pixelbert.config import Config
from pixelbert.data.skips import SkipCounter, TooManyBadRecords, summary
from pixelbert.data.tasks import AnswerVocabulary
from pixelbert.data.tokenizer import TextTokenizer
from pixelbert.engine.batches import BatchPreparer, to_device
from pixelbert.engine.decoding import build_decoder
from pixelbert.engine.distributed import DistInfo, gather_objects


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
        return self.share_of(self.dist.rank, count)

    def share_of(self, rank: int, count: int) -> range:
        """The indices `rank` evaluates."""
        return range(rank, count, self.dist.world_size)

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


def check_readable(skips: SkipCounter, cfg: Config) -> None:
    """Stop when more of the split than data.max_bad_fraction could not be read (it has been
    read in full: the fraction is final, no warm-up), or when none of it could."""
    skipped, attempts = skips.totals()
    if sum(skipped.values()) == attempts:
        raise TooManyBadRecords(f"none of the {attempts} records could be read: {summary(skipped)}. "
                                f"Examples: {'; '.join(e for shown in skips.examples.values() for e in shown)}")
    skips.check(skipped, attempts, cfg.data.max_bad_fraction, min_attempts=0)
