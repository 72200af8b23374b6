"""Fine-tuning tasks: VQA, NLVR2 and retrieval data, heads, weight loading and evaluation."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pixelbert.config import DataConfig, load_config
from pixelbert.data import synthetic
from pixelbert.data.formats import read_karpathy, read_nlvr2, read_vqa
from pixelbert.data.tasks import AnswerVocabulary, TaskDataset, collate_task
from pixelbert.data.tokenizer import build_tokenizer, run_tokenizer
from pixelbert.data.skips import SkipCounter
from pixelbert.engine.batches import BatchPreparer
from pixelbert.engine.distributed import DistInfo
from pixelbert.engine.weights import load_weights
from pixelbert.model import PixelBert
from pixelbert.model.tasks import PixelBertForNLVR2, PixelBertForRetrieval, PixelBertForVQA
from tests.helpers import FailingDecoder, eval_run, tiny_config

DATA = DataConfig(image_shorter=64, image_longer=128, max_text_len=16, num_workers=0)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(out, 40, 3)
    return out


@pytest.fixture(scope="module")
def records(synth):
    ann = synth / "annotations"
    return {
        "vqa": read_vqa(ann / "vqa_questions_train.json", ann / "vqa_annotations_train.json", synth / "images"),
        "nlvr2": read_nlvr2(ann / "nlvr2_train.jsonl", synth / "nlvr2" / "train"),
        "retrieval": read_karpathy(ann / "dataset_synthetic.json", synth, "train+restval"),
    }


@pytest.fixture(scope="module")
def tok(records, tmp_path_factory):
    texts = [r.text for rs in records.values() for r in rs]
    return build_tokenizer(DATA, texts, tmp_path_factory.mktemp("tok"), 100)


def test_answer_vocabulary_and_soft_targets():
    from pixelbert.data.formats import Record
    make = lambda answers: Record("x.jpg", 1, "q?", answers=answers)  # noqa: E731
    records = [make(["Two", "2", "two", "3", "yes", "yes.", "no", "2", "two ", "red"]),
               make(["red"] * 9 + ["blue"])]
    vocab = AnswerVocabulary.build(records, min_count=2)
    # "two" normalises to "2" (5 in all), "yes." to "yes" (2); red 10; most frequent first.
    assert vocab.answers == ["red", "2", "yes"]
    target = vocab.targets(["2", "two", "2", "red", "x", "x", "x", "x", "x", "x"])
    assert target.tolist() == pytest.approx([0.3, 0.9, 0.0])  # 1 x 0.3, 3 x 0.3, none
    assert vocab.targets(["2"] * 6 + ["red"] * 4).tolist() == pytest.approx([1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="min_answer_count"):
        AnswerVocabulary.build(records, min_count=50)


def test_task_batches(records, tok):
    vqa_answers = AnswerVocabulary.build(records["vqa"], 1)
    vqa = collate_task([TaskDataset("vqa", records["vqa"], tok, DATA, answers=vqa_answers)[(i, i)]
                        for i in range(4)], tok.pad_id, 32)
    # Four questions of one synthetic image share it: one image, four pairs.
    assert vqa["images"].shape[0] == len(set(r.image for r in records["vqa"][:4]))
    assert vqa["input_ids"].shape[0] == 4 and vqa["vqa_targets"].shape == (4, len(vqa_answers.answers))
    assert (vqa["vqa_targets"].max(dim=1).values > 0).all()  # every answer is in a min-count-1 vocabulary
    nlvr2 = collate_task([TaskDataset("nlvr2", records["nlvr2"], tok, DATA)[(i, i)] for i in range(3)],
                         tok.pad_id, 32)
    assert nlvr2["input_ids"].shape[0] == 6 and torch.equal(nlvr2["input_ids"][0], nlvr2["input_ids"][1])
    assert nlvr2["pair_image"][0] != nlvr2["pair_image"][1]  # left and right image
    assert nlvr2["nlvr2_labels"].tolist() == [int(r.label) for r in records["nlvr2"][:3]]
    ret = TaskDataset("retrieval", records["retrieval"], tok, DATA, negatives=5)
    item = ret[(7, 99)]
    assert len(item["texts"]) == 6
    by_text = {}
    for r in records["retrieval"]:
        by_text.setdefault(tuple(tok.encode(r.text, DATA.max_text_len)), set()).add(r.image)
    assert all(ret.images[image] in by_text[tuple(t.tolist())] for t, image in zip(item["texts"], item["text_images"]))
    batch = collate_task([ret[(7, 99)], ret[(12, 5)]], tok.pad_id, 32)
    assert batch["text_image"].tolist() == ret[(7, 99)]["text_images"] + ret[(12, 5)]["text_images"]
    assert [ret.images[i] for i in batch["image_ids"].tolist()] == batch["image_keys"]
    assert batch["image_ids"].tolist() == batch["text_image"][[0, 6]].tolist()  # each item's positive
    own = {r.text for r in records["retrieval"] if r.image == records["retrieval"][7].image}
    decoded = [tuple(t.tolist()) for t in item["texts"]]
    assert decoded[0] == tuple(tok.encode(records["retrieval"][7].text, DATA.max_text_len))
    assert not any(d in {tuple(tok.encode(t, DATA.max_text_len)) for t in own} for d in decoded[1:])


def task_dataset(task, records, tok, **kwargs) -> TaskDataset:
    extra = {"vqa": lambda: dict(answers=AnswerVocabulary.build(records["vqa"], 1)),
             "nlvr2": dict, "retrieval": lambda: dict(negatives=3)}[task]()
    return TaskDataset(task, records[task], tok, DATA, **extra, **kwargs)


def spread_items(data: TaskDataset) -> list[dict]:
    """Records 0, 1, m, m+1 (m the middle): neighbours often share an image (a VQA image's
    questions, a retrieval image's captions), the two halves do not."""
    middle = len(data) // 2
    return [data[(i, i)] for i in (0, 1, middle, middle + 1)]


def test_task_items_hand_encoded_images_to_the_batch_decoder(records, tok):
    data = task_dataset("nlvr2", records, tok, encoded_images=True)
    batch = collate_task([data[(i, i)] for i in (0, len(data) // 2)], tok.pad_id, 32)  # two image pairs
    assert "images" not in batch and len(batch["encoded"]) == len(batch["image_keys"]) == 4
    for key, encoded in zip(batch["image_keys"], batch["encoded"]):
        assert bytes(encoded) == Path(key).read_bytes()
    assert batch["pair_item"].tolist() == [0, 0, 1, 1]


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "retrieval"])
def test_an_undecodable_image_drops_every_item_using_it(records, tok, task):
    """What DALI cannot decode takes its whole items out: NLVR2's other image and a retrieval
    item's negatives are meaningless alone, and per-item targets must stay aligned."""
    batch = collate_task(spread_items(task_dataset(task, records, tok, encoded_images=True)), tok.pad_id, 32)
    bad = 1
    skips = SkipCounter()
    inputs, stats = BatchPreparer(torch.device("cpu"), torch.float32, skips, FailingDecoder([bad]))(batch)
    pair_item, pair_image = batch["pair_item"].tolist(), batch["pair_image"].tolist()
    dropped = {item for item, image in zip(pair_item, pair_image) if image == bad}
    kept_items = [i for i in range(4) if i not in dropped]
    kept_pairs = [p for p, item in enumerate(pair_item) if item not in dropped]
    assert dropped and kept_items  # the case is real: something goes, something stays
    assert torch.equal(inputs["input_ids"], batch["input_ids"][kept_pairs])
    assert torch.equal(inputs["attention_mask"], batch["attention_mask"][kept_pairs])
    assert inputs["pair_item"].tolist() == [kept_items.index(pair_item[p]) for p in kept_pairs]
    assert inputs["pair_image"].tolist() == [pair_image[p] - (pair_image[p] > bad) for p in kept_pairs]
    if task == "vqa":
        assert torch.equal(inputs["vqa_targets"], batch["vqa_targets"][kept_items])
        assert inputs["question_ids"] == [batch["question_ids"][i] for i in kept_items]
    if task == "nlvr2":
        assert torch.equal(inputs["nlvr2_labels"], batch["nlvr2_labels"][kept_items])
        assert inputs["identifiers"] == [batch["identifiers"][i] for i in kept_items]
    if task == "retrieval":  # dataset-wide image ids: of each kept text, and of each kept image
        assert torch.equal(inputs["text_image"], batch["text_image"][kept_pairs])
        assert inputs["image_ids"].tolist() == [i for n, i in enumerate(batch["image_ids"].tolist()) if n != bad]
    assert stats["images"] == len(batch["encoded"]) - 1 and skips.counts == {"truncated": 1}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("task", ["vqa", "nlvr2", "retrieval"])
def test_task_batches_decoded_by_dali_match_pil(records, tok, task, device):
    """The fine-tuning batch through DALI (the CPU pipeline, or `mixed` on a GPU) equals the PIL
    batch: every non-image entry exactly, the images within the tolerances tests/test_dali.py sets."""
    pytest.importorskip("nvidia.dali")
    from pixelbert.data.dali_decode import DaliImageDecoder
    from tests.test_dali import INTERIOR_TOL, MAX_TOL_GPU, MEAN_TOL, MEAN_TOL_GPU, STEP, assert_matches
    pil = collate_task(spread_items(task_dataset(task, records, tok)), tok.pad_id, 32)
    encoded = collate_task(spread_items(task_dataset(task, records, tok, encoded_images=True)), tok.pad_id, 32)
    decoder = DaliImageDecoder(DATA.image_shorter, DATA.image_longer, 32, norm=DATA.pixel_norm(), num_threads=1, max_batch_size=8,
                               device_id=0 if device == "cuda" else None)
    inputs, _ = BatchPreparer(torch.device(device), torch.float32, SkipCounter(), decoder)(encoded)
    assert set(inputs) == set(pil) - {"image_keys", "skips", "attempts"}
    for key, value in inputs.items():
        if key not in ("images", "image_sizes"):
            expected = pil[key]
            assert (torch.equal(value.cpu(), expected) if torch.is_tensor(value) else value == expected), key
    # Interior and mean as for photos; the outermost rows/columns may differ by up to 10 levels
    # here, where a drawn shape's hard edge meets the border after a 4.5x downscale (measured on
    # the CPU; the GPU decoder is allowed its own tolerances on top).
    mean_tol, interior_tol = (MEAN_TOL_GPU, MAX_TOL_GPU) if device == "cuda" else (MEAN_TOL, INTERIOR_TOL)
    assert_matches(SimpleNamespace(images=inputs["images"], sizes=inputs["image_sizes"].cpu(), failed=[]),
                   pil["images"], pil["image_sizes"], mean_tol=mean_tol, max_tol=12 * STEP,
                   interior_tol=interior_tol)


def test_task_models_train_and_load_pretrained(records, tok, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=100)
    pretrained = PixelBert(cfg)
    torch.save(pretrained.state_dict(), tmp_path / "pre.pt")
    answers = AnswerVocabulary.build(records["vqa"], 1)
    vqa = PixelBertForVQA(cfg, len(answers.answers))
    report = load_weights(vqa, tmp_path / "pre.pt")
    assert all(k.startswith("vqa_head.") for k in report.initialised) and report.initialised
    assert any(k.startswith("cls.") for k in report.unused) and any(k.startswith("itm_head.") for k in report.unused)
    torch.testing.assert_close(vqa.encoder.layer[0].attention.self.query.weight,
                               pretrained.encoder.layer[0].attention.self.query.weight)
    retrieval = PixelBertForRetrieval(cfg, negatives=5, hard_negatives=2)
    assert load_weights(retrieval, tmp_path / "pre.pt").initialised == []  # the ITM head is reused
    cases = [(vqa, "vqa", dict(answers=answers)), (PixelBertForNLVR2(cfg), "nlvr2", {}),
             (retrieval, "retrieval", dict(negatives=5))]
    for model, task, kwargs in cases:
        data = TaskDataset(task, records[task], tok, DATA, **kwargs)
        batch = collate_task([data[(i, i)] for i in range(3)], tok.pad_id, 32)
        out = model(batch)
        assert torch.isfinite(out["loss"]), task
        out["loss"].backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), task


def test_retrieval_trains_on_the_hardest_negatives(records, tok, monkeypatch):
    model = PixelBertForRetrieval(tiny_config(vocab_size=100), negatives=4, hard_negatives=2)
    data = TaskDataset("retrieval", records["retrieval"], tok, DATA, negatives=4)
    batch = collate_task([data[(i, i)] for i in range(2)], tok.pad_id, 32)
    fixed = torch.tensor([5.0, 1.0, 9.0, -2.0, 3.0, 0.0, 4.0, 8.0, 7.0, -1.0])
    monkeypatch.setattr(model, "scores", lambda b, feat=None: fixed[:len(b["input_ids"])])
    seen = {}
    original = model.pair_logits
    monkeypatch.setattr(model, "pair_logits", lambda b, feat=None: seen.setdefault("ids", b["input_ids"]) is None
                        or original(b, feat))
    out = model(batch)
    # Item 0 scores [5 | 1, 9, -2, 3]: hardest negatives 2 and 4; item 1 [0 | 4, 8, 7, -1]: 7 and 8.
    assert torch.equal(seen["ids"], batch["input_ids"][[0, 2, 4, 5, 7, 8]])
    assert out["rank1_correct"] == 0 and out["rank1_count"] == 2


def contrastive_batch(records, tok, items=3, negatives=4):
    """A retrieval batch whose item 0 has its own positive text again among item 1's negatives."""
    data = TaskDataset("retrieval", records["retrieval"], tok, DATA, negatives=negatives)
    batch = collate_task([data[(5 * i, 10 + i)] for i in range(items)], tok.pad_id, 32)  # 5 captions per image
    batch["input_ids"][(1 + negatives) + 2] = batch["input_ids"][0]
    batch["attention_mask"][(1 + negatives) + 2] = batch["attention_mask"][0]
    return batch


def test_contrastive_loss_and_vectors_match_a_direct_computation(records, tok):
    """The ITC loss against a loop over images and texts, duplicates of a positive text counted
    as positives; the vectors are each [CLS] of a text-only / image-only pass, independent of
    what else is in the batch; the loss is added at its weight and trains the head."""
    torch.manual_seed(0)
    negatives = 4
    model = PixelBertForRetrieval(tiny_config(vocab_size=100), negatives=negatives, hard_negatives=2,
                                  contrastive_weight=0.5, contrastive_dim=24)
    batch = contrastive_batch(records, tok, negatives=negatives)
    model.eval()  # BatchNorm on its running statistics: an image's features do not depend on the batch
    feat = model.pixel_embeddings.features(batch["images"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    text = model.text_vectors(ids, mask)
    image = model.image_vectors(batch["images"], batch["image_sizes"], feat, ids[:1, :1])
    assert text.shape == (len(ids), 24) and image.shape == (3, 24)
    torch.testing.assert_close(text.norm(dim=1), torch.ones(len(ids)))
    alone = model.text_vectors(ids[5:6, :int(mask[5].sum())], mask[5:6, :int(mask[5].sum())])
    torch.testing.assert_close(alone[0], text[5], atol=1e-5, rtol=1e-5)
    h, w = batch["image_sizes"][1].tolist()
    one = batch["images"][1:2, :, :-(-h // 32) * 32, :-(-w // 32) * 32]
    alone = model.image_vectors(one, batch["image_sizes"][1:2], model.pixel_embeddings.features(one), ids[:1, :1])
    torch.testing.assert_close(alone[0], image[1], atol=1e-5, rtol=1e-5)

    positives = list(range(0, len(ids), 1 + negatives))
    scale = model.contrastive.scale()
    logits = scale * image @ text.T
    terms = []
    batch["text_image"][3] = batch["image_ids"][2]  # as if item 0's third negative were written for image 2
    for j in range(3):  # image j: its positive text, and the copy of item 0's in item 1's negatives
        matching = [t for t in range(len(ids)) if torch.equal(ids[t], ids[positives[j]])
                    or batch["text_image"][t] == batch["image_ids"][j]]
        assert len(matching) == {0: 2, 1: 1, 2: 2}[j]
        terms.append(-torch.log_softmax(logits[j], 0)[matching].mean())
    image_to_text = torch.stack(terms).mean()
    text_to_image = torch.stack([-torch.log_softmax(logits[:, positives[j]], 0)[j] for j in range(3)]).mean()
    expected = (image_to_text + text_to_image) / 2
    torch.testing.assert_close(model.batch_contrastive_loss(batch, feat), expected)

    model.train()
    out = model(batch)
    torch.testing.assert_close(out["loss"], out["itm_loss"] + 0.5 * out["itc_loss"])
    out["loss"].backward()
    for name in ("contrastive.text_proj.weight", "contrastive.image_proj.weight", "contrastive.log_scale",
                 "encoder.layer.0.attention.self.query.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_contrastive_loss_counts_an_image_held_twice_once():
    """Two ranks' items of one image bring it twice into the gathered batch: the loss is the one
    of the batch holding it once (and its vector gets that gradient)."""
    from pixelbert.model.contrastive import contrastive_loss
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    image = torch.nn.functional.normalize(torch.randn(3, 8), dim=1).requires_grad_()
    input_ids = torch.randint(5, 50, (6, 7))
    mask = torch.ones_like(input_ids)
    positives = torch.tensor([0, 2, 4])  # three items, the third of image 11 again
    text_image = torch.tensor([10, 12, 11, 10, 11, 12])
    once = contrastive_loss(text, image[:2], torch.tensor(5.0), input_ids, mask, positives,
                            text_image, torch.tensor([10, 11]))
    twice = contrastive_loss(text, image[[0, 1, 1]], torch.tensor(5.0), input_ids, mask, positives,
                             text_image, torch.tensor([10, 11, 11]))
    torch.testing.assert_close(twice, once)
    grad_once, = torch.autograd.grad(once, image)
    grad_twice, = torch.autograd.grad(twice, image)
    torch.testing.assert_close(grad_twice, grad_once)
    different = contrastive_loss(text, image, torch.tensor(5.0), input_ids, mask, positives,
                                 text_image, torch.tensor([10, 11, 12]))  # a real third image changes it
    assert not torch.isclose(different, once)


def test_contrastive_training_pulls_matching_pairs_together(records, tok):
    """Sixty steps on one batch: the ITC loss (at first about ln 12 / 2 + ln 4 / 2) falls, and
    images end closer to their own texts than to the others'. The run is chaotic (its end
    varies with thread count and run to run): over 96 runs the median of the last five losses
    was 5-68 % of the first, the own-minus-other similarity 0.08-1.08; a loss that does not
    train stays near 100 %."""
    torch.manual_seed(1)
    model = PixelBertForRetrieval(tiny_config(vocab_size=100), negatives=2, hard_negatives=1,
                                  contrastive_weight=1.0, contrastive_dim=16)
    batch = contrastive_batch(records, tok, items=4, negatives=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        out = model(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["itc_loss"].item())
    assert sorted(losses[-5:])[2] < 0.8 * losses[0], losses  # the median: a late spike happens
    with torch.no_grad():  # in training mode, as the loss saw them (BatchNorm on batch statistics)
        ids = batch["input_ids"]
        image = model.image_vectors(batch["images"], batch["image_sizes"],
                                    model.pixel_embeddings.features(batch["images"]), ids[:1, :1])
        text = model.text_vectors(ids[::3], batch["attention_mask"][::3])
    similarity = image @ text.T
    assert similarity.diag().mean() > (similarity.sum() - similarity.diag().sum()) / 12


def test_shortlists_take_both_directions_and_equal_passes(monkeypatch):
    """Each image's rows: its k nearest texts and the texts that have it among their k nearest
    images; an unreadable image has none and is no text's neighbour. Under equal_passes the
    n-th pass of every rank makes as many scorer calls as the busiest rank's n-th pass (the
    extra ones dropped), and no list is padded to the longest."""
    from pixelbert.engine import retrieval_eval
    text = torch.eye(4)[[0, 0, 1, 2, 3]]  # texts 0 and 1 lie on axis 0, text 2 on 1, 3 on 2, 4 on 3
    image = torch.eye(4)[[0, 1, 3]] + torch.tensor([[0, 0.5, 0, 0], [0, 0, 0, 0], [0, 0, 0.4, 0]])

    class Vectors:
        def text_vectors(self, input_ids, attention_mask):
            return text[input_ids[:, 1]]

        def image_vectors(self, pixels, sizes, feat, cls_id):
            return image[pixels.flatten()[:1].long()]

        pixel_embeddings = SimpleNamespace(features=lambda pixels: pixels)

    class Reader:
        paths = ["a", "b", "c"]
        unreadable = torch.tensor([0, 0, 0])

        def __init__(self, readable):
            self.readable = readable

        def __iter__(self):
            for i in self.readable:
                yield i, torch.tensor([[float(i)]]), torch.tensor([[64, 64]])

    input_ids = torch.stack([torch.tensor([1, n]) for n in range(5)])
    cfg = SimpleNamespace(train=SimpleNamespace(eval_batch_size=2))
    dist = SimpleNamespace(world_size=1, device=torch.device("cpu"))
    setup = SimpleNamespace(cfg=cfg, dist=dist)

    def shortlists(reader):
        similarity = retrieval_eval.contrastive_similarity(Vectors(), setup, reader, input_ids, torch.ones_like(input_ids))
        return retrieval_eval.two_way_shortlist(similarity, 1)

    def calls(plan, passes):
        return [[(rows.tolist(), keep) for rows, keep in plan(n, i)] for n, i in enumerate(passes)]

    plan = retrieval_eval.scoring_plan(shortlists(Reader([0, 1, 2])), 5, 16, None)
    # Image 0 (axis 0, a little of 1): nearest text 0 (ties with 1: the first), and texts 0, 1
    # have it nearest; image 1: text 2; image 2 (axis 3, a little of 2): text 4, and text 3.
    assert calls(plan, [0, 1, 2]) == [[([0, 1], True)], [([2], True)], [([3, 4], True)]]
    reader = Reader([0, 2])
    reader.unreadable = torch.tensor([0, 5, 0])  # image 1 unreadable: text 2 goes to image 0's list
    chosen = shortlists(reader)
    assert [row.nonzero().flatten().tolist() for row in chosen] == [[0, 1, 2], [], [3, 4]]
    # Two ranks, two pairs per call: rank 0 reads images 0 and 2, rank 1 a blank for image 1,
    # then a filler pass. Both make 2 calls, then 1; only the lists' own pairs are kept.
    plan = retrieval_eval.scoring_plan(chosen, 5, 2, [range(0, 3, 2), range(1, 3, 2)])
    assert calls(plan, [0, 2]) == [[([0, 1], True), ([2], True)], [([3, 4], True)]]
    assert calls(plan, [None, None]) == [[([0], False)] * 2, [([0], False)]]
    # Without shortlists every image takes every text: every pass makes the same calls.
    plan = retrieval_eval.scoring_plan(None, 5, 2, [range(0, 3, 2), range(1, 3, 2)])
    assert [len(c) for c in calls(plan, [0, 2])] == [len(c) for c in calls(plan, [1, None])] == [3, 3]
    assert [rows for rows, keep in calls(plan, [1])[0] if keep] == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("decoder", ["pil", "dali"])
def test_equal_pass_reader_keeps_each_images_place(tmp_path, decoder):
    """Under equal_passes a rank's n-th pass is the n-th image of its share or a blank in its
    place (an unreadable one, then fillers up to the busiest rank's count), so that ranks can
    plan their passes by position; without it the unreadable images are left out."""
    from pixelbert.engine.eval_setup import EvalSetup
    from pixelbert.engine.retrieval_eval import ImageReader
    if decoder == "dali":
        pytest.importorskip("nvidia.dali")
    from PIL import Image
    paths = []
    for n in range(5):
        path = tmp_path / f"{n}.jpg"
        Image.fromarray(np.random.default_rng(n).integers(0, 255, (40 + 8 * n, 48, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    Path(paths[1]).write_bytes(Path(paths[1]).read_bytes()[:100])  # truncated
    Path(paths[2]).unlink()  # missing
    cfg = load_config("configs/tiny.json", ["data.num_workers=0", f"data.decoder={decoder}",
                                            "data.image_shorter=64", "data.image_longer=128"])
    decoded = None
    if decoder == "dali":
        from pixelbert.engine.eval_setup import eval_decoder
        decoded = eval_decoder(cfg, torch.device("cpu"))[0]
    for equal, expected in ((True, [[0, None, 4], [None, 3, None]]), (False, [[0, 4], [3]])):
        seen = []
        for rank in (0, 1):
            setup = EvalSetup(cfg, None, DistInfo(rank, 2, rank, torch.device("cpu")), equal_passes=equal,
                              decoder=decoded)
            reader = ImageReader(paths, setup)
            passes = list(reader)
            seen.append([i for i, _, _ in passes])
            assert all(pixels.shape[0] == 1 and pixels.shape[2] >= 64 for _, pixels, _ in passes)
            assert reader.unreadable.nonzero().flatten().tolist() == [[2], [1]][rank]
        assert seen == expected


class PairScorer:
    """A retrieval model whose scores and contrastive vectors depend on the pair alone (the
    image's pixels, the text's tokens) and never on which pairs share a pass: integer text keys,
    elementwise maths."""
    pixel_embeddings = SimpleNamespace(features=lambda pixels: pixels)

    @staticmethod
    def text_key(input_ids, attention_mask):
        return (input_ids * attention_mask * torch.arange(1, input_ids.shape[1] + 1) ** 2).sum(1).double()

    def scores(self, batch, feat):
        return torch.sin(0.0137 * self.text_key(batch["input_ids"], batch["attention_mask"]) + 40 * feat.double().mean())

    def text_vectors(self, input_ids, attention_mask):
        key = self.text_key(input_ids, attention_mask)
        return torch.nn.functional.normalize(torch.stack([torch.sin(key * a) for a in (0.011, 0.023, 0.031)], 1), dim=1).float()

    def image_vectors(self, pixels, sizes, feat, cls_id):
        key = feat.double().mean()
        return torch.nn.functional.normalize(torch.stack([torch.sin(key * a) for a in (31.0, 57.0, 83.0)])[None], dim=1).float()


@pytest.mark.parametrize("shortlist", [0, 3])
def test_retrieval_folds_report_what_each_fold_alone_gives(synth, records, tok, tmp_path, shortlist):
    """task.retrieval_folds (COCO's 1K test: 5 folds of the 5K split): the folds are runs of the
    split's order, each fold's report is exactly that of evaluating its images alone (with its
    own shortlists), an unreadable image leaves its fold only, and the mean averages the folds."""
    import dataclasses
    from pixelbert.engine import evaluator
    from pixelbert.engine.distributed import DistInfo
    from pixelbert.engine.eval_setup import EvalSetup
    by_image: dict[str, list] = {}
    for r in records["retrieval"]:
        by_image.setdefault(r.image, []).append(r)
    chosen = list(by_image)[:11]
    order = [chosen[i] for i in torch.randperm(11, generator=torch.Generator().manual_seed(3)).tolist()]
    assert order != sorted(order)  # folds must follow the split's order, not the paths'
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    by_image[order[5]] = [dataclasses.replace(r, image=str(broken)) for r in by_image[order[5]]]
    split = [r for image in order for r in by_image[image]]
    fold_images = [order[:4], order[4:8], order[8:]]  # 11 images in 3 folds: 4, 4, 3

    def evaluate(recs, folds):
        cfg = load_config("configs/tiny.json", [
            f"train.output_dir={tmp_path}", f"data.synthetic_dir={synth}", "train.task=retrieval",
            "data.image_shorter=64", "data.image_longer=128", "data.num_workers=0", "train.eval_batch_size=2",
            "data.max_bad_fraction=0.5", f"task.shortlist={shortlist}",
            f"task.contrastive_weight={float(shortlist > 0)}", f"task.retrieval_folds={folds}"])
        setup = EvalSetup(cfg, tok, DistInfo(0, 1, 0, torch.device("cpu")))
        with torch.no_grad():
            report = evaluator.evaluate(PairScorer(), setup, recs, "val", SkipCounter())
        assert report.pop("rankings_file") == str(tmp_path / "retrieval_val_rankings.json")  # a fold's report has none
        return report

    whole = evaluate(split, 3)
    alone = [evaluate([r for image in images for r in by_image[image]], 0) for images in fold_images]
    assert whole["folds"]["count"] == 3 and whole["folds"]["each"] == alone
    assert [fold["images"] for fold in alone] == [4, 3, 3] and whole["images"] == 10
    for key, mean in whole["folds"]["mean"].items():
        assert mean == pytest.approx(sum(fold[key] for fold in alone) / 3)
    assert {"i2t_r1", "t2i_r10", "mean"} <= set(whole["folds"]["mean"])
    assert 0 < whole["folds"]["mean"]["mean"] < 100 and whole["mean"] < whole["folds"]["mean"]["mean"]
    if shortlist:  # the folds' own lists are scored too: more pairs than the split's lists alone
        assert whole["pairs_scored"] < evaluate(split, 0)["pairs_scored"] + sum(f["pairs_scored"] for f in alone)
        assert whole["folds"]["mean"]["shortlist_coverage"] > 0
    else:
        assert whole["pairs_scored"] == whole["images"] * whole["texts"]


def test_evaluate_cli_end_to_end(synth, records, tmp_path, capsys):
    from pixelbert import evaluate
    run = tmp_path / "run"
    build_tokenizer(DATA, [r.text for r in records["nlvr2"]], run / "tokenizer", 100)  # the run's vocabulary
    cfg = load_config("configs/tiny.json", [f"train.output_dir={run}", f"data.synthetic_dir={synth}",
                                            "data.synthetic_images=40", "train.task=nlvr2",
                                            "model.backbone_weights=null",
                                            "data.image_shorter=64", "data.image_longer=128"])
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    model = PixelBertForNLVR2(cfg.model)
    torch.save(model.state_dict(), run / "weights.pt")
    assert evaluate.main(["--config", str(run / "config.json"), "--checkpoint", str(run / "weights.pt")]) == 0
    report = json.loads((run / "eval_nlvr2_val.json").read_text())
    assert 0 <= report["accuracy"] <= 100 and report["split"] == "val"
    assert evaluate.main(["--config", str(run / "config.json"), "--checkpoint", str(tmp_path / "nothing")]) == 2
    # A checkpoint without the task's head (a pre-training one) would leave it random: refused.
    torch.save(PixelBert(cfg.model).state_dict(), run / "pretrain.pt")
    assert evaluate.main(["--config", str(run / "config.json"), "--checkpoint", str(run / "pretrain.pt")]) == 2
    assert "lacks" in capsys.readouterr().err
    # --out: the outputs go elsewhere (a read-only run folder), the run's tokenizer is still used.
    out = tmp_path / "out"
    assert evaluate.main(["--config", str(run / "config.json"), "--checkpoint", str(run / "weights.pt"),
                          "--out", str(out)]) == 0
    elsewhere = json.loads((out / "eval_nlvr2_val.json").read_text())
    assert {k: v for k, v in elsewhere.items() if k != "eval_s"} == {k: v for k, v in report.items() if k != "eval_s"}
    assert (out / "records-eval-val" / "data.npy").is_file() and not (out / "tokenizer").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    capsys.readouterr()
    assert evaluate.main(["--config", str(run / "config.json"), "--checkpoint", str(run / "weights.pt"),
                          "--out", str(blocker / "out")]) == 2
    assert "cannot write the evaluation's outputs" in capsys.readouterr().err


@pytest.mark.parametrize("shortlist", [0, 2])
def test_retrieval_rankings_file_gives_the_reports_recalls(tmp_path, shortlist):
    """The rankings file names each image's and each text's best matches, best first: read
    back, its top 10s give the report's recalls (and with a shortlist hold only its pairs, not
    the pairs scored for the folds' own shortlists)."""
    from pixelbert import evaluate
    synth = tmp_path / "synthetic"
    synthetic.generate(synth, 100 if shortlist else 40, 3)
    run, val = eval_run(tmp_path, synth, "retrieval", f"task.shortlist={shortlist}", "data.num_workers=0",
                        f"task.contrastive_weight={float(shortlist > 0)}",
                        f"data.synthetic_images={100 if shortlist else 40}",
                        f"task.retrieval_folds={2 if shortlist else 0}")  # folds: more pairs scored than listed
    assert evaluate.main(["--config", str(run / "config.json"), "--checkpoint", str(run / "weights.pt")]) == 0
    report = json.loads((run / "eval_retrieval_val.json").read_text())
    rankings = json.loads(Path(report["rankings_file"]).read_text())
    assert Path(report["rankings_file"]) == run / "retrieval_val_rankings.json"
    assert rankings["images"] == list(dict.fromkeys(r.image for r in val))
    assert [(t["text"], rankings["images"][t["image"]]) for t in rankings["texts"]] == [(r.text, r.image) for r in val]
    assert (len(rankings["image_to_text"]), len(rankings["text_to_image"])) == (report["images"], report["texts"])
    for lists, size in ((rankings["image_to_text"], report["texts"]), (rankings["text_to_image"], report["images"])):
        for best in lists:
            scores = [m["score"] for m in best]
            assert scores == sorted(scores, reverse=True)
            assert len(best) == min(10, size) or shortlist  # a shortlist may hold fewer
    listed = sum(map(len, rankings["image_to_text"]))
    assert (listed < report["images"] * min(10, report["texts"])) == bool(shortlist)
    image_of = [t["image"] for t in rankings["texts"]]
    for k in (1, 5, 10):  # at k >= the candidates every query hits, its unscored pairs included
        i2t = [any(image_of[m["text"]] == i for m in best[:k]) for i, best in enumerate(rankings["image_to_text"])]
        t2i = [any(m["image"] == image_of[t] for m in best[:k]) for t, best in enumerate(rankings["text_to_image"])]
        assert (100.0 * sum(i2t) / len(i2t) if k < report["texts"] else 100.0) == pytest.approx(report[f"i2t_r{k}"])
        assert (100.0 * sum(t2i) / len(t2i) if k < report["images"] else 100.0) == pytest.approx(report[f"t2i_r{k}"])
    assert report["images"] > 1 and 0 < report["t2i_r1"] < 100  # not all trivially


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "retrieval"])
def test_evaluation_counts_unreadable_images_and_never_substitutes(tmp_path, task, capsys):
    """An evaluation image that cannot be read is counted, reported and kept out of the metric
    (VQA answers its questions with the most frequent answer: the results file must be
    complete); it is never replaced by another record, and too many stop with exit code 3."""
    from pixelbert import evaluate
    synth = tmp_path / "synthetic"
    synthetic.generate(synth, 40, 3)
    run, val = eval_run(tmp_path, synth, task)
    args = ["--config", str(run / "config.json"), "--checkpoint", str(run / "weights.pt")]
    assert evaluate.main(args) == 0
    clean = json.loads((run / f"eval_{task}_val.json").read_text())
    assert clean["skipped"] == {}
    broken = Path(val[0].images[1] if val[0].images else val[0].image)
    head = broken.read_bytes()[:200]  # the header survives, the pixels do not
    broken.unlink()  # the synthetic set hard-links its images: cut this path only
    broken.write_bytes(head)
    on_it = [r for r in val if str(broken) in (r.images or (r.image,))]
    assert evaluate.main(args + ["data.max_bad_fraction=0.5"]) == 0
    report = json.loads((run / f"eval_{task}_val.json").read_text())
    skipped = 1 if task == "retrieval" else len(on_it)  # images ranked, or records answered
    assert report["skipped"] == {"truncated": skipped}
    assert f"records skipped (unreadable image or empty text): truncated {skipped}" in capsys.readouterr().err
    if task == "vqa":
        results = json.loads(Path(report["results_file"]).read_text())
        assert sorted(r["question_id"] for r in results) == sorted(r.question_id for r in val)
        assert report["fallback_answers"] == len(on_it) and report["questions"] == len(val)
    elif task == "nlvr2":
        assert report["statements"] == clean["statements"] - len(on_it) == len(val) - len(on_it)
    else:
        assert (report["images"], report["texts"]) == (clean["images"] - 1, clean["texts"] - len(on_it))
        rankings = json.loads(Path(report["rankings_file"]).read_text())
        assert rankings["images"] == [image for image in dict.fromkeys(r.image for r in val) if image != str(broken)]
        assert [(t["text"], rankings["images"][t["image"]]) for t in rankings["texts"]] == \
            [(r.text, r.image) for r in val if r.image != str(broken)]
    assert evaluate.main(args + ["data.max_bad_fraction=0.0"]) == 3
    assert "Examples: truncated: " + str(broken) in capsys.readouterr().err


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "retrieval"])
def test_evaluation_decoded_by_dali_matches_pil(tmp_path, task):
    """data.decoder=dali in evaluation: the workers read file bytes and DALI (its CPU pipeline
    here) decodes a batch at a time. The same records are evaluated and skipped (a truncated
    image passes the header check and fails in DALI), and every score agrees with PIL's within
    what a level or two of pixel difference moves a model."""
    pytest.importorskip("nvidia.dali")
    from pixelbert.engine.distributed import DistInfo
    from pixelbert.engine.eval_setup import EvalSetup, eval_decoder
    from pixelbert.engine.evaluator import task_outputs
    from pixelbert.engine.retrieval_eval import retrieval_scores
    from pixelbert.model.tasks import build_model
    synth = tmp_path / "synthetic"
    # One item per batch: the broken image's batch decodes to nothing. Retrieval: 5 val images,
    # decoded 2 at a time (a batch decoder's calls hold 2 x eval_batch_size images, or a micro-batch).
    run, val = eval_run(tmp_path, synth, task, "data.synthetic_images=100", "train.eval_batch_size=1",
                        "deepspeed.train_micro_batch_size_per_gpu=2", "data.captions_per_image=1",
                        "data.max_bad_fraction=0.5",
                        "data.num_workers=1")
    broken = Path(val[1].images[1] if task == "nlvr2" else val[1].image)
    head = broken.read_bytes()[:200]
    broken.unlink()
    broken.write_bytes(head)
    dist = DistInfo(0, 1, 0, torch.device("cpu"))
    answers = AnswerVocabulary.load(run / "answers.txt") if task == "vqa" else None
    outputs, skips = {}, {}
    for name in ("pil", "dali"):
        cfg = load_config(run / "config.json", [f"data.decoder={name}"])
        model = build_model(cfg, len(answers.answers) if answers else None).eval()
        load_weights(model, run / "weights.pt")
        decoder, decoder_name = eval_decoder(cfg, dist.device)
        assert (decoder is None) == (name == "pil") and decoder_name.startswith(name.upper()[:3])
        setup = EvalSetup(cfg, run_tokenizer(cfg.data, run), dist, answers, decoder=decoder)
        skips[name] = SkipCounter()
        with torch.no_grad():
            if task == "retrieval":
                outputs[name] = retrieval_scores(model, setup, val, skips[name]).scores
            else:
                dataset = TaskDataset(task, val, setup.tokenizer, cfg.data, answers=answers, replace_bad=False,
                                      encoded_images=decoder is not None)
                outputs[name] = torch.cat([logits for _, logits in task_outputs(dataset, setup, skips[name],
                                                                                 model.logits)])
    on_broken = 1 if task == "retrieval" else sum(str(broken) in (r.images or (r.image,)) for r in val)
    assert skips["pil"].counts == skips["dali"].counts == {"truncated": on_broken}
    assert skips["pil"].attempts == skips["dali"].attempts
    assert outputs["pil"].shape == outputs["dali"].shape
    assert not torch.equal(outputs["pil"], outputs["dali"])  # a different decoder really ran
    if task != "retrieval":  # Seen: at most 3e-4 of a spread of 0.7-1.1 (VQA and NLVR2 logits).
        torch.testing.assert_close(outputs["dali"], outputs["pil"], rtol=0, atol=0.01 * outputs["pil"].std().item())
    else:  # an untrained model's scores hang on the text: compare what the image adds
        image_part = {name: scores - scores.mean(0) for name, scores in outputs.items()}
        # Seen over 12 random inits: at most 0.15 of its spread (the whole scores moved 0.7-2 %
        # of theirs, which are the text's); images swapped would move it by the spread.
        torch.testing.assert_close(image_part["dali"], image_part["pil"], rtol=0,
                                   atol=0.25 * image_part["pil"].std().item())


def test_repeated_vqa_evaluation_reads_each_file_once_per_process(tmp_path, monkeypatch):
    """Validation runs many times in a training run: the val records are packed into the run
    once (records-eval-val/), and the training annotations behind the question-type baseline
    are read once per process; the val annotations (the accuracy itself) at each evaluation,
    by the main rank alone. The reports stay the same."""
    from pixelbert import evaluate
    from pixelbert.engine import data as engine_data, evaluator
    synth = tmp_path / "synthetic"
    run, _ = eval_run(tmp_path, synth, "vqa")
    sources, annotations = [], []
    read_source, read_json = engine_data.read_source, evaluator.read_json
    monkeypatch.setattr(engine_data, "read_source", lambda source: sources.append(source) or read_source(source))
    monkeypatch.setattr(evaluator, "read_json", lambda path: annotations.append(Path(path).name) or read_json(path))
    evaluator.type_answers.cache_clear()
    reports = []
    for _ in range(2):
        assert evaluate.main(["--config", str(run / "config.json"), "--checkpoint", str(run / "weights.pt")]) == 0
        reports.append(json.loads((run / "eval_vqa_val.json").read_text()))
    assert len(sources) == 1 and (run / "records-eval-val" / "data.npy").is_file()
    assert sorted(annotations) == ["vqa_annotations_train.json"] + ["vqa_annotations_val.json"] * 2
    assert reports[0]["question_type_prior_baseline"] > 0
    assert [{k: v for k, v in r.items() if k != "eval_s"} for r in reports] == \
        [{k: v for k, v in reports[0].items() if k != "eval_s"}] * 2


def test_empty_questions_are_counted_in_training_and_answered_in_evaluation(tmp_path, capsys):
    """A VQA question with no text is a counted skip in training; in evaluation it is counted
    and still answered (the official results file must cover every question)."""
    from pixelbert import evaluate
    from pixelbert.engine.data import build_training_data
    from pixelbert.engine.distributed import DistInfo
    synth = tmp_path / "synthetic"
    run, val = eval_run(tmp_path, synth, "vqa")  # writes the synthetic set: blank questions after
    blanked = {}
    for split in ("train", "val"):
        path = synth / "annotations" / f"vqa_questions_{split}.json"
        questions = json.loads(path.read_text())
        questions["questions"][1]["question"] = "   "
        blanked[split] = questions["questions"][1]["question_id"]
        path.write_text(json.dumps(questions))
    cfg = load_config(run / "config.json", [f"train.output_dir={tmp_path / 'train'}"])  # keep run/answers.txt
    data = build_training_data(cfg, DistInfo(0, 1, 0, torch.device("cpu")))
    assert [reason for reason, _ in data.startup_skips] == ["empty_text"]
    assert str(blanked["train"]) in data.startup_skips[0][1]
    assert evaluate.main(["--config", str(run / "config.json"), "--checkpoint", str(run / "weights.pt"),
                          "data.max_bad_fraction=0.5"]) == 0
    report = json.loads((run / "eval_vqa_val.json").read_text())
    assert report["skipped"] == {"empty_text": 1} and report["fallback_answers"] == 1
    results = json.loads(Path(report["results_file"]).read_text())
    assert blanked["val"] in {r["question_id"] for r in results} and len(results) == len(val)


@pytest.mark.slow
@pytest.mark.parametrize("task,shortlist", [("vqa", 0), ("nlvr2", 0), ("retrieval", 0), ("retrieval", 2)])
def test_evaluation_on_two_ranks_equals_one(tmp_path, task, shortlist):
    """Sharded evaluation (VQA and NLVR2 batches, retrieval images, split over the ranks; the
    predictions, scores and skips merged) gives exactly the one-rank report, with an unreadable
    image in rank 1's share that rank 0 learns of only by the merge."""
    from tests.launch import clean_env, run_deepspeed
    synth = tmp_path / "synthetic"
    synthetic.generate(synth, 40, 3)
    # Batches of 3: VQA's 16 questions make 6 batches, NLVR2's 8 statements 3.
    run, val = eval_run(tmp_path, synth, task, f"task.shortlist={shortlist}", "data.max_bad_fraction=0.5",
                        "train.eval_batch_size=3", f"task.contrastive_weight={float(shortlist > 0)}",
                        f"data.synthetic_images={100 if shortlist else 40}",  # shortlists: 5 val images, not 2
                        f"task.retrieval_folds={2 if shortlist else 0}")
    if task == "retrieval":  # image i is on rank i mod 2
        broken = Path(list(dict.fromkeys(r.image for r in val))[1])  # in the split's order
    else:  # record 4 is in batch 1, on rank 1
        broken = Path(val[4].images[1] if task == "nlvr2" else val[4].image)
    head = broken.read_bytes()[:200]
    broken.unlink()
    broken.write_bytes(head)
    reports, results = [], []
    for ranks in (1, 2):
        (run / f"eval_{task}_val.json").unlink(missing_ok=True)
        result = run_deepspeed(["--module", "pixelbert.evaluate", "--config", str(run / "config.json"),
                                "--checkpoint", str(run / "weights.pt")], ranks, clean_env(OMP_NUM_THREADS="1"), 600)
        assert result.returncode == 0, result.stderr[-3000:]
        reports.append(json.loads((run / f"eval_{task}_val.json").read_text()))
        if task == "vqa":
            results.append(json.loads(Path(reports[-1]["results_file"]).read_text()))
        elif task == "retrieval":
            results.append(json.loads(Path(reports[-1]["rankings_file"]).read_text()))
    one, two = reports
    on_broken = sum(str(broken) in (r.images or (r.image,)) for r in val)
    assert one["skipped"] == two["skipped"] == {"truncated": 1 if task == "retrieval" else on_broken}
    if task == "vqa":
        assert one["fallback_answers"] == on_broken and sorted(results[0], key=str) == sorted(results[1], key=str)
    if shortlist:  # fewer pairs scored than all, every image's and every text's nearest 2 at least
        assert one["mode"] == "shortlist top 2" and 0 < one["shortlist_coverage"] <= 100
        assert [fold["images"] for fold in one["folds"]["each"]] == [2, 2]  # 3 and 2, one unreadable
        assert max(2 * one["images"], 2 * one["texts"]) <= one["pairs_scored"] < one["images"] * one["texts"]
    elif task == "retrieval":
        assert one["pairs_scored"] == one["images"] * one["texts"]
    if task == "retrieval":  # the merged scores are each image's own rank's: the same lists
        assert results[0] == results[1]
    same = lambda report: {k: v for k, v in report.items() if k not in ("checkpoint", "eval_s")}  # noqa: E731
    assert same(one) == same(two) and one["eval_s"] > 0


def test_backbone_pretraining_on_synthetic_labels(synth, tmp_path):
    """The ImageNet stand-in: the loss falls, and the weights load as model.backbone_weights."""
    from pixelbert.model.backbone import build_backbone
    from pixelbert.tools.pretrain_backbone import pretrain, scene_labels
    scene = {"shapes": [{"color": "red", "kind": "circle"}, {"color": "blue", "kind": "circle"}]}
    assert scene_labels(scene).sum() == 2 + 2 + 1  # two pairs, two colours, one shape
    losses = pretrain(synth, tmp_path / "cnn.pth", steps=30, batch=8, shorter=64, longer=128, log_every=0)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    build_backbone("tiny", frozen_bn=False, weights=tmp_path / "cnn.pth")  # loads strictly
    assert all(t.is_contiguous() for t in torch.load(tmp_path / "cnn.pth").values())  # saved in the usual layout, trained channels-last


@pytest.mark.parametrize("args", [["--backbone", "nope"], ["--steps", "0"], ["--batch", "-1"], ["--lr", "0"]])
def test_backbone_pretraining_refuses_bad_arguments(tmp_path, capsys, args):
    from pixelbert.tools.pretrain_backbone import main
    with pytest.raises(SystemExit) as stopped:
        main(["--synthetic", str(tmp_path / "never"), "--out", str(tmp_path / "cnn.pth"), *args])
    assert stopped.value.code == 2 and "error:" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()  # refused before generating anything
