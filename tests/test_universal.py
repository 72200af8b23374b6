"""engine/universal.py on hand-made ZeRO-1/2 and ZeRO-3 files: each parameter's states come back
whole from the ranks' flat partitions, whatever rank a parameter starts or ends on (the runs
that resume on another rank count are in test_training.py)."""
from __future__ import annotations

import math
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


def write_zero3_shards(tag_dir, sub_groups: list[dict[str, torch.Tensor]], frozen: dict[str, torch.Tensor],
                       ranks: int):
    """The files a ZeRO-3 run of `ranks` ranks writes: each parameter padded to a multiple of
    the ranks and cut evenly, each rank's slices of a sub-group's parameters concatenated; the
    first sub-group AdamW's (moments: the weights times 2 and 3, step 7), the others SGD's
    (momentum: times 2); the frozen parameters cut alike into each rank's model file."""
    def cut(tensor, rank):
        part = math.ceil(tensor.numel() / ranks)
        padded = torch.cat([tensor.flatten(), torch.zeros(part * ranks - tensor.numel())])
        return padded[rank * part:(rank + 1) * part]

    groups = [{"lr": 0.1 * (index + 1), "algorithm": "adamw" if index == 0 else "sgd", "params": [index]}
              for index in range(len(sub_groups))]
    for rank in range(ranks):
        flats = [torch.cat([cut(p, rank) for p in params.values()]) for params in sub_groups]
        state = {index: ({"step": torch.tensor(7.0), "exp_avg": flat * 2, "exp_avg_sq": flat * 3} if index == 0
                         else {"momentum_buffer": flat * 2}) for index, flat in enumerate(flats)}
        shard = {"loss_scaler": None, "overflow": False, "partition_count": ranks,
                 "optimizer_state_dict": {"state": state, "param_groups": groups}, "fp32_flat_groups": flats}
        torch.save({"optimizer_state_dict": shard}, tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        torch.save({"param_shapes": [{name: p.shape for name, p in params.items()} for params in sub_groups],
                    "frozen_param_shapes": {name: p.shape for name, p in frozen.items()},
                    "frozen_param_fragments": {name: cut(p, rank) for name, p in frozen.items()}},
                   tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt")


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_zero3_states_come_back_whole(tmp_path, ranks):
    adamw = {"a.weight": torch.randn(3, 5), "b.bias": torch.randn(7)}
    sgd = {"c.weight": torch.randn(2, 2, 2), "d.weight": torch.randn(1)}
    frozen = {"stem.weight": torch.randn(4, 5)}
    write_zero3_shards(tmp_path, [adamw, sgd], frozen, ranks)
    folder = universal.convert(tmp_path)
    for name, p in adamw.items():
        assert sorted(os.listdir(folder / name)) == ["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt", "step.pt"]
        assert torch.equal(load(folder, name, "fp32"), p)
        assert torch.equal(load(folder, name, "exp_avg"), p * 2)
        assert torch.equal(load(folder, name, "exp_avg_sq"), p * 3)
        assert torch.equal(load(folder, name, "step"), torch.tensor(7.0))
    for name, p in sgd.items():
        assert sorted(os.listdir(folder / name)) == ["fp32.pt", "momentum_buffer.pt"]
        assert torch.equal(load(folder, name, "fp32"), p)
        assert torch.equal(load(folder, name, "momentum_buffer"), p * 2)
    assert sorted(os.listdir(folder / "stem.weight")) == ["fp32.pt"]
    assert torch.equal(load(folder, "stem.weight", "fp32"), frozen["stem.weight"])
    settings = torch.load(folder / "optimizer_state.pt", weights_only=False)
    assert [group["algorithm"] for group in settings["param_groups"]] == ["adamw", "sgd"]
    assert settings["partition_count"] == ranks and not set(settings) & set(universal.SLICED_ZERO3)


def test_zero3_files_that_do_not_add_up_are_refused(tmp_path):
    write_zero3_shards(tmp_path, [{"w": torch.randn(10)}], {}, ranks=2)
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    model = torch.load(path, weights_only=False)
    model["param_shapes"] = [{"w": torch.Size([8])}]  # two elements short of the saved partitions
    torch.save(model, path)
    with pytest.raises(ValueError, match="take 4 elements a rank, the saved partition 5"):
        universal.convert(tmp_path)
    assert not (tmp_path / "zero").exists() and not list(tmp_path.glob(".zero-*"))


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


def test_a_deepspeed_without_the_zero3_internals_read_is_named(tmp_path):
    from types import SimpleNamespace
    engine = SimpleNamespace(optimizer=SimpleNamespace(optimizer=None, param_names={}))
    with pytest.raises(RuntimeError, match=r"no \['fp16_groups', 'fp32_partitioned_groups_flat', "
                                           r"'load_hp_checkpoint_state'\].*resume on the rank count that saved it"):
        universal.load_zero3_rest(engine, tmp_path)
