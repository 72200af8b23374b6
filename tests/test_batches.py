"""Image-grouped pre-training batches: grouping, items, in-batch negatives, skips, sampling
with source weights and aspect grouping, and the model's one-CNN-pass-per-image path."""
from __future__ import annotations

import itertools
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelbert.config import DataConfig
from pixelbert.data.dataset import (ImageGroup, PretrainDataset, collate, drop_images,
                                    group_by_image, padded_fraction)
from pixelbert.data.errors import DataError
from pixelbert.data.formats import Record
from pixelbert.data.masking import IGNORE_INDEX
from pixelbert.data.sampler import StepBatchSampler
from pixelbert.data.skips import SkipCounter, TooManyBadRecords
from pixelbert.data.tokenizer import build_tokenizer
from pixelbert.engine.batches import BatchPreparer, Prefetcher
from pixelbert.model.embeddings import PixelEmbeddings
from tests.bad_files import jpeg_bytes, smooth_rgb, write_bad
from tests.helpers import FailingDecoder, tiny_config

COLORS = ("red", "green", "blue", "white", "black", "orange")
KINDS = ("circle", "square", "bar")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    """Twelve JPEGs of assorted sizes, portrait and landscape."""
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(1)
    paths = []
    for i in range(12):
        h, w = (int(v) for v in rng.integers(70, 200, size=2))
        path = root / f"{i}.jpg"
        path.write_bytes(jpeg_bytes(smooth_rgb(h, w, rng)))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def cfg() -> DataConfig:
    return DataConfig(image_shorter=64, image_longer=128, max_text_len=12, num_workers=0, captions_per_image=3)


def captions_of(i: int) -> list[str]:
    """Four distinct captions per image, one of them naming the image's number."""
    return [f"a {COLORS[(i + k) % 6]} {KINDS[(i + k) % 3]} number {i}" for k in range(4)]


@pytest.fixture(scope="module")
def groups(images) -> list[ImageGroup]:
    records = [Record(str(p), i, text) for i, p in enumerate(images) for text in captions_of(i)]
    return group_by_image([records]).groups


@pytest.fixture(scope="module")
def tok(groups, cfg, tmp_path_factory):
    texts = [t for g in groups for t in g.texts]
    return build_tokenizer(cfg, texts, tmp_path_factory.mktemp("tok"), 200)


@pytest.fixture(scope="module")
def dataset(groups, tok, cfg) -> PretrainDataset:
    return PretrainDataset(groups, tok, cfg)


def test_group_by_image_keeps_order_and_drops_empty_texts():
    records = [Record("b.jpg", 2, "two"), Record("a.jpg", 1, "one"), Record("b.jpg", 2, "  "),
               Record("b.jpg", 2, "deux"), Record("c.jpg", 3, ""), Record("a.jpg", 1, "un", size=(5, 9))]
    other = [Record("a.jpg", 1, "eins", size=(4, 8))]
    grouped = group_by_image([records, other])
    assert [(g.image, g.texts, g.source) for g in grouped.groups] == [
        ("b.jpg", ["two", "deux"], 0), ("a.jpg", ["one", "un"], 0), ("a.jpg", ["eins"], 1)]
    assert len(grouped.empty_texts) == 2 and "c.jpg" in grouped.empty_texts[1]  # c.jpg had no usable text
    assert grouped.groups[2].size == (4, 8)
    assert grouped.aspect_ratios.tolist() == [1.0, 1.0, 0.5]


def test_items_hold_up_to_captions_per_image_masked_captions(dataset, tok, cfg):
    rng = np.random.default_rng()
    for index, seed in zip(rng.integers(len(dataset), size=40).tolist(), rng.integers(2**32, size=40).tolist()):
        item = dataset[(index, seed)]
        group = dataset.groups[index]
        assert item["image_key"] == group.image and item["skips"] == [] and item["attempts"] == 1
        assert item["image"].shape[0] == 3 and len(item["input_ids"]) == cfg.captions_per_image
        originals = {tuple(tok.encode(t, cfg.max_text_len)) for t in group.texts}
        seen = set()
        for ids, labels in zip(item["input_ids"], item["mlm_labels"]):
            chosen = labels != IGNORE_INDEX
            assert chosen.any()
            restored = torch.where(chosen, labels, ids)
            matches = [o for o in originals if len(o) == len(ids)
                       and torch.equal(torch.tensor(o)[~chosen], ids[~chosen])
                       and torch.equal(torch.tensor(o)[chosen], labels[chosen])]
            assert matches, "every caption is one of the image's own, masked"
            seen.add(tuple(restored.tolist()))
        assert len(seen) == cfg.captions_per_image  # drawn without replacement
        assert len(item["pair_seeds"]) == cfg.captions_per_image
    few = PretrainDataset(dataset.groups, tok, replace(cfg, captions_per_image=9))
    assert len(few[(0, 1)]["input_ids"]) == 4  # "up to": the image has four


