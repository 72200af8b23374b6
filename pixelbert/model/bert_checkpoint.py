"""Loading Hugging Face BERT checkpoints (local folder or file) into PixelBert's text side.

Accepts the `bert-base-uncased` layout: `model.safetensors` or `pytorch_model.bin` (also
sharded, with their `*.index.json`), with `BertModel` keys (`embeddings.*`, `encoder.*`,
`pooler.*`) or `BertForPreTraining` keys (the same under `bert.`, plus `cls.predictions.*`
and `cls.seq_relationship.*`). Old TensorFlow-converted names (`LayerNorm.gamma/beta`) are
mapped too.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pixelbert.config import ConfigError

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Parameters of PixelBert that a BERT checkpoint can provide.
TEXT_PREFIXES = ("embeddings.", "encoder.", "pooler.", "cls.predictions.")


@dataclass
class LoadReport:
    """What `load_bert_checkpoint` did with a checkpoint's tensors."""
    loaded: list[str] = field(default_factory=list)
    unused: list[str] = field(default_factory=list)  # in the checkpoint, not used here
    missing: list[str] = field(default_factory=list)  # text-side parameters left at their init


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"BERT checkpoint not found: {path}")
    if path.is_dir():
        files = _weight_files(path)
    else:
        files = [path]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file
            state.update(load_file(str(file)))
        else:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def _weight_files(folder: Path) -> list[Path]:
    for name in WEIGHT_FILES:
        if (folder / name).exists():
            return [folder / name]
    for name in INDEX_FILES:
        if (folder / name).exists():
            shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
    raise FileNotFoundError(f"no BERT weights in {folder}: expected one of {WEIGHT_FILES + INDEX_FILES}")


def normalise_key(key: str) -> str:
    """Map a BertModel / BertForPreTraining / TF-converted key onto PixelBert's names."""
    if key.startswith("bert."):
        key = key[len("bert."):]
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def load_into(model: torch.nn.Module, path: str | Path) -> LoadReport:
    """Copy every matching tensor of the checkpoint into `model`; return what was (not) used."""
    source = {normalise_key(k): v for k, v in read_state_dict(path).items()}
    target = model.state_dict()
    report = LoadReport()
    with torch.no_grad():
        for key, tensor in sorted(source.items()):
            if key not in target or not key.startswith(TEXT_PREFIXES):
                report.unused.append(key)
                continue
            if target[key].shape != tensor.shape:
                raise ConfigError(f"BERT checkpoint {path}: {key} has shape {tuple(tensor.shape)}, the "
                                  f"model expects {tuple(target[key].shape)} (check model.vocab_size, "
                                  "hidden_size, max_position_embeddings, type_vocab_size)")
            target[key].copy_(tensor)
            report.loaded.append(key)
    report.missing = sorted(k for k in target if k.startswith(TEXT_PREFIXES) and k not in report.loaded)
    return report
