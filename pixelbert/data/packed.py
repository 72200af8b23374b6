"""Records kept as one byte buffer instead of millions of Python objects.

A dataset of Python objects (Visual Genome: 5.4M region phrases) held by the main process is
shared with forked DataLoader workers page by page, but every read in a worker writes the
objects' reference counts, so each worker slowly copies every page it reads: the memory of the
records multiplies by the number of workers on every rank. Stored pickled in one numpy buffer,
the records cost a fraction of the memory and reading them writes nothing shared. Saved to
a folder and opened memory-mapped, one copy in the page cache serves every rank of a machine.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Generic, Iterable, Sequence, TypeVar, overload

import numpy as np

T = TypeVar("T")


class PackedList(Sequence[T], Generic[T]):
    """An immutable list of picklable items: each one is unpickled on access (a new copy)."""

    def __init__(self, items: Iterable[T]):
        blobs = [pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL) for item in items]
        self._ends = np.cumsum([len(blob) for blob in blobs], dtype=np.int64)
        self._data = np.frombuffer(b"".join(blobs), dtype=np.uint8)
        self._folder: Path | None = None  # where it was opened from (memory-mapped)

    def save(self, folder: str | Path) -> None:
        """Write the buffer to `folder` (data.npy, ends.npy), each file atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in (("data.npy", self._data), ("ends.npy", self._ends)):
            temp = folder / f".{name}.{os.getpid()}.tmp"
            with open(temp, "wb") as f:
                np.save(f, array)
            os.replace(temp, folder / name)

    @classmethod
    def open(cls, folder: str | Path) -> "PackedList":
        """The list `save` wrote to `folder`, memory-mapped read-only: processes that open it
        share the file's pages instead of each holding a copy."""
        packed = cls.__new__(cls)
        packed._folder = Path(folder)
        packed._data = np.load(packed._folder / "data.npy", mmap_mode="r")
        packed._ends = np.load(packed._folder / "ends.npy", mmap_mode="r")
        return packed

    def __reduce__(self):
        # Sent to a spawned process: an opened list is reopened there, not copied through a pipe.
        if self._folder is not None:
            return PackedList.open, (str(self._folder),)
        return super().__reduce__()

    def __len__(self) -> int:
        return len(self._ends)

    @overload
    def __getitem__(self, index: int) -> T: ...

    @overload
    def __getitem__(self, index: slice) -> list[T]: ...

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        index %= len(self)
        start = int(self._ends[index - 1]) if index else 0
        return pickle.loads(self._data[start:int(self._ends[index])].data)

    @property
    def nbytes(self) -> int:
        return self._data.nbytes + self._ends.nbytes
