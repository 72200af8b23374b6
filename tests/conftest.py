import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if not torch.cuda.is_available():
    # Without a GPU the Triton kernels are tested in Triton's interpreter, which must be
    # switched on before pixelbert.kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.chdir(ROOT)  # configs/ and train.py are addressed relative to the project root
sys.path.insert(0, str(ROOT))


def pytest_collection_modifyitems(config, items):
    # The long tests first: under `pytest -n 2 --dist worksteal` (the README's command) the
    # first worker starts on them while the second runs the rest, then takes over its queue.
    items.sort(key=lambda item: "long" not in item.keywords)  # stable: the rest keep their order
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
