"""Step-indexed batch sampling: which (index, seed) pairs each rank sees at each optimiser step.

The data order is one infinite stream of positions: epoch e is a permutation of the epoch's
items drawn from (seed, e) (every index once, or, with source weights, each source's indices
repeated or subsampled by its weight), and epochs follow each other. Step s consumes stream
positions [s*G, (s+1)*G), G = micro x accum x world, whatever epoch they fall in; micro-batch
a of rank r takes the slice starting at (a*world + r)*micro. With aspect grouping, the W*G
positions of each window of W steps are sorted by aspect ratio and cut into W steps (in an
order drawn from the seed), so a step's images pad little. A step's samples and their seeds
therefore depend only on (seed, s, G, W), never on how G is split into ranks and accumulation
slots, and resuming at step k replays exactly the tail of the stream.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Iterator, Optional, Sequence

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
                 world_size: int, rank: int, seed: int, start_step: int = 0, *,
                 source_ids: Sequence[int] | None = None, source_weights: Sequence[float] | None = None,
                 aspect_ratios: Sequence[float] | None = None, aspect_window: int = 1):
        """`source_ids[i]` is the source of index i and `source_weights[k]` the weight of source k;
        `aspect_ratios[i]` (height / width) drives aspect grouping over `aspect_window` steps."""
        if min(num_samples, micro_batch_size, grad_accum_steps, world_size, aspect_window) < 1:
            raise ValueError("num_samples, micro_batch_size, grad_accum_steps, world_size and "
                             "aspect_window must be >= 1")
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
        self.sources = self._sources(num_samples, source_ids, source_weights)
        self.epoch_length = sum(len(indices) * whole + partial for indices, whole, partial in self.sources)
        if self.epoch_length < 1:
            raise ValueError("the source weights leave no item in an epoch")
        if aspect_ratios is not None and len(aspect_ratios) != num_samples:
            raise ValueError(f"aspect_ratios has {len(aspect_ratios)} entries for {num_samples} samples")
        self.aspect_ratios = None if aspect_ratios is None else np.asarray(aspect_ratios, dtype=np.float64)
        self.aspect_window = aspect_window if aspect_ratios is not None else 1
        self._perms: dict[int, np.ndarray] = {}  # the last two epochs: a window may straddle them
        self._window, self._window_steps = -1, np.empty(0, dtype=np.int64)

    @staticmethod
    def _sources(num_samples, source_ids, source_weights) -> list[tuple[np.ndarray, int, int]]:
        """Per source: its indices, how many whole copies an epoch holds, and how many more
        drawn at random (weight 2.5 on 10 items: 2 copies + 5)."""
        if source_ids is None:
            return [(np.arange(num_samples), 1, 0)]
        source_ids = np.asarray(source_ids)
        if len(source_ids) != num_samples:
            raise ValueError(f"source_ids has {len(source_ids)} entries for {num_samples} samples")
        weights = list(source_weights) if source_weights is not None else [1.0] * (int(source_ids.max()) + 1)
        if any(not w > 0 for w in weights) or source_ids.min() < 0 or source_ids.max() >= len(weights):
            raise ValueError("source weights must be > 0, one per source id")
        sources = []
        for k, weight in enumerate(weights):
            indices = np.flatnonzero(source_ids == k)
            whole = int(weight)
            sources.append((indices, whole, int(round((weight - whole) * len(indices)))))
        return sources

    def permutation(self, epoch: int) -> np.ndarray:
        """Order of the dataset indices in `epoch` (the last two are cached)."""
        if epoch not in self._perms:
            # (seed, epoch) as separate entropy words: unlike seed + epoch, runs with nearby
            # seeds never share an epoch order.
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch]))
            if len(self.sources) == 1 and self.sources[0][1:] == (1, 0):
                items = self.sources[0][0]
            else:
                items = np.concatenate([np.concatenate([np.tile(indices, whole),
                                                        rng.choice(indices, partial, replace=False)])
                                        for indices, whole, partial in self.sources])
            self._perms = {e: p for e, p in self._perms.items() if abs(e - epoch) == 1}
            self._perms[epoch] = rng.permutation(items)
        return self._perms[epoch]

    def step_positions(self, step: int) -> np.ndarray:
        """The G stream positions of optimiser step `step`, in the order slots and ranks take them."""
        g, w = self.global_batch_size, self.aspect_window
        if w == 1:
            return np.arange(step * g, (step + 1) * g)
        window, offset = divmod(step, w)
        if window != self._window:
            positions = np.arange(window * w * g, (window + 1) * w * g)
            ratios = self.aspect_ratios[[self.index_at(p) for p in positions]]
            chunks = positions[np.argsort(ratios, kind="stable")].reshape(w, g)
            # Sorted chunks go to the window's steps in a seeded order, not narrow-to-wide.
            order = np.random.default_rng(np.random.SeedSequence([self.seed, 2**31, window])).permutation(w)
            self._window, self._window_steps = window, chunks[order]
        return self._window_steps[offset]

    def index_at(self, position: int) -> int:
        epoch, pos = divmod(int(position), self.epoch_length)
        return int(self.permutation(epoch)[pos])

    def micro_batch(self, step: int, slot: int) -> list[tuple[int, int]]:
        """This rank's micro-batch in accumulation slot `slot` of optimiser step `step`."""
        first = (slot * self.world_size + self.rank) * self.micro_batch_size
        batch = []
        for p in self.step_positions(step)[first:first + self.micro_batch_size]:
            epoch, pos = divmod(int(p), self.epoch_length)
            batch.append((int(self.permutation(epoch)[pos]), sample_seed(self.seed, epoch, pos)))
        return batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while True:
            for slot in range(self.grad_accum_steps):
                yield self.micro_batch(step, slot)
            step += 1


def build_pretrain_loader(dataset: PretrainDataset, sampler: StepBatchSampler, data_cfg,
                          collate_fn: Callable[..., dict] = collate,
                          worker_init_fn: Optional[Callable[[int], None]] = None) -> DataLoader:
    """The pre-training DataLoader: `collate_fn(items, pad_id, pad_multiple,
    itm_negative_probability)` with the tokenizer's and the data section's values bound."""
    return build_loader(dataset, sampler, data_cfg, partial(
        collate_fn, pad_id=dataset.tokenizer.pad_id, pad_multiple=data_cfg.pad_multiple,
        itm_negative_probability=data_cfg.itm_negative_probability), worker_init_fn)


def build_loader(dataset, sampler: StepBatchSampler, data_cfg, collate_fn: Callable[[list], dict],
                 worker_init_fn: Optional[Callable[[int], None]] = None) -> DataLoader:
    """DataLoader driven by `sampler`, with the worker settings of the data section.

    `collate_fn` (and `worker_init_fn`) must pickle into worker processes: a module-level
    function or a partial of one.
    """
    workers = data_cfg.num_workers
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_fn, worker_init_fn=worker_init_fn,
        num_workers=workers, prefetch_factor=data_cfg.prefetch_factor if workers > 0 else None,
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        # Its own generator: starting an iterator then draws no number from the global RNG,
        # which exact resume restores and the model's dropout consumes.
        generator=torch.Generator().manual_seed(sampler.seed))
