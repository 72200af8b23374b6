"""Convert Detectron's ImageNet ResNet/ResNeXt weights (Caffe2 pickles) into the engine's
torchvision layout, with the input normalisation they were trained with.

    python -m pixelbert.tools.convert_backbone X-152-32x8d-IN5k.pkl --arch resnext152_32x8d \
        --out x152-in5k.safetensors

The paper's ResNeXt-152 is the one Detectron published (`X-152-32x8d-IN5k.pkl`, trained on
ImageNet-5k with Caffe2); torchvision has none. Those files differ from torchvision's in three
ways, each handled here so that the converted CNN computes exactly what Detectron's does:
- names: `res{2-5}_{block}_branch{1,2a,2b,2c}_{w,bn_s,bn_b}`, `conv1_w`, `res_conv1_bn_{s,b}`;
- normalisation: frozen affine scale and shift (`_bn_s`, `_bn_b`) instead of BatchNorm
  statistics; written as weight and bias with mean 0 and variance 1 - eps, so the engine's
  FrozenBatchNorm2d applies that affine (to float rounding; model.frozen_bn must be true);
- input: BGR pixels minus Detectron's mean, std 1. The first convolution's input channels are
  reordered to RGB; the mean and std go into the file's metadata, and the engine refuses to
  train with other data.pixel_mean / pixel_std.
The pickle is read with an unpickler that builds numpy arrays and nothing else.
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import torch

from pixelbert.model.backbone import SPECS, FrozenBatchNorm2d, build_backbone

# Detectron's PIXEL_MEANS (BGR, 0-255; its configs use no std). Other Caffe2 models, such as
# detectron2's re-uploads, name theirs: --pixel-mean / --pixel-std.
DETECTRON_PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)
BN_EPS = FrozenBatchNorm2d(1).eps  # running_var = 1 - eps: sqrt(var + eps) = 1 (to float rounding)
IGNORED = re.compile(r"(^pred_|^fc1000|_momentum$|^lr$|^iter$)")  # classifier, solver state
BLOCK = re.compile(r"^res(\d)_(\d+)_branch(1|2a|2b|2c)_(w|bn_s|bn_b)$")
TORCHVISION_BRANCH = {"1": ("downsample.0", "downsample.1"), "2a": ("conv1", "bn1"),
                      "2b": ("conv2", "bn2"), "2c": ("conv3", "bn3")}

# What a Caffe2 pickle may build: numpy arrays, their dtypes and scalars.
SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # how Python 3 writes bytes into a protocol-2 pickle: text to bytes only
}


class ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a weights pickle holds "
                                         "numpy arrays only")
        return super().find_class(module, name)


def read_detectron_blobs(path: str | Path) -> dict[str, np.ndarray]:
    """The named arrays of a Detectron pickle (`{"blobs": {...}}`, or `{"model": {...}}` as
    detectron2 stores them, or the names at the top level)."""
    with open(path, "rb") as f:
        data = ArraysOnly(f, encoding="latin1").load()
    if isinstance(data, dict):
        for key in ("blobs", "model"):
            if isinstance(data.get(key), dict):
                data = data[key]
                break
    if not isinstance(data, dict) or not all(isinstance(v, np.ndarray) for v in data.values()
                                             if not isinstance(v, (int, float, str))):
        raise ValueError(f"{path}: not a Detectron weights pickle (a dict of named numpy arrays)")
    return {k: v for k, v in data.items() if isinstance(v, np.ndarray)}


def torchvision_name(blob: str) -> tuple[str, str] | None:
    """Detectron blob name -> (torchvision module, 'w' | 'bn_s' | 'bn_b'), None if not a trunk blob."""
    if blob == "conv1_w":
        return "conv1", "w"
    if blob in ("res_conv1_bn_s", "res_conv1_bn_b"):
        return "bn1", blob[-4:]
    match = BLOCK.match(blob)
    if match is None:
        return None
    stage, block, branch, kind = match.groups()
    conv, norm = TORCHVISION_BRANCH[branch]
    return f"layer{int(stage) - 1}.{block}.{conv if kind == 'w' else norm}", kind


def convert(blobs: dict[str, np.ndarray], input_bgr: bool = True) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(torchvision-layout state dict, ignored blob names). Unknown blobs and BatchNorm running
    statistics (`_bn_rm`, `_bn_riv`: not an affine-normalised model) are errors."""
    state, ignored, unknown = {}, [], []
    for blob, value in sorted(blobs.items()):
        target = torchvision_name(blob)
        if target is None:
            (ignored if IGNORED.search(blob) else unknown).append(blob)
            continue
        module, kind = target
        tensor = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
        if kind == "w":
            if module == "conv1" and input_bgr:
                tensor = tensor.flip(1)  # input channels B, G, R -> R, G, B
            state[f"{module}.weight"] = tensor.contiguous()
        elif kind == "bn_s":
            state[f"{module}.weight"] = tensor
            state[f"{module}.running_mean"] = torch.zeros_like(tensor)
            state[f"{module}.running_var"] = torch.full_like(tensor, 1.0 - BN_EPS)
            state[f"{module}.num_batches_tracked"] = torch.zeros((), dtype=torch.int64)
        else:
            state[f"{module}.bias"] = tensor
    if unknown:
        raise ValueError(f"blobs that are not a Detectron ResNet/ResNeXt trunk with affine normalisation: "
                         f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    return state, ignored


def check_fits(state: dict[str, torch.Tensor], arch: str) -> None:
    """The converted tensors are exactly backbone `arch`'s (names and shapes), as the engine
    will load them."""
    own = build_backbone(arch, frozen_bn=True).state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own) - {k for k in state if k.endswith("num_batches_tracked")})
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or extra or wrong:
        raise ValueError(f"not a {arch}: missing {missing[:5]}, unexpected {extra[:5]}, wrong shapes {wrong[:5]}")


