"""Data side: synthetic set, COCO reader, tokenizer, masking, images, sampler (batches: test_batches.py)."""
from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelbert.config import DataConfig
from pixelbert.data import synthetic, tokenizer as tokenizer_module
from pixelbert.data.formats import read_coco_captions
from pixelbert.data.images import IMAGENET_NORM, load_image, pad_images, resize_size
from pixelbert.data.masking import IGNORE_INDEX, mask_tokens, random_regular_ids
from pixelbert.data.sampler import StepBatchSampler, sample_seed
from pixelbert.data.tokenizer import build_tokenizer

NUM_IMAGES = 40
SEED = 7
COLOR_RE = re.compile(r"\b(" + "|".join(synthetic.PALETTE) + r")\b")
KIND_RE = "|".join(synthetic.SHAPES)


def sigma_bound(p: float, n: int, k: float = 5.0) -> float:
    """k binomial standard deviations of a fraction estimated from n draws."""
    return k * math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(out, NUM_IMAGES, SEED)
    return out


def load_split(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"captions_{split}.json").read_text())


def all_scenes(root: Path) -> list[synthetic.Scene]:
    return synthetic.load_scenes(root, "train") + synthetic.load_scenes(root, "val")


# ---- synthetic set ------------------------------------------------------------------------

def test_synthetic_is_deterministic(synth, tmp_path):
    same = synthetic.generate(tmp_path / "same", NUM_IMAGES, SEED)
    other = synthetic.generate(tmp_path / "other", NUM_IMAGES, SEED + 1)
    for key in ("captions_train", "captions_val", "scenes_train", "scenes_val"):
        name = same[key].name
        assert same[key].read_bytes() == (synth / "annotations" / name).read_bytes()
        assert other[key].read_bytes() != same[key].read_bytes()
    for image_id in (1, NUM_IMAGES // 2, NUM_IMAGES):
        name = synthetic.file_name(image_id)
        a, b = np.asarray(Image.open(synth / "images" / name)), np.asarray(Image.open(same["images"] / name))
        assert np.array_equal(a, b)
        c = np.asarray(Image.open(other["images"] / name))
        assert a.shape != c.shape or not np.array_equal(a, c)


def test_synthetic_is_valid_coco_captions(synth):
    train, val = load_split(synth, "train"), load_split(synth, "val")
    assert len(val["images"]) == round(NUM_IMAGES * 0.1)
    assert len(train["images"]) + len(val["images"]) == NUM_IMAGES
    ann_ids = []
    for data in (train, val):
        assert {"info", "images", "annotations"} <= data.keys()
        image_ids = [img["id"] for img in data["images"]]
        assert len(set(image_ids)) == len(image_ids)
        for img in data["images"]:
            assert set(img) >= {"id", "file_name", "height", "width"}
            assert re.fullmatch(r"COCO_synthetic_\d{12}\.jpg", img["file_name"])  # VQA finds them
            assert img["file_name"] == synthetic.file_name(img["id"])
        per_image = Counter(a["image_id"] for a in data["annotations"])
        assert per_image == {i: 5 for i in image_ids}
        for ann in data["annotations"]:
            assert set(ann) >= {"id", "image_id", "caption"} and ann["caption"].strip()
        ann_ids += [a["id"] for a in data["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids)  # unique across splits
    assert not {i["id"] for i in train["images"]} & {i["id"] for i in val["images"]}
    # captions vary: most of them are distinct
    captions = [a["caption"] for a in train["annotations"]]
    assert len(set(captions)) > 0.6 * len(captions)


def test_synthetic_jpegs_match_records(synth):
    orientations = set()
    for split in ("train", "val"):
        for img in load_split(synth, split)["images"]:
            with Image.open(synth / "images" / img["file_name"]) as im:
                assert im.format == "JPEG" and im.mode == "RGB"
                assert im.size == (img["width"], img["height"])
                im.load()
            lo, hi = synthetic.SIDE_RANGE
            assert lo <= img["width"] <= hi and lo <= img["height"] <= hi
            orientations.add(img["width"] > img["height"])
    assert orientations == {True, False}  # portrait and landscape


def test_synthetic_scenes_are_true_of_the_pixels(synth):
    for scene in all_scenes(synth):
        assert 1 <= len(scene.shapes) <= 3
        pixels = np.asarray(Image.open(synth / "images" / scene.file_name), dtype=np.int32)
        shorter = min(scene.width, scene.height)
        for s in scene.shapes:
            x0, y0, x1, y1 = s.box
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            # colour: the box centre is inside every shape kind and painted in the palette colour
            assert np.abs(pixels[cy, cx] - synthetic.PALETTE[s.color]).max() < 40, (scene.file_name, s)
            # layout: the box lies inside the grid cell its position word names
            row, col = synthetic.POSITIONS[s.position]
            assert col * scene.width / 3 <= x0 and x1 < (col + 1) * scene.width / 3
            assert row * scene.height / 3 <= y0 and y1 < (row + 1) * scene.height / 3
            # size: the longer box side is in the range of its size word
            lo, hi = synthetic.SIZES[s.size]
            assert lo * shorter - 1.5 <= max(x1 - x0 + 1, y1 - y0 + 1) <= hi * shorter + 1.5


def test_captions_name_the_drawn_shapes(synth):
    scenes = {s.image_id: s for s in all_scenes(synth)}
    for split in ("train", "val"):
        for ann in load_split(synth, split)["annotations"]:
            scene = scenes[ann["image_id"]]
            caption = ann["caption"]
            colors = set(COLOR_RE.findall(caption))
            assert colors and colors <= {s.color for s in scene.shapes}, caption
            drawn = {(s.color, s.kind) for s in scene.shapes}
            for pair in re.findall(rf"\b({'|'.join(synthetic.PALETTE)}) ({KIND_RE})\b", caption):
                assert pair in drawn, caption
            for size, color, kind in re.findall(rf"\b(small|large) (\w+) ({KIND_RE})\b", caption):
                assert (size, color, kind) in {(s.size, s.color, s.kind) for s in scene.shapes}, caption
            for kind, phrase, color in re.findall(rf"^the ({KIND_RE}) (\w+ the \w+) is (\w+)$", caption):
                assert any(s.kind == kind and synthetic.POSITION_PHRASES[s.position] == phrase
                           and s.color == color for s in scene.shapes), caption


def test_ensure_synthetic_reuses_and_regenerates(tmp_path, monkeypatch):
    calls = []
    real_generate = synthetic.generate
    monkeypatch.setattr(synthetic, "generate", lambda *a, **k: calls.append(a) or real_generate(*a, **k))
    out = tmp_path / "set"
    assert synthetic.ensure_synthetic(out, 6, 1) == out and len(calls) == 1
    synthetic.ensure_synthetic(out, 6, 1)
    assert len(calls) == 1  # complete set with these parameters: reused
    synthetic.ensure_synthetic(out, 6, 2)
    assert len(calls) == 2  # other seed
    synthetic.ensure_synthetic(out, 4, 2)
    assert len(calls) == 3  # other size; the two surplus images are gone
    assert sorted(p.name for p in (out / "images").iterdir()) == [synthetic.file_name(i) for i in range(1, 5)]
    (out / synthetic.MANIFEST).unlink()  # as after a crash mid-generation
    synthetic.ensure_synthetic(out, 4, 2)
    assert len(calls) == 4
    (out / synthetic.MANIFEST).write_text('{"num_images": 4')  # torn manifest
    synthetic.ensure_synthetic(out, 4, 2)
    assert len(calls) == 5
    assert json.loads((out / synthetic.MANIFEST).read_text())["num_images"] == 4


def test_synthetic_cli(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path), "--num-images", "3", "--seed", "5", "--val-fraction", "0.34"])
    assert len(load_split(tmp_path, "train")["images"]) == 2
    assert len(load_split(tmp_path, "val")["images"]) == 1
    assert "3 images" in capsys.readouterr().out


# ---- formats ------------------------------------------------------------------------------

def test_read_coco_captions(synth):
    records = read_coco_captions(synth / "annotations" / "captions_train.json", synth / "images")
    data = load_split(synth, "train")
    assert len(records) == len(data["annotations"]) == 5 * len(data["images"])
    assert [r.text for r in records] == [a["caption"] for a in data["annotations"]]
    files = {img["id"]: img["file_name"] for img in data["images"]}
    for r in records:
        assert Path(r.image) == synth / "images" / files[r.image_id] and Path(r.image).is_file()


def test_read_coco_captions_errors(tmp_path):
    missing = tmp_path / "captions_train2014.json"
    with pytest.raises(FileNotFoundError) as err:
        read_coco_captions(missing, tmp_path)
    assert str(missing) in str(err.value) and "synthetic" in str(err.value) and "data.train=[]" in str(err.value)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [],\n "annotations": [,]}')
    with pytest.raises(ValueError, match=r"bad\.json.*line 2 column"):
        read_coco_captions(bad, tmp_path)


