#!/usr/bin/env bash
# The kernel work of one GPU session, in one call: build the extension with CUDA, run the
# gpu-marked kernel tests (bf16 Triton, CUDA ext, the >2**31-element map), then the benchmark.
#   bash benchmarks/gpu_kernels.sh        (from the project root, on the GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
python -m pip install -q --no-build-isolation --no-deps -e .
python -c "import torch; from pixelbert import _C; assert _C.with_cuda, 'pixelbert._C was built without CUDA'"
python -m pytest -q -ra -m gpu tests/test_kernels.py
python benchmarks/kernels.py
