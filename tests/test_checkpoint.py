"""Checkpoint retention (train.keep_checkpoints): what prune deletes and what it never does."""
from __future__ import annotations

import json

from pixelbert.engine import checkpoint


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
