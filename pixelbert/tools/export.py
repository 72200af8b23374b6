"""Export a run's model as one self-contained folder: the weights of a checkpoint (any ZeRO stage,
gathered from its shards) as one safetensors file, beside the run's config and vocabulary.

    python -m pixelbert.tools.export --checkpoint RUN[/checkpoints/step_N] --out DIR [--dtype bf16]

DIR then holds `model.safetensors`, `config.json` (its `train.output_dir` set to DIR),
`tokenizer/vocab.txt` (with its casing, `tokenizer_config.json`) and, for VQA, `answers.txt`: it is a run folder without optimiser state,
a fraction of a checkpoint's size, and everything that reads weights takes it
(`python -m pixelbert.evaluate --config DIR/config.json --checkpoint DIR/model.safetensors`,
`task.init_from=DIR/model.safetensors`, `python -m pixelbert.visualize`,
`python -m pixelbert.predict`).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save

from pixelbert.data.tokenizer import SETTINGS_FILE, VOCAB_FILE
from pixelbert.engine.data import ANSWERS_FILE, run_dir_of
from pixelbert.engine.weights import model_state_dict
from pixelbert.fileio import write_atomic

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHTS_FILE = "model.safetensors"


def export(checkpoint: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write the export folder `out` for `checkpoint`; returns its weights file."""
    run = run_dir_of(checkpoint)
    config = json.loads((run / "config.json").read_text())
    state = model_state_dict(checkpoint)
    # Own storage per tensor (safetensors refuses tied tensors); floating tensors in `dtype`.
    tensors = {name: (t.to(dtype) if t.is_floating_point() else t).contiguous().clone() for name, t in state.items()}
    out = Path(out)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    for name in (VOCAB_FILE, SETTINGS_FILE):  # older runs lack the second (the casing)
        if (run / "tokenizer" / name).is_file():
            shutil.copyfile(run / "tokenizer" / name, out / "tokenizer" / name)
    if (run / ANSWERS_FILE).is_file():
        shutil.copyfile(run / ANSWERS_FILE, out / ANSWERS_FILE)
    config.setdefault("train", {})["output_dir"] = str(out)
    write_atomic(out / "config.json", json.dumps(config, indent=2))
    write_atomic(out / WEIGHTS_FILE, save(tensors, metadata={"source": str(Path(checkpoint).resolve())}))
    return out / WEIGHTS_FILE


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoints/ folder or step_N folder")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="floating-point tensors in this dtype (the checkpoint's master weights are fp32)")
    args = parser.parse_args(argv)
    try:
        weights = export(args.checkpoint, args.out, DTYPES[args.dtype])
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {weights} ({weights.stat().st_size / 2 ** 20:.1f} MiB) and the run's config and vocabulary "
          f"beside it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