# ---- tokenizer ----------------------------------------------------------------------------

def captions_of(root: Path) -> list[str]:
    return [a["caption"] for a in load_split(root, "train")["annotations"]]


def test_tokenizer_trains_caches_and_retrains(synth, tmp_path, monkeypatch):
    cfg = DataConfig()
    caps = captions_of(synth)
    tok = build_tokenizer(cfg, caps, tmp_path, vocab_size=120)
    assert (tmp_path / "vocab.txt").is_file() and tok.vocab_size <= 120
    assert [tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id] == [0, 1, 2, 3, 4]
    assert tok.special_ids == {0, 1, 2, 3, 4}
    ids = tok.encode("A large RED circle on the left", 40)
    assert tok.unk_id not in ids and tok.decode(ids) == "a large red circle on the left"

    def no_training(*args, **kwargs):
        raise AssertionError("retrained although the cache matches")
    real_train = tokenizer_module.train_vocab
    monkeypatch.setattr(tokenizer_module, "train_vocab", no_training)
    assert build_tokenizer(cfg, iter(caps), tmp_path, vocab_size=120).encode("a red bar", 10) == \
        tok.encode("a red bar", 10)

    trained = []
    monkeypatch.setattr(tokenizer_module, "train_vocab", lambda *a: trained.append(1) or real_train(*a))
    other = build_tokenizer(cfg, ["zebras graze quietly", "a zebra"] * 20, tmp_path, vocab_size=120)
    assert trained == [1] and "zebra" in (tmp_path / "vocab.txt").read_text().split()
    assert other.unk_id not in other.encode("zebra", 10)
    build_tokenizer(cfg, caps, tmp_path, vocab_size=100)  # same captions, other size: retrain
    assert trained == [1, 1]