def test_items_are_functions_of_index_and_seed(dataset):
    a, b = dataset[(5, 777)], dataset[(5, 777)]
    assert torch.equal(a["image"], b["image"]) and a["pair_seeds"] == b["pair_seeds"]
    assert all(torch.equal(x, y) for x, y in zip(a["input_ids"], b["input_ids"]))
    assert len({tuple(dataset[(5, s)]["pair_seeds"][0]) for s in range(10)}) == 10


def test_bad_images_are_counted_and_replaced(tmp_path, groups, tok, cfg):
    bad = write_bad(tmp_path, np.random.default_rng())
    broken = [ImageGroup(str(path), ["a red circle"]) for path, _ in bad.values()]
    mixed = PretrainDataset(broken + groups, tok, cfg)
    for i, (path, reason) in enumerate(bad.values()):
        item = mixed[(i, 1000 + i)]
        assert item["skips"][0][0] == reason and str(path) in item["skips"][0][1]
        assert item["attempts"] == len(item["skips"]) + 1
        good = [g for g in mixed.groups if g.image == item["image_key"]][0]
        assert good in groups  # replaced by a readable image, with that image's own captions
    only_bad = PretrainDataset(broken, tok, cfg)
    with pytest.raises(TooManyBadRecords, match="bad images in a row"):
        only_bad[(0, 0)]


def test_collate_pairs_and_in_batch_negatives(dataset, tok):
    rng = np.random.default_rng()
    negatives = pairs = 0
    for trial in range(30):
        keys = [(int(i), int(s)) for i, s in zip(rng.choice(len(dataset), 4, replace=False), rng.integers(2**32, size=4))]
        items = [dataset[k] for k in keys]
        batch = collate(items, tok.pad_id, 32, itm_negative_probability=0.5)
        n = sum(len(it["input_ids"]) for it in items)
        assert batch["input_ids"].shape[0] == n == len(batch["pair_image"]) == len(batch["itm_labels"])
        assert batch["images"].shape[0] == 4 and batch["image_keys"] == [it["image_key"] for it in items]
        owner = [i for i, it in enumerate(items) for _ in it["input_ids"]]
        for p in range(n):
            img = int(batch["pair_image"][p])
            if batch["itm_labels"][p] == 1:
                assert img == owner[p]
                length = int(batch["attention_mask"][p].sum())
                own = items[owner[p]]["mlm_labels"][[q for q in range(n) if owner[q] == owner[p]].index(p)]
                assert torch.equal(batch["mlm_labels"][p, :length], own)
            else:
                negatives += 1
                assert batch["image_keys"][img] != batch["image_keys"][owner[p]]
                assert (batch["mlm_labels"][p] == IGNORE_INDEX).all()
        pairs += n
        again = collate(items, tok.pad_id, 32, itm_negative_probability=0.5)
        assert all(torch.equal(batch[k], again[k]) for k in ("pair_image", "itm_labels", "mlm_labels"))
    assert abs(negatives / pairs - 0.5) < 5 * math.sqrt(0.25 / pairs)
    # No other image in the batch: every pair stays matched.
    alone = collate([dataset[(0, 1)], dataset[(0, 2)]], tok.pad_id, 32, itm_negative_probability=1.0)
    assert alone["itm_labels"].tolist() == [1] * len(alone["itm_labels"])


def test_collate_hands_encoded_images_to_the_batch_decoder(groups, tok, cfg):
    encoded = PretrainDataset(groups, tok, cfg, encoded_images=True)
    items = [encoded[(0, 1)], encoded[(1, 2)]]
    batch = collate(items, tok.pad_id, 32)
    assert "images" not in batch and len(batch["encoded"]) == 2
    assert bytes(batch["encoded"][0]) == Path(groups[0].image).read_bytes()


