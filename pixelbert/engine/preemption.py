"""Stopping on a scheduler's signal: a pre-empted job saves a checkpoint and exits cleanly.

Schedulers warn a job before they kill it: SIGTERM (Kubernetes, SLURM at the end of a time
limit or on pre-emption), or a chosen signal some time ahead (SLURM's `--signal=USR1@120`); the
DeepSpeed launcher passes SIGTERM on to its ranks and kills them 30 s later. The signals of
`train.stop_signals` are caught instead of ending the process at once: the ranks agree at the
end of the step in flight (riding on the step's non-finite-loss check, so it costs no extra
collective), save a checkpoint there and stop, and `train.resume=true` goes on exactly from it.
"""
from __future__ import annotations

import signal
from typing import Optional


class StopSignals:
    """While open, the named signals only record that they came (`received`: the last one's
    name); `close` puts the previous handlers back."""

    def __init__(self, names: list[str]):
        self.received: Optional[str] = None
        self._previous = {}
        for name in names:
            number = signal.Signals[name]
            self._previous[number] = signal.signal(number, self._record)

    def _record(self, number: int, frame) -> None:
        self.received = signal.Signals(number).name

    def close(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
