"""A run's records, read once and shared by every rank (and, with data.records_cache, by
every run on the same sources).

The main rank reads the configured sources and saves the records packed (`packed.py`), with
what the run needs besides them (`meta.json`), in a folder of the run or, with
`data.records_cache`, in an entry of that shared folder named by the records' fingerprint;
every rank then opens that folder memory-mapped, so one copy in the page cache serves a
machine's ranks and their loader workers. A restart, or another run of the same sources,
finds the folder and reads nothing, as long as the fingerprint holds: the sources' settings,
their annotation files' contents (image folders: their listing's modification time), and
the code that reads and groups them. A folder is written under a temporary name and renamed
into place, so a crash or a run starting beside another never leaves a half-written one.

Without it every rank parses the annotation files at once: Visual Genome's 700 MB region file
becomes several GB of Python objects in each of a machine's 8 ranks.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Callable, Iterable, Optional

from pixelbert.config import ConfigError, SourceConfig
from pixelbert.data.packed import PackedList
from pixelbert.engine.distributed import DistInfo, on_main
from pixelbert.fileio import write_atomic

FINGERPRINT_FILE, META_FILE = "fingerprint", "meta.json"
PATH_KEYS = ("annotations", "questions", "images", "image_data")
# The code whose output is cached: a change to any of these files reads the sources again.
PACKAGE = Path(__file__).resolve().parents[1]
CODE_FILES = sorted((PACKAGE / "data").glob("*.py")) + [PACKAGE / "engine" / "data.py", Path(__file__).resolve()]
KEY_CHARS = 24  # of the fingerprint, in a shared cache entry's name
LEFTOVER_AGE_S = 24 * 3600  # a temporary folder this old was left by a killed build
LEFTOVER = re.compile(r"^\.records[\w-]*\.[a-z0-9_]{8}\.(tmp|old)$")  # publish's (tempfile.mkdtemp's) names


def fingerprint(settings: dict, sources: list[SourceConfig]) -> str:
    """A hash of `settings` (JSON), every source's settings, the contents of its files (a file
    replaced by another of the same size and time is seen), the size and modification time of
    its folders (an image folder's changes when files are added or removed), and the reading
    code."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for source in sources:
        h.update(json.dumps(dataclasses.asdict(source), sort_keys=True).encode())
        for key in PATH_KEYS:
            for path in filter(None, (part.strip() for part in str(getattr(source, key, "") or "").split(","))):
                h.update(describe_path(Path(path)))
    for code in CODE_FILES:
        h.update(code.read_bytes())
    return h.hexdigest()


def describe_path(path: Path) -> bytes:
    """A file's resolved path and content hash; a folder's resolved path, size and time."""
    try:
        if path.is_dir():
            stat = path.stat()
            return f"{path.resolve()} folder {stat.st_size} {stat.st_mtime_ns}".encode()
        content = hashlib.sha256()
        with open(path, "rb") as f:  # Visual Genome's 700 MB: 0.45 s (in the page cache), on the main rank
            while chunk := f.read(1 << 22):
                content.update(chunk)
        return f"{path.resolve()} file {content.hexdigest()}".encode()
    except OSError:
        return f"{path} missing".encode()


def records_folder(records_cache: str, run_dir: str | Path, name: str, key: str) -> Path:
    """Where the records `name` with fingerprint `key` live: the run's `name` folder, or with a
    shared cache (data.records_cache) its entry `name-<key>`."""
    if not records_cache:
        return Path(run_dir) / name
    return Path(records_cache).expanduser() / f"{name}-{key[:KEY_CHARS]}"


def holds(folder: Path, expected: str) -> bool:
    marker = folder / FINGERPRINT_FILE
    return marker.is_file() and marker.read_text() == expected and (folder / META_FILE).is_file()


def mark_used(folder: Path) -> None:
    """Record a reuse: the fingerprint file's modification time is an entry's last use, which
    `python -m pixelbert.tools.records_cache --prune-days` goes by."""
    try:
        os.utime(folder / FINGERPRINT_FILE)
    except OSError:  # a read-only cache is still usable; it just cannot say it was used
        pass


def last_used(folder: Path) -> float:
    return (folder / FINGERPRINT_FILE).stat().st_mtime


def move_aside(folder: Path) -> Path:
    """Rename a records folder to a temporary name that sweep_leftovers knows, to be deleted
    from there: no run finds it half-deleted, and runs that have it open keep their memory maps."""
    aside = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".old"))
    os.rename(folder, aside / "records")
    return aside


