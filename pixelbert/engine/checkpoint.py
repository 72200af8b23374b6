"""Checkpoints that resume exactly: model, optimiser, scheduler (DeepSpeed's own files), plus
the step and every rank's random state.

DeepSpeed writes a tag folder `step_N/`; each rank adds `rng_rank{R}.pt`; only when all have
finished does rank 0 point `latest` at the tag, by an atomic rename. A run killed mid-save
therefore resumes from the previous complete checkpoint, never from a partial one. Only after
that are checkpoints beyond `keep` (train.keep_checkpoints) deleted, oldest first.

A ZeRO checkpoint resumed on another number of ranks is first converted, by the main rank and
once, to DeepSpeed's universal layout (`engine/universal.py`), which the engine then loads with
`checkpoint.load_universal` set in its DeepSpeed config (`needs_universal`).
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pixelbert.config import ConfigError
from pixelbert.engine import universal
from pixelbert.engine.distributed import DistInfo, barrier, on_main
from pixelbert.fileio import torch_save_atomic, write_atomic

LATEST = "latest"
BEST = "best.json"  # {"tag", "step", "metric", "value"}: train.best_metric's best validation


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, directory: str | Path, step: int, dist: DistInfo, client_state: Optional[dict] = None,
         keep: int = 0, best: Optional[dict] = None) -> Path:
    """Save a complete checkpoint for `step`, mark it as the latest (and, given `best` =
    {"metric", "value"}, as the best validation's in best.json), then delete all but the newest
    `keep` checkpoints and the best (0: none deleted)."""
    directory = Path(directory)
    tag = f"step_{step}"
    engine.save_checkpoint(str(directory), tag=tag, client_state={"step": step, **(client_state or {})},
                           save_latest=False)
    torch_save_atomic(rng_state(), directory / tag / f"rng_rank{dist.rank}.pt")
    barrier()  # every rank's part is written: the tag is complete

    def mark() -> None:
        write_atomic(directory / LATEST, tag)
        if best is not None:
            write_atomic(directory / BEST, json.dumps({"tag": tag, "step": step, **best}))
    on_main(dist, mark)  # a failure there (a full disk) stops every rank
    if keep and dist.is_main:  # the folder is shared by all ranks, as resuming from it requires
        prune(directory, keep)
    return directory / tag


def prune(directory: Path, keep: int) -> list[str]:
    """Delete the `step_N` folders older than the newest `keep` (never the latest, nor the best).
    Each goes by a rename first, so a run killed while deleting leaves no partial `step_N`."""
    kept = {latest_tag(directory), (best_record(directory) or {}).get("tag")}
    tags = sorted((p.name for p in directory.glob("step_*") if p.name[5:].isdigit()), key=lambda t: int(t[5:]))
    doomed = [t for t in tags[:-keep] if t not in kept]
    for tag in doomed:
        trash = directory / f".deleting-{tag}"
        (directory / tag).rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def best_record(directory: str | Path) -> Optional[dict]:
    path = Path(directory) / BEST
    return json.loads(path.read_text()) if path.exists() else None


def latest_tag(directory: str | Path) -> Optional[str]:
    path = Path(directory) / LATEST
    return path.read_text().strip() if path.exists() else None


def saved_ranks(directory: str | Path) -> Optional[int]:
    """How many ranks wrote the latest checkpoint (each writes one RNG file); None without one."""
    tag = latest_tag(directory)
    return None if tag is None else len(list((Path(directory) / tag).glob("rng_rank*.pt")))


def needs_universal(directory: str | Path, world_size: int, zero_stage: int) -> bool:
    """Whether resuming from `directory` on `world_size` ranks must load DeepSpeed's universal
    layout: ZeRO optimiser partitions written by another number of ranks."""
    ranks = saved_ranks(directory)
    return zero_stage in (1, 2, 3) and ranks is not None and ranks != world_size


def saved_zero_stage(tag_dir: Path) -> Optional[int]:
    """The ZeRO stage the checkpoint in `tag_dir` was written under (from DeepSpeed's config in
    its model file, memory-mapped: the weights are not read); None where it is not recorded."""
    name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if universal.is_zero3(tag_dir) else "mp_rank_00_model_states.pt"
    if not (tag_dir / name).exists():
        return None
    ds_config = torch.load(tag_dir / name, map_location="cpu", weights_only=False, mmap=True).get("ds_config")
    return None if ds_config is None else ds_config.get("zero_optimization", {}).get("stage", 0)


def load(engine, directory: str | Path, dist: DistInfo) -> Optional[dict]:
    """Restore the latest checkpoint into `engine` and this rank's RNG (a rank the saving run
    did not have keeps its own); its client state, None when there is none. An engine built
    with `checkpoint.load_universal` (see needs_universal) loads the universal layout, which
    the main rank writes first if it is not there yet."""
    tag = latest_tag(directory)
    if tag is None:
        return None
    tag_dir = Path(directory) / tag
    saved_stage, stage = saved_zero_stage(tag_dir), engine.zero_optimization_stage()
    if saved_stage is not None and saved_stage != stage and not {saved_stage, stage} <= {1, 2}:
        # Left to DeepSpeed, each such pair died in a traceback or a missing-file error (tried 2026-12-02).
        raise ConfigError(f"{tag_dir} was written under ZeRO stage {saved_stage}, this run uses stage {stage}: "
                          "DeepSpeed's checkpoint files of the one do not load into the other (stages 1 and 2 share "
                          f"theirs). Resume with deepspeed.zero_optimization.stage={saved_stage}, or start a new run "
                          f"from its weights (task.init_from={tag_dir}: the optimiser state starts afresh)")
    universal_load = engine.load_universal_checkpoint()
    if universal_load and engine.zero_nvme_offload_optimizer():
        raise ConfigError(f"{tag_dir}: written by {saved_ranks(directory)} ranks, resumed on {dist.world_size} with "
                          "the optimiser offloaded to NVMe, which DeepSpeed restores only on the rank count that "
                          "saved it. Resume on that many ranks, or without NVMe offload")
    zero3 = stage == 3
    if universal_load:
        on_main(dist, lambda: universal.convert(tag_dir))  # its error, if any, stops every rank
    # DeepSpeed's ZeRO-3 universal loader knows Adam's states alone: it restores the weights,
    # universal.load_zero3_rest the optimiser state.
    path, client_state = engine.load_checkpoint(str(directory), tag=tag,
                                                load_optimizer_states=not (universal_load and zero3))
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {tag_dir}")
    if universal_load and zero3:
        universal.load_zero3_rest(engine, tag_dir)
        client_state.pop("optimizer", None)
    elif universal_load:
        # The universal load restores the optimised parameters only; buffers (BatchNorm's
        # statistics) and frozen weights come from the model file, as in a plain load.
        model_file = tag_dir / "mp_rank_00_model_states.pt"
        engine.module.load_state_dict(torch.load(model_file, map_location="cpu", weights_only=False)["module"])
    rng_file = Path(directory) / tag / f"rng_rank{dist.rank}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    elif client_state.get("world_size", dist.world_size) >= dist.world_size:  # this rank wrote one
        raise RuntimeError(f"{rng_file} is missing: the checkpoint is incomplete"
                           + ("" if "world_size" in client_state else " or was written by fewer ranks"))
    # else a rank the saving run did not have: it goes on from its fresh random state
    return client_state
