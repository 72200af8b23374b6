"""DeepSpeed's monitors (TensorBoard, W&B, Comet, CSV): the events the engine sends them, and
their files cut back at the start of a run so that, like `metrics.jsonl`, they read as one
uninterrupted run after a resume."""
from __future__ import annotations

import csv
import io
from pathlib import Path

from pixelbert.fileio import write_atomic

# DeepSpeed's own events (`Train/Samples/lr`, …) count samples on their step axis, not steps.
SAMPLES_AXIS = "Train/Samples/"


def monitor_events(group: str, record: dict, step: int) -> list[tuple[str, float, int]]:
    """A log line's numbers as DeepSpeed Monitor events `(group/key, value, step)`, for the
    TensorBoard, W&B, Comet or CSV backends the `deepspeed` section enables. A nested dict (the
    skip counts, retrieval's folds) gives `group/key/inner`; lists and text are left out."""
    events = []
    for key, value in record.items():
        if key == "step" or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            events.append((f"{group}/{key}", float(value), step))
        elif isinstance(value, dict):
            events.extend(monitor_events(f"{group}/{key}", value, step))
    return events


class RunPosition:
    """Where the run starts: events past it were logged by an interrupted run (or an earlier run
    in the same folder, when this one starts from step 0) and are dropped."""

    def __init__(self, step: int, samples: int):
        self.step, self.samples = step, samples

    def keeps(self, tag: str, step: int) -> bool:
        return step <= (self.samples if tag.startswith(SAMPLES_AXIS) else self.step)


def cut_back_monitors(monitor, position: RunPosition) -> dict[str, int]:
    """Drops the events past `position` from the files of DeepSpeed's enabled CSV and TensorBoard
    monitors (rank 0 only: it alone writes them); returns the number dropped per folder. W&B and
    Comet start a new run on their servers at each start, so they have nothing to cut."""
    dropped = {}
    csv_monitor = getattr(monitor, "csv_monitor", None)
    if csv_monitor is not None and csv_monitor.enabled and csv_monitor.log_dir:
        dropped[csv_monitor.log_dir] = cut_back_csv(Path(csv_monitor.log_dir), position,
                                                    csv_monitor.filenames)
    tb_monitor = getattr(monitor, "tb_monitor", None)
    writer = getattr(tb_monitor, "summary_writer", None)
    if writer is not None:
        current = Path(writer.file_writer.event_writer._file_name)  # this run's file: nothing past position yet
        dropped[str(current.parent)] = cut_back_tensorboard(current.parent, position, keep_file=current)
    return dropped


def cut_back_csv(folder: Path, position: RunPosition, registered: list[str]) -> int:
    """DeepSpeed's CSV monitor writes `<tag with / as _>.csv` with a `step,<key>` header, which it
    repeats in a file it has not written to in this process: the cut files are registered in its
    `registered` list (its `filenames`) so that the header stays single."""
    dropped = 0
    for path in sorted(folder.glob("*.csv")):
        tag = path.stem.replace("Train_Samples_", SAMPLES_AXIS, 1)
        rows = list(csv.reader(path.read_text().splitlines()))
        if not rows:
            continue
        kept = [rows[0]] + [row for row in rows[1:] if is_step_row(row) and position.keeps(tag, int(row[0]))]
        dropped += len(rows) - len(kept)
        if len(kept) < len(rows):
            text = io.StringIO()
            csv.writer(text).writerows(kept)
            write_atomic(path, text.getvalue())
        if path.stem not in registered:
            registered.append(path.stem)
    return dropped


def is_step_row(row: list[str]) -> bool:
    """A data row (a repeated header, written by an earlier resume, is not)."""
    return len(row) == 2 and row[0].isdigit()


def cut_back_tensorboard(folder: Path, position: RunPosition, keep_file: Path) -> int:
    """Rewrites each earlier event file of the folder without the scalars past `position`.
    TensorBoard's own purge (a SessionLog.START event) cannot do this: it cuts every tag at one
    step, and DeepSpeed's `Train/Samples/*` tags count samples."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    dropped = 0
    for path in sorted(folder.glob("events.out.tfevents.*")):
        if path == keep_file:
            continue
        records, changed = [], False
        for raw in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(raw)
            values = event.summary.value
            kept = [value for value in values if position.keeps(value.tag, event.step)]
            if len(kept) < len(values):
                dropped += len(values) - len(kept)
                changed = True
                if not kept:
                    continue
                del values[:]
                values.extend(kept)
                raw = event.SerializeToString()
            records.append(raw)
        if changed:
            data = io.BytesIO()
            writer = RecordWriter(data)
            for raw in records:
                writer.write(raw)
            # TensorBoard loads any file with "tfevents" in its name: the temporary one must not have it.
            write_atomic(path, data.getvalue(), temp_prefix=".rewrite.")
    return dropped

