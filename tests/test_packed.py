"""PackedList: records in one byte buffer, read like a list; forked DataLoader workers read it
without copying it (Python objects get copied page by page as workers touch their refcounts)."""
import pytest
from torch.utils.data import DataLoader, Dataset

from pixelbert.data.dataset import ImageGroup
from pixelbert.data.formats import Record
from pixelbert.data.packed import PackedList


def test_reads_like_the_list_it_packs():
    items = [Record(image=f"{i}.jpg", image_id=i, text="a caption " * (i % 7), answers=["yes"] * (i % 3) or None)
             for i in range(101)] + [ImageGroup("x.jpg", ["one", "two"], 1, (3, 4))]
    packed = PackedList(items)
    assert len(packed) == len(items) and list(packed) == items
    assert packed[-1] == items[-1] and packed[-102] == items[0] and packed[3:9:2] == items[3:9:2]
    with pytest.raises(IndexError, match="index 102 out of range for 102 items"):
        packed[102]
    copy = packed[5]
    copy.text = "changed"
    assert packed[5].text == items[5].text  # each access is a fresh copy: the buffer never changes
    assert len(PackedList([])) == 0


class Reader(Dataset):
    """Item k: the worker's private memory before and after reading the k-th tenth of the records."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return 10

    def __getitem__(self, chunk):
        import psutil
        before = psutil.Process().memory_full_info().uss
        step = -(-len(self.records) // len(self))
        sum(len(self.records[i].text) for i in range(chunk * step, min(len(self.records), (chunk + 1) * step)))
        return before, psutil.Process().memory_full_info().uss


def worker_growth_mb(records) -> float:
    """How much a forked worker's private memory grows while it reads every record once."""
    loader = DataLoader(Reader(records), batch_size=None, num_workers=1, multiprocessing_context="fork")
    uss = [u for pair in loader for u in pair]
    return (uss[-1] - uss[0]) / 2**20


def test_forked_workers_share_the_buffer_instead_of_copying_objects():
    records = [Record(image=f"/data/images/{i}.jpg", image_id=i, text=f"caption number {i} of many") for i in range(200_000)]
    as_objects = worker_growth_mb(records)
    packed = worker_growth_mb(PackedList(records))
    assert as_objects > 20  # the objects' pages, copied as the worker touched them
    assert packed < as_objects / 4


def test_the_pretraining_run_keeps_its_groups_only_packed(tmp_path):
    """Once the pre-training data is built, the main process holds no ImageGroup objects (the
    sampler keeps arrays of each image's source and aspect ratio, the dataset the packed
    buffer), and the loader still works from those."""
    import gc

    import torch

    from pixelbert.config import load_config
    from pixelbert.engine.data import build_training_data
    from pixelbert.engine.distributed import DistInfo

    def live_groups() -> int:
        gc.collect()
        return sum(type(o) is ImageGroup for o in gc.get_objects())

    before = live_groups()
    cfg = load_config("configs/tiny.json", [f"train.output_dir={tmp_path / 'run'}",
                                            f"data.synthetic_dir={tmp_path / 'synthetic'}",
                                            "data.synthetic_images=40", "model.backbone_weights=null",
                                            "data.num_workers=0", "data.aspect_grouping_window=4"])
    data = build_training_data(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    assert live_groups() == before
    batch = next(iter(data.make_loader(0)))
    assert batch["images"].shape[0] == cfg.micro_batch_size // cfg.data.captions_per_image
    assert len(batch["input_ids"]) == cfg.micro_batch_size


def test_saved_and_opened_memory_mapped(tmp_path):
    """`save` then `open` gives the same items from a read-only memory map; an opened list is
    sent to a spawned process as its folder, not its bytes."""
    import pickle

    import numpy as np
    items = [Record(image=f"{i}.jpg", image_id=i, text="words " * (i % 9)) for i in range(301)]
    PackedList(items).save(tmp_path / "records")
    opened = PackedList.open(tmp_path / "records")
    assert isinstance(opened._data, np.memmap) and not opened._data.flags.writeable
    assert list(opened) == items and opened[-1] == items[-1] and opened[5:9] == items[5:9]
    sent = pickle.dumps(opened)
    assert len(sent) < 500 and list(pickle.loads(sent)) == items
    assert list(pickle.loads(pickle.dumps(PackedList(items[:3])))) == items[:3]  # an in-memory one: its bytes
