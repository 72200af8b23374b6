"""Child runs for the tests: plain `python` or the `deepspeed` launcher, one place for both.

A run that outlives its timeout is killed with its whole process group (the launcher's ranks
included), so a hang fails its test instead of leaving ranks behind to slow every later test.
After a launcher run, any DeepSpeed shared-memory segment with the run's port is swept away;
a run that succeeded and still left one fails its test (the engine unlinks its own at exit).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def clean_env(**extra: str) -> dict:
    """The environment for a child run: no process-group settings leaked from this process."""
    leaked = ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE")
    return {**{k: v for k, v in os.environ.items() if k not in leaked}, "DS_ACCELERATOR": "cpu", **extra}


def run_child(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """subprocess.run, except that a timeout kills the child's process group, not just the child."""
    child = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        stdout, stderr = child.communicate(timeout=timeout)
    except BaseException as stop:  # this timeout, pytest-timeout's or ^C: no rank outlives its test
        os.killpg(child.pid, signal.SIGKILL)
        stdout, stderr = child.communicate()
        if not isinstance(stop, subprocess.TimeoutExpired):
            raise
        pytest.fail(f"{' '.join(cmd)} still running after {timeout} s:\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return subprocess.CompletedProcess(cmd, child.returncode, stdout, stderr)


def shm_segments(port: int) -> list[Path]:
    """DeepSpeed's CPU all-reduce segments for a run on `port` (named ..._<addr>_<port>_<rank>)."""
    return sorted(SHM.glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def run_python(args: list[str], env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    return run_child([sys.executable, *args], clean_env() if env is None else env, timeout)


def run_srun_like(args: list[str], ranks: int, env: dict, timeout: float = 900) -> list[subprocess.CompletedProcess]:
    """`srun -n ranks python ... args` on this machine, without SLURM: each task started with the
    variables srun gives it (one node, job 4242 step 0) and none of torch's, on a port of its own."""
    port = free_port()
    children = []
    for task in range(ranks):
        slurm = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": str(ranks),
                 "SLURM_NTASKS": str(ranks), "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task),
                 "SLURM_NODEID": "0", "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_TASKS_PER_NODE": str(ranks),
                 "MASTER_PORT": str(port)}
        children.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**env, **slurm}, text=True,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True))
    results = []
    try:
        for child in children:
            stdout, stderr = child.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        pytest.fail(f"{' '.join(args)} as {ranks} srun tasks still running after {timeout} s")
    finally:
        for child in children:
            if child.poll() is None:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
        left_behind = shm_segments(port)
        for segment in left_behind:
            segment.unlink(missing_ok=True)
    if all(r.returncode == 0 for r in results) and left_behind:
        pytest.fail(f"srun-like run left DeepSpeed shared memory behind: {[p.name for p in left_behind]}")
    return results


def run_deepspeed(args: list[str], ranks: int, env: dict | None = None,
                  timeout: float = 900) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus ranks ... args` on CPU ranks, on a port of its own."""
    port = free_port()
    cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), *args]
    try:
        result = run_child(cmd, clean_env() if env is None else env, timeout)
    finally:
        left_behind = shm_segments(port)
        for segment in left_behind:
            segment.unlink(missing_ok=True)
    if result.returncode == 0 and left_behind:
        pytest.fail(f"{' '.join(cmd)} left DeepSpeed shared memory behind: {[p.name for p in left_behind]}")
    return result
