"""benchmarks/gpu_session.py: a lease's plan keeps going past a failed or slow stage, stays in
its budget, and returns everything in one archive."""
import sys
import tarfile
import time

import pytest

from benchmarks import gpu_session
from benchmarks.gpu_session import Stage

PY = sys.executable


@pytest.fixture
def stages(monkeypatch, tmp_path):
    marker = tmp_path / "grandchild-still-running"
    # The slow stage's command starts a grandchild that would write a file after 3 s: a
    # timeout must kill the whole process group, not just the command.
    slow = (f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            f"\"import time; time.sleep(3); open(r'{marker}', 'w').write('x')\"]); time.sleep(60)")
    fake = {
        "fails": Stage("fails", 60, [], [[PY, "-c", "import sys; print('broken'); sys.exit(3)"]], "exits 3"),
        "slow": Stage("slow", 2, [], [[PY, "-c", slow]], "outlives its cap"),
        "writes": Stage("writes", 60, [], [[PY, "-c", "open(r'{logs}/table.csv', 'w').write('a,b\\n1,2\\n'); "
                                                "print('table printed')"]], "writes a result"),
    }
    monkeypatch.setattr(gpu_session, "STAGES", fake)
    monkeypatch.setattr(gpu_session, "GROUPS", {"both": ["fails", "writes"]})
    monkeypatch.setattr(gpu_session, "cuda_available", lambda: False)
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    return marker


def test_stages_run_past_failures_and_timeouts_into_one_archive(stages, tmp_path, capsys):
    started = time.monotonic()
    assert gpu_session.main(["--budget", "120", "slow", "both"]) == 1
    assert time.monotonic() - started < 30
    printed = capsys.readouterr().out
    summary = printed[printed.rindex("\nstage ") + 1:].splitlines()
    assert [line.split()[:2] for line in summary[1:]] == [["slow", "timeout"], ["fails", "exit"], ["writes", "ok"]]
    assert "table printed" in printed and "broken" in printed
    time.sleep(4)
    assert not stages.exists(), "the timed-out stage's grandchild outlived it"
    with tarfile.open(tmp_path / "out" / "gpu_session.tar.gz") as tar:
        names = set(tar.getnames())
        assert {"gpu_session/slow.log", "gpu_session/fails.log", "gpu_session/writes.log",
                "gpu_session/table.csv"} <= names
        assert tar.extractfile("gpu_session/table.csv").read() == b"a,b\n1,2\n"


def test_budget_is_shared_by_the_stages(stages, capsys):
    assert gpu_session.main(["--budget", "0.5", "writes"]) == 1
    assert "writes      no time" in capsys.readouterr().out


def test_unknown_stage_is_a_clear_error(stages, capsys):
    with pytest.raises(SystemExit):
        gpu_session.main(["bogus"])
    assert "unknown stage or group 'bogus'" in capsys.readouterr().err


def test_build_plan_skips_reuses_a_matching_prebuilt_extension_or_compiles(monkeypatch, tmp_path):
    build = gpu_session.STAGES["build"]
    installed = {"value": False}
    monkeypatch.setattr(gpu_session, "passes", lambda check: installed["value"] or check == gpu_session.CUDA_EXT_CHECK)
    monkeypatch.setattr(gpu_session, "PREBUILT_INFO", tmp_path / "_C.prebuilt.json")
    assert gpu_session.build_plan(build) == ("ok", build.gpu)  # no prebuilt extension: compile

    import torch
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    (tmp_path / "_C.prebuilt.json").write_text(f'{{"python": "{python}", "torch": "0.0.1", "arch": "9.0"}}')
    assert gpu_session.build_plan(build) == ("ok", build.gpu)  # built for another torch: compile

    (tmp_path / "_C.prebuilt.json").write_text(f'{{"python": "{python}", "torch": "{torch.__version__}", "arch": "9.0"}}')
    status, commands = gpu_session.build_plan(build)
    assert status == "ok (prebuilt extension)"
    assert commands[0][:2] == ["env", "PIXELBERT_PREBUILT_EXT=1"] and commands[0][2:] == gpu_session.PIP_INSTALL
    assert commands[1] == [PY, "-c", gpu_session.INSTALLED_CHECK]

    installed["value"] = True  # a warm machine's second call
    assert gpu_session.build_plan(build) == ("ok (already built)", [])
