"""Resume a ZeRO run on another number of ranks, through DeepSpeed's universal checkpoint layout.

ZeRO cuts the fp32 weights and optimiser state into one slice per rank, so a checkpoint's
`*zero_pp_rank_R_*optim_states.pt` files fit only the rank count that wrote them. DeepSpeed
also loads a "universal" layout, on any rank count (`checkpoint.load_universal` in its config):
one folder per parameter under `<tag>/zero/`, each state whole (`fp32.pt`, `exp_avg.pt`, ...),
plus `zero/optimizer_state.pt` with the groups' settings. Its converter
(`deepspeed.checkpoint.ds_to_universal`) writes only Adam's two moments; this engine's optimiser
also keeps SGD's `momentum_buffer` for the CNN, so the conversion here writes every state a
group holds: for ZeRO-1/2 cut by the fragment map (`param_slice_mappings`) DeepSpeed's converter
reads, for ZeRO-3 by its per-parameter partitions (each parameter padded to a multiple of the
rank count and cut evenly, as `zero_to_fp32` reassembles them).

DeepSpeed's ZeRO-1/2 universal loader restores every state it finds. Its ZeRO-3 one takes Adam's
two keys and the first group's settings for every group (it would turn the CNN's SGD into
AdamW), so for ZeRO-3 DeepSpeed loads the weights only and `load_zero3_rest` the rest.
"""
from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import torch

from pixelbert.config import ConfigError

UNIVERSAL_DIR = "zero"  # where DeepSpeed's universal loader looks, inside the tag folder
SHARD_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")
# The parts of a rank's optimiser file that are slices of the flat groups; the rest (loss
# scaler, clipping, versions) is the same on every rank and goes to optimizer_state.pt.
SLICED = ("base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings")  # ZeRO-1/2
SLICED_ZERO3 = ("optimizer_state_dict", "fp32_flat_groups")


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


def is_zero3(tag_dir: Path) -> bool:
    """ZeRO-3 checkpoints hold one model file per rank (ZeRO-0/1/2: `mp_rank_00_model_states.pt`)."""
    return any(Path(tag_dir).glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))


def convert(tag_dir: str | Path) -> Path:
    """Write `tag_dir/zero/` from the checkpoint's per-rank ZeRO files, once (a folder already
    there is kept); built under a temporary name and renamed into place, so a crash never
    leaves a partial one. Returns the folder."""
    tag_dir = Path(tag_dir)
    target = tag_dir / UNIVERSAL_DIR
    if (target / "optimizer_state.pt").exists():
        return target
    shards = [torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
              for path in shard_files(tag_dir)]
    if not shards:
        raise ValueError(f"{tag_dir} holds no ZeRO optimiser files to convert")
    for left in tag_dir.glob(f".{UNIVERSAL_DIR}-*"):  # what a killed conversion left
        if not pid_alive(left.name.rsplit("-", 1)[1]):
            shutil.rmtree(left, ignore_errors=True)
    building = tag_dir / f".{UNIVERSAL_DIR}-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    try:
        if is_zero3(tag_dir):
            states, shapes, settings = zero3_states(tag_dir, shards)
        else:
            states, shapes, settings = zero12_states(tag_dir, shards)
        write_universal(building, states, shapes, settings)
        building.rename(target)
    except BaseException as error:
        shutil.rmtree(building, ignore_errors=True)
        if (target / "optimizer_state.pt").exists():  # another process finished first: keep its folder
            return target
        if isinstance(error, ValueError):
            raise ValueError(f"{tag_dir}: {error}") from None
        raise
    return target


def zero12_states(tag_dir: Path, shards: list[dict]) -> tuple[dict, dict, dict]:
    """(each parameter's states whole, its shape, the settings) from ZeRO-1/2 files."""
    model_states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    shapes = {name: shape for group in model_states["param_shapes"] for name, shape in group.items()}
    states = {}
    for group_id in range(len(shards[0]["param_slice_mappings"])):
        states.update(group_states(shards, group_id))
    settings = {key: value for key, value in shards[0].items() if key not in SLICED}
    settings["param_groups"] = shards[0]["base_optimizer_state"]["param_groups"]
    return states, shapes, settings


