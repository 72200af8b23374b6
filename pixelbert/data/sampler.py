"""Step-indexed batch sampling: which (index, seed) pairs each rank sees at each optimiser step.

The data order is one infinite stream of positions: epoch e is a permutation of the dataset
drawn from (seed, e), and epochs follow each other. Step s consumes stream positions
[s*G, (s+1)*G), G = micro x accum x world, whatever epoch they fall in; micro-batch a of
rank r takes the slice starting at (a*world + r)*micro. A step's samples and their seeds
therefore depend only on (seed, s, G), never on how G is split into ranks and accumulation
slots, and resuming at step k replays exactly the tail of the stream.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from .dataset import PretrainDataset, collate


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """Seed of the sample at `position` of epoch `epoch`: a fresh mask, negative and pixel
    draw every epoch, identical for every rank/worker layout."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


class StepBatchSampler:
    """Infinite iterable of micro-batches, each a list of `(index, sample_seed)`, for one rank:
    the accum micro-batches of `start_step`, then of `start_step + 1`, and so on."""

    def __init__(self, num_samples: int, micro_batch_size: int, grad_accum_steps: int,
                 world_size: int, rank: int, seed: int, start_step: int = 0):
        if min(num_samples, micro_batch_size, grad_accum_steps, world_size) < 1:
            raise ValueError("num_samples, micro_batch_size, grad_accum_steps and world_size must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if seed < 0 or start_step < 0:
            raise ValueError(f"seed and start_step must be >= 0, got {seed} and {start_step}")
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.grad_accum_steps = grad_accum_steps
        self.world_size = world_size
        self.rank = rank
        self.seed = seed
        self.start_step = start_step
        self.global_batch_size = micro_batch_size * grad_accum_steps * world_size
        self._perm_epoch = -1
        self._perm = np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        """Order of the dataset indices in `epoch` (the current one is cached)."""
        if epoch != self._perm_epoch:
            # (seed, epoch) as separate entropy words: unlike seed + epoch, runs with nearby
            # seeds never share an epoch order.
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            self._perm, self._perm_epoch = rng.permutation(self.num_samples), epoch
        return self._perm

    def micro_batch(self, step: int, slot: int) -> list[tuple[int, int]]:
        """This rank's micro-batch in accumulation slot `slot` of optimiser step `step`."""
        first = step * self.global_batch_size + (slot * self.world_size + self.rank) * self.micro_batch_size
        batch = []
        for p in range(first, first + self.micro_batch_size):
            epoch, pos = divmod(p, self.num_samples)
            batch.append((int(self.permutation(epoch)[pos]), sample_seed(self.seed, epoch, pos)))
        return batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            for slot in range(self.grad_accum_steps):
                yield self.micro_batch(step, slot)
            step += 1


def build_pretrain_loader(dataset: PretrainDataset, sampler: StepBatchSampler, data_cfg,
                          collate_fn: Callable[..., dict] = collate) -> DataLoader:
    """DataLoader driven by `sampler`, with the worker settings of the data section.

    `collate_fn(items, pad_id, pad_multiple)` gets the tokenizer's pad id and data.pad_multiple
    bound here (a partial of a module-level function pickles into worker processes).
    """
    workers = data_cfg.num_workers
    return DataLoader(
        dataset, batch_sampler=sampler,
        collate_fn=partial(collate_fn, pad_id=dataset.tokenizer.pad_id, pad_multiple=data_cfg.pad_multiple),
        num_workers=workers, prefetch_factor=data_cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        # Its own generator: starting an iterator then draws no number from the global RNG,
        # which exact resume restores and the model's dropout consumes.
        generator=torch.Generator().manual_seed(sampler.seed))
