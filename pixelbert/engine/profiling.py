"""A torch.profiler window over a few training steps, written as a trace and a table.

Used by `train.profile_steps` and `benchmarks/throughput.py --profile`. The trace
(`<name>.json.gz`) opens in Perfetto (ui.perfetto.dev) or chrome://tracing; the table
(`<name>.txt`) lists the ops by self time (CUDA time on a GPU), for reading without a viewer.
"""
from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile


class StepProfiler:
    """Profiles steps `first`..`last` (inclusive): call `before(step)` and `after(step)` around
    each step; the files are written after `last`, or by `close()` if the steps end sooner."""

    def __init__(self, first: int, last: int, out_dir: str | Path, name: str, cuda: bool):
        self.first, self.last, self.cuda = first, last, cuda
        self.out_dir, self.name = Path(out_dir), name
        self.active: profile | None = None
        self.written: list[Path] = []

    def before(self, step: int) -> None:
        if step == self.first and self.active is None and not self.written:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.active = profile(activities=activities)
            self.active.start()

    def after(self, step: int) -> None:
        if self.active is not None and step >= self.last:
            self.close()

    def close(self) -> None:
        """Stop and write the files (nothing when the window never opened)."""
        if self.active is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
        prof, self.active = self.active, None
        prof.stop()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace, table = self.out_dir / f"{self.name}.json.gz", self.out_dir / f"{self.name}.txt"
        plain = self.out_dir / f".{self.name}.json"
        prof.export_chrome_trace(str(plain))
        with plain.open("rb") as src, gzip.open(trace, "wb") as dst:  # traces compress about 10x
            shutil.copyfileobj(src, dst)
        plain.unlink()
        sort_by = "self_cuda_time_total" if self.cuda else "self_cpu_time_total"
        table.write_text(f"steps {self.first}-{self.last}, sorted by {sort_by}\n"
                         + prof.key_averages().table(sort_by=sort_by, row_limit=40) + "\n")
        self.written = [trace, table]