def zero3_states(tag_dir: Path, shards: list[dict]) -> tuple[dict, dict, dict]:
    """(each parameter's states whole, its shape, the settings) from ZeRO-3 files. Each rank's
    flat sub-group holds, parameter after parameter, its slice of each parameter; the frozen
    parameters (no optimiser state) are in the ranks' model files."""
    ranks = len(shards)
    models = [torch.load(tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt", map_location="cpu",
                         weights_only=False) for rank in range(ranks)]
    groups = shards[0]["optimizer_state_dict"]["param_groups"]
    sub_groups = len(shards[0]["fp32_flat_groups"])
    # DeepSpeed lists each group's flat sub-groups in its `params`, group after group.
    if [index for group in groups for index in group["params"]] != list(range(sub_groups)):
        raise ValueError(f"the optimiser's groups hold sub-groups {[group['params'] for group in groups]}, "
                         f"not 0..{sub_groups - 1} in order")
    if len(models[0]["param_shapes"]) != sub_groups:
        raise ValueError(f"the model file lists {len(models[0]['param_shapes'])} sub-groups, the optimiser's {sub_groups}")
    states, shapes = {}, {}
    for sub_group, params in enumerate(models[0]["param_shapes"]):
        flats, step = [], None
        for rank, shard in enumerate(shards):
            flat, rank_step = per_element_states(shard["optimizer_state_dict"]["state"].get(sub_group, {}),
                                                 shard["fp32_flat_groups"][sub_group], rank, sub_group)
            step = same_step(step, rank_step, sub_group)
            flats.append(flat)
        offset = 0
        for name, shape in params.items():
            part = math.ceil(shape.numel() / ranks)
            states[name] = {key: torch.cat([flat[key].narrow(0, offset, part) for flat in flats])[:shape.numel()]
                            for key in flats[0]}
            if step is not None:
                states[name]["step"] = step
            shapes[name] = shape
            offset += part
        if offset != flats[0]["fp32"].numel():
            raise ValueError(f"sub-group {sub_group}: its parameters take {offset} elements a rank, "
                             f"the saved partition {flats[0]['fp32'].numel()}")
    for name, shape in (models[0].get("frozen_param_shapes") or {}).items():
        states[name] = {"fp32": torch.cat([model["frozen_param_fragments"][name].flatten()
                                           for model in models])[:shape.numel()]}
        shapes[name] = shape
    settings = {key: value for key, value in shards[0].items() if key not in SLICED_ZERO3}
    settings["param_groups"] = groups
    return states, shapes, settings


def write_universal(folder: Path, states: dict[str, dict], shapes: dict[str, torch.Size], settings: dict) -> None:
    """One folder per parameter with each of its states whole (`{"param": tensor}`, the step as
    saved, as DeepSpeed's converter writes them), and optimizer_state.pt with `settings`."""
    for name, parameter_states in states.items():
        (folder / name).mkdir(parents=True)
        for key, value in parameter_states.items():
            if key != "step":
                if value.numel() != shapes[name].numel():
                    raise ValueError(f"the ranks' fragments of {name} ({key}) hold {value.numel()} elements, "
                                     f"its shape {tuple(shapes[name])} {shapes[name].numel()}")
                value = {"param": value.reshape(shapes[name])}
            torch.save(value, folder / name / f"{key}.pt")
    torch.save(settings, folder / "optimizer_state.pt")


def load_zero3_rest(engine, tag_dir: Path) -> None:
    """After DeepSpeed's ZeRO-3 universal load of the trainable weights (with
    load_optimizer_states=False), what it leaves: the optimiser state and settings and the
    frozen weights from `tag_dir/zero/`, the buffers (BatchNorm's statistics) from rank 0's model
    file, as the ZeRO-1/2 universal load takes them. Every rank calls it (the frozen weights are
    gathered and scattered)."""
    import deepspeed
    zero = engine.optimizer
    # DeepSpeed's ZeRO-3 internals read here (as of 0.19): say so if a version lacks them.
    missing = [name for name in ("optimizer", "fp16_groups", "fp32_partitioned_groups_flat", "param_names",
                                 "load_hp_checkpoint_state") if not hasattr(zero, name)]
    if missing:
        raise RuntimeError(f"DeepSpeed {deepspeed.__version__}'s ZeRO-3 optimiser has no {missing}, which resuming a "
                           "ZeRO-3 checkpoint on another number of ranks reads; resume on the rank count that saved it")
    folder = tag_dir / UNIVERSAL_DIR
    load_zero3_optimizer(zero, folder)
    frozen = [(name, param) for name, param in engine.module.named_parameters() if not param.requires_grad]
    if frozen:
        with deepspeed.zero.GatheredParameters([param for _, param in frozen], modifier_rank=0):
            if engine.global_rank == 0:
                for name, param in frozen:
                    saved = torch.load(folder / name / "fp32.pt", map_location="cpu", weights_only=False)["param"]
                    param.data.copy_(saved.view_as(param))
    module = torch.load(tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=False)["module"]
    for name, buffer in engine.module.named_buffers():
        if name in module:
            buffer.copy_(module[name])


