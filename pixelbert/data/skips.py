"""Counting skipped records, and stopping a run whose data is mostly broken."""
from __future__ import annotations

import threading
from collections import Counter
from typing import Callable, Iterable

import torch

from .errors import SKIP_REASONS

EXAMPLES_PER_REASON = 3


class TooManyBadRecords(RuntimeError):
    pass


class SkipCounter:
    """Skips per reason and the records attempted, on this rank; `totals` sums over ranks."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self.attempts = 0
        self.examples: dict[str, list[str]] = {}
        self._lock = threading.Lock()  # batches are prepared in a prefetch thread

    def add(self, skips: Iterable[tuple[str, str]], attempts: int) -> None:
        with self._lock:
            self.attempts += attempts
            for reason, message in skips:
                self.counts[reason] += 1
                shown = self.examples.setdefault(reason, [])
                if len(shown) < EXAMPLES_PER_REASON:
                    shown.append(message)

    def merge(self, counts: dict[str, int], attempts: int, examples: dict[str, list[str]]) -> None:
        """Add another counter's contents (another rank's, gathered)."""
        with self._lock:
            self.attempts += attempts
            self.counts.update(counts)
            for reason, messages in examples.items():
                shown = self.examples.setdefault(reason, [])
                shown.extend(messages[:EXAMPLES_PER_REASON - len(shown)])

    def totals(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
               device: torch.device | str = "cpu") -> tuple[dict[str, int], int]:
        """(skips per reason, attempts), summed over ranks with `all_reduce_sum` when given
        (a collective call: every rank must make it)."""
        with self._lock:
            local = [self.counts[r] for r in SKIP_REASONS] + [self.attempts]
        values = torch.tensor(local, dtype=torch.float64, device=device)
        if all_reduce_sum is not None:
            values = all_reduce_sum(values)
        counts = [int(v) for v in values.tolist()]
        return {r: c for r, c in zip(SKIP_REASONS, counts) if c}, counts[-1]

    def check(self, skipped: dict[str, int], attempts: int, max_fraction: float, min_attempts: int) -> None:
        """Raise when more than `max_fraction` of the attempts were skipped (once at least
        `min_attempts` were made, so that one early bad file does not stop a run)."""
        total = sum(skipped.values())
        if attempts >= max(min_attempts, 1) and total > max_fraction * attempts:
            with self._lock:
                examples = "; ".join(e for shown in self.examples.values() for e in shown)
            raise TooManyBadRecords(
                f"{total} of {attempts} records were bad ({total / attempts:.1%} > data.max_bad_fraction="
                f"{max_fraction}): {summary(skipped)}. Examples: {examples or 'on other ranks'}")


def summary(skipped: dict[str, int]) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in sorted(skipped.items())) or "none"
