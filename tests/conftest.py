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
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
