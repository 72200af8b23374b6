"""Training metrics: summed across micro-batches and ranks, written to `metrics.jsonl`."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pixelbert.engine.distributed import all_reduce_sum
from pixelbert.fileio import write_atomic

class MetricsWindow:
    """Accumulates the model's outputs over the steps between two log lines.

    The model's output dict holds `loss`, any number of `<name>_loss` values (averaged per
    micro-batch) and `<name>_correct` / `<name>_count` pairs (logged as `<name>_acc`). Every
    micro-batch of a task gives the same keys, so the sums line up across ranks.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.keys: list[str] = []
        self.reset()

    def reset(self) -> None:
        self.totals = torch.zeros(len(self.keys), dtype=torch.float64, device=self.device)

    def add(self, out: dict[str, torch.Tensor], samples: int, images: int | None = None,
            padded_fraction: float = 0.0) -> None:
        """One micro-batch: the model's outputs, its (image, text) pairs and images, and the
        share of its padded image batch that is padding."""
        loss = out["loss"].detach().double()
        values = {key: value.detach() for key, value in out.items()
                  if key == "loss" or key.endswith(("_loss", "_correct", "_count"))}
        values.update(micro_batches=1, samples=samples, images=samples if images is None else images,
                      padded_fraction=padded_fraction, nonfinite=(~torch.isfinite(loss)).double())
        if not self.keys:
            self.keys = sorted(values)
            self.reset()
        elif sorted(values) != self.keys:
            raise ValueError(f"model outputs changed keys within a window: {sorted(values)} vs {self.keys}")
        self.totals += torch.stack([torch.as_tensor(values[k], dtype=torch.float64, device=self.device)
                                    for k in self.keys])

    def step_check(self, stop_requested: bool = False) -> tuple[bool, bool]:
        """(whether any rank saw a non-finite loss in this window, whether any rank asked to
        stop): the same on every rank, from one small collective."""
        flags = torch.stack([self.totals[self.keys.index("nonfinite")],
                             torch.tensor(float(stop_requested), dtype=torch.float64, device=self.device)])
        nonfinite, stop = all_reduce_sum(flags).tolist()
        return nonfinite > 0, stop > 0

    def summary(self) -> dict[str, float]:
        """Means over the window, across all ranks (a collective call: every rank must call it)."""
        return window_means(dict(zip(self.keys, all_reduce_sum(self.totals.clone()).tolist())))

    def local_totals(self) -> dict[str, float]:
        """This rank's sums (none when it added nothing), for window_means after a merge."""
        return dict(zip(self.keys, self.totals.tolist()))


def window_means(t: dict[str, float]) -> dict[str, float]:
    """The logged means of a window's summed outputs (MetricsWindow's totals by key)."""
    micro = max(t["micro_batches"], 1.0)
    summary = {"loss": t["loss"] / micro}
    summary.update({k: v / micro for k, v in t.items() if k.endswith("_loss")})
    summary.update({k[:-len("_correct")] + "_acc": v / max(t[k[:-len("_correct")] + "_count"], 1.0)
                    for k, v in t.items() if k.endswith("_correct")})
    summary.update(samples=t["samples"], images=t["images"],
                   padded_fraction=t["padded_fraction"] / micro)
    return summary


class JsonlLog:
    """Append-only `metrics.jsonl`; on resume, lines past the checkpoint's step are dropped so
    the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            write_atomic(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")

