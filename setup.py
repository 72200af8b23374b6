"""Build the `pixelbert` package and its C++/CUDA extension `pixelbert._C`.

The top-level `kernels/` folder installs as `pixelbert.kernels` (never as a top-level
`kernels` module: that name belongs to another PyPI package). CUDA sources in `csrc/` are
compiled only when a CUDA toolkit and a CUDA build of torch are both present.
"""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch


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
    ext_modules=[extension()],
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
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
    },
)
