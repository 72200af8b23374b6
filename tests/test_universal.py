"""engine/universal.py on hand-made ZeRO-1/2 files: each parameter's states come back whole from
the ranks' flat partitions, whatever rank a parameter starts or ends on (the runs that resume
on another rank count are in test_training.py)."""
from __future__ import annotations

import os
from collections import namedtuple

import pytest
import torch

from pixelbert.engine import universal

Fragment = namedtuple("Fragment", "numel start")  # DeepSpeed's tensor_fragment.fragment_address


def write_shards(tag_dir, params: dict[str, torch.Tensor], ranks: int, padding: int = 3, sgd: bool = False):
    """The files a ZeRO-2 run of `ranks` ranks writes for one group holding `params` (flattened
    in order, cut into equal partitions, the last padded), with AdamW's moments and step, or
    SGD's momentum, equal to the weights times 2 and 3 so each can be told apart."""
    flat = torch.cat([p.flatten() for p in params.values()])
    flat = torch.cat([flat, torch.zeros(padding)])
    size = len(flat) // ranks
    assert size * ranks == len(flat)
    offsets, start = {}, 0
    for name, p in params.items():
        offsets[name] = (start, start + p.numel())
        start += p.numel()
    for rank in range(ranks):
        lo, hi = rank * size, (rank + 1) * size
        mapping = {name: Fragment(min(e, hi) - max(s, lo), max(s, lo) - lo)
                   for name, (s, e) in offsets.items() if s < hi and e > lo}
        part = flat[lo:hi]
        unpadded = part[:size - padding] if rank == ranks - 1 else part
        state = {"momentum_buffer": part * 2} if sgd else {"step": torch.tensor(7.0), "exp_avg": part * 2,
                                                           "exp_avg_sq": part * 3}
        shard = {"loss_scaler": None, "clip_grad": 1.0, "ds_version": "0.19.8",
                 "base_optimizer_state": {"state": {0: state}, "param_groups": [{"lr": 0.1, "algorithm": "x"}]},
                 "single_partition_of_fp32_groups": [unpadded.clone()], "param_slice_mappings": [mapping]}
        torch.save({"optimizer_state_dict": shard}, tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    torch.save({"param_shapes": [{name: p.shape for name, p in params.items()}]}, tag_dir / "mp_rank_00_model_states.pt")


def load(folder, name, key):
    value = torch.load(folder / name / f"{key}.pt", weights_only=False)
    return value if key == "step" else value["param"]


@pytest.mark.parametrize("ranks, sgd", [(1, False), (2, False), (4, True)])
def test_each_state_comes_back_whole(tmp_path, ranks, sgd):
    params = {"a.weight": torch.randn(3, 5), "b.bias": torch.randn(7), "c.weight": torch.randn(2, 2, 2)}
    write_shards(tmp_path, params, ranks, padding=(-sum(p.numel() for p in params.values())) % ranks + ranks,
                 sgd=sgd)
    folder = universal.convert(tmp_path)
    assert folder == tmp_path / "zero"
    for name, p in params.items():
        assert torch.equal(load(folder, name, "fp32"), p)
        if sgd:
            assert torch.equal(load(folder, name, "momentum_buffer"), p * 2)
            assert sorted(os.listdir(folder / name)) == ["fp32.pt", "momentum_buffer.pt"]
        else:
            assert torch.equal(load(folder, name, "exp_avg"), p * 2)
            assert torch.equal(load(folder, name, "exp_avg_sq"), p * 3)
            assert torch.equal(load(folder, name, "step"), torch.tensor(7.0))
    settings = torch.load(folder / "optimizer_state.pt", weights_only=False)
    assert settings["param_groups"] == [{"lr": 0.1, "algorithm": "x"}] and settings["clip_grad"] == 1.0
    assert not set(settings) & set(universal.SLICED)


def test_a_converted_folder_is_kept_and_a_dead_conversions_left_overs_go(tmp_path):
    write_shards(tmp_path, {"w": torch.randn(10)}, ranks=2, padding=2)
    dead = tmp_path / ".zero-999999999"  # no such process
    dead.mkdir()
    folder = universal.convert(tmp_path)
    assert not dead.exists()
    stamp = (folder / "optimizer_state.pt").stat().st_mtime_ns
    assert universal.convert(tmp_path) == folder and (folder / "optimizer_state.pt").stat().st_mtime_ns == stamp


def test_missing_rank_files_and_unknown_states_are_refused(tmp_path):
    write_shards(tmp_path, {"w": torch.randn(10)}, ranks=2, padding=2)
    (tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt").unlink()
    with pytest.raises(ValueError, match=r"ranks \[1\] are not one per rank"):
        universal.convert(tmp_path)
    odd = tmp_path / "odd"
    odd.mkdir()
    write_shards(odd, {"w": torch.randn(10)}, ranks=1, padding=2)
    path = odd / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard = torch.load(path, weights_only=False)
    shard["optimizer_state_dict"]["base_optimizer_state"]["state"][0]["max_exp_avg_sq"] = torch.zeros(3)
    torch.save(shard, path)
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        universal.convert(odd)
    assert not (odd / "zero").exists() and not list(odd.glob(".zero-*"))
