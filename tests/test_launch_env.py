"""Ranks started by srun or mpirun: each process finds its place from the launcher's variables."""
import importlib.util
from types import SimpleNamespace

import pytest

from pixelbert.config import ConfigError
from pixelbert.engine import launch_env
from pixelbert.engine.launch_env import (device_index, device_rank_variables, expand_tasks_per_node, first_host,
                                          launched_world_size, rank_environment, slurm_port)


def srun_task(procid: int, localid: int, nodeid: int, **extra: str) -> dict:
    """What srun gives task `procid` of step 0 of job 4242: 8 tasks, 4 on each of 2 nodes."""
    return {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8",
            "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid), "SLURM_NODEID": str(nodeid),
            "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_JOB_NODELIST": "gpu[007-008]",
            "SLURM_STEP_TASKS_PER_NODE": "4(x2)", **extra}


def test_every_srun_task_finds_its_rank_and_the_same_rank_zero():
    tasks = [srun_task(procid, procid % 4, procid // 4) for procid in range(8)]
    found = [rank_environment(env) for env in tasks]
    assert [variables["RANK"] for variables, _ in found] == [str(r) for r in range(8)]
    assert [variables["LOCAL_RANK"] for variables, _ in found] == [str(r % 4) for r in range(8)]
    for variables, place in found:
        assert variables["WORLD_SIZE"] == "8" and variables["LOCAL_SIZE"] == "4"
        assert variables["MASTER_ADDR"] == "gpu007"
        assert variables["MASTER_PORT"] == str(slurm_port("4242", "0"))
        assert place.source == "SLURM step 4242.0"


def test_exported_master_address_and_port_win():
    variables, _ = rank_environment(srun_task(5, 1, 1, MASTER_ADDR="10.0.0.9", MASTER_PORT="23456"))
    assert (variables["MASTER_ADDR"], variables["MASTER_PORT"]) == ("10.0.0.9", "23456")


def test_a_launcher_that_set_rank_is_left_alone():
    """The deepspeed launcher run inside an srun step: its RANK, not the step's task number."""
    assert rank_environment(srun_task(1, 1, 0, RANK="3", WORLD_SIZE="8")) == ({}, None)


def test_the_batch_script_itself_is_one_rank():
    """In an sbatch script SLURM_NTASKS=4 but only one process runs there (no SLURM_STEP_*)."""
    batch = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
             "SLURM_NODELIST": "gpu[007-010]", "SLURM_TASKS_PER_NODE": "1(x4)"}
    variables, place = rank_environment(batch)
    assert place is None and variables["RANK"] == "0" and variables["WORLD_SIZE"] == "1"
    single, _ = rank_environment(srun_task(0, 0, 0, SLURM_STEP_NUM_TASKS="1"))
    assert single["WORLD_SIZE"] == "1" and single["MASTER_ADDR"] == "127.0.0.1"


def test_plain_python_is_one_rank_on_its_own_port():
    variables, place = rank_environment({})
    assert place is None
    assert {k: variables[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")} == {"RANK": "0", "WORLD_SIZE": "1",
                                                                               "LOCAL_RANK": "0"}
    assert 0 < int(variables["MASTER_PORT"]) < 65536
    assert rank_environment({"MASTER_PORT": "31111"})[0]["MASTER_PORT"] == "31111"


def test_world_size_without_rank_is_refused():
    with pytest.raises(ConfigError, match="WORLD_SIZE=4 but no RANK"):
        rank_environment({"WORLD_SIZE": "4"})


def open_mpi_rank(rank: int, **extra: str) -> dict:
    return {"OMPI_COMM_WORLD_RANK": str(rank), "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": str(rank % 2),
            "OMPI_COMM_WORLD_LOCAL_SIZE": "2", **extra}


def test_open_mpi_ranks_with_an_exported_master_address():
    variables, place = rank_environment(open_mpi_rank(3, MASTER_ADDR="node1"))
    assert place.source == "Open MPI"
    assert variables == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "node1",
                         "MASTER_PORT": str(launch_env.TORCH_DEFAULT_PORT), "LOCAL_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}


def test_mpirun_inside_a_slurm_job_takes_mpi_numbers():
    """mpirun starts one daemon per node through srun: the step says 2 tasks, MPI says 4 ranks."""
    env = {**srun_task(1, 0, 1, SLURM_STEP_NUM_TASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)"),
           **open_mpi_rank(3, MASTER_ADDR="gpu007")}
    variables, place = rank_environment(env)
    assert place.source == "Open MPI" and (variables["RANK"], variables["WORLD_SIZE"]) == ("3", "4")


def test_srun_with_pmi_takes_the_step_and_its_node_list():
    env = {**srun_task(6, 2, 1), "PMI_RANK": "6", "PMI_SIZE": "8"}
    variables, place = rank_environment(env)
    assert place.source.startswith("SLURM") and variables["MASTER_ADDR"] == "gpu007"


def without_mpi4py(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "mpi4py" else real_find_spec(name))


def test_mpich_ranks_need_a_local_rank(monkeypatch):
    env = {"PMI_RANK": "1", "PMI_SIZE": "2", "MASTER_ADDR": "node1"}
    without_mpi4py(monkeypatch)
    with pytest.raises(ConfigError, match=r"2 ranks started by MPI \(PMI\).*MPI_LOCALRANKID"):
        rank_environment(env)
    variables, place = rank_environment({**env, "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"})
    assert place.source == "MPI (PMI)" and (variables["RANK"], variables["LOCAL_RANK"]) == ("1", "1")


def test_mpi_without_a_master_address(monkeypatch):
    """Nothing names rank 0's host: DeepSpeed's own MPI discovery where mpi4py is installed,
    otherwise a clear error that says what to export."""
    without_mpi4py(monkeypatch)
    with pytest.raises(ConfigError, match="4 ranks started by Open MPI.*MASTER_ADDR"):
        rank_environment(open_mpi_rank(0))
    monkeypatch.undo()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "mpi4py" else real_find_spec(name))
    variables, place = rank_environment(open_mpi_rank(0))
    assert variables == {} and place.source == "Open MPI"
    variables, place = rank_environment({"PMI_RANK": "1", "PMI_SIZE": "2", "MASTER_ADDR": "node1"})
    assert variables == {} and place.local_rank is None  # MPI finds the local rank too


@pytest.mark.parametrize("hostlist, first", [
    ("node1", "node1"), ("node1,node2", "node1"), ("gpu[007-009,012],cpu1", "gpu007"),
    ("gpu[12,3-4]", "gpu12"), ("rack[1-2]-n[01-04]", "rack1-n01"), ("a-b.example.org", "a-b.example.org"),
])
def test_first_host_of_a_slurm_host_list(hostlist, first):
    assert first_host(hostlist) == first


def test_an_unreadable_host_list_asks_for_master_addr():
    with pytest.raises(ConfigError, match="export MASTER_ADDR"):
        first_host("gpu[007-009")


def test_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    assert expand_tasks_per_node("") == [] and expand_tasks_per_node("odd") == []
    # a node the list does not cover leaves the local size unset
    variables, _ = rank_environment(srun_task(7, 3, 1, SLURM_STEP_TASKS_PER_NODE="4"))
    assert "LOCAL_SIZE" not in variables


def test_concurrent_steps_of_one_job_get_different_ports():
    ports = {slurm_port("4242", str(step)) for step in range(4)}
    assert len(ports) == 4 and all(launch_env.SLURM_PORT_BASE <= p < 32768 for p in ports)


def test_launched_world_size_counts_every_launchers_ranks():
    """pixelbert.evaluate splits its work only when started as several ranks."""
    assert launched_world_size({}) == 1
    assert launched_world_size({"RANK": "0", "WORLD_SIZE": "2"}) == 2
    assert launched_world_size(srun_task(3, 3, 0)) == 8
    assert launched_world_size(open_mpi_rank(1)) == 4  # before any MASTER_ADDR is looked for
    assert launched_world_size({**srun_task(0, 0, 0), "SLURM_STEP_NODELIST": "gpu[0"}) == 8  # not parsed here


def test_a_rank_uses_its_local_gpu_or_the_only_one_it_sees():
    assert device_index(3, 8) == 3  # every GPU of the node visible
    assert device_index(3, 1) == 0  # srun --gpus-per-task=1: its own GPU is cuda:0
    with pytest.raises(ConfigError, match="local rank 5 but this process sees 4 GPUs"):
        device_index(5, 4)


def test_an_open_mpi_task_with_its_own_gpu_passes_deepspeeds_local_rank_check(monkeypatch):
    """mpirun binding one GPU to each task: rank 3 is local rank 1 and its GPU is cuda:0.
    DeepSpeed's engine asserts LOCAL_RANK == OMPI_COMM_WORLD_LOCAL_RANK and takes LOCAL_RANK as
    the device; with the local rank alone rewritten (as before) the assert fired."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.engine import DeepSpeedEngine

    def configure(env: dict) -> SimpleNamespace:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        engine = SimpleNamespace()
        DeepSpeedEngine._configure_with_arguments(engine, SimpleNamespace(local_rank=None), mpu=None)
        return engine

    env = open_mpi_rank(3, MASTER_ADDR="node1")
    env.update(rank_environment(env)[0])
    device = device_index(int(env["LOCAL_RANK"]), 1)
    with pytest.raises(AssertionError, match="conflicting local rank"):
        configure({**env, "LOCAL_RANK": str(device)})
    assert device_rank_variables(env, device) == {"LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert configure({**env, **device_rank_variables(env, device)}).local_rank == 0
    assert device_rank_variables({"LOCAL_RANK": "1"}, 0) == {"LOCAL_RANK": "0"}  # srun, torchrun: nothing else
