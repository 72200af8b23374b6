"""Which rank this process is, from whatever started it.

torch.distributed reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT. The
`deepspeed` launcher (pdsh, one node or several) and torchrun set them. A process started by
SLURM's `srun` or by `mpirun` has only the scheduler's own variables: without this module each
such process took itself for a one-rank run, and N copies trained side by side into one output
folder. DeepSpeed's `--launcher openmpi|slurm` start ranks that way too, and count on mpi4py to
find the ranks; where mpi4py is installed it still does (nothing is set here for it).

Every rank derives the same MASTER_ADDR and MASTER_PORT from its own environment, with no
communication: the first host of the SLURM step (or MASTER_ADDR as exported), and a port fixed
by the SLURM job and step (or MASTER_PORT as exported).
"""
from __future__ import annotations

import importlib.util
import re
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

from pixelbert.config import ConfigError

TORCH_DEFAULT_PORT = 29500  # torch's and DeepSpeed's default MASTER_PORT
SLURM_PORT_BASE, SLURM_PORT_SPAN = 10000, 20000  # below Linux's ephemeral range (32768-60999)


@dataclass
class LaunchPlace:
    """One process's place among the ranks, as a launcher described it."""
    source: str  # "SLURM step 4242.0", "Open MPI", ...
    rank: int
    world_size: int
    local_rank: Optional[int]  # None: the launcher does not say (PMI without MPI_LOCALRANKID)
    local_size: Optional[int]  # ranks on this node, where the launcher says
    node_list: Optional[str] = None  # SLURM's host list: its first host is rank 0's
    master_port: Optional[int] = None


def rank_environment(env: Mapping[str, str]) -> tuple[dict[str, str], Optional[LaunchPlace]]:
    """The variables to add to `env` for torch.distributed, and the launcher's description of
    this process (None where a launcher set them already, or for a one-rank run). With that
    place but nothing to add, DeepSpeed's init_distributed finds the ranks through mpi4py. Raises
    ConfigError for a launch that gives several ranks but no way to find rank 0."""
    if "RANK" in env:  # the deepspeed launcher, torchrun, DeepSpeed's MPICH/Intel MPI runners
        return {}, None
    place = launch_place(env)
    if place is None:
        if int(env.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"WORLD_SIZE={env['WORLD_SIZE']} but no RANK: start the ranks with `deepspeed`, "
                              "torchrun, srun or mpirun, or set RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT")
        # plain `python train.py`: a one-rank group
        return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": env.get("MASTER_PORT") or str(free_port())}, None
    master_addr = env.get("MASTER_ADDR") or (first_host(place.node_list) if place.node_list else None)
    if master_addr is None or place.local_rank is None:
        if importlib.util.find_spec("mpi4py") is not None:
            return {}, place  # DeepSpeed asks MPI itself
        if master_addr is None:
            raise ConfigError(f"{place.world_size} ranks started by {place.source}, but nothing names rank 0's "
                              "host: export MASTER_ADDR=<its host> (and MASTER_PORT) to every rank "
                              "(mpirun -x MASTER_ADDR), or install mpi4py")
        raise ConfigError(f"{place.world_size} ranks started by {place.source}, but nothing says which of this "
                          "node's devices is this rank's (MPI_LOCALRANKID): set LOCAL_RANK, or install mpi4py")
    port = env.get("MASTER_PORT") or str(place.master_port or TORCH_DEFAULT_PORT)
    local_size = {} if place.local_size is None else {"LOCAL_SIZE": str(place.local_size),
                                                      "LOCAL_WORLD_SIZE": str(place.local_size)}
    return {"RANK": str(place.rank), "WORLD_SIZE": str(place.world_size), "LOCAL_RANK": str(place.local_rank),
            "MASTER_ADDR": master_addr, "MASTER_PORT": port, **local_size}, place


def device_index(local_rank: int, visible_devices: int) -> int:
    """The GPU of a rank among those its process sees: its local rank when it sees the node's
    GPUs (the deepspeed launcher, torchrun, `srun --gpus-per-node`), 0 when it sees only its
    own (`srun --gpus-per-task=1`, where CUDA_VISIBLE_DEVICES differs per task)."""
    if local_rank < visible_devices:
        return local_rank
    if visible_devices == 1:
        return 0
    raise ConfigError(f"local rank {local_rank} but this process sees {visible_devices} GPUs: start one rank per "
                      "GPU (srun --ntasks-per-node=<GPUs per node>), or give each task its own (--gpus-per-task=1)")


