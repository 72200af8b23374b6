"""Process-group set-up: the same code under the `deepspeed` launcher and as plain `python`.

On a machine without a GPU DeepSpeed is pointed at its CPU accelerator and the gloo backend,
which is how the tests prove that several ranks agree with one.
"""
from __future__ import annotations

import atexit
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch
from tqdm import tqdm

from pixelbert.engine.launch_env import device_index, device_rank_variables, rank_environment

T = TypeVar("T")


def configure_accelerator() -> None:
    """Choose DeepSpeed's accelerator before deepspeed is first imported."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Initialise torch.distributed through DeepSpeed: the ranks of the `deepspeed` launcher,
    torchrun, srun or mpirun, or one rank under plain `python`."""
    configure_accelerator()
    variables, place = rank_environment(os.environ)
    os.environ.update(variables)
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    on_gpu = accelerator.device_name() == "cuda"
    if not on_gpu and int(os.environ.get("LOCAL_RANK", 0)) == 0:
        remove_stale_shm_segments()
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    global _had_process_group
    _had_process_group = True
    rank = torch.distributed.get_rank()
    world_size = torch.distributed.get_world_size()
    if place is not None and rank == 0:
        print(f"[pixelbert] {world_size} ranks started by {place.source}; rank 0 at "
              f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", file=sys.stderr, flush=True)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if on_gpu:
        device = torch.device("cuda", device_index(local_rank, torch.cuda.device_count()))
        torch.cuda.set_device(device)
        # cuda:0 for a task that sees only its own GPU (srun --gpus-per-task=1, mpirun binding
        # one GPU to each task); DistInfo keeps the rank's place on the node.
        os.environ.update(device_rank_variables(os.environ, device.index))
    else:
        device = torch.device("cpu")
        # Ranks on one machine share its cores; oversubscription slows every rank down.
        if "OMP_NUM_THREADS" not in os.environ:
            local_world = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world_size)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    return DistInfo(rank, world_size, local_rank, device)


def shutdown_distributed() -> None:
    """Take the process group down and remove this rank's DeepSpeed segment before the process
    exits (exit_process then skips interpreter finalisation, where gloo's threads still crashed
    it now and then). No barrier: on an error path the other ranks may never arrive."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    remove_shm_segment()


def log(dist: DistInfo, message: str) -> None:
    """A line from the main rank (through tqdm, so a progress bar stays intact)."""
    if dist.is_main:
        tqdm.write(f"[pixelbert] {message}")


_had_process_group = False  # set by init_distributed: exit_process leaves without finalisation


def exit_process(code: int) -> None:
    """End a `train.py` or `pixelbert.evaluate` process. After a process group, without
    interpreter finalisation: a gloo worker thread may still be releasing the last collective's
    work, whose tensors need the GIL that finalisation is tearing down, and the process dies in
    std::terminate (SIGABRT, exit code 250). Seen in about one two-rank evaluation in ten even
    after destroy_process_group; a core dump showed ProcessGroupGloo::AsyncWork::~AsyncWork ->
    decref -> take_gil -> pthread_exit during Py_FinalizeEx. Everything has been written by now.
    The atexit handlers (logging's flush, a user's hooks) still run first, as a normal exit runs
    them before finalisation."""
    if not _had_process_group:
        sys.exit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "deepspeed_allreduce_buffer_"


def shm_segment_path(rank: int | None = None) -> Path:
    """The shared-memory file DeepSpeed's CPU all-reduce creates for a rank (its shm.cpp names it
    after the user, MASTER_ADDR, MASTER_PORT and the rank); only launcher runs on one machine
    (LOCAL_SIZE == world size) create one."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    name = (f"{SHM_PREFIX}{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    return SHM_DIR / name


def remove_shm_segment() -> None:
    """DeepSpeed (0.19) never unlinks that file: each two-rank run left 2 x 67 MB of RAM behind
    in /dev/shm, and a few hundred runs starved the machine. Every rank mapped its peers'
    segments while the process group came up, so unlinking its own at exit takes nothing from a
    peer still running (the launcher kills the peers of a rank that fails)."""
    if "LOCAL_SIZE" in os.environ and "MASTER_PORT" in os.environ:
        shm_segment_path().unlink(missing_ok=True)


STALE_SEGMENT_AGE_S = 120  # a live run maps its segment within seconds of creating it


def remove_stale_shm_segments() -> list[str]:
    """Remove this user's DeepSpeed segments that no process has open or mapped and that are
    older than STALE_SEGMENT_AGE_S: those of runs killed before remove_shm_segment ran (a
    SIGKILL, an out-of-memory kill). Each holds 67 MB of RAM until the machine restarts, and a
    few hundred starved one. Segments of runs still going stay: their ranks map them."""
    owned = [path for path in SHM_DIR.glob(f"{SHM_PREFIX}*") if _owned_by_me(path)]
    if not owned:
        return []
    in_use = _shm_files_in_use()
    now = time.time()
    removed = []
    for path in owned:
        try:
            old = now - path.stat().st_mtime > STALE_SEGMENT_AGE_S
        except FileNotFoundError:
            continue
        if old and str(path) not in in_use:
            path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        print(f"removed {len(removed)} stale DeepSpeed shared-memory segment(s) from {SHM_DIR}, "
              f"left by runs that were killed: {', '.join(removed[:4])}{' ...' if len(removed) > 4 else ''}",
              file=sys.stderr, flush=True)
    return removed


def _owned_by_me(path: Path) -> bool:
    try:
        return path.stat().st_uid == os.getuid()
    except FileNotFoundError:
        return False


def _shm_files_in_use() -> set[str]:
    """Paths under SHM_DIR that any process this user can inspect has mapped or open."""
    in_use = set()
    prefix = str(SHM_DIR) + "/"
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                fields = line.split(maxsplit=5)  # address perms offset device inode [path]
                path = fields[5] if len(fields) == 6 else ""
                if path.startswith(prefix):
                    in_use.add(path.removesuffix(" (deleted)"))
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(prefix):
                    in_use.add(target)
        except OSError:  # gone, or another user's process
            continue
    return in_use


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics). Each rank updates its
    own from its own batches and DeepSpeed never re-syncs them, but a checkpoint keeps rank 0's
    only: syncing at each save and before each validation makes every rank hold what the
    checkpoint holds, so validation on any rank and a resumed run see the same model."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        for buffer in module.buffers():
            torch.distributed.broadcast(buffer, src=0)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def broadcast_object(value):
    """Rank 0's `value` (picklable) on every rank; `value` itself without a process group."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def on_main(dist: DistInfo, compute: Callable[[], T]) -> Optional[T]:
    """`compute()` on the main rank; its result on every rank, or its error raised on every
    rank (none is left waiting for a result that will not come). Without a process group, a
    rank other than the main one gets None."""
    outcome = None
    if dist.is_main:
        try:
            outcome = (compute(), None)
        except Exception as error:  # noqa: BLE001 - raised on every rank below
            outcome = (None, error)
    outcome = broadcast_object(outcome)
    if outcome is None:
        return None
    result, error = outcome
    if error is not None:
        raise error
    return result


def gather_objects(part) -> list:
    """Every rank's `part` (picklable), in rank order; [part] without a process group."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return [part]
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, part)
    return parts


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(values)
    return values