def pixel_metadata(mean_rgb, std_rgb) -> dict[str, str]:
    """The safetensors metadata the engine checks against data.pixel_mean / pixel_std."""
    return {"pixel_mean": json.dumps([float(v) for v in mean_rgb]),
            "pixel_std": json.dumps([float(v) for v in std_rgb]),
            "batch_norm": "affine"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pickle", help="Detectron weights (e.g. X-152-32x8d-IN5k.pkl)")
    parser.add_argument("--arch", required=True, choices=sorted(SPECS), help="the engine's backbone")
    parser.add_argument("--out", required=True, help="output .safetensors (it carries the normalisation)")
    parser.add_argument("--pixel-mean", type=float, nargs=3, default=DETECTRON_PIXEL_MEAN_BGR,
                        help="the model's input mean, in its input channel order (default Detectron's, BGR)")
    parser.add_argument("--pixel-std", type=float, nargs=3, default=(1.0, 1.0, 1.0))
    parser.add_argument("--input-rgb", action="store_true", help="the model takes RGB, not Detectron's BGR")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".safetensors":
        parser.error("--out must be a .safetensors file: its metadata records the input normalisation")
    from safetensors.torch import save_file

    try:
        state, ignored = convert(read_detectron_blobs(args.pickle), input_bgr=not args.input_rgb)
        check_fits(state, args.arch)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as e:  # a missing or cut file, other weights
        print(f"error: {e}", file=sys.stderr)
        return 2
    order = slice(None) if args.input_rgb else slice(None, None, -1)
    mean_rgb, std_rgb = list(args.pixel_mean)[order], list(args.pixel_std)[order]
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata=pixel_metadata(mean_rgb, std_rgb))
    print(f"{out}: {args.arch}, {sum(v.numel() for k, v in state.items() if 'num_batches' not in k):,} "
          f"numbers; ignored {len(ignored)} blobs (classifier, solver state). Train with:\n"
          f"  model.backbone={args.arch} model.backbone_weights={out} model.frozen_bn=true "
          f"'data.pixel_mean={json.dumps(mean_rgb)}' 'data.pixel_std={json.dumps(std_rgb)}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
