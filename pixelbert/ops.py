"""The dispatch layer: one function per fused op; the only place that picks a backend.

Backends: `reference` (plain PyTorch, pixelbert.reference), `triton` (pixelbert.kernels, for
CUDA tensors; CPU tensors only in Triton's interpreter, TRITON_INTERPRET=1) and `ext` (the
C++/CUDA extension pixelbert._C: OpenMP on the CPU, CUDA when built with it). `backend=None` takes the
process-wide choice: `PIXELBERT_KERNELS` when set, else what `set_default_backend` was given
(the config's `model.kernels`), else the fastest backend that implements the op for the given
tensors. A backend that is asked for by name and cannot run the given tensors raises a clear
error: it never falls back silently.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Callable, Optional

import torch

from pixelbert import op_checks, reference

BACKENDS = ("reference", "triton", "ext")
_default_backend: Optional[str] = None


def set_default_backend(name: Optional[str]) -> None:
    """Set the backend used when a call names none ("auto"/None: pick per call)."""
    global _default_backend
    if name in (None, "auto"):
        _default_backend = None
        return
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose from {BACKENDS} or 'auto'")
    _default_backend = name


# backend -> why it could not be imported (shown when it is asked for: a broken install, not
# only a missing one, must be told apart from a backend that does not exist).
_IMPORT_ERRORS: dict[str, str] = {}


def _load_ext():
    try:
        from pixelbert import _C
    except ImportError as error:  # not built (pip install --no-build-isolation -e .)
        _IMPORT_ERRORS["ext"] = str(error)
        return None
    return _C


def _load_triton_kernels():
    try:
        from pixelbert import kernels
    except ImportError as error:  # triton is not installed, or kernels/ is not mapped to pixelbert.kernels
        _IMPORT_ERRORS["triton"] = str(error)
        return None
    return kernels


def _ext_impls() -> dict[str, Callable]:
    ext = _load_ext()
    if ext is None:
        return {}
    from pixelbert import ext_ops
    return {"valid_pooled_index": ext.valid_pooled_index,
            "pool_sample": ext_ops.pool_sample, "embed_layernorm": ext_ops.embed_layernorm}


def _triton_impls() -> dict[str, Callable]:
    kernels = _load_triton_kernels()
    if kernels is None:
        return {}
    return {"pool_sample": kernels.pool_sample, "embed_layernorm": kernels.embed_layernorm}


# op -> backend -> implementation.
_REGISTRY: dict[str, dict[str, Callable]] = {
    "pool_sample": {"reference": reference.pool_sample},
    "embed_layernorm": {"reference": reference.embed_layernorm},
    "valid_pooled_index": {"reference": reference.valid_pooled_index},
}
for _backend, _impls in (("triton", _triton_impls()), ("ext", _ext_impls())):
    for _op, _fn in _impls.items():
        _REGISTRY[_op][_backend] = _fn

# Preference order of `auto`: triton on CUDA tensors, then the extension, then reference.
_AUTO_ORDER = {"cuda": ("triton", "ext", "reference"), "cpu": ("ext", "reference")}


def triton_interpreted() -> bool:
    """Triton kernels run on CPU tensors only in its interpreter (set before the import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _release(version: str) -> tuple[int, int]:
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


@functools.lru_cache(maxsize=None)
def interpreter_incompatibility() -> Optional[str]:
    """Why Triton's interpreter cannot run these kernels here, or None.

    Up to triton 3.6 (torch 2.11's) the interpreter holds a scalar kernel argument as a
    one-element array and, for a loop over a runtime bound, converts it with int(), which
    numpy 2.4 refuses: the kernels' loops fail deep inside it. triton 3.7 fixed it."""
    import numpy
    import triton
    if _release(triton.__version__) < (3, 7) and _release(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter cannot run the kernels with numpy "
                f"{numpy.__version__} (its loops call int() on one-element arrays, which numpy >= 2.4 "
                "refuses; fixed in triton 3.7): install 'numpy<2.4' or triton >= 3.7")
    return None


def unavailable_reason(backend: str, op: str, device: torch.device,
                dtype: Optional[torch.dtype]) -> Optional[str]:
    """Why `backend` cannot run `op` on `dtype` tensors of `device`, or None when it can."""
    if backend not in _REGISTRY[op]:
        cause = f"; its import failed: {_IMPORT_ERRORS[backend]}" if backend in _IMPORT_ERRORS else ""
        return (f"kernel backend {backend!r} has no implementation of {op} "
                f"(available: {sorted(_REGISTRY[op])}){cause}")
    if backend == "triton" and device.type == "cpu" and not triton_interpreted():
        return "kernel backend 'triton' runs CPU tensors only with TRITON_INTERPRET=1 set before import"
    if backend == "triton" and device.type == "cpu" and interpreter_incompatibility():
        return f"kernel backend 'triton': {interpreter_incompatibility()}"
    if backend == "triton" and device.type not in ("cpu", "cuda"):
        return f"kernel backend 'triton' cannot run {device.type} tensors"
    if backend == "ext" and device.type != "cpu" and not (device.type == "cuda" and _load_ext().with_cuda):
        return f"kernel backend 'ext' was built without support for {device.type} tensors"
    if backend != "reference" and dtype is not None and dtype not in op_checks.FAST_DTYPES:
        return f"kernel backend {backend!r} computes in fp32, fp16 and bf16, not {dtype}"
    return None


def available_backends(op: str) -> tuple[str, ...]:
    return tuple(_REGISTRY[op])


def resolve_backend(op: str, backend: Optional[str], device: torch.device,
                    dtype: Optional[torch.dtype] = None) -> str:
    """The backend that will run `op` on (`dtype`) tensors of `device`."""
    name = backend if backend not in (None, "auto") else (
        os.environ.get("PIXELBERT_KERNELS") or _default_backend)
    if name in (None, "auto"):
        order = _AUTO_ORDER.get(device.type, ("reference",))
        return next(b for b in order if unavailable_reason(b, op, device, dtype) is None)
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} for {op}; choose from {BACKENDS}")
    reason = unavailable_reason(name, op, device, dtype)
    if reason is not None:
        raise RuntimeError(f"{reason}; set PIXELBERT_KERNELS / model.kernels to another backend "
                           "or to 'auto'")
    return name