def test_drop_images_keeps_the_other_pairs_consistent(dataset, tok):
    items = [dataset[(i, i)] for i in range(3)]
    batch = collate(items, tok.pad_id, 32, itm_negative_probability=0.5)
    keep = torch.tensor([True, False, True])
    kept = drop_images({k: v for k, v in batch.items() if k not in ("images", "image_sizes")}, keep)
    survivors = [p for p in range(len(batch["pair_image"])) if keep[batch["pair_image"][p]]]
    assert torch.equal(kept["input_ids"], batch["input_ids"][survivors])
    remap = {0: 0, 2: 1}
    assert kept["pair_image"].tolist() == [remap[int(batch["pair_image"][p])] for p in survivors]
    assert kept["image_keys"] == [batch["image_keys"][0], batch["image_keys"][2]]


def test_padded_fraction():
    sizes = torch.tensor([[64, 64], [32, 64]])
    assert padded_fraction(sizes, 64, 64) == pytest.approx(0.25)


# ---- model: one CNN pass per image ------------------------------------------------------------

@pytest.mark.parametrize("sample", [True, False])
def test_shared_images_equal_one_image_per_pair(sample):
    """pair_image gives the same tokens and gradients as repeating each image per pair."""
    torch.manual_seed(0)
    emb = PixelEmbeddings(tiny_config(pixel_samples=3)).eval()  # eval: BatchNorm uses running stats
    sizes = torch.tensor([[97, 131], [160, 70], [128, 128]])
    images = torch.zeros(3, 3, 160, 160)
    for i, (h, w) in enumerate(sizes.tolist()):
        images[i, :, :h, :w] = torch.randn(3, h, w)
    pair_image = torch.tensor([0, 0, 2, 1, 0, 2, 1])  # image 0 three times: cells drawn twice
    seeds = torch.randint(0, 2**31, (7,))
    shared, shared_mask = emb(images, sizes, sample=sample, sample_seeds=seeds, pair_image=pair_image)
    grads_shared = torch.autograd.grad(shared[shared_mask].square().sum(), list(emb.parameters()))
    expanded, expanded_mask = emb(images[pair_image], sizes[pair_image], sample=sample, sample_seeds=seeds)
    grads_expanded = torch.autograd.grad(expanded[expanded_mask].square().sum(), list(emb.parameters()))
    assert torch.equal(shared_mask, expanded_mask)
    # Same math, different reduction order (thread count decides it): fp32 rounding only.
    torch.testing.assert_close(shared, expanded, rtol=1e-4, atol=1e-4)
    for a, b in zip(grads_shared, grads_expanded):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---- sampler: source weights and aspect grouping ------------------------------------------------

def test_source_weights_set_each_epoch_composition():
    source_ids = [0] * 10 + [1] * 6 + [2] * 4
    sampler = StepBatchSampler(20, 4, 1, 1, 0, seed=3, source_ids=source_ids, source_weights=[1.0, 2.0, 0.5])
    assert sampler.epoch_length == 10 + 12 + 2
    for epoch in range(3):
        order = sampler.permutation(epoch)
        counts = np.bincount(order, minlength=20)
        assert (counts[:10] == 1).all() and (counts[10:16] == 2).all()
        assert counts[16:].sum() == 2 and counts[16:].max() == 1  # a different random half each epoch
    halves = {tuple(np.flatnonzero(np.bincount(sampler.permutation(e), minlength=20)[16:])) for e in range(12)}
    assert len(halves) > 1
    with pytest.raises(ValueError, match="weights"):
        StepBatchSampler(20, 4, 1, 1, 0, seed=3, source_ids=source_ids, source_weights=[1.0, 0.0, 1.0])


def window_steps(sampler, steps):
    it = iter(sampler)
    return [[pair for _ in range(sampler.grad_accum_steps) for pair in next(it)] for _ in range(steps)]


