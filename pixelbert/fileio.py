"""Atomic file writes: a reader sees the old file or the whole new one, never a partial write."""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import torch


def write_atomic(path: str | Path, data: str | bytes, temp_prefix: str | None = None) -> None:
    """Write `data` to `path` through a temporary file and `os.replace`.

    Readers see either the old file or the whole new one, never a partial write; the
    temporary name is unique, so processes writing the same path at once do not collide. It
    starts with `temp_prefix` (by default `.<name>.`; give another where readers pick files by
    a part of their name).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=temp_prefix or f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def torch_save_atomic(obj, path: str | Path) -> None:
    """`torch.save` through `write_atomic`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())
