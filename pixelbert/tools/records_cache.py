"""List or prune a shared records cache (`data.records_cache`).

    python -m pixelbert.tools.records_cache DIR                  # each entry: size, last use, items
    python -m pixelbert.tools.records_cache DIR --prune-days 30  # delete entries unused for 30 days

A run marks the entry it reuses (engine/record_cache.py), so "last use" is the last run that
started on it. Every process of a run holds a shared lock on its entry for as long as it lives
(its loader workers may open the entry again by path, e.g. for a validation), and pruning never
deletes an entry so held, however old. An entry is renamed aside before it is deleted; a run
that starts later builds it again. Left-over temporary folders of killed builds older than a
day are deleted too.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pixelbert.data.packed import PackedList
from pixelbert.engine.record_cache import FINGERPRINT_FILE, META_FILE, claim, last_used, move_aside, sweep_leftovers

DAY_S = 24 * 3600


@dataclass
class Entry:
    folder: Path
    bytes: int
    last_used: float  # seconds since the epoch
    items: int  # records (pre-training: images with their captions)


def entries(cache: Path) -> list[Entry]:
    """The cache's complete entries (a fingerprint and a meta file), least recently used first."""
    found = []
    for folder in cache.iterdir():
        if folder.name.startswith(".") or not (folder / FINGERPRINT_FILE).is_file() \
                or not (folder / META_FILE).is_file():
            continue
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        found.append(Entry(folder, size, last_used(folder), len(PackedList.open(folder))))
    return sorted(found, key=lambda entry: entry.last_used)


def prune(cache: Path, unused_days: float, now: float | None = None) -> tuple[list[Entry], list[Entry]]:
    """Delete the entries last used more than `unused_days` ago, except those a live run holds
    (and stale build leftovers); (the entries deleted, the old ones kept because in use)."""
    now = time.time() if now is None else now
    pruned, busy = [], []
    for entry in entries(cache):
        if now - entry.last_used <= unused_days * DAY_S:
            continue
        claimed = claim(entry.folder)
        if claimed is None:
            busy.append(entry)
            continue
        with claimed:  # no run starts on it while it moves aside
            aside = move_aside(entry.folder)
        shutil.rmtree(aside, ignore_errors=True)
        pruned.append(entry)
    sweep_leftovers(cache)
    return pruned, busy


def describe(entry: Entry, now: float) -> str:
    return (f"{entry.folder.name}  {entry.bytes / 2**20:,.1f} MB  "
            f"{entry.items:,} records, last used {(now - entry.last_used) / DAY_S:.1f} days ago")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache", help="the data.records_cache folder")
    parser.add_argument("--prune-days", type=float, default=None,
                        help="delete the entries no run has used for this many days")
    args = parser.parse_args(argv)
    cache = Path(args.cache).expanduser()
    if not cache.is_dir():
        print(f"error: {cache} is not a folder", file=sys.stderr)
        return 2
    if args.prune_days is not None and args.prune_days < 0:
        print(f"error: --prune-days must be >= 0, got {args.prune_days}", file=sys.stderr)
        return 2
    now = time.time()
    if args.prune_days is not None:
        try:
            pruned, busy = prune(cache, args.prune_days, now)
        except OSError as e:
            print(f"error: cannot lock the entries of {cache} ({e}): pruning could not tell which a running job "
                  "uses; delete unused entries by hand", file=sys.stderr)
            return 2
        for entry in pruned:
            print(f"deleted {describe(entry, now)}")
        for entry in busy:
            print(f"kept (a running job holds it) {describe(entry, now)}")
        print(f"{len(pruned)} entries deleted ({sum(e.bytes for e in pruned) / 2**20:,.1f} MB)")
    kept = entries(cache)
    for entry in kept:
        print(describe(entry, now))
    print(f"{len(kept)} entries, {sum(e.bytes for e in kept) / 2**20:,.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