VOCAB = [*["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"], *".,!?'-",
         *"abcdefghijklmnopqrstuvwxyz", "the", "a", "red", "blue", "circle", "square", "left", "of",
         "on", "run", "play", "cafe", "##s", "##ing", "##ed", "##e", "##r", "##n", "##a", "##y",
         "un", "##believ", "##able", "ä", "中"]
SENTENCES = ["The RED circle, on the left!", "Running squares played", "unbelievable cafés",
             "a [MASK] square", "Ärger über 中文 text?", "  spaced\tout\nwords  ", "xyzzy-plugh's"]


@pytest.mark.parametrize("lowercase", [True, False])
@pytest.mark.parametrize("as_folder", [True, False])
def test_local_vocab_matches_transformers(tmp_path, lowercase, as_folder):
    from transformers import BertTokenizerFast
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("".join(t + "\n" for t in VOCAB), encoding="utf-8")
    cfg = DataConfig(tokenizer=str(tmp_path if as_folder else vocab_file), lowercase=lowercase)
    ours = build_tokenizer(cfg, [], tmp_path / "unused", vocab_size=100)
    # transformers 5 ignores BertTokenizerFast(vocab_file=...); from_pretrained reads vocab.txt
    ref = BertTokenizerFast.from_pretrained(str(tmp_path), do_lower_case=lowercase)
    assert (ours.pad_id, ours.unk_id, ours.cls_id, ours.sep_id, ours.mask_id) == \
        (ref.pad_token_id, ref.unk_token_id, ref.cls_token_id, ref.sep_token_id, ref.mask_token_id)
    assert ours.vocab_size == len(VOCAB)
    for text in SENTENCES:
        assert ours.encode(text, 512) == ref(text)["input_ids"], text
        assert ours.tokenize(text) == ref.tokenize(text), text
    assert not (tmp_path / "unused").exists()  # a local vocabulary is never cached