def test_aspect_grouping_sorts_within_windows_and_keeps_the_epoch():
    rng = np.random.default_rng()
    n, window, g = 48, 4, 6
    ratios = rng.uniform(0.5, 2.0, size=n)
    plain = StepBatchSampler(n, g, 1, 1, 0, seed=8)
    grouped = StepBatchSampler(n, g, 1, 1, 0, seed=8, aspect_ratios=ratios, aspect_window=window)
    steps = window_steps(grouped, 8)
    plain_steps = window_steps(plain, 8)
    for w in range(2):  # each window holds exactly the same samples (and seeds) as without grouping
        assert sorted(p for s in steps[w * window:(w + 1) * window] for p in s) == \
            sorted(p for s in plain_steps[w * window:(w + 1) * window] for p in s)
        # ... cut into steps of neighbouring aspect ratios: the spread within a step shrinks.
        spread = np.mean([np.ptp(ratios[[i for i, _ in s]]) for s in steps[w * window:(w + 1) * window]])
        plain_spread = np.mean([np.ptp(ratios[[i for i, _ in s]]) for s in plain_steps[w * window:(w + 1) * window]])
        assert spread < plain_spread
        bounds = sorted((ratios[[i for i, _ in s]].min(), ratios[[i for i, _ in s]].max())
                        for s in steps[w * window:(w + 1) * window])
        assert all(a[1] <= b[0] for a, b in zip(bounds, bounds[1:]))  # steps do not overlap


def test_aspect_grouping_is_layout_independent_and_resumable():
    n = 37
    ratios = np.random.default_rng(4).uniform(0.5, 2.0, size=n)
    kwargs = dict(aspect_ratios=ratios, aspect_window=3)
    one = window_steps(StepBatchSampler(n, 4, 2, 1, 0, seed=2, **kwargs), 7)
    ranks = [window_steps(StepBatchSampler(n, 4, 1, 2, r, seed=2, **kwargs), 7) for r in range(2)]
    assert one == [ranks[0][s] + ranks[1][s] for s in range(7)]
    full = list(itertools.islice(StepBatchSampler(n, 4, 2, 1, 0, seed=2, **kwargs), 14))
    tail = list(itertools.islice(StepBatchSampler(n, 4, 2, 1, 0, seed=2, start_step=4, **kwargs), 6))
    assert tail == full[8:]


# ---- skips ----------------------------------------------------------------------------------------

def test_skip_counter_counts_and_stops_a_broken_run():
    skips = SkipCounter()
    skips.add([("truncated", "truncated: a.jpg"), ("missing_file", "missing_file: b.jpg")], attempts=10)
    skips.add([("truncated", f"truncated: {i}.jpg") for i in range(5)], attempts=90)
    counts, attempts = skips.totals()
    assert counts == {"truncated": 6, "missing_file": 1} and attempts == 100
    skips.check(counts, attempts, max_fraction=0.1, min_attempts=50)  # 7 % is fine
    with pytest.raises(TooManyBadRecords, match=r"7 of 100 .*missing_file 1, truncated 6.*a\.jpg"):
        skips.check(counts, attempts, max_fraction=0.05, min_attempts=50)
    skips.check(counts, attempts, max_fraction=0.05, min_attempts=200)  # too early to judge


def test_preparer_drops_what_the_batch_decoder_cannot_read(groups, tok, cfg):
    encoded = PretrainDataset(groups, tok, cfg, encoded_images=True)
    batch = collate([encoded[(i, i)] for i in range(3)], tok.pad_id, 32, itm_negative_probability=0.5)
    skips = SkipCounter()
    prepare = BatchPreparer(torch.device("cpu"), torch.float32, skips, FailingDecoder([1]))
    inputs, stats = prepare(batch)
    survivors = (batch["pair_image"] != 1).sum()
    assert len(inputs["input_ids"]) == survivors and int(inputs["pair_image"].max()) <= 1
    assert stats["images"] == 2 and skips.counts == {"truncated": 1}
    assert batch["image_keys"][1] in skips.examples["truncated"][0]
    assert skips.attempts == 3


def test_a_micro_batch_with_no_decodable_image_is_replaced_by_the_last_decoded_one(groups, tok, cfg):
    encoded = PretrainDataset(groups, tok, cfg, encoded_images=True)
    batches = [collate([encoded[(i, i)] for i in range(start, start + 2)], tok.pad_id, 32) for start in (0, 2)]
    skips = SkipCounter()
    prepare = BatchPreparer(torch.device("cpu"), torch.float32, skips, FailingDecoder([0, 1]))
    with pytest.raises(DataError, match="first micro-batch could be decoded.*truncated"):
        prepare(batches[0])  # nothing decoded yet: nothing can stand in
    prepare.decoder = FailingDecoder([])
    good, _ = prepare(batches[0])
    prepare.decoder = FailingDecoder([0, 1])
    stand_in, stats = prepare(batches[1])
    assert stand_in.keys() == good.keys() and stats["images"] == 2
    assert all(torch.equal(stand_in[k], good[k]) for k in good if torch.is_tensor(good[k]))
    assert skips.counts == {"truncated": 4} and skips.attempts == 6


