"""Stopping on a scheduler's signal (engine/preemption.py): the ranks agree at the end of the
step in flight, save a checkpoint there, exit with train.signal_exit_code (not 0: the run is not
finished), and a resume goes on from that step."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from pixelbert.config import ConfigError, load_config
from pixelbert.engine.preemption import StopSignals
from tests.launch import ROOT, clean_env, free_port
from tests.test_training import SMALL, run_train


def test_stop_signals_record_and_restore():
    before = signal.getsignal(signal.SIGUSR1)
    stop = StopSignals(["SIGUSR1", "SIGUSR2"])
    try:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.received == "SIGUSR1"
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.parametrize("names", [["SIGKILL"], ["SIGTERM", "NOTASIGNAL"]])
def test_uncatchable_or_unknown_stop_signals_are_config_errors(names):
    with pytest.raises(ConfigError, match="train.stop_signals"):
        load_config("configs/tiny.json", [f"train.stop_signals={json.dumps(names)}"])


def steps_logged(run: Path) -> list[int]:
    metrics = run / "metrics.jsonl"
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []


def rank_processes(launcher_pid: int) -> list[psutil.Process]:
    """The training ranks under a `deepspeed` runner: train.py processes whose parent is the
    launcher (their loader workers are train.py processes too, one level down)."""
    return [p for p in psutil.Process(launcher_pid).children(recursive=True)
            if "train.py" in p.cmdline() and "deepspeed.launcher.launch" in " ".join(p.parent().cmdline())]


@pytest.mark.parametrize("code", [-1, 256, 2, 4])
def test_a_signal_exit_code_must_be_a_code_of_its_own(code):
    with pytest.raises(ConfigError, match="train.signal_exit_code"):
        load_config("configs/tiny.json", [f"train.signal_exit_code={code}"])


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_stop_signal_saves_the_step_in_flight_and_the_run_resumes_from_it(tmp_path, ranks):
    """One rank: SIGTERM to the process group, as SLURM sends it and the DeepSpeed launcher
    passes it on (to its whole process tree): the loader worker ignores it, where it used to die
    and take the run down before the save. Two ranks: SIGUSR1
    to rank 1 alone (SLURM's --signal=USR1@T reaches each task in its own time): rank 0 learns
    it at the same step's check, so both save that step and stop. The exit code: the default
    (75) through the launcher, a chosen one (76) on one rank."""
    synth, run = tmp_path / "synthetic", tmp_path / "run"
    common = SMALL + ["train.max_steps=3000", "train.save_every=0", "data.num_workers=1",
                      "deepspeed.train_micro_batch_size_per_gpu=4", "model.backbone_weights=null",
                      f"data.synthetic_dir={synth}", "data.synthetic_images=96", f"train.output_dir={run}",
                      f"data.tokenizer_cache={tmp_path / 'tokenizers'}", "train.eval_every=0"]
    args = ["train.py", "--config", "configs/tiny.json", *common] + (["train.signal_exit_code=76"] if ranks == 1 else [])
    cmd = [sys.executable, *args] if ranks == 1 else \
        ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), *args]
    with open(tmp_path / "out.log", "w") as out:
        child = subprocess.Popen(cmd, cwd=ROOT, env=clean_env(PYTHONUNBUFFERED="1"), stdout=out,
                                 stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while len(steps_logged(run)) < 3:
                assert child.poll() is None and time.monotonic() < deadline, (tmp_path / "out.log").read_text()[-3000:]
                time.sleep(0.2)
            if ranks == 1:  # to every process of the run, loader workers included, as SLURM sends it
                os.killpg(child.pid, signal.SIGTERM)
            else:
                (rank_1,) = [p for p in rank_processes(child.pid) if "--local_rank=1" in p.cmdline()]
                rank_1.send_signal(signal.SIGUSR1)
            # Not 0: a stopped run is not a finished one (the DeepSpeed launcher passes a rank's code on).
            assert child.wait(timeout=120) == (76 if ranks == 1 else 75)
        finally:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
    log = (tmp_path / "out.log").read_text()
    stopped = steps_logged(run)
    assert stopped == list(range(1, len(stopped) + 1)) and len(stopped) < 3000
    assert (run / "checkpoints" / "latest").read_text() == f"step_{stopped[-1]}"
    said = "SIGTERM" if ranks == 1 else "a stop signal (on another rank)"
    assert f"{said}: saved {run / 'checkpoints' / f'step_{stopped[-1]}'} and stopped" in log, log[-3000:]
    resumed = run_train(run, synth, common + ["train.resume=true", f"train.stop_at_step={stopped[-1] + 2}"],
                        ranks=ranks, timeout=300)
    assert [r["step"] for r in resumed] == list(range(1, stopped[-1] + 3))
