"""Checkpoint retention (train.keep_checkpoints): what prune deletes and what it never does;
a resume DeepSpeed cannot make, refused before it starts."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from pixelbert.config import ConfigError
from pixelbert.engine import checkpoint
from pixelbert.engine.distributed import DistInfo


def test_prune_keeps_the_newest_the_latest_and_the_best(tmp_path):
    for step in (2, 4, 6, 10, 12):
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / "mp_rank_00_model_states.pt").write_bytes(b"weights")
    (tmp_path / "step_notes").mkdir()  # not a checkpoint: left alone
    (tmp_path / "latest").write_text("step_10")  # step_12: written after, never completed
    (tmp_path / "best.json").write_text(json.dumps({"tag": "step_4", "step": 4, "metric": "overall", "value": 1.0}))
    assert checkpoint.prune(tmp_path, keep=1) == ["step_2", "step_6"]  # numeric order, not text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "latest", "step_10", "step_12",
                                                          "step_4", "step_notes"]
    assert checkpoint.prune(tmp_path, keep=3) == []


@pytest.mark.parametrize("nvme", [False, True])
def test_nvme_offloaded_state_is_not_resumed_on_another_rank_count(tmp_path, monkeypatch, nvme):
    """Two ranks saved; one resumes. Through the universal layout that works (its loading is
    tested in test_universal.py), except with the optimiser state offloaded to NVMe: refused
    with the reason, before anything is converted or DeepSpeed is asked to load."""
    (tmp_path / "step_4").mkdir()
    for rank in range(2):
        (tmp_path / "step_4" / f"rng_rank{rank}.pt").write_bytes(b"")
    (tmp_path / checkpoint.LATEST).write_text("step_4")
    assert checkpoint.needs_universal(tmp_path, world_size=1, zero_stage=2)
    calls = []
    monkeypatch.setattr(checkpoint.universal, "convert", lambda tag_dir: calls.append(("convert", tag_dir)))
    engine = SimpleNamespace(zero_optimization_stage=lambda: 2, load_universal_checkpoint=lambda: True,
                             zero_nvme_offload_optimizer=lambda: nvme,
                             load_checkpoint=lambda directory, **kwargs: calls.append(("load", kwargs)) or (None, None))
    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    if nvme:
        with pytest.raises(ConfigError, match="written by 2 ranks, resumed on 1 with the optimiser offloaded to NVMe"):
            checkpoint.load(engine, tmp_path, dist)
        assert calls == []
    else:  # converted, then loaded (this stand-in of DeepSpeed's engine loads nothing)
        with pytest.raises(RuntimeError, match="DeepSpeed could not load checkpoint"):
            checkpoint.load(engine, tmp_path, dist)
        assert [name for name, _ in calls] == ["convert", "load"] and calls[0][1] == tmp_path / "step_4"