def test_trained_vocab_records_its_casing(synth, tmp_path):
    """A trained vocabulary's folder holds tokenizer_config.json with its casing: Hugging Face's
    tokenizer loads the folder cased alike without being told, and the run's vocabulary refuses
    text cased otherwise (its ids were made for the other)."""
    from transformers import BertTokenizerFast
    from pixelbert.data.tokenizer import run_tokenizer
    cased = DataConfig(lowercase=False)
    ours = build_tokenizer(cased, captions_of(synth), tmp_path / "tokenizer", vocab_size=120)
    assert json.loads((tmp_path / "tokenizer" / "tokenizer_config.json").read_text())["do_lower_case"] is False
    ref = BertTokenizerFast.from_pretrained(str(tmp_path / "tokenizer"))
    text = "A large RED circle on the left"
    assert ours.encode(text, 40) == ref(text)["input_ids"] and ref.tokenize(text) == ours.tokenize(text)
    assert ref.tokenize("A a") == ["[UNK]", "a"]  # not lowercased: the captions never start a word with "A"
    assert run_tokenizer(cased, tmp_path).encode(text, 40) == ours.encode(text, 40)
    with pytest.raises(ValueError, match="made with do_lower_case=false: .* set data.lowercase=false"):
        run_tokenizer(DataConfig(lowercase=True), tmp_path)


def test_local_vocab_missing(tmp_path):
    cfg = DataConfig(tokenizer=str(tmp_path / "bert-base-uncased"))
    with pytest.raises(FileNotFoundError, match="bert-base-uncased"):
        build_tokenizer(cfg, [], tmp_path, vocab_size=100)


def test_truncation_keeps_sep(synth, tmp_path):
    tok = build_tokenizer(DataConfig(), captions_of(synth), tmp_path, vocab_size=200)
    text = "a large red circle on the left of a small blue square"
    full = tok.encode(text, 100)
    for max_len in (3, 5, len(full) - 1):
        ids = tok.encode(text, max_len)
        assert len(ids) == max_len and ids[0] == tok.cls_id and ids[-1] == tok.sep_id
        assert ids[1:-1] == full[1:max_len - 1]
    assert tok.encode(text, len(full)) == full and tok.encode("", 5) == [tok.cls_id, tok.sep_id]


# ---- masking ------------------------------------------------------------------------------

class Info:
    special_ids = frozenset({0, 1, 2, 3, 4})
    mask_id = 4
    vocab_size = 1000


