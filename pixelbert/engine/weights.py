"""Model weights out of a training run, for fine-tuning, evaluation and visualisation."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from pixelbert.config import ConfigError
from pixelbert.engine.checkpoint import LATEST
from pixelbert.model.backbone import load_weights as load_backbone


def resolve_tag_dir(path: str | Path) -> Path:
    """A run folder (`output_dir`), its `checkpoints/` folder or one `step_N/` tag folder -> the tag folder."""
    path = Path(path)
    for candidate in (path / "checkpoints", path):
        if (candidate / LATEST).is_file():
            return candidate / (candidate / LATEST).read_text().strip()
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path
    raise FileNotFoundError(f"no checkpoint at {path}: expected a run folder, its checkpoints/ folder, "
                            f"a step_N/ folder or a .pt / .safetensors weights file")


def model_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The model weights (fp32) of a DeepSpeed checkpoint (any ZeRO stage) or a weights file."""
    path = Path(path)
    if path.is_file():
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
        return state.get("module", state)
    tag_dir = resolve_tag_dir(path)
    if any(tag_dir.glob("zero_pp_rank_*_model_states.pt")) or any(tag_dir.glob("*optim_states.pt")):
        # ZeRO: the fp32 master weights live partitioned in the optimiser states.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    state = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    return {k: v.float() if v.is_floating_point() else v for k, v in state["module"].items()}


@dataclass
class WeightsReport:
    loaded: list[str]
    initialised: list[str]  # the model's tensors the checkpoint does not have (new heads)
    unused: list[str]       # the checkpoint's tensors the model does not have (e.g. pre-training heads)


def load_weights(model: nn.Module, path: str | Path) -> WeightsReport:
    """Load what fits; a tensor of the right name and the wrong shape is an error."""
    return load_state(model, model_state_dict(path), path)


def load_trained(model: nn.Module, path: str | Path, task: str) -> WeightsReport:
    """`load_weights` for evaluation and inference: every tensor of the model must come from
    `path`, since a head left at random would answer as if trained."""
    report = load_weights(model, path)
    if report.initialised:
        raise ValueError(f"{path} lacks {len(report.initialised)} of this model's tensors "
                         f"(e.g. {', '.join(report.initialised[:3])}): it is not a checkpoint of a "
                         f"{task} run with this config")
    return report


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str | Path) -> WeightsReport:
    """`load_weights` of a state dict already read from `source`."""
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and own[k].shape != v.shape]
    if wrong:
        raise ConfigError(f"{source}: tensors of the wrong shape for this model (checkpoint vs model): "
                          f"{', '.join(wrong[:5])}")
    result = model.load_state_dict(state, strict=False)
    return WeightsReport(sorted(set(state) & set(own)), sorted(result.missing_keys),
                         sorted(result.unexpected_keys))


CNN_PREFIX = "pixel_embeddings.backbone."


def load_initial_weights(model, backbone_weights: Optional[str], bert_checkpoint: Optional[str],
                         init_from: Optional[str], say: Callable[[str], None]) -> None:
    """The weights a training run starts from: the CNN's `model.backbone_weights`, then
    `model.bert_checkpoint` for the text side, then `task.init_from` (a pre-trained Pixel-BERT
    run or weights file) over all of them. Each fills only what the later ones lack, so a
    fine-tuning config that still names BERT and the ImageNet CNN keeps the pre-trained model
    whole; and when `init_from` holds the whole CNN, the CNN file is not read at all (a
    fine-tuning machine need not have it). The model must be built without its CNN weights."""
    init_state = model_state_dict(init_from) if init_from else {}
    if backbone_weights:
        cnn = model.pixel_embeddings.backbone
        if any(CNN_PREFIX + name not in init_state for name in cnn.state_dict()):
            load_backbone(cnn, backbone_weights)
            say(f"CNN weights {backbone_weights}" + (f" (where {init_from} lacks them)" if init_from else ""))
        else:
            say(f"the CNN comes from {init_from}: model.backbone_weights ({backbone_weights}) is not read")
    if bert_checkpoint:
        report = model.load_bert_checkpoint(bert_checkpoint)
        say(f"BERT checkpoint {bert_checkpoint}: {len(report.loaded)} tensors loaded, "
            f"unused {report.unused or 'none'}, left at init {report.missing or 'none'}")
    if init_from:
        report = load_state(model, init_state, init_from)
        say(f"initialised from {init_from}" + (" (over the BERT checkpoint)" if bert_checkpoint else "") +
            f": {len(report.loaded)} tensors loaded; new (initialised here): {report.initialised or 'none'}; "
            f"unused: {report.unused or 'none'}")
