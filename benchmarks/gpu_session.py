"""A GPU lease's work, planned to fit the device time a task is lent (15 minutes, start included).

    python benchmarks/gpu_session.py --budget 540 core     # call 1 (README, "A GPU session")
    python benchmarks/gpu_session.py --budget 150 rest     # call 2, at once, if time is left
    python benchmarks/gpu_session.py --budget 240 dali     # a call after the DALI wheels are stashed
    python benchmarks/gpu_session.py --budget 900 all      # here, on the CPU: try the plan first

Runs the named stages (or groups of them) in order. Each runs under a time limit cut to what
the budget has left, and a stage that fails or times out does not stop the ones after it: what
a lease measured is never lost to a later stage's trouble. Every stage's log, the benchmark
CSVs and their JSON/PNG go into one archive, `$OUT/gpu_session.tar.gz` when the device tool's
$OUT is set (else runs/gpu_session/), and a summary table is printed last.

Without a GPU each stage runs its CPU form (the benchmarks' --quick sizes), so the whole plan
is tried on the CPU before a lease spends device time on it.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PIP_INSTALL = [PY, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."]
CUDA_EXT_CHECK = "import torch; from pixelbert import _C; assert _C.with_cuda, 'pixelbert._C was built without CUDA'"
# kernels/ imports as pixelbert.kernels only once the package is installed.
INSTALLED_CHECK = CUDA_EXT_CHECK + "; import pixelbert.kernels"
PREBUILT_INFO = ROOT / "pixelbert" / "_C.prebuilt.json"  # written by benchmarks/prebuild_gpu_ext.sh
# X152 modes for the targets: the headline ratios, five captions per image, fp32.
HEADLINE_MODES = "engine,engine-grouped,baseline,baseline-tuned,baseline-fp32"
ABLATION_MODES = "engine,engine-no-kernels,engine-no-packing,engine-no-decoder,engine-no-fused-optim"


@dataclasses.dataclass
class Stage:
    name: str
    cap_s: int  # at most this long, even with budget to spare
    gpu: list[list[str]]  # commands on a GPU machine
    cpu: list[list[str]]  # their CPU form
    why: str


def throughput(config: str, *extra: str) -> list[str]:
    out = f"{{logs}}/throughput-{Path(config).stem}-{{stage}}.json"  # its PNG lands beside it
    return [PY, "benchmarks/throughput.py", "--config", config, "--csv", "{logs}/throughput.csv", "--out", out, *extra]


def bench(script: str, *extra: str) -> list[str]:
    return [PY, f"benchmarks/{script}.py", "--csv", f"{{logs}}/{script}.csv", *extra]


STAGES = {s.name: s for s in [
    Stage("build", 300, [PIP_INSTALL, [PY, "-c", INSTALLED_CHECK]],
          [[PY, "-c", "import torch; from pixelbert import _C"]],
          "the package and its C++/CUDA extension (see build_plan)"),
    Stage("tests", 420, [[PY, "-m", "pytest", "-q", "-ra", "-m", "gpu", "-p", "no:cacheprovider",
                          "--timeout", "300", "tests/"]],
          [[PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests/"]],
          "every gpu-marked test (DALI's skip unless its wheels are installed)"),
    Stage("kernels", 240, [bench("kernels")], [bench("kernels", "--repeats", "20")],
          "issue 3 targets: pool_sample and embed_layernorm, every backend and torch.compile"),
    Stage("attention", 240, [bench("attention")], [bench("attention", "--quick")],
          "issue 5 targets: packed vs padded encoder, every attention backend"),
    Stage("throughput", 420, [throughput("configs/x152.json", "--steps", "10", "--warmup", "3",
                                         "--modes", HEADLINE_MODES, "--profile", "3")],
          [throughput("configs/tiny.json", "--quick", "--modes", HEADLINE_MODES, "--profile", "1")],
          "issue 7 targets: X152 engine against the baselines, one run (and a profile of the engine's step)"),
    Stage("ablations", 300, [throughput("configs/x152.json", "--steps", "10", "--warmup", "3",
                                        "--modes", ABLATION_MODES)],
          [throughput("configs/tiny.json", "--quick", "--modes", ABLATION_MODES)],
          "issue 7: what each fast path is worth"),
    Stage("latency", 180, [throughput("configs/r50.json", "--latency"), throughput("configs/x152.json", "--latency")],
          [throughput("configs/tiny.json", "--quick", "--latency")],
          "issue 7: single-request VQA latency, R50 and X152"),
    Stage("maxbatch", 420, [throughput("configs/x152.json", "--max-batch")],
          [throughput("configs/tiny.json", "--quick", "--max-batch")],
          "issue 7: largest micro-batch, with and without activation checkpointing"),
    Stage("r50", 300, [throughput("configs/r50.json", "--steps", "10", "--warmup", "3", "--modes", HEADLINE_MODES)],
          [throughput("configs/tiny.json", "--quick", "--modes", "engine,baseline")],
          "issue 7: the R50 reference point"),
    Stage("dali", 420, [[PY, "-m", "pytest", "-q", "-ra", "-m", "gpu", "-k", "dali", "-p", "no:cacheprovider",
                         "--timeout", "300", "tests/"],
                        bench("dataloader")],
          [bench("dataloader", "--quick")],
          "issue 4: DALI mixed decoding tests and the data-loading targets (needs the DALI wheels)"),
]}
GROUPS = {
    "core": ["build", "tests", "kernels", "attention", "throughput"],
    "rest": ["ablations", "latency", "maxbatch", "r50"],
    "dali": ["build", "dali"],
}
GROUPS["all"] = list(dict.fromkeys(GROUPS["core"] + GROUPS["rest"] + GROUPS["dali"]))


def cuda_available() -> bool:
    probe = subprocess.run([PY, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, cwd=ROOT)
    return probe.stdout.strip() == "True"


def passes(check: str) -> bool:
    return subprocess.run([PY, "-c", check], capture_output=True, cwd=ROOT).returncode == 0


def prebuilt_matches() -> bool:
    """A pixelbert._C built elsewhere (benchmarks/prebuild_gpu_ext.sh) for this Python and torch."""
    if not PREBUILT_INFO.exists():
        return False
    built_for = json.loads(PREBUILT_INFO.read_text())
    here = subprocess.run([PY, "-c", "import sys, torch; print(f'{sys.version_info.major}.{sys.version_info.minor}', "
                                      "torch.__version__)"], capture_output=True, text=True, cwd=ROOT).stdout.split()
    return here == [built_for["python"], built_for["torch"]] and passes(CUDA_EXT_CHECK)


def build_plan(stage: Stage) -> tuple[str, list[list[str]]]:
    """The build stage on a GPU machine: (status when its commands succeed, the commands).
    Nothing to do when the package is installed with its CUDA extension (a later call on a
    warm machine); an install without compiling when a prebuilt extension for this Python and
    torch loads (the device time of a compile saved); else the full build."""
    if passes(INSTALLED_CHECK):
        return "ok (already built)", []
    if prebuilt_matches():
        return "ok (prebuilt extension)", [["env", "PIXELBERT_PREBUILT_EXT=1", *PIP_INSTALL],
                                           [PY, "-c", INSTALLED_CHECK]]
    return "ok", stage.gpu


def run_command(command: list[str], log, limit_s: float) -> str:
    """Run one command with its output in the log; 'ok', 'exit N' or 'timeout'. A timeout kills
    the command's whole process group (benchmark loader workers too)."""
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    child = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = child.wait(timeout=max(limit_s, 1))
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        return "timeout"
    return "ok" if code == 0 else f"exit {code}"


