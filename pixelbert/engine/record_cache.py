"""A training run's records, read once and shared by every rank.

The main rank reads the configured sources and saves the records packed (`packed.py`) in a
folder of the run, with what the run needs besides them (`meta.json`); every rank then opens
that folder memory-mapped, so one copy in the page cache serves a machine's ranks and their
loader workers. A restart finds the folder and reads nothing, as long as the fingerprint
holds: the sources' settings, their files' sizes and modification times, and the code that
reads and groups them.

Without it every rank parses the annotation files at once: Visual Genome's 700 MB region file
becomes several GB of Python objects in each of a machine's 8 ranks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable, Iterable

from pixelbert.config import SourceConfig
from pixelbert.data.packed import PackedList
from pixelbert.engine.distributed import DistInfo, on_main
from pixelbert.fileio import write_atomic

FINGERPRINT_FILE, META_FILE = "fingerprint", "meta.json"
PATH_KEYS = ("annotations", "questions", "images", "image_data")
# The code whose output is cached: a change to any of these files reads the sources again.
PACKAGE = Path(__file__).resolve().parents[1]
CODE_FILES = sorted((PACKAGE / "data").glob("*.py")) + [PACKAGE / "engine" / "data.py", Path(__file__).resolve()]


def fingerprint(settings: dict, sources: list[SourceConfig]) -> str:
    """A hash of `settings` (JSON), every source's settings and the size and modification time
    of each of its paths (image folders: the folder's own, which changes when files are added
    or removed), and the reading code."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for source in sources:
        h.update(json.dumps(dataclasses.asdict(source), sort_keys=True).encode())
        for key in PATH_KEYS:
            for path in filter(None, (part.strip() for part in str(getattr(source, key, "") or "").split(","))):
                try:
                    stat = Path(path).stat()
                    h.update(f"{Path(path).resolve()} {stat.st_size} {stat.st_mtime_ns}".encode())
                except OSError:
                    h.update(f"{path} missing".encode())
    for code in CODE_FILES:
        h.update(code.read_bytes())
    return h.hexdigest()


def holds(folder: Path, expected: str) -> bool:
    marker = folder / FINGERPRINT_FILE
    return marker.is_file() and marker.read_text() == expected and (folder / META_FILE).is_file()


def shared_records(folder: str | Path, settings: dict, sources: list[SourceConfig],
                   build: Callable[[], tuple[Iterable, dict]], dist: DistInfo,
                   ) -> tuple[PackedList, dict, bool]:
    """(the records, their meta, whether the main rank read them now). The main rank calls `build`
    (-> the records and a JSON-able meta) unless `folder` already holds this fingerprint's; an
    error there is raised on every rank, so none waits for records that will not come."""
    folder = Path(folder)
    expected = fingerprint(settings, sources)

    def read_unless_held() -> bool:
        if holds(folder, expected):
            return False
        (folder / FINGERPRINT_FILE).unlink(missing_ok=True)  # a crash below leaves no valid-looking cache
        items, meta = build()
        PackedList(items).save(folder)
        write_atomic(folder / META_FILE, json.dumps(meta))
        write_atomic(folder / FINGERPRINT_FILE, expected)
        return True
    fresh = bool(on_main(dist, read_unless_held))  # the others wait here while the main rank reads
    if not holds(folder, expected):
        raise RuntimeError(f"{folder}: the records the main rank saved are not there on rank {dist.rank}: "
                           "train.output_dir must be on a file system every rank sees")
    return PackedList.open(folder), json.loads((folder / META_FILE).read_text()), fresh