def test_prefetcher_hands_out_batches_in_order_and_measures_waiting(dataset, tok):
    batches = iter([collate([dataset[(i, i)], dataset[(i + 1, i)]], tok.pad_id, 32) for i in range(4)])
    prefetch = Prefetcher(batches, BatchPreparer(torch.device("cpu"), torch.float32, SkipCounter()),
                          torch.device("cpu"))
    first, stats = next(prefetch)
    assert first["images"].shape[0] == 2 and stats["images"] == 2
    assert "image_keys" not in first and "skips" not in first
    assert prefetch.wait_s >= 0


def test_closing_the_prefetcher_ends_the_loader_workers(dataset, cfg):
    """train.py leaves through os._exit (exit_process), which never collects the loader's
    iterator: close() must end its persistent workers itself."""
    import multiprocessing

    from pixelbert.data.sampler import build_pretrain_loader
    loader = build_pretrain_loader(dataset, StepBatchSampler(len(dataset), 2, 1, 1, 0, seed=3),
                                   replace(cfg, num_workers=2), collate)
    prefetch = Prefetcher(iter(loader), BatchPreparer(torch.device("cpu"), torch.float32, SkipCounter()),
                          torch.device("cpu"))
    next(prefetch)
    workers = multiprocessing.active_children()
    assert len(workers) >= 2
    prefetch.close()
    assert not any(worker.is_alive() for worker in workers)


def test_loader_batches_do_not_depend_on_workers(dataset, cfg):
    from pixelbert.data.sampler import build_pretrain_loader

    def first_batches(workers: int) -> list[dict]:
        sampler = StepBatchSampler(len(dataset), 3, 2, 1, 0, seed=11)
        loader = build_pretrain_loader(dataset, sampler, replace(cfg, num_workers=workers), collate)
        assert loader.num_workers == workers and loader.persistent_workers == (workers > 0)
        return list(itertools.islice(loader, 4))
    for a, b in zip(first_batches(0), first_batches(2)):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]) if torch.is_tensor(a[key]) else a[key] == b[key], key


def test_image_sizes_for_aspect_grouping_come_from_headers_once(images, tmp_path, monkeypatch):
    from PIL import Image

    from pixelbert.engine import data as engine_data
    (tmp_path / "imgs").mkdir()
    images = [Path(shutil.copy(p, tmp_path / "imgs")) for p in images[:4]]  # one is replaced below
    grouped = group_by_image([[Record(str(p), i, "a caption") for i, p in enumerate(images)]
                              + [Record(str(tmp_path / "gone.jpg"), 99, "lost")]])
    grouped.groups[0].size = (1, 2)  # from the annotations: kept as given
    cache = tmp_path / "run" / "image_sizes.json"
    engine_data.complete_sizes(grouped, cache)
    assert grouped.groups[0].size == (1, 2)
    for group, path in zip(grouped.groups[1:4], images[1:4]):
        with Image.open(path) as img:
            assert group.size == (img.height, img.width)
    assert grouped.groups[4].size is None  # unreadable: treated as square, skipped when loaded
    # A second run (or a resume) reads the cache, not the headers.
    again = group_by_image([[Record(str(p), i, "a caption", size=(1, 2) if i == 0 else None)
                              for i, p in enumerate(images)]])
    with monkeypatch.context() as patched:
        patched.setattr(engine_data, "header_size", lambda path: pytest.fail("read a header again"))
        engine_data.complete_sizes(again, cache)
    assert [g.size for g in again.groups[1:]] == [g.size for g in grouped.groups[1:4]]
    # An image replaced in place (same path, another size) is read again; only that one.
    with Image.open(images[2]) as img:
        img.transpose(Image.Transpose.ROTATE_90).save(images[2])
    read = []
    monkeypatch.setattr(engine_data, "header_size", lambda path: read.append(path) or (7, 5))
    replaced = group_by_image([[Record(str(p), i, "a caption") for i, p in enumerate(images[1:4])]])
    engine_data.complete_sizes(replaced, cache)
    assert read == [str(images[2])]
    assert [g.size for g in replaced.groups] == [grouped.groups[1].size, (7, 5), grouped.groups[3].size]