def publish(folder: Path, key: str, build: Callable[[], tuple[Iterable, dict]]) -> None:
    """`build`'s records and meta saved in `folder`: written into a temporary folder beside it,
    then renamed into place (replacing an outdated one), so no reader meets a partial folder.
    When another run published the same records first, theirs are kept."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_leftovers(folder.parent)
    temp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        items, meta = build()
        PackedList(items).save(temp)
        write_atomic(temp / META_FILE, json.dumps(meta))
        write_atomic(temp / FINGERPRINT_FILE, key)
        try:
            os.rename(temp, folder)
            return
        except OSError:  # `folder` exists: the same records another run published, or outdated ones
            if holds(folder, key):
                return
        outdated = move_aside(folder)  # a rename onto a non-empty folder fails
        os.rename(temp, folder)
        shutil.rmtree(outdated, ignore_errors=True)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def sweep_leftovers(parent: Path, age_s: float = LEFTOVER_AGE_S) -> list[str]:
    """Delete the temporary folders (`.records<...>.<random>.tmp` or `.old`) that a killed build left in
    `parent` more than `age_s` ago (a build takes seconds to minutes: none is still being
    written); the names deleted."""
    swept = []
    for leftover in parent.glob(".records*"):
        try:
            stale = LEFTOVER.match(leftover.name) and leftover.is_dir() and \
                time.time() - leftover.stat().st_mtime > age_s
        except OSError:  # another run swept it first
            continue
        if stale:
            shutil.rmtree(leftover, ignore_errors=True)
            swept.append(leftover.name)
    return swept


def shared_records(place: Callable[[str], Path], settings: dict, sources: list[SourceConfig],
                   build: Callable[[], tuple[Iterable, dict]], dist: DistInfo,
                   ) -> tuple[PackedList, dict, Path, bool]:
    """(the records, their meta, their folder, whether the main rank read them now). The main
    rank fingerprints the sources, finds their folder with `place(fingerprint)` and, unless it
    holds them already, calls `build` (-> the records and a JSON-able meta) and publishes them
    there; an error there is raised on every rank, so none waits for records that will not come."""
    def find_or_build() -> tuple[str, str, bool]:
        key = fingerprint(settings, sources)
        folder = place(key)
        if holds(folder, key):
            mark_used(folder)
            return str(folder), key, False
        publish(folder, key, build)
        return str(folder), key, True
    found = on_main(dist, find_or_build)  # the others wait here while the main rank reads
    if found is None:  # no process group: a rank without the main one's answer finds the folder itself
        key = fingerprint(settings, sources)
        found = (str(place(key)), key, False)
    folder, key, fresh = Path(found[0]), found[1], found[2]
    if not holds(folder, key):
        raise ConfigError(f"{folder}: the records the main rank saved are not there on rank {dist.rank}: "
                          "train.output_dir (and data.records_cache, when set) must be on a file system "
                          "every rank sees")
    hold(folder)
    if not holds(folder, key):  # pruned (tools/records_cache) between the check and the lock
        raise ConfigError(f"{folder} was deleted by the records cache's pruning as this run started: start it again")
    return PackedList.open(folder), json.loads((folder / META_FILE).read_text()), folder, fresh


_HELD: list = []  # the open files whose shared locks say "in use" until this process ends


def hold(folder: Path) -> None:
    """Mark `folder` in use for as long as this process lives: a shared lock on its fingerprint
    file, which the records cache tool's pruning will not break (loader workers started later,
    e.g. for a validation, may open the folder again by its path)."""
    marker = open(folder / FINGERPRINT_FILE, "rb")  # noqa: SIM115 - held open until the process exits
    try:
        fcntl.flock(marker, fcntl.LOCK_SH)
    except OSError:  # a file system without locks (e.g. Lustre without -o flock): pruning refuses there
        marker.close()
        return
    _HELD.append(marker)


def claim(folder: Path) -> Optional[IO]:
    """`folder`'s fingerprint file, opened and locked exclusively (no run can start on the
    folder until the caller closes it), or None when a live process holds the folder. OSError
    where the file system has no locks: then nothing can tell an entry in use."""
    marker = open(folder / FINGERPRINT_FILE, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    try:
        fcntl.flock(marker, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        marker.close()
        return None
    except OSError:
        marker.close()
        raise
    return marker
