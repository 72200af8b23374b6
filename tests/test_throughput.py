"""What a rank holds under ZeRO-3, and the end-to-end benchmark's CPU run.

Performance is measured in benchmarks/throughput.py, never asserted here: these tests check that
the measurements exist and add up, not how fast anything is.
"""
import csv
import json
import sys

import pytest

from tests.launch import ROOT, clean_env, run_python
from tests.test_training import SMALL, launch

sys.path.insert(0, str(ROOT / "benchmarks"))
from throughput import ALL_MODES, largest_fitting  # noqa: E402


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


def state_bytes(run_dir, ranks: int) -> list[dict]:
    return [json.loads((run_dir / f"state_bytes_rank{r}.json").read_text()) for r in range(ranks)]


@pytest.mark.slow
def test_zero3_two_ranks_hold_half_the_state_of_one(tmp_path, synthetic_dir):
    """Parameters (ZeRO-3 shards) plus optimiser state (fp32 master partition, SGD momentum and
    AdamW moments) per rank, from the JSON files train.py writes at the end.

    Two ranks hold each half, plus DeepSpeed's padding of every parameter to a multiple of the
    world size: at most one element per parameter tensor and copy, a few hundred bytes of the
    ~9 MB here (observed: exactly 0.5000, every tensor of this model has an even size). The
    bound of 0.505 leaves room for a model with odd sizes without admitting a replicated
    tensor (one replicated 64-wide LayerNorm already moves the ratio by ~0.001, a replicated
    weight matrix by far more)."""
    common = SMALL + ["train.max_steps=3", "data.num_workers=0", "deepspeed.train_micro_batch_size_per_gpu=4",
                      "deepspeed.zero_optimization.stage=3"]
    for name, ranks in (("one", 1), ("two", 2)):
        result = launch(tmp_path / name, synthetic_dir, common, ranks=ranks)
        assert result.returncode == 0, f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    (one,) = state_bytes(tmp_path / "one", 1)
    two = state_bytes(tmp_path / "two", 2)
    print("one rank:", one, "\ntwo ranks:", two)
    assert one["stage"] == 3 and one["world_size"] == 1
    assert [s["rank"] for s in two] == [0, 1] and all(s["world_size"] == 2 for s in two)
    # Everything was counted: fp32 weights and master copy (4 bytes each), and state.
    assert one["param_bytes"] > 0 and one["master_bytes"] == one["param_bytes"]
    assert one["optimizer_state_bytes"] > one["param_bytes"]  # momentum + two AdamW moments
    total_one = one["param_bytes"] + one["optimizer_bytes"]
    for rank in two:
        for key in ("param_bytes", "optimizer_bytes"):
            assert 0.5 <= rank[key] / one[key] <= 0.505, (key, rank, one)
        assert 0.5 <= (rank["param_bytes"] + rank["optimizer_bytes"]) / total_one <= 0.505


@pytest.mark.slow
def test_quick_benchmark_writes_every_mode(tmp_path):
    out, table = tmp_path / "throughput.json", tmp_path / "throughput.csv"
    result = run_python(["benchmarks/throughput.py", "--quick", "--steps", "2", "--warmup", "1", "--images", "24",
                         "--out", str(out), "--csv", str(table), "--profile", "1"], clean_env(OMP_NUM_THREADS="1"), 600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    print(result.stdout[-4000:])
    report = json.loads(out.read_text())
    modes = {r["mode"]: r for r in report["modes"]}
    assert list(modes) == list(ALL_MODES)
    failed = {name: r["error"] for name, r in modes.items() if "error" in r}
    assert not failed, f"modes failed: {failed}"
    for r in modes.values():
        assert r["steps"] == 2 and r["batch_pairs"] == 10 and len(r["losses"]) == 3
        assert r["samples_per_s"] > 0 and r["flops_per_step"] > 0 and r["peak_mem_mb"] > 0
        assert r["images_per_step"] == (2 if r["mode"] == "engine-grouped" else 10)
        parts = r["backbone_fwd_ms"] + r["encoder_heads_ms"] + r["backward_ms"] + r["optimizer_ms"] + r["other_ms"]
        assert parts == pytest.approx(r["step_ms"], rel=0.25)  # medians of parts, not of their sum
    assert modes["baseline"]["vs_baseline"] == 1.0 and "engine/baseline" in report["ratios"]
    rows = list(csv.DictReader(table.open()))
    assert [row["mode"] for row in rows] == list(ALL_MODES)
    assert all(row["device"] and row["commit"] and float(row["samples_per_s"]) > 0 for row in rows)
    assert out.with_suffix(".png").stat().st_size > 0
    # --profile: one more, untimed step of the engine mode only, as a trace and a table
    assert sorted(p.name for p in tmp_path.glob("*profile*")) == ["throughput-profile-engine.json.gz",
                                                                 "throughput-profile-engine.txt"]


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_latency_measures_a_request_decoded_as_predict_does(tmp_path, decoder):
    """--latency builds its request as `pixelbert.predict` does, with data.decoder's choice."""
    if decoder == "dali":
        pytest.importorskip("nvidia.dali")
    out = tmp_path / "latency.json"
    result = run_python(["benchmarks/throughput.py", "--quick", "--latency", "--images", "8", "--out", str(out),
                         "--csv", str(tmp_path / "latency.csv"), f"data.decoder={decoder}"],
                        clean_env(OMP_NUM_THREADS="1"), 300)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    latency = json.loads(out.read_text())["latency"]
    assert latency["decoder"] == ("DALI (cpu)" if decoder == "dali" else "PIL (loader workers)")
    assert latency["repeats"] == 20 and 0 < latency["model_ms_median"] <= latency["model_ms_p90"]
    assert 0 < latency["end_to_end_ms_median"] <= latency["end_to_end_ms_p90"]


def test_max_batch_search_finds_the_boundary():
    for limit, start, granularity in [(100, 64, 1), (37, 64, 1), (64, 64, 1), (3, 64, 1), (0, 8, 1), (97, 60, 5)]:
        calls = []

        def fits(batch):
            calls.append(batch)
            return batch <= limit

        best, first_oom = largest_fitting(fits, start, granularity)
        assert best <= limit and best % granularity == 0 and first_oom > limit
        assert first_oom - best <= max(granularity, best // 16), (limit, best, first_oom)
        assert len(calls) == len(set(calls)) or granularity > 1
