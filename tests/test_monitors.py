"""DeepSpeed monitor files cut back at the start of a run: the CSV and TensorBoard backends then
read as one uninterrupted run after a resume, on both step axes (the engine's steps, DeepSpeed's
sample counts)."""
from pathlib import Path

import pytest

from pixelbert.engine.monitors import RunPosition, cut_back_csv, cut_back_tensorboard, monitor_events


def test_monitor_events_flatten_numbers_and_leave_out_the_rest():
    record = {"step": 7, "loss": 1.5, "skipped": {"missing": 2}, "ok": True, "names": ["a"], "note": "x"}
    assert monitor_events("Train", record, 7) == [("Train/loss", 1.5, 7), ("Train/skipped/missing", 2.0, 7)]


def write_csv(path: Path, header: str, rows: list[tuple[int, float]], *, repeat_header_after: int = -1) -> None:
    lines = ["step," + header]
    for i, (step, value) in enumerate(rows):
        lines.append(f"{step},{value}")
        if i == repeat_header_after:  # what DeepSpeed's CSV monitor writes on its next start
            lines.append("step," + header)
    path.write_text("\r\n".join(lines) + "\r\n")


def read_csv(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_csv_cut_back_keeps_each_axis_up_to_the_checkpoint(tmp_path):
    write_csv(tmp_path / "Train_loss.csv", "loss", [(s, s / 10) for s in (1, 2, 3, 4, 5)], repeat_header_after=2)
    write_csv(tmp_path / "Train_Samples_lr.csv", "lr", [(s, 0.1) for s in (4, 8, 12, 16, 20)])
    write_csv(tmp_path / "Eval_itm_acc.csv", "itm_acc", [(2, 0.5)])
    registered: list[str] = []
    assert cut_back_csv(tmp_path, RunPosition(step=3, samples=12), registered) == 2 + 1 + 2
    assert read_csv(tmp_path / "Train_loss.csv") == ["step,loss", "1,0.1", "2,0.2", "3,0.3"]
    assert read_csv(tmp_path / "Train_Samples_lr.csv") == ["step,lr", "4,0.1", "8,0.1", "12,0.1"]
    assert read_csv(tmp_path / "Eval_itm_acc.csv") == ["step,itm_acc", "2,0.5"]
    # registered with the monitor, so its next rows go under the one header
    assert sorted(registered) == ["Eval_itm_acc", "Train_Samples_lr", "Train_loss"]
    assert cut_back_csv(tmp_path, RunPosition(step=3, samples=12), registered) == 0  # nothing left to cut


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_cut_back_rewrites_earlier_event_files(tmp_path, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    from pixelbert import fileio
    first = SummaryWriter(tmp_path)  # the interrupted run: steps 1-5, samples 4-20
    for step in range(1, 6):
        first.add_scalar("Train/loss", step / 10, step)
        first.add_scalar("Train/Samples/lr", 0.1 * step, 4 * step)
    first.add_text("notes", "kept: not a scalar past the checkpoint", 1)
    first.close()
    current = SummaryWriter(tmp_path, filename_suffix=".resumed")  # the resumed run's own file
    current.flush()
    current_file = Path(current.file_writer.event_writer._file_name)

    temp_names, mkstemp = [], fileio.tempfile.mkstemp
    monkeypatch.setattr(fileio.tempfile, "mkstemp", lambda **kw: temp_names.append(kw["prefix"]) or mkstemp(**kw))
    dropped = cut_back_tensorboard(tmp_path, RunPosition(step=3, samples=12), keep_file=current_file)
    assert dropped == 2 + 2
    # TensorBoard loads any file whose name holds "tfevents", a rewrite's temporary file too.
    assert len(temp_names) == 1 and "tfevents" not in temp_names[0]
    for step in (4, 5):  # the resumed run logs its steps again
        current.add_scalar("Train/loss", step / 10 + 1, step)
        current.add_scalar("Train/Samples/lr", 0.1 * step + 1, 4 * step)
    current.close()
    scalars = tensorboard_scalars(tmp_path)
    assert scalars["Train/loss"] == [(s, pytest.approx(v)) for s, v in [(1, 0.1), (2, 0.2), (3, 0.3), (4, 1.4), (5, 1.5)]]
    assert scalars["Train/Samples/lr"] == [(s, pytest.approx(v)) for s, v in
                                           [(4, 0.1), (8, 0.2), (12, 0.3), (16, 1.4), (20, 1.5)]]
    assert cut_back_tensorboard(tmp_path, RunPosition(step=5, samples=20), keep_file=current_file) == 0
