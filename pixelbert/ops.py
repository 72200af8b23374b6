"""The dispatch layer: one function per fused op; the only place that picks a backend.

Backends: `reference` (plain PyTorch, pixelbert.reference), `triton` (pixelbert.kernels, for
CUDA tensors) and `ext` (the C++/CUDA extension pixelbert._C). `backend=None` takes the
process-wide choice: `PIXELBERT_KERNELS` when set, else what `set_default_backend` was given
(the config's `model.kernels`), else the fastest backend that implements the op for the given
tensors. A backend that is asked for by name and cannot run the given tensors raises a clear
error: it never falls back silently.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

import torch

from pixelbert import reference

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


def _load_ext():
    try:
        from pixelbert import _C
    except ImportError:
        return None
    return _C


def _ext_impls() -> dict[str, Callable]:
    ext = _load_ext()
    if ext is None:
        return {}
    return {"valid_pooled_index": ext.valid_pooled_index}


def _cpu_only(fn: Callable) -> Callable:
    def run(*args):
        if any(isinstance(a, torch.Tensor) and not a.device.type == "cpu" for a in args):
            raise RuntimeError(f"backend 'ext' implements {fn.__name__} for CPU tensors only")
        return fn(*args)
    return run


# op -> backend -> implementation. The kernels issue adds `triton` and more `ext` entries.
_REGISTRY: dict[str, dict[str, Callable]] = {
    "pool_sample": {"reference": reference.pool_sample},
    "embed_layernorm": {"reference": reference.embed_layernorm},
    "valid_pooled_index": {"reference": reference.valid_pooled_index},
}
for _op, _fn in _ext_impls().items():
    _REGISTRY[_op]["ext"] = _cpu_only(_fn)

# Preference order of `auto`: triton on CUDA tensors, then the extension, then reference.
_AUTO_ORDER = {"cuda": ("triton", "ext", "reference"), "cpu": ("ext", "reference")}


def available_backends(op: str) -> tuple[str, ...]:
    return tuple(_REGISTRY[op])


def resolve_backend(op: str, backend: Optional[str], device: torch.device) -> str:
    """The backend that will run `op` on tensors of `device`."""
    name = backend if backend not in (None, "auto") else (
        os.environ.get("PIXELBERT_KERNELS") or _default_backend)
    impls = _REGISTRY[op]
    if name in (None, "auto"):
        order = _AUTO_ORDER.get(device.type, ("reference",))
        return next(b for b in order if b in impls)
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} for {op}; choose from {BACKENDS}")
    if name not in impls:
        raise RuntimeError(f"kernel backend {name!r} has no implementation of {op} "
                           f"(available: {sorted(impls)}); set PIXELBERT_KERNELS / model.kernels "
                           "to one of those or to 'auto'")
    return name


def pool_sample(feat, index, type_embedding=None, *, backend=None):
    """Rows `index` of max_pool2d(feat, 2) flattened to [B*Hp*Wp, C] (+ type_embedding)."""
    name = resolve_backend("pool_sample", backend, feat.device)
    return _REGISTRY["pool_sample"][name](feat, index, type_embedding)


def embed_layernorm(input_ids, position_ids, token_type_ids, word_embeddings,
                    position_embeddings, token_type_embeddings, weight, bias,
                    eps=1e-12, *, backend=None):
    """layer_norm(word[ids] + pos[position_ids] (+ type[token_type_ids])) -> [..., D]."""
    name = resolve_backend("embed_layernorm", backend, word_embeddings.device)
    return _REGISTRY["embed_layernorm"][name](
        input_ids, position_ids, token_type_ids, word_embeddings, position_embeddings,
        token_type_embeddings, weight, bias, eps)


def valid_pooled_index(valid_sizes, grid_h, grid_w, *, backend=None):
    """Flat indices of every valid pooled cell, image by image, row-major (int64 [N])."""
    name = resolve_backend("valid_pooled_index", backend, valid_sizes.device)
    return _REGISTRY["valid_pooled_index"][name](valid_sizes, grid_h, grid_w)
