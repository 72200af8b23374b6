"""Build the `pixelbert` package and its C++/CUDA extension `pixelbert._C`.

The top-level `kernels/` folder installs as `pixelbert.kernels` (never as a top-level
`kernels` module: that name belongs to another PyPI package). CUDA sources in `csrc/` are
compiled only when a CUDA toolkit and a CUDA build of torch are both present.
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import setup


def cuda_home_from_nvcc():
    """CUDA's root as nvcc itself reports it (`TOP` in its dry run), or None.

    Without CUDA_HOME, torch takes the folder above the `nvcc` on PATH; when that `nvcc` is a
    wrapper script (as /usr/local/bin/nvcc is on this project's build machines) the folder is
    /usr/local, and linking fails with "cannot find -lcudart"."""
    nvcc = shutil.which("nvcc")
    if nvcc is None or os.path.exists(os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include", "cuda.h")):
        return None
    try:
        dry_run = subprocess.run([nvcc, "--dryrun", "-c", "pixelbert.cu"], capture_output=True, text=True,
                                 timeout=60).stderr
    except (OSError, subprocess.SubprocessError):
        return None
    top = re.search(r"^#\$ TOP=(.+)$", dry_run, re.MULTILINE)
    return os.path.realpath(top.group(1).strip()) if top else None


if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")):
    NVCC_CUDA_HOME = cuda_home_from_nvcc()
    if NVCC_CUDA_HOME:
        os.environ["CUDA_HOME"] = NVCC_CUDA_HOME  # read by torch.utils.cpp_extension at import

from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402
import torch  # noqa: E402


def prebuilt_extension() -> list:
    """PIXELBERT_PREBUILT_EXT=1: install without compiling, keeping the pixelbert/_C*.so already in
    the tree (benchmarks/prebuild_gpu_ext.sh builds one for the GPU machine; an editable install
    imports it from there)."""
    if not glob.glob("pixelbert/_C*.so"):
        raise SystemExit("PIXELBERT_PREBUILT_EXT=1, but there is no pixelbert/_C*.so to keep")
    return []


def extension():
    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    openmp = ["-fopenmp"] if os.name != "nt" else ["/openmp"]
    cxx_flags = ["-O3", "-std=c++17", *openmp]
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and os.environ.get("PIXELBERT_NO_CUDA", "0") != "1")
    if with_cuda and cuda_sources:
        return CUDAExtension(
            "pixelbert._C", sources + cuda_sources,
            define_macros=[("PIXELBERT_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=openmp)
    return CppExtension("pixelbert._C", sources, extra_compile_args=cxx_flags,
                        extra_link_args=openmp)


setup(
    name="pixelbert",
    version="0.1.0",
    description="Pixel-BERT (arXiv 2004.00849) training engine: CNN over pixels + BERT, "
                "fused kernels, packed attention, DALI decoding, DeepSpeed ZeRO",
    python_requires=">=3.11",
    packages=["pixelbert", "pixelbert.model", "pixelbert.data", "pixelbert.engine", "pixelbert.tools",
              "pixelbert.kernels"],
    package_dir={"pixelbert": "pixelbert", "pixelbert.kernels": "kernels"},
    ext_modules=prebuilt_extension() if os.environ.get("PIXELBERT_PREBUILT_EXT") == "1" else [extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=[
        # Bounded so that no install step pulls a multi-GB CUDA torch over the one in place.
        "torch>=2.11,<2.15",
        "triton>=3.4",
        "deepspeed>=0.17",
        "transformers>=4.50",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "numpy>=1.26",
        "pillow>=10",
        "tqdm>=4.66",
        "nvidia-dali-cuda130>=2.0",
    ],
    extras_require={
        "flash": ["flash-attn>=2.6"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "tensorboard>=2.15", "psutil>=5.9"],
    },
)
