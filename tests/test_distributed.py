"""Process-group housekeeping that needs no process group: DeepSpeed's shared-memory segments."""
import os
import subprocess
import sys
import time

from pixelbert.engine import distributed


def make_segment(directory, name, age_s):
    path = directory / f"{distributed.SHM_PREFIX}{os.getuid()}_127.0.0.1_{name}"
    path.write_bytes(os.urandom(4096))
    stamp = time.time() - age_s
    os.utime(path, (stamp, stamp))
    return path


def test_stale_segments_go_and_segments_in_use_or_new_stay(tmp_path, monkeypatch):
    """The sweep at start-up removes what killed runs left (old, mapped and opened by nobody),
    never a live run's segment (mapped, or only open) nor one just created."""
    monkeypatch.setattr(distributed, "SHM_DIR", tmp_path)
    stale = [make_segment(tmp_path, f"2950{i}_{i}", age_s=3600) for i in range(2)]
    mapped = make_segment(tmp_path, "29510_0", age_s=3600)
    opened = make_segment(tmp_path, "29511_0", age_s=3600)
    fresh = make_segment(tmp_path, "29512_0", age_s=1)
    other = tmp_path / "unrelated_file"
    other.write_bytes(b"x")
    os.utime(other, (0, 0))

    # A live run: one process maps its segment and closes the file, another holds one open.
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import mmap, sys, time\n"
         "with open(sys.argv[1], 'r+b') as f: m = mmap.mmap(f.fileno(), 0)\n"
         "g = open(sys.argv[2], 'rb')\n"
         "print('ready', flush=True); time.sleep(60)",
         str(mapped), str(opened)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        in_use = distributed._shm_files_in_use()
        assert {str(mapped), str(opened)} <= in_use and not {str(p) for p in stale} & in_use
        removed = distributed.remove_stale_shm_segments()
    finally:
        holder.kill()
        holder.wait()
    assert sorted(removed) == sorted(p.name for p in stale)
    assert not any(p.exists() for p in stale)
    assert mapped.exists() and opened.exists() and fresh.exists() and other.exists()
    # Once their run is gone they are stale too; the fresh one stays until it is old.
    assert sorted(distributed.remove_stale_shm_segments()) == sorted([mapped.name, opened.name])
    assert fresh.exists()


def test_sweep_is_quiet_without_segments(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(distributed, "SHM_DIR", tmp_path / "missing")
    assert distributed.remove_stale_shm_segments() == []
    assert capsys.readouterr().err == ""


def test_exit_after_a_process_group_runs_atexit_handlers_and_keeps_the_code(tmp_path):
    """exit_process skips interpreter finalisation after a process group (os._exit), but not
    what a normal exit runs before it: the atexit handlers, and the buffered output."""
    marker = tmp_path / "ran"
    script = ("import atexit, sys\n"
              "from pixelbert.engine import distributed\n"
              "distributed._had_process_group = True\n"
              f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
              "sys.stdout.write('buffered')\n"
              "distributed.exit_process(3)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 3 and done.stdout == "buffered", done.stderr
    assert marker.read_text() == "ran"


def test_on_main_runs_on_the_main_rank_and_raises_its_error():
    """Without a process group: the main rank computes (its error is raised); another rank does
    not compute. (Two ranks: test_record_cache's broken source reaches both.)"""
    import pytest
    import torch
    main, other = (distributed.DistInfo(r, 2, r, torch.device("cpu")) for r in (0, 1))
    calls = []
    assert distributed.on_main(main, lambda: calls.append("main") or 7) == 7
    assert distributed.on_main(other, lambda: calls.append("other") or 7) is None
    assert calls == ["main"]
    with pytest.raises(ValueError, match="bad source"):
        distributed.on_main(main, lambda: (_ for _ in ()).throw(ValueError("bad source")))