def test_masking_rates():
    rng = np.random.default_rng(np.random.SeedSequence().entropy)  # fresh data every run
    draws, length = 3000, 64
    chosen = masked_n = random_n = kept_n = 0
    for _ in range(draws):
        ids = np.concatenate([[2], rng.integers(5, Info.vocab_size, length), [3], [0, 0, 0]])
        masked, labels = mask_tokens(ids, rng, Info, 0.15)
        assert masked.dtype == labels.dtype == np.int64 and masked.shape == ids.shape
        special = np.isin(ids, list(Info.special_ids))
        assert (labels[special] == IGNORE_INDEX).all() and (masked[special] == ids[special]).all()
        sel = labels != IGNORE_INDEX
        assert sel.any() and (labels[sel] == ids[sel]).all() and (masked[~sel] == ids[~sel]).all()
        chosen += sel.sum()
        masked_n += (masked[sel] == Info.mask_id).sum()
        kept_n += (masked[sel] == ids[sel]).sum()
        replaced = masked[sel][(masked[sel] != Info.mask_id) & (masked[sel] != ids[sel])]
        assert not np.isin(replaced, list(Info.special_ids)).any() and (replaced < Info.vocab_size).all()
        random_n += len(replaced)
    n = draws * length
    assert abs(chosen / n - 0.15) < sigma_bound(0.15, n)
    assert abs(masked_n / chosen - 0.8) < sigma_bound(0.8, chosen)
    # a random replacement hits the original id with chance 1/995: far inside the bound
    assert abs(random_n / chosen - 0.1) < sigma_bound(0.1, chosen)
    assert abs(kept_n / chosen - 0.1) < sigma_bound(0.1, chosen)


def test_masking_always_chooses_one():
    rng = np.random.default_rng()
    for _ in range(500):
        ids = [2, *rng.integers(5, 1000, int(rng.integers(1, 4))), 3]
        _, labels = mask_tokens(ids, rng, Info, 0.15)
        assert (labels != IGNORE_INDEX).sum() >= 1 and labels[0] == labels[-1] == IGNORE_INDEX
    masked, labels = mask_tokens([2, 3, 0, 0], rng, Info, 0.15)  # nothing maskable
    assert (labels == IGNORE_INDEX).all() and masked.tolist() == [2, 3, 0, 0]
    masked, labels = mask_tokens([2, 7, 8, 3], rng, Info, 0.0)  # MLM off
    assert (labels == IGNORE_INDEX).all() and masked.tolist() == [2, 7, 8, 3]


def test_random_regular_ids_are_uniform_over_non_special():
    class Small:
        special_ids, mask_id, vocab_size = frozenset({0, 3, 9}), 3, 10
    n = 70000
    counts = Counter(random_regular_ids(np.random.default_rng(), n, Small).tolist())
    assert set(counts) == {1, 2, 4, 5, 6, 7, 8}
    for c in counts.values():
        assert abs(c / n - 1 / 7) < sigma_bound(1 / 7, n)


# ---- images -------------------------------------------------------------------------------

def test_resize_size():
    assert resize_size(480, 640, 800, 1333) == (800, 1067)
    assert resize_size(640, 480, 800, 1333) == (1067, 800)
    assert resize_size(50, 20000, 800, 1333) == (3, 1333)  # the longer side limits
    assert resize_size(20000, 50, 800, 1333) == (1333, 3)
    assert resize_size(1, 100000, 800, 1333) == (1, 1333)  # never below one pixel
    assert resize_size(800, 800, 800, 1333) == (800, 800)
    rng = np.random.default_rng()
    for h, w in rng.integers(10, 3000, size=(200, 2)).tolist():
        nh, nw = resize_size(h, w, 800, 1333)
        assert max(nh, nw) <= 1333 and (min(nh, nw) == 800 or max(nh, nw) == 1333)
        scale = max(nh, nw) / max(h, w) if max(nh, nw) == 1333 else min(nh, nw) / min(h, w)
        assert abs(nh - h * scale) <= 0.5 + 1e-9 and abs(nw - w * scale) <= 0.5 + 1e-9


def normalised(rgb) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) - torch.tensor(IMAGENET_NORM.mean)) / torch.tensor(IMAGENET_NORM.std)


