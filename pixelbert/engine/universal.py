"""Resume a ZeRO-1/2 run on another number of ranks, through DeepSpeed's universal checkpoint.

ZeRO cuts each parameter group's flat fp32 weights and optimiser state into one slice per rank,
so a checkpoint's `*zero_pp_rank_R_*optim_states.pt` files fit only the rank count that wrote
them. DeepSpeed also loads a "universal" layout, on any rank count (`checkpoint.load_universal`
in its config): one folder per parameter under `<tag>/zero/`, each state whole (`fp32.pt`,
`exp_avg.pt`, ...), plus `zero/optimizer_state.pt` with the groups' settings. Its converter
(`deepspeed.checkpoint.ds_to_universal`) writes only Adam's two moments; this engine's optimiser
also keeps SGD's `momentum_buffer` for the CNN, so the conversion here writes every state a
group holds, cut by the same fragment map (`param_slice_mappings`) DeepSpeed's converter reads.
ZeRO-3's universal loader takes Adam's keys and the first group's settings for every group
(it would turn the CNN's SGD into AdamW), so a ZeRO-3 checkpoint is not converted.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch

UNIVERSAL_DIR = "zero"  # where DeepSpeed's universal loader looks, inside the tag folder
SHARD_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
# The parts of a rank's optimiser file that are slices of the flat groups; the rest (loss
# scaler, clipping, versions) is the same on every rank and goes to optimizer_state.pt.
SLICED = ("base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings")


def shard_files(tag_dir: Path) -> list[Path]:
    """The per-rank ZeRO optimiser files of a checkpoint, in rank order (the caller knows the stage)."""
    ranked = {}
    for path in tag_dir.iterdir():
        match = SHARD_FILE.match(path.name)
        if match:
            ranked[int(match.group(1))] = path
    if sorted(ranked) != list(range(len(ranked))):
        raise ValueError(f"{tag_dir}: the ZeRO optimiser files of ranks {sorted(ranked)} are not one per rank")
    return [ranked[rank] for rank in range(len(ranked))]


def convert(tag_dir: str | Path) -> Path:
    """Write `tag_dir/zero/` from the checkpoint's per-rank ZeRO-1/2 files, once (a folder
    already there is kept); built under a temporary name and renamed into place, so a crash
    never leaves a partial one. Returns the folder."""
    tag_dir = Path(tag_dir)
    target = tag_dir / UNIVERSAL_DIR
    if (target / "optimizer_state.pt").exists():
        return target
    shards = [torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
              for path in shard_files(tag_dir)]
    if not shards:
        raise ValueError(f"{tag_dir} holds no ZeRO-1/2 optimiser files to convert")
    model_states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    shapes = {name: shape for group in model_states["param_shapes"] for name, shape in group.items()}
    for left in tag_dir.glob(f".{UNIVERSAL_DIR}-*"):  # what a killed conversion left
        if not pid_alive(left.name.rsplit("-", 1)[1]):
            shutil.rmtree(left, ignore_errors=True)
    building = tag_dir / f".{UNIVERSAL_DIR}-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    try:
        write_universal(building, shards, shapes)
        building.rename(target)
    except BaseException as error:
        shutil.rmtree(building, ignore_errors=True)
        if (target / "optimizer_state.pt").exists():  # another process finished first: keep its folder
            return target
        if isinstance(error, ValueError):
            raise ValueError(f"{tag_dir}: {error}") from None
        raise
    return target


def write_universal(folder: Path, shards: list[dict], shapes: dict[str, torch.Size]) -> None:
    """One folder per parameter with each of its states whole (`{"param": tensor}`, the step as
    saved, as DeepSpeed's converter writes them), and optimizer_state.pt."""
    for group_id in range(len(shards[0]["param_slice_mappings"])):
        for name, states in group_states(shards, group_id).items():
            (folder / name).mkdir(parents=True)
            for key, value in states.items():
                if key != "step":
                    if value.numel() != shapes[name].numel():
                        raise ValueError(f"the ranks' fragments of {name} ({key}) hold {value.numel()} elements, "
                                         f"its shape {tuple(shapes[name])} {shapes[name].numel()}")
                    value = {"param": value.reshape(shapes[name])}
                torch.save(value, folder / name / f"{key}.pt")
    settings = {key: value for key, value in shards[0].items() if key not in SLICED}
    settings["param_groups"] = shards[0]["base_optimizer_state"]["param_groups"]
    torch.save(settings, folder / "optimizer_state.pt")


def pid_alive(pid: str) -> bool:
    """Whether a process of this id runs on this machine (the main rank converts, so a live
    conversion's folder carries a local pid)."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def group_states(shards: list[dict], group_id: int) -> dict[str, dict]:
    """{parameter name: {state key: its whole flat tensor (the step: as saved)}} for one group:
    each rank's fragment of each state, concatenated in rank order."""
    fragments: dict[str, dict[str, list]] = {}
    step = None
    for rank, shard in enumerate(shards):
        fp32 = shard["single_partition_of_fp32_groups"][group_id]
        state = shard["base_optimizer_state"]["state"].get(group_id, {})
        flat = {"fp32": fp32, **{key: value for key, value in state.items()
                                 if torch.is_tensor(value) and value.dim() == 1 and value.numel() >= fp32.numel()}}
        unknown = set(state) - set(flat) - {"step"}
        if unknown:
            raise ValueError(f"rank {rank}, optimiser group {group_id}: states {sorted(unknown)} are neither "
                             "per-element nor the step; cannot convert them")
        if "step" in state:
            if step is not None and not torch.equal(torch.as_tensor(step), torch.as_tensor(state["step"])):
                raise ValueError(f"optimiser group {group_id}: ranks saved different steps")
            step = state["step"]
        for name, address in shard["param_slice_mappings"][group_id].items():
            for key, tensor in flat.items():
                fragments.setdefault(name, {}).setdefault(key, []).append(
                    tensor.narrow(0, address.start, address.numel))
    whole = {name: {key: torch.cat(parts) for key, parts in states.items()} for name, states in fragments.items()}
    if step is not None:
        for states in whole.values():
            states["step"] = step
    return whole