def run_stage(stage: Stage, gpu: bool, logs: Path, deadline: float) -> dict:
    """Run a stage's commands in order until one fails; its status, seconds and log."""
    started = time.monotonic()
    log_path = logs / f"{stage.name}.log"
    done, commands = ("ok", stage.gpu if gpu else stage.cpu)
    if stage.name == "build" and gpu:
        done, commands = build_plan(stage)
    status = done
    with open(log_path, "w") as log:
        for command in commands:
            limit = min(stage.cap_s - (time.monotonic() - started), deadline - time.monotonic())
            if limit < 1:
                status = "no time"
                break
            command = [part.format(logs=logs, stage=stage.name) for part in command]
            status = run_command(command, log, limit)
            if status != "ok":
                break
            status = done
    return {"stage": stage.name, "status": status, "seconds": time.monotonic() - started, "log": log_path}


def archive(logs: Path, destination: Path) -> Path:
    """One tar.gz of the logs and of what the benchmarks wrote beside them (their CSV rows, JSON
    and PNG: the device tool returns at most 8 files). Append the CSV rows to benchmarks/*.csv."""
    path = destination / "gpu_session.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(logs, arcname="gpu_session")
    return path


def tail(path: Path, lines: int) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", nargs="*", default=["core"],
                        help=f"stages ({', '.join(STAGES)}) or groups ({', '.join(GROUPS)}); default core")
    parser.add_argument("--budget", type=float, default=540, help="seconds for all the stages together")
    parser.add_argument("--tail", type=int, default=25, help="log lines shown per benchmark stage")
    args = parser.parse_args(argv)
    names = []
    for word in args.what:
        if word not in STAGES and word not in GROUPS:
            parser.error(f"unknown stage or group {word!r}: stages {list(STAGES)}, groups {list(GROUPS)}")
        names += GROUPS.get(word, [word])
    names = list(dict.fromkeys(names))

    deadline = time.monotonic() + args.budget
    gpu = cuda_available()
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "runs" / "gpu_session"
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    print(f"{'GPU' if gpu else 'CPU (each stage in its CPU form)'}: {', '.join(names)} in {args.budget:.0f} s",
          flush=True)
    if gpu:
        subprocess.run(["nvidia-smi", "--query-gpu=name,clocks.sm,clocks.max.sm", "--format=csv"])  # read only
    results = []
    for name in names:
        result = run_stage(STAGES[name], gpu, logs, deadline)
        results.append(result)
        print(f"[{name}] {result['status']} in {result['seconds']:.0f} s", flush=True)

    saved = archive(logs, out)
    for result in results:  # the tables the benchmarks printed last, for RESULTS.md
        if result["stage"] not in ("build",) and result["log"].stat().st_size:
            print(f"\n===== {result['stage']}: {STAGES[result['stage']].why}\n{tail(result['log'], args.tail)}")
    print(f"\narchive: {saved}")
    print(f"{'stage':11} {'status':20} {'s':>5}")
    for result in results:
        print(f"{result['stage']:11} {result['status']:20} {result['seconds']:5.0f}")
    return 0 if all(r["status"].startswith("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