def test_load_image_modes_and_normalisation(tmp_path):
    Image.new("RGB", (50, 30), (200, 100, 50)).save(tmp_path / "rgb.png")
    img = load_image(tmp_path / "rgb.png", 64, 200, IMAGENET_NORM)
    assert img.dtype == torch.float32 and img.shape == (3, 64, 107)
    assert torch.allclose(img[:, 10, 10], normalised([200, 100, 50]), atol=1e-4)
    Image.new("L", (40, 80), 128).save(tmp_path / "gray.jpg")
    gray = load_image(tmp_path / "gray.jpg", 64, 200, IMAGENET_NORM)
    assert gray.shape == (3, 128, 64)
    assert torch.allclose(gray[:, 20, 20], normalised([128, 128, 128]), atol=0.05)
    Image.new("CMYK", (64, 64), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")  # red
    red = load_image(tmp_path / "cmyk.jpg", 64, 200, IMAGENET_NORM)
    assert red.shape == (3, 64, 64) and torch.allclose(red[:, 32, 32], normalised([255, 0, 0]), atol=0.1)


def test_load_image_applies_exif_orientation(tmp_path):
    im = Image.new("RGB", (80, 40), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 40, 40))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turns it 90 degrees clockwise
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    img = load_image(tmp_path / "rot.jpg", 64, 200, IMAGENET_NORM)
    assert img.shape == (3, 128, 64)  # portrait once upright
    top, bottom = img[:, 10, 32], img[:, 118, 32]  # red half ends on top after the turn
    assert torch.allclose(top, normalised([255, 0, 0]), atol=0.2)
    assert torch.allclose(bottom, normalised([0, 0, 255]), atol=0.2)


def test_pad_images():
    a, b = torch.randn(3, 10, 20) + 5, torch.randn(3, 33, 5) + 5
    batch, sizes = pad_images([a, b], 32)
    assert batch.shape == (2, 3, 64, 32) and batch.dtype == torch.float32
    assert sizes.dtype == torch.int64 and sizes.tolist() == [[10, 20], [33, 5]]
    assert torch.equal(batch[0, :, :10, :20], a) and torch.equal(batch[1, :, :33, :5], b)
    assert (batch[0, :, 10:] == 0).all() and (batch[0, :, :, 20:] == 0).all()
    assert (batch[1, :, 33:] == 0).all() and (batch[1, :, :, 5:] == 0).all()
    exact, _ = pad_images([torch.ones(3, 64, 32)], 32)
    assert exact.shape == (1, 3, 64, 32)


# ---- dataset and collate ------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_cfg() -> DataConfig:
    return DataConfig(image_shorter=64, image_longer=128, max_text_len=16, num_workers=0)


# ---- sampler ------------------------------------------------------------------------------

N = 37  # not a multiple of any global batch below: global batches straddle epochs


def step_batches(sampler: StepBatchSampler, steps: int) -> list[list[list[tuple[int, int]]]]:
    """[step][slot] -> micro-batch, read from the sampler's iterator."""
    it = iter(sampler)
    return [[next(it) for _ in range(sampler.grad_accum_steps)] for _ in range(steps)]


def stream(seed: int, positions: int) -> list[tuple[int, int]]:
    g = 12
    batches = step_batches(StepBatchSampler(N, g, 1, 1, 0, seed), math.ceil(positions / g))
    return [pair for step in batches for pair in step[0]][:positions]


def test_sampler_epochs_cover_every_index_once():
    seed = int(np.random.default_rng().integers(2**31))
    pairs = stream(seed, 4 * N)
    orders = [[i for i, _ in pairs[e * N:(e + 1) * N]] for e in range(4)]
    for order in orders:
        assert sorted(order) == list(range(N))
    assert len({tuple(o) for o in orders}) == 4  # a new order every epoch
    assert len({s for _, s in pairs}) == len(pairs)  # every (epoch, position) has its own seed
    assert [s for _, s in pairs[N:N + 3]] == [sample_seed(seed, 1, p) for p in range(3)]


def test_sampler_global_batch_spans_epoch_boundary():
    sampler = StepBatchSampler(N, 12, 1, 1, 0, seed=5)
    batch = sampler.micro_batch(3, 0)  # stream positions 36..47: last of epoch 0, first 11 of epoch 1
    p0, p1 = sampler.permutation(0).copy(), sampler.permutation(1).copy()
    assert [i for i, _ in batch] == [p0[36], *p1[:11]]
    assert [s for _, s in batch] == [sample_seed(5, 0, 36), *(sample_seed(5, 1, p) for p in range(11))]


