"""Stopping on a scheduler's signal: a pre-empted job saves a checkpoint and exits cleanly.

Schedulers warn a job before they kill it: SIGTERM (Kubernetes, SLURM at the end of a time
limit or on pre-emption), or a chosen signal some time ahead (SLURM's `--signal=USR1@120`); the
DeepSpeed launcher passes SIGTERM on to its ranks and kills them 30 s later. The signals of
`train.stop_signals` are caught instead of ending the process at once: the ranks agree at the
end of the step in flight (riding on the step's non-finite-loss check, so it costs no extra
collective), save a checkpoint there and stop, and `train.resume=true` goes on exactly from it.
`train()` then raises StoppedBySignal, which train.py turns into `train.signal_exit_code`.
"""
from __future__ import annotations

import signal
from functools import partial
from typing import Callable, Optional


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


def ignore_signals(names: tuple[str, ...], worker_id: int = 0) -> None:
    """Ignore the named signals in this process (a DataLoader worker_init_fn, via
    `loader_worker_init`)."""
    for name in names:
        signal.signal(signal.Signals[name], signal.SIG_IGN)


def loader_worker_init(stop_signals: list[str]) -> Optional[Callable[[int], None]]:
    """The worker_init_fn that keeps loader workers alive through the run's stop signals. SLURM
    signals every process of a job step, and the DeepSpeed launcher its whole process tree: a
    worker killed by the signal makes its DataLoader raise in the main process mid-step, before
    the checkpoint. Ignoring it, workers live until the main process ends them (or, should it
    die, their watchdog does within seconds). None when there is nothing to ignore."""
    return partial(ignore_signals, tuple(stop_signals)) if stop_signals else None


class StoppedBySignal(Exception):
    """The run stopped on a stop signal after saving its checkpoint (the message says which
    signal and where); raised once everything else at the end of the run is done."""
