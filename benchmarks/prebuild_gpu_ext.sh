#!/usr/bin/env bash
# Build the CUDA extension pixelbert._C for the GPU machine here, so that a GPU session does not
# spend its device time compiling it: Python 3.12, torch 2.11.0 (CUDA 13), sm_90, the versions
# that machine has. Writes, git-ignored, to carry in a session's first call:
#   pixelbert/_C.cpython-312-x86_64-linux-gnu.so
#   pixelbert/_C.prebuilt.json   (the Python, torch and arch it was built for)
# gpu_session.py's build stage installs around it when it loads under the same torch, and
# compiles as before when it does not. Needs python3.12 and nvcc (CUDA 13) here; the first run
# downloads torch's wheel and its CUDA libraries (~4.5 GB) into a venv it keeps for later runs.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin=${PYTHON:-python3.12}
torch_version=${TORCH_VERSION:-2.11.0}
arch=${TORCH_CUDA_ARCH_LIST:-9.0}
venv=${VENV:-/tmp/pixelbert-gpu-ext-venv}

[ -x "$venv/bin/python" ] || "$python_bin" -m venv "$venv"
"$venv/bin/pip" install -q "torch==$torch_version" "numpy<2.4" setuptools wheel ninja pybind11

# The working tree as the device tool copies it (tracked and untracked, not ignored files).
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$src"
(cd "$src" && TORCH_CUDA_ARCH_LIST=$arch MAX_JOBS=$(nproc) "$venv/bin/python" setup.py -q build_ext --inplace)

so=$(cd "$src" && ls pixelbert/_C.cpython-*.so)
"$venv/bin/python" - "$src" "$arch" <<'PY'
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from pixelbert import _C
assert _C.with_cuda, "built without CUDA"
info = {"python": f"{sys.version_info.major}.{sys.version_info.minor}", "torch": torch.__version__,
        "arch": sys.argv[2]}
with open(f"{sys.argv[1]}/pixelbert/_C.prebuilt.json", "w") as f:
    json.dump(info, f)
print("built for", info)
PY
strip --strip-debug "$src/$so"  # ~29 MB of debug information: ~1 MB left to carry
cp "$src/$so" "$src/pixelbert/_C.prebuilt.json" pixelbert/
echo "carry in call 1: $so pixelbert/_C.prebuilt.json"