LAYOUTS_G12 = [(12, 1, 1), (6, 2, 1), (6, 1, 2), (2, 3, 2), (2, 2, 3), (1, 3, 4), (3, 1, 4)]  # micro, accum, world


def test_sampler_step_content_independent_of_layout():
    seed, steps = int(np.random.default_rng().integers(2**31)), 8
    reference = None
    for micro, accum, world in LAYOUTS_G12:
        per_rank = [step_batches(StepBatchSampler(N, micro, accum, world, r, seed), steps) for r in range(world)]
        # global order of step s: slot-major, then rank: exactly the stream order
        ordered = [[pair for a in range(accum) for r in range(world) for pair in per_rank[r][s][a]]
                   for s in range(steps)]
        reference = reference or ordered
        assert ordered == reference, (micro, accum, world)
    assert [pair for step in reference for pair in step] == stream(seed, steps * 12)


def test_sampler_ranks_and_accumulation_slots_are_interchangeable():
    seed, steps = 3, 6
    by_rank = [step_batches(StepBatchSampler(N, 4, 1, 2, r, seed), steps) for r in range(2)]
    by_slot = step_batches(StepBatchSampler(N, 4, 2, 1, 0, seed), steps)
    for s in range(steps):
        for r in range(2):
            assert by_rank[r][s][0] == by_slot[s][r]


@pytest.mark.parametrize("start_step", [1, 3, 10])
def test_sampler_resume_yields_the_tail(start_step):
    for rank in range(2):
        args = dict(num_samples=N, micro_batch_size=3, grad_accum_steps=2, world_size=2, rank=rank, seed=9)
        full = list(itertools.islice(StepBatchSampler(**args), (start_step + 5) * 2))
        resumed = list(itertools.islice(StepBatchSampler(**args, start_step=start_step), 5 * 2))
        assert resumed == full[start_step * 2:]


def test_sampler_determinism_and_arguments():
    a = list(itertools.islice(StepBatchSampler(N, 4, 2, 2, 1, 21), 10))
    assert a == list(itertools.islice(StepBatchSampler(N, 4, 2, 2, 1, 21), 10))
    assert a != list(itertools.islice(StepBatchSampler(N, 4, 2, 2, 1, 22), 10))
    assert all(len(mb) == 4 and all(0 <= i < N and 0 <= s < 2**32 for i, s in mb) for mb in a)
    for bad in (dict(rank=2), dict(world_size=0), dict(seed=-1), dict(start_step=-1), dict(num_samples=0)):
        kwargs = dict(num_samples=N, micro_batch_size=4, grad_accum_steps=1, world_size=2, rank=0, seed=0)
        with pytest.raises(ValueError):
            StepBatchSampler(**{**kwargs, **bad})



def test_shared_cache_gives_every_run_the_same_vocabulary(tmp_path, small_cfg):
    caps = [f"a {c} {s} on the {p}" for c in ("red", "blue", "green") for s in ("circle", "bar")
            for p in ("left", "right")] * 5
    first = build_tokenizer(small_cfg, caps, tmp_path / "run1", 80, shared_cache=tmp_path / "shared")
    second = build_tokenizer(small_cfg, caps, tmp_path / "run2", 80, shared_cache=tmp_path / "shared")
    assert (tmp_path / "run1" / "vocab.txt").read_text() == (tmp_path / "run2" / "vocab.txt").read_text()
    assert first.encode("a blue bar on the left", 12) == second.encode("a blue bar on the left", 12)
    # A run's own copy wins over the shared cache: resume never sees ids change under it.
    shared = next((tmp_path / "shared").iterdir()) / "vocab.txt"
    shared.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    again = build_tokenizer(small_cfg, caps, tmp_path / "run1", 80, shared_cache=tmp_path / "shared")
    assert again.vocab_size == first.vocab_size
