"""ResNet / ResNeXt backbones for Pixel-BERT's visual side.

Our own modules, laid out so that their state-dict keys are exactly torchvision's ResNet
keys (``conv1``, ``bn1``, ``layer1.0.conv1`` ... ``layer4.*``, ``downsample.0/1``): a
torchvision weight file loads from a local path with no renaming. There is no ``avgpool``
or ``fc``: Pixel-BERT takes the stride-32 ``layer4`` map, one visual token per cell.
Bottlenecks are torchvision's "v1.5" ones (stride on the 3x3 conv, grouped for ResNeXt).
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import torch
import torch.utils.checkpoint
from safetensors.torch import load_file as load_safetensors
from torch import nn

from pixelbert.config import ConfigError

IntOrTensor = Union[int, torch.Tensor]

EXPANSION = 4  # bottleneck output channels = planes * EXPANSION
STRIDE = 32  # five stride-2 steps: stem conv, maxpool, layer2, layer3, layer4


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    layers: tuple[int, int, int, int]
    groups: int = 1
    width_per_group: int = 64
    stem_width: int = 64
    planes: tuple[int, int, int, int] = (64, 128, 256, 512)


SPECS: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("resnet50", (3, 4, 6, 3)),
        BackboneSpec("resnext101_32x8d", (3, 4, 23, 3), groups=32, width_per_group=8),
        BackboneSpec("resnext152_32x8d", (3, 8, 36, 3), groups=32, width_per_group=8),
        # CPU-test size: same structure and key layout, 512 output channels.
        BackboneSpec("tiny", (1, 1, 1, 1), stem_width=16, planes=(16, 32, 64, 128)),
    )
}


def ceil_div(n: IntOrTensor, d: int) -> IntOrTensor:
    """Exact ceil(n / d) for a positive python int or an integer tensor (elementwise).

    Integer arithmetic only, so it is exact for any size and traces cleanly; tensor
    values are not range-checked (that would force a device sync).
    """
    if isinstance(n, torch.Tensor):
        if n.is_floating_point() or n.is_complex():
            raise TypeError(f"sizes must be an integer tensor, got {n.dtype}")
        return torch.div(n + (d - 1), d, rounding_mode="floor")
    if n < 1:
        raise ValueError(f"size must be >= 1, got {n}")
    return (n + d - 1) // d


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine, applied as ``x * scale + shift``.

    All four tensors are buffers under torchvision's names, so they load from a BatchNorm2d
    checkpoint and never receive gradients. ``scale``/``shift`` are folded in ``forward``
    rather than cached, so the module stays right after ``load_state_dict`` or ``.to()``.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # BatchNorm2d checkpoints carry a step counter that has no meaning here; dropping it
        # lets torchvision state dicts load with strict=True.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Fold in fp32 (buffer dtype), then cast so the op runs in x's dtype (e.g. bf16 under
        # autocast) as a single mul+add that compilers fuse into the preceding conv's epilogue.
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.to(x.dtype).view(1, -1, 1, 1) + shift.to(x.dtype).view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


Norm = Callable[[int], nn.Module]


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck: 1x1 -> 3x3 (strided, grouped) -> 1x1, plus shortcut."""

    def __init__(
        self, inplanes: int, planes: int, stride: int, groups: int, width_per_group: int, norm: Norm
    ) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        out = planes * EXPANSION
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=groups, bias=False)
        self.bn2 = norm(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = norm(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, out, 1, stride=stride, bias=False), norm(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


def _make_layer(spec: BackboneSpec, index: int, norm: Norm) -> nn.Sequential:
    """Stage ``layer{index + 1}``; its first block changes width (and stride, after layer1)."""
    planes = spec.planes[index]
    inplanes = spec.stem_width if index == 0 else spec.planes[index - 1] * EXPANSION
    blocks = []
    for i in range(spec.layers[index]):
        stride = 2 if index > 0 and i == 0 else 1  # layer1 follows the maxpool: no stride
        blocks.append(Bottleneck(inplanes, planes, stride, spec.groups, spec.width_per_group, norm))
        inplanes = planes * EXPANSION
    return nn.Sequential(*blocks)


class Backbone(nn.Module):
    """ResNet/ResNeXt trunk up to ``layer4``.

    Images ``[B, 3, H, W]`` -> features ``[B, out_channels, ceil(H/32), ceil(W/32)]``.
    """

    stride: int = STRIDE

    def __init__(
        self,
        spec: BackboneSpec,
        *,
        frozen_bn: bool = True,
        freeze_stem: bool = True,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.name = spec.name
        self.channels_last = channels_last
        norm: Norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
        self.conv1 = nn.Conv2d(3, spec.stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = norm(spec.stem_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = _make_layer(spec, 0, norm)
        self.layer2 = _make_layer(spec, 1, norm)
        self.layer3 = _make_layer(spec, 2, norm)
        self.layer4 = _make_layer(spec, 3, norm)
        self.out_channels: int = spec.planes[3] * EXPANSION
        self.checkpoint_stages = False  # activation checkpointing of the four stages (training)

        # torchvision's init. BatchNorm defaults (weight 1, bias 0) already match it. The
        # last BN of each block is NOT zero-initialised (torchvision's default): with
        # FrozenBatchNorm2d that weight is a fixed buffer, so zero would switch the
        # residual branch off for good.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        if freeze_stem:
            # Detection practice: low-level filters transfer well, and skipping backward through
            # the two highest-resolution stages saves the most time and activation memory.
            for module in (self.conv1, self.bn1, self.layer1):
                for p in module.parameters():
                    p.requires_grad_(False)
        # channels_last: the activations run NHWC (the input is converted in forward; cuDNN then
        # picks NHWC kernels). The weights keep the default layout: DeepSpeed views every
        # parameter as bytes to broadcast it, which needs a unit last stride, and ZeRO flattens
        # them into one buffer anyway.

    def feature_size(self, h: IntOrTensor, w: IntOrTensor) -> tuple[IntOrTensor, IntOrTensor]:
        """Size of the output map for a valid input region of ``h x w`` (ints or int tensors).

        Every stride-2 step (7x7 p3, 3x3 p1 and 1x1 p0 convs, 3x3 p1 maxpool) maps n to
        ceil(n / 2), and nested ceilings compose: ceil(ceil(n / a) / b) = ceil(n / ab).
        """
        return ceil_div(h, self.stride), ceil_div(w, self.stride)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            if self.checkpoint_stages and self.training and torch.is_grad_enabled():
                # Recompute the stage in backward instead of keeping its activations.
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_safetensors(str(path), device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise TypeError(
            f"{path}: expected a state dict (mapping of tensors), got {type(state).__name__}"
        )
    return state


def _first(keys: list[str], n: int = 5) -> str:
    more = f" ... (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_weights(model: Backbone, path: str | os.PathLike[str]) -> None:
    """Load a torchvision-layout ResNet state dict (``.pth``/``.pt`` or ``.safetensors``).

    ``fc.*`` is ignored (classifier head); any other missing, unexpected or mis-shaped key
    is an error, so a checkpoint for another architecture never half-loads silently.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"backbone weights file not found: {path} (model.backbone_weights). For the synthetic "
            f"set, make one with `python -m pixelbert.tools.pretrain_backbone --out {path}`, or "
            "train the CNN from scratch with model.backbone_weights=null")
    state = {k: v for k, v in _read_state_dict(path).items() if not k.startswith("fc.")}
    own = model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if mismatched:
        raise ConfigError(
            f"{path}: shapes do not fit backbone '{model.name}' (file vs model): "
            f"{_first(mismatched)}"
        )
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(
            f"{path}: not a '{model.name}' state dict in torchvision layout; "
            f"missing keys: [{_first(result.missing_keys)}]; "
            f"unexpected keys: [{_first(result.unexpected_keys)}]"
        )


def build_backbone(
    name: str,
    *,
    frozen_bn: bool = True,
    freeze_stem: bool = True,
    channels_last: bool = False,
    weights: str | os.PathLike[str] | None = None,
) -> Backbone:
    """Build backbone ``name`` (see ``SPECS``), optionally loading local torchvision weights."""
    if name not in SPECS:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(SPECS)}")
    model = Backbone(
        SPECS[name], frozen_bn=frozen_bn, freeze_stem=freeze_stem, channels_last=channels_last
    )
    if weights is not None:
        load_weights(model, weights)
    return model