def device_rank_variables(env: Mapping[str, str], device: int) -> dict[str, str]:
    """The variables that tell DeepSpeed a rank's device: its engine and ZeRO read LOCAL_RANK as
    the device index, and under Open MPI its engine asserts that LOCAL_RANK equals
    OMPI_COMM_WORLD_LOCAL_RANK, so a task that sees only its own GPU (device 0, local rank 1
    and up) has both set to the index; nothing reads either as a place among the node's ranks
    after the process group exists."""
    variables = {"LOCAL_RANK": str(device)}
    if "OMPI_COMM_WORLD_LOCAL_RANK" in env:
        variables["OMPI_COMM_WORLD_LOCAL_RANK"] = str(device)
    return variables


def free_port() -> int:
    """A port free on this machine now (a one-rank run's own group)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launched_world_size(env: Mapping[str, str]) -> int:
    """How many ranks started this process and its peers (1: none beside it)."""
    if "RANK" in env or "WORLD_SIZE" in env:
        return int(env.get("WORLD_SIZE", "1"))
    place = launch_place(env)
    return 1 if place is None else place.world_size


def launch_place(env: Mapping[str, str]) -> Optional[LaunchPlace]:
    """This process's place when an MPI launcher or a SLURM step started several ranks (None
    otherwise). mpirun inside a SLURM job starts its node daemons through srun, so MPI's numbers
    win over the step's; where both agree (srun --mpi=pmix) the step's node list names rank 0."""
    mpi, slurm = mpi_place(env), slurm_place(env)
    if mpi is not None and not (slurm and (slurm.rank, slurm.world_size) == (mpi.rank, mpi.world_size)):
        return mpi
    return slurm


def mpi_place(env: Mapping[str, str]) -> Optional[LaunchPlace]:
    """Open MPI's variables, or those of MPICH / Intel MPI (PMI_*)."""
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return LaunchPlace("Open MPI", int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                           int(env["OMPI_COMM_WORLD_LOCAL_RANK"]), _int_or_none(env.get("OMPI_COMM_WORLD_LOCAL_SIZE")))
    if int(env.get("PMI_SIZE", "1")) > 1:
        return LaunchPlace("MPI (PMI)", int(env["PMI_RANK"]), int(env["PMI_SIZE"]),
                           _int_or_none(env.get("MPI_LOCALRANKID")), _int_or_none(env.get("MPI_LOCALNRANKS")))
    return None


def slurm_place(env: Mapping[str, str]) -> Optional[LaunchPlace]:
    """The variables srun gives each task of a step. Only srun sets the SLURM_STEP_* ones: in the
    batch script itself SLURM_NTASKS may say 4 while one process runs, so those are not read."""
    tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1"))
    if tasks <= 1:
        return None
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    per_node = expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", ""))
    node = int(env.get("SLURM_NODEID", "0"))
    job, step = env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", "0")), env.get("SLURM_STEP_ID", "0")
    return LaunchPlace(f"SLURM step {job}.{step}", int(env["SLURM_PROCID"]), tasks, int(env["SLURM_LOCALID"]),
                       per_node[node] if node < len(per_node) else None,
                       nodes, slurm_port(job, step))


def slurm_port(job: str, step: str) -> int:
    """A port every task of one step computes alike, and two steps running at once in one job
    (or two jobs sharing a node) most likely do not share."""
    return SLURM_PORT_BASE + (int(job) * 7 + int(step if step.isdigit() else 0)) % SLURM_PORT_SPAN


def first_host(hostlist: str) -> str:
    """The first host of a SLURM host list: "gpu[007-009,012],cpu1" -> "gpu007" (a bracket's
    first number as written, zero padding kept), "rack[1-2]-n[01-04]" -> "rack1-n01"."""
    depth, end = 0, len(hostlist)
    for position, char in enumerate(hostlist):  # the first entry ends at a comma outside brackets
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = position
            break
    host = re.sub(r"\[([^\]]*)\]", lambda ranges: re.split(r"[-,]", ranges.group(1))[0], hostlist[:end])
    if not host or "[" in host or "]" in host:
        raise ConfigError(f"cannot read the first host of the SLURM node list {hostlist!r}: export MASTER_ADDR")
    return host


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's tasks-per-node list, one number per node: "2(x3),1" -> [2, 2, 2, 1]."""
    counts: list[int] = []
    for item in filter(None, spec.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if match is None:
            return []  # not a form we know: the local size stays unset rather than wrong
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def _int_or_none(value: Optional[str]) -> Optional[int]:
    return None if value is None else int(value)