def pool_sample(feat, index, type_embedding=None, *, out=None, out_index=None, backend=None):
    """Rows `index` of max_pool2d(feat, 2) flattened to [B*Hp*Wp, C] (+ type_embedding).

    With `out` [M, C] and `out_index` [N], row i is written to out[out_index[i]] and `out`
    is returned (filling a packed sequence buffer in place).
    """
    op_checks.check_pool_sample(feat, index, type_embedding, out, out_index)
    name = resolve_backend("pool_sample", backend, feat.device, feat.dtype)
    return _REGISTRY["pool_sample"][name](feat, index, type_embedding, out=out, out_index=out_index)


def embed_layernorm(input_ids, position_ids, token_type_ids, word_embeddings,
                    position_embeddings, token_type_embeddings, weight, bias,
                    eps=1e-12, *, out=None, out_index=None, backend=None):
    """layer_norm(word[ids] + pos[position_ids] (+ type[token_type_ids])) -> [..., D].

    With `out` [M, D] and `out_index` [ids.numel()], row i of the flattened result is written
    to out[out_index[i]] and `out` is returned.
    """
    op_checks.check_embed_layernorm(input_ids, position_ids, token_type_ids, word_embeddings,
                                    position_embeddings, token_type_embeddings, weight, bias,
                                    out, out_index)
    name = resolve_backend("embed_layernorm", backend, word_embeddings.device, word_embeddings.dtype)
    return _REGISTRY["embed_layernorm"][name](
        input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings,
        token_type_embeddings, weight, bias, eps, out=out, out_index=out_index)


def valid_pooled_index(valid_sizes, grid_h, grid_w, *, backend=None):
    """Flat indices of every valid pooled cell, image by image, row-major (int64 [N])."""
    name = resolve_backend("valid_pooled_index", backend, valid_sizes.device)
    if name == "ext" and valid_sizes.device.type != "cpu":
        raise RuntimeError("backend 'ext' implements valid_pooled_index for CPU tensors only")
    return _REGISTRY["valid_pooled_index"][name](valid_sizes, grid_h, grid_w)