def load_zero3_optimizer(zero, folder: Path) -> None:
    """Each group's settings, the loss scaler, and each sub-group's states and step (this
    rank's slice of each of its parameters, cut by DeepSpeed's own partitioning) into the ZeRO-3
    optimiser `zero`, from the universal `folder`."""
    settings = torch.load(folder / "optimizer_state.pt", map_location="cpu", weights_only=False)
    base = zero.optimizer
    saved_algorithms = [group.get("algorithm") for group in settings["param_groups"]]
    if saved_algorithms != [group.get("algorithm") for group in base.param_groups]:  # a changed train section
        raise ConfigError(f"{folder}: the checkpoint's optimiser groups ({saved_algorithms}) are not this run's "
                          f"({[group.get('algorithm') for group in base.param_groups]}); resume with the "
                          "train settings that saved it")
    for group, saved in zip(base.param_groups, settings["param_groups"]):
        group.update({key: value for key, value in saved.items() if key != "params"})
    for key in ("loss_scaler", "dynamic_loss_scale", "overflow"):
        if key in settings:
            setattr(zero, key, settings[key])
    for sub_group, params in enumerate(zero.fp16_groups):
        flat = zero.fp32_partitioned_groups_flat[sub_group]
        folders = [folder / zero.param_names[param] for param in params]
        keys = {path.stem for path in folders[0].glob("*.pt")} - {"fp32"}
        for param_folder in folders:
            if {path.stem for path in param_folder.glob("*.pt")} - {"fp32"} != keys:
                raise ValueError(f"{param_folder} holds other optimiser states than {folders[0]} ({sorted(keys)}), "
                                 "a parameter of the same group")
        state = {}
        for key in sorted(keys):
            if key == "step":
                state[key] = torch.load(folders[0] / "step.pt", weights_only=False)
                continue
            partition, offset = torch.zeros_like(flat), 0  # this rank's slice of each parameter, in order
            for param, param_folder in zip(params, folders):
                part = zero.load_hp_checkpoint_state(str(param_folder), key, param=param)
                partition.narrow(0, offset, part.numel()).copy_(part)
                offset += part.numel()
            state[key] = partition
        base.state[flat] = state


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
    """{parameter name: {state key: its whole flat tensor (the step: as saved)}} for one ZeRO-1/2
    group: each rank's fragment of each state, concatenated in rank order."""
    fragments: dict[str, dict[str, list]] = {}
    step = None
    for rank, shard in enumerate(shards):
        flat, rank_step = per_element_states(shard["base_optimizer_state"]["state"].get(group_id, {}),
                                             shard["single_partition_of_fp32_groups"][group_id], rank, group_id)
        step = same_step(step, rank_step, group_id)
        for name, address in shard["param_slice_mappings"][group_id].items():
            for key, tensor in flat.items():
                fragments.setdefault(name, {}).setdefault(key, []).append(
                    tensor.narrow(0, address.start, address.numel))
    whole = {name: {key: torch.cat(parts) for key, parts in states.items()} for name, states in fragments.items()}
    if step is not None:
        for states in whole.values():
            states["step"] = step
    return whole


def per_element_states(state: dict, fp32: torch.Tensor, rank: int, group_id: int) -> tuple[dict, object]:
    """A rank's flat partition of one group: ({"fp32": the weights, each per-element state (a
    ZeRO-1/2 state may run on over the weights' padding)}, the step or None); any other state
    is an error, since it could not be cut per parameter."""
    flat = {"fp32": fp32, **{key: value for key, value in state.items()
                             if torch.is_tensor(value) and value.dim() == 1 and value.numel() >= fp32.numel()}}
    unknown = set(state) - set(flat) - {"step"}
    if unknown:
        raise ValueError(f"rank {rank}, optimiser group {group_id}: states {sorted(unknown)} are neither "
                         "per-element nor the step; cannot convert them")
    return flat, state.get("step")


def same_step(step, rank_step, group_id: int):
    """The group's step so far, checked against one more rank's."""
    if step is not None and rank_step is not None and not torch.equal(torch.as_tensor(step), torch.as_tensor(rank_step)):
        raise ValueError(f"optimiser group {group_id}: ranks saved different steps")
    return rank_step if rank_step is not None else step
