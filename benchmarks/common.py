"""What every benchmark here shares: timing medians, the commit, CSV rows."""
from __future__ import annotations

import csv
import os
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]


def median_ms(device: torch.device, fn: Callable, repeats: int, warmup: int = 5) -> float:
    """Median milliseconds of fn() after warm-up: triton's do_bench (or CUDA events) on a GPU,
    perf_counter on the CPU."""
    if device.type == "cuda":
        try:
            import triton.testing
            return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))
        except ImportError:
            pass
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - start_s) * 1e3)
    return statistics.median(samples)


def git_commit() -> str:
    """The short commit of the working tree: $PIXELBERT_COMMIT where set (a copy of the tree
    without .git, as on a device machine), else git's; unknown outside a checkout."""
    if os.environ.get("PIXELBERT_COMMIT"):
        return os.environ["PIXELBERT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def append_csv(path: str | Path, fields: list[str], rows: list[dict]) -> None:
    """Append rows to a CSV file, writing the header when the file is new."""
    new_file = not Path(path).exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        if new_file:
            writer.writeheader()
        writer.writerows(rows)
