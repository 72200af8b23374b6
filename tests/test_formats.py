"""Readers of the published formats, on the synthetic set (checked against its scenes) and on
hand-written files for the layouts and errors the synthetic set does not show."""
from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from pixelbert.data import synthetic
from pixelbert.data.synthetic import VG_ID_OFFSET
from pixelbert.data.formats import (read_coco_captions, read_karpathy, read_nlvr2, read_vg_regions,
                                    read_vqa)

NUM_IMAGES = 60
SEED = 3
COLORS = "|".join(synthetic.PALETTE)
KINDS = "|".join(synthetic.SHAPES)
POSITION_OF_PHRASE = {phrase: word for word, phrase in synthetic.POSITION_PHRASES.items()}
NUMBER = {word: n for n, word in synthetic.NUMBER_WORDS.items()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    synthetic.generate(out, NUM_IMAGES, SEED)
    return out


def scenes_of(root: Path, split: str) -> dict[int, synthetic.Scene]:
    return {s.image_id: s for s in synthetic.load_scenes(root, split)}


def ann(root: Path, name: str) -> Path:
    return root / "annotations" / name


def write(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj, indent=1))
    return path


# ---- COCO captions ----------------------------------------------------------------------

def test_coco_captions_sizes(synth, tmp_path):
    scenes = scenes_of(synth, "val")
    records = read_coco_captions(ann(synth, "captions_val.json"), synth / "images")
    assert len(records) == synthetic.CAPTIONS_PER_IMAGE * len(scenes)
    for r in records:
        assert r.size == (scenes[r.image_id].height, scenes[r.image_id].width) and r.coco_id == r.image_id
        assert Path(r.image).name == scenes[r.image_id].file_name and Path(r.image).is_file()
    partial = write(tmp_path / "c.json", {
        "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2, "file_name": "b.jpg", "height": 5, "width": 7}],
        "annotations": [{"id": 1, "image_id": 1, "caption": " x\n"}, {"id": 2, "image_id": 2, "caption": "  "}]})
    a, b = read_coco_captions(partial, tmp_path)
    assert (a.size, a.text, b.size, b.text) == (None, "x", (5, 7), "")  # empty text kept


# ---- Visual Genome ----------------------------------------------------------------------

def test_vg_regions_synthetic(synth):
    for split in ("train", "val"):
        scenes = scenes_of(synth, split)
        raw = json.loads(ann(synth, f"region_descriptions_{split}.json").read_text())
        records = read_vg_regions(ann(synth, f"region_descriptions_{split}.json"), synth / "vg",
                                  ann(synth, "image_data.json"))
        assert [r.text for r in records] == [g["phrase"] for e in raw for g in e["regions"]]
        # VG numbers its images apart from COCO; image_data.json gives each its COCO id
        assert {r.coco_id for r in records} == set(scenes)
        assert all(r.image_id == r.coco_id + VG_ID_OFFSET for r in records)
        for r in records:
            assert r.image == str(synth / "vg" / f"{r.image_id}.jpg")
            original = synth / "images" / scenes[r.coco_id].file_name
            assert Path(r.image).read_bytes() == original.read_bytes()
        for entry in raw:
            shapes = scenes[entry["id"] - VG_ID_OFFSET].shapes
            assert len(entry["regions"]) == len(shapes) + (len(shapes) >= 2)
            for region, s in zip(entry["regions"], shapes):  # one region per shape, then a relation
                assert region["image_id"] == entry["id"]
                named = re.findall(rf"\b({COLORS}) ({KINDS})\b", region["phrase"])
                assert named == [(s.color, s.kind)], region
                x0, y0, x1, y1 = s.box
                assert (region["x"], region["y"], region["width"], region["height"]) == \
                    (x0, y0, x1 - x0 + 1, y1 - y0 + 1)
                if m := re.search(r"\b(small|large) ", region["phrase"]):
                    assert m[1] == s.size
                if m := re.search(r" ((?:on|at|in) the \w+)$", region["phrase"]):
                    assert POSITION_OF_PHRASE[m[1]] == s.position
            if len(shapes) >= 2:
                named = set(re.findall(rf"\b({COLORS}) ({KINDS})\b", entry["regions"][-1]["phrase"]))
                assert len(named) == 2 and named <= {(s.color, s.kind) for s in shapes}
    ids = [g["region_id"] for split in ("train", "val") for e in
           json.loads(ann(synth, f"region_descriptions_{split}.json").read_text()) for g in e["regions"]]
    assert len(set(ids)) == len(ids)


def test_vg_regions_two_folders(tmp_path):
    first, second = tmp_path / "VG_100K", tmp_path / "VG_100K_2"
    for folder, ids in ((first, (1, 3)), (second, (2, 3))):
        folder.mkdir()
        for i in ids:
            (folder / f"{i}.jpg").write_bytes(b"jpeg")
    region = {"region_id": 9, "image_id": 0, "x": 0, "y": 0, "width": 2, "height": 2}
    regions = write(tmp_path / "region_descriptions.json", [
        {"id": i, "regions": [{**region, "image_id": i, "phrase": f" phrase {i} "}]} for i in (1, 2, 3, 4)]
        + [{"id": 5, "regions": [{**region, "image_id": 5, "phrase": " "}]}])
    records = read_vg_regions(regions, f"{first},{second}")
    assert [(r.image_id, r.image, r.text) for r in records] == [
        (1, str(first / "1.jpg"), "phrase 1"), (2, str(second / "2.jpg"), "phrase 2"),
        (3, str(first / "3.jpg"), "phrase 3"),  # in both: the first folder's
        (4, str(first / "4.jpg"), "phrase 4"),  # in none: the first folder's path, a skip at load time
        (5, str(first / "5.jpg"), "")]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"region_descriptions\.json.*{re.escape(str(empty))}"):
        read_vg_regions(regions, empty)  # not one image: a wrong folder, not bad records
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "VG_100K_3"))):
        read_vg_regions(regions, f"{first},{tmp_path / 'VG_100K_3'}")
    assert read_vg_regions(write(tmp_path / "none.json", []), empty) == []


def test_vg_image_data_names_the_coco_images(tmp_path):
    """With VG's image_data.json a region of an image VG took from COCO carries its COCO id (VG
    numbers its images itself); the others carry none, as without the file."""
    (tmp_path / "vg").mkdir()
    for vg_id in (101, 102):
        (tmp_path / "vg" / f"{vg_id}.jpg").write_bytes(b"jpeg")
    region = {"region_id": 1, "x": 0, "y": 0, "width": 2, "height": 2, "phrase": "a phrase"}
    regions = write(tmp_path / "region_descriptions.json",
                    [{"id": i, "regions": [{**region, "image_id": i}]} for i in (101, 102)])
    image_data = write(tmp_path / "image_data.json", [
        {"image_id": 101, "coco_id": 7, "flickr_id": None, "width": 5, "height": 5, "url": "u"},
        {"image_id": 102, "coco_id": None, "flickr_id": 3, "width": 5, "height": 5, "url": "u"}])
    assert [(r.image_id, r.coco_id) for r in read_vg_regions(regions, tmp_path / "vg", image_data)] == \
        [(101, 7), (102, None)]
    assert [r.coco_id for r in read_vg_regions(regions, tmp_path / "vg")] == [None, None]
    with pytest.raises(ValueError, match=r"image_data\.json: not a Visual Genome image_data file"):
        read_vg_regions(regions, tmp_path / "vg", write(tmp_path / "image_data.json", {"images": []}))
    with pytest.raises(ValueError, match=r"entry 0 has no 'coco_id'"):
        read_vg_regions(regions, tmp_path / "vg", write(tmp_path / "image_data.json", [{"image_id": 101}]))


# ---- VQA --------------------------------------------------------------------------------

def vqa_truth(question: str, scene: synthetic.Scene) -> str:
    """The answer to a synthetic question, worked out from the scene."""
    shapes = scene.shapes
    if question == "how many shapes are there?":
        return str(len(shapes))
    if m := re.fullmatch(rf"what color is the ({KINDS})\?", question):
        (shape,) = [s for s in shapes if s.kind == m[1]]  # asked only when the kind is unique
        return shape.color
    if m := re.fullmatch(r"what color is the shape (.+)\?", question):
        (shape,) = [s for s in shapes if s.position == POSITION_OF_PHRASE[m[1]]]
        return shape.color
    if m := re.fullmatch(rf"is there an? ({COLORS}) ({KINDS})\?", question):
        return "yes" if any((s.color, s.kind) == (m[1], m[2]) for s in shapes) else "no"
    if m := re.fullmatch(rf"where is the ({COLORS}) ({KINDS})\?", question):
        (shape,) = [s for s in shapes if (s.color, s.kind) == (m[1], m[2])]
        return shape.position
    raise AssertionError(f"unknown question {question!r}")


def test_vqa_synthetic(synth):
    kinds, yes_no, dissenting = Counter(), Counter(), 0
    for split in ("train", "val"):
        scenes = scenes_of(synth, split)
        records = read_vqa(ann(synth, f"vqa_questions_{split}.json"),
                           ann(synth, f"vqa_annotations_{split}.json"), synth / "images")
        assert {r.image_id for r in records} == set(scenes)
        for r in records:
            assert Path(r.image).name == scenes[r.image_id].file_name and Path(r.image).is_file()
            assert r.coco_id == r.image_id and len(r.answers) == 10
            truth = vqa_truth(r.text, scenes[r.image_id])
            top, votes = Counter(r.answers).most_common(1)[0]
            assert top == truth and votes >= 8, (r.text, r.answers, truth)
            dissenting += votes < 10
            kinds[r.text.split()[0]] += 1
            if truth in ("yes", "no"):
                yes_no[truth] += 1
        assert len({r.question_id for r in records}) == len(records)
    assert set(kinds) == {"what", "how", "is", "where"}
    total = sum(kinds.values())
    assert 0.05 * total < dissenting < 0.7 * total  # some near answers: the soft score means something
    assert abs(yes_no["yes"] - yes_no["no"]) <= 0.3 * sum(yes_no.values())


def test_vqa_annotation_layout(synth):
    raw = json.loads(ann(synth, "vqa_annotations_train.json").read_text())
    assert raw["data_subtype"] == synthetic.DATA_SUBTYPE
    for a in raw["annotations"]:
        assert set(a) >= {"question_id", "image_id", "answers", "multiple_choice_answer",
                          "answer_type", "question_type"}
        assert [x["answer_id"] for x in a["answers"]] == list(range(1, 11))
        assert a["multiple_choice_answer"] == Counter(x["answer"] for x in a["answers"]).most_common(1)[0][0]
        assert a["answer_type"] in ("yes/no", "number", "other")


@pytest.mark.parametrize("subtype", ["test2015", "test-dev2015"])
def test_vqa_test_split_without_annotations(tmp_path, subtype):
    # test-dev's questions (data_subtype "test-dev2015") are on a subset of the test2015 images,
    # which keep their COCO_test2015_ names.
    questions = write(tmp_path / "q.json", {"data_subtype": subtype, "questions": [
        {"image_id": 1, "question": " what is it? ", "question_id": 1000},
        {"image_id": 262144, "question": "", "question_id": 262144000}]})
    for no_annotations in (None, ""):
        records = read_vqa(questions, no_annotations, tmp_path / "test2015")
        assert [(r.image, r.text, r.question_id, r.answers) for r in records] == [
            (str(tmp_path / "test2015" / "COCO_test2015_000000000001.jpg"), "what is it?", 1000, None),
            (str(tmp_path / "test2015" / "COCO_test2015_000000262144.jpg"), "", 262144000, None)]


def test_vqa_join_errors(tmp_path):
    questions = write(tmp_path / "q.json", {"data_subtype": "val2014", "questions": [
        {"image_id": 1, "question": "q?", "question_id": 1000},
        {"image_id": 1, "question": "r?", "question_id": 1001}]})
    answers = [{"answer": "yes", "answer_confidence": "yes", "answer_id": k} for k in range(1, 11)]
    one = {"question_id": 1000, "image_id": 1, "answers": answers, "multiple_choice_answer": "yes",
           "answer_type": "yes/no", "question_type": "is the"}
    short = write(tmp_path / "a_short.json", {"annotations": [one]})
    with pytest.raises(ValueError, match=r"a_short\.json.*question_id 1001"):
        read_vqa(questions, short, tmp_path)
    extra = write(tmp_path / "a_extra.json", {"annotations": [
        one, {**one, "question_id": 1001}, {**one, "question_id": 1002}]})
    with pytest.raises(ValueError, match=r"a_extra\.json.*question_id 1002.*no question"):
        read_vqa(questions, extra, tmp_path)
    moved = write(tmp_path / "a_moved.json",
                  {"annotations": [one, {**one, "question_id": 1001, "image_id": 2}]})
    with pytest.raises(ValueError, match=r"a_moved\.json.*question_id 1001.*image_id"):
        read_vqa(questions, moved, tmp_path)
    good = write(tmp_path / "a.json", {"annotations": [one, {**one, "question_id": 1001}]})
    assert [r.answers for r in read_vqa(questions, good, tmp_path)] == [["yes"] * 10] * 2


# ---- NLVR2 ------------------------------------------------------------------------------

def nlvr2_truth(sentence: str, left: synthetic.Scene, right: synthetic.Scene) -> bool:
    """The label of a synthetic statement, worked out from the two scenes."""
    side = {"left": left, "right": right}
    if m := re.fullmatch(rf"the (left|right) image contains an? ({COLORS}) ({KINDS})", sentence):
        return any((s.color, s.kind) == (m[2], m[3]) for s in side[m[1]].shapes)
    if m := re.fullmatch(rf"both images contain an? ({KINDS})", sentence):
        return all(any(s.kind == m[1] for s in scene.shapes) for scene in (left, right))
    if m := re.fullmatch(rf"neither image contains an? ({COLORS}) shape", sentence):
        return not any(s.color == m[1] for s in left.shapes + right.shapes)
    if m := re.fullmatch(r"there are more shapes in the (left|right) image than in the (left|right) image",
                         sentence):
        return len(side[m[1]].shapes) > len(side[m[2]].shapes)
    if m := re.fullmatch(r"one of the images contains exactly (\w+) shapes?", sentence):
        return NUMBER[m[1]] in (len(left.shapes), len(right.shapes))
    raise AssertionError(f"unknown statement {sentence!r}")


def test_nlvr2_synthetic(synth):
    labels, families = Counter(), Counter()
    for split, name in (("train", "train"), ("val", "dev")):
        scenes = scenes_of(synth, split)
        by_file = {s.file_name: s for s in scenes.values()}
        path = ann(synth, f"nlvr2_{split}.jsonl")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        records = read_nlvr2(path, synth / "nlvr2" / name)
        assert len(records) == len(rows) == len(scenes) * synthetic.SENTENCES_PER_PAIR
        for r, row in zip(records, rows):
            assert r.image == "" and r.text == row["sentence"]
            assert r.image_id == row["identifier"].rsplit("-", 1)[0] and r.image_id.startswith(f"{name}-")
            assert ("directory" in row) == (split == "train")
            folder = synth / "nlvr2" / name / str(row.get("directory", ""))
            assert r.images == tuple(str(folder / f"{r.image_id}-img{k}.png") for k in (0, 1))
            left, right = (by_file[Path(row[k]).name] for k in ("left_url", "right_url"))
            assert left.image_id != right.image_id
            for image, scene in zip(r.images, (left, right)):
                assert Path(image).read_bytes() == (synth / "images" / scene.file_name).read_bytes()
            assert r.label == nlvr2_truth(r.text, left, right), (r.text, left, right)
            labels[r.label] += 1
            families[r.text.split()[0]] += 1
    assert abs(labels[True] - labels[False]) <= 0.2 * sum(labels.values())
    assert set(families) == {"the", "both", "neither", "there", "one"}  # every family in use
    train = read_nlvr2(ann(synth, "nlvr2_train.jsonl"), synth / "nlvr2" / "train")
    pairs = Counter(r.image_id for r in train)
    assert set(pairs.values()) == {synthetic.SENTENCES_PER_PAIR}  # statements share their pair


def test_nlvr2_directory_layout(tmp_path):
    rows = [{"identifier": "train-10171-0-0", "sentence": "Two dogs. ", "label": "True", "directory": "95"},
            {"identifier": "train-10171-0-1", "sentence": "", "label": "False", "directory": 3},
            {"identifier": "dev-850-1-0", "sentence": "x", "label": "False"}]
    path = write(tmp_path / "train.json", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    a, b, c = read_nlvr2(path, tmp_path / "images")
    assert (a.image_id, a.text, a.label, a.images) == (
        "train-10171-0", "Two dogs.", True,
        (str(tmp_path / "images" / "95" / "train-10171-0-img0.png"),
         str(tmp_path / "images" / "95" / "train-10171-0-img1.png")))
    assert (b.text, b.label, b.images[1]) == \
        ("", False, str(tmp_path / "images" / "3" / "train-10171-0-img1.png"))
    assert (c.image_id, c.images[0]) == ("dev-850-1", str(tmp_path / "images" / "dev-850-1-img0.png"))


def test_nlvr2_errors(tmp_path):
    good = json.dumps({"identifier": "dev-1-0-0", "sentence": "s", "label": "True"})
    with pytest.raises(ValueError, match=r"bad\.jsonl: invalid JSON on line 3"):
        read_nlvr2(write(tmp_path / "bad.jsonl", f"{good}\n{good}\n{{\"identifier\": \n"), tmp_path)
    for label in ("true", "1", True):
        row = json.dumps({"identifier": "dev-1-0-0", "sentence": "s", "label": label})
        with pytest.raises(ValueError, match=r"label\.jsonl: line 2: label must be"):
            read_nlvr2(write(tmp_path / "label.jsonl", f"{good}\n{row}\n"), tmp_path)
    with pytest.raises(ValueError, match=r"nolabel\.jsonl: line 1 has no 'label'"):
        no_label = json.dumps({"identifier": "dev-1-0-0", "sentence": "s"})
        read_nlvr2(write(tmp_path / "nolabel.jsonl", no_label), tmp_path)
    with pytest.raises(ValueError, match=r"ident\.jsonl: line 1: identifier 'dev-1-0'"):
        read_nlvr2(write(tmp_path / "ident.jsonl", json.dumps({"identifier": "dev-1-0", "sentence": "s",
                                                               "label": "True"})), tmp_path)


# ---- Karpathy ---------------------------------------------------------------------------

def test_karpathy_synthetic(synth):
    path = ann(synth, "dataset_synthetic.json")
    raw = json.loads(path.read_text())
    assert Counter(e["split"] for e in raw["images"]).keys() == {"train", "restval", "val", "test"}
    for splits, coco in (("train+restval", "captions_train.json"), ("val+test", "captions_val.json")):
        records = read_karpathy(path, synth, splits)
        expected = read_coco_captions(ann(synth, coco), synth / "images")
        assert [(r.image, r.image_id, r.text) for r in records] == \
            [(r.image, r.image_id, r.text) for r in expected]
    train = read_karpathy(path, synth, "train")
    restval = read_karpathy(path, synth, "restval")
    assert all(r.image_id % 10 == 0 for r in restval) and not any(r.image_id % 10 == 0 for r in train)
    for entry in raw["images"]:
        for s in entry["sentences"]:
            assert s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower())


def test_karpathy_flickr_layout_and_splits(tmp_path):
    path = write(tmp_path / "dataset_flickr30k.json", {"dataset": "flickr30k", "images": [
        {"filename": "1000092795.jpg", "imgid": 0, "split": "train",
         "sentences": [{"raw": "Two young guys. ", "tokens": []}, {"raw": " ", "tokens": []}]},
        {"filename": "10002456.jpg", "imgid": 1, "split": "restval", "sentences": [{"raw": "A dog."}]},
        {"filename": "1000268201.jpg", "imgid": 2, "split": "test", "sentences": [{"raw": "A girl."}]}]})
    records = read_karpathy(path, tmp_path / "flickr30k-images", "train+restval")
    assert [(r.image, r.image_id, r.text) for r in records] == [
        (str(tmp_path / "flickr30k-images" / "1000092795.jpg"), 0, "Two young guys."),
        (str(tmp_path / "flickr30k-images" / "1000092795.jpg"), 0, ""),
        (str(tmp_path / "flickr30k-images" / "10002456.jpg"), 1, "A dog.")]
    assert [r.text for r in read_karpathy(path, tmp_path, "test")] == ["A girl."]
    assert {r.coco_id for r in records} == {None}  # Flickr30K's images are not COCO's (data.exclude)
    coco = write(tmp_path / "dataset_coco.json", {"dataset": "coco", "images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "imgid": 0, "split": "test",
         "cocoid": 391895, "sentences": [{"raw": "A man riding a bike."}]}]})
    (r,) = read_karpathy(coco, tmp_path, "test")
    assert (r.image, r.image_id, r.coco_id) == (str(tmp_path / "val2014" / "COCO_val2014_000000391895.jpg"),
                                                391895, 391895)
    with pytest.raises(ValueError, match=r"dataset_flickr30k\.json: split 'val'.*has train, test, restval"):
        read_karpathy(path, tmp_path, "train+val")
    with pytest.raises(ValueError, match=r"split 'trian' \(not a Karpathy split name.*has train, test, "
                                         r"restval"):
        read_karpathy(path, tmp_path, "trian")


# ---- errors common to every reader ------------------------------------------------------

def vqa_questions(tmp_path: Path) -> Path:
    return write(tmp_path / "questions_ok.json", {"data_subtype": "val2014", "questions": []})


READERS = {
    "coco_captions": lambda path, tmp: read_coco_captions(path, tmp),
    "vg_regions": lambda path, tmp: read_vg_regions(path, tmp),
    "vqa_questions": lambda path, tmp: read_vqa(path, None, tmp),
    "vqa_annotations": lambda path, tmp: read_vqa(vqa_questions(tmp), path, tmp),
    "karpathy": lambda path, tmp: read_karpathy(path, tmp, "train"),
    "nlvr2": lambda path, tmp: read_nlvr2(path, tmp),
}


@pytest.mark.parametrize("reader", READERS)
def test_missing_file_names_the_path(tmp_path, reader):
    missing = tmp_path / "nowhere" / "annotations.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        READERS[reader](missing, tmp_path)


@pytest.mark.parametrize("reader", READERS)
def test_invalid_json_names_file_line_and_column(tmp_path, reader):
    bad = write(tmp_path / "bad.json", '{"images": [],\n "annotations": [,]}')
    line = "line 1" if reader == "nlvr2" else "line 2"  # jsonl: the file's line, each a document
    with pytest.raises(ValueError, match=rf"bad\.json.*{line} column \d+"):
        READERS[reader](bad, tmp_path)


# reader -> (a file of another format, the key or layout the message must name)
WRONG_SHAPE = {
    "coco_captions": ("vqa", r"no top-level 'images'"),
    "vg_regions": ("coco", r"not a Visual Genome region descriptions file.*got an object with 'images'"),
    "vqa_questions": ("coco", r"not a VQA questions file: no top-level 'data_subtype'"),
    "vqa_annotations": ("vqa", r"not a VQA annotations file: no top-level 'annotations'"),
    "karpathy": ("coco", r"images\[0\] has no 'split'"),
    "nlvr2": ("coco", r"line 1 has no 'identifier'"),
}


@pytest.mark.parametrize("reader", READERS)
def test_wrong_format_names_file_and_key(tmp_path, reader):
    other, message = WRONG_SHAPE[reader]
    files = {
        "vqa": {"data_subtype": "train2014",
                "questions": [{"image_id": 1, "question": "q?", "question_id": 1}]},
        "coco": {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []},
    }
    path = write(tmp_path / f"given_{other}.json", json.dumps(files[other]))
    with pytest.raises(ValueError, match=rf"given_{other}\.json: .*{message}"):
        READERS[reader](path, tmp_path)


@pytest.mark.parametrize("reader, content, message", [
    ("coco_captions", {"images": [{"id": 1}], "annotations": []}, r"images\[0\] has no 'file_name'"),
    ("coco_captions", {"images": [{"id": 1, "file_name": "a"}], "annotations": [{"id": 4, "image_id": 1}]},
     r"annotations\[0\] has no 'caption'"),
    ("vg_regions", [{"id": 7, "regions": [{"region_id": 1, "x": 0}]}],
     r"entry 0 \(id 7\) region 0 has no 'phrase'"),
    ("vg_regions", [{"regions": []}], r"entry 0 has no 'id'"),
    ("vqa_questions", {"data_subtype": "x", "questions": [{"question_id": 5, "image_id": 1}]},
     r"question_id 5 has no 'question'"),
    ("vqa_annotations", {"annotations": [{"question_id": 5, "image_id": 1}]},
     r"annotation of question_id 5 has no 'answers'"),
    ("karpathy", {"images": [{"split": "train", "imgid": 0, "sentences": []}]},
     r"images\[0\] has no 'filename'"),
    ("karpathy", {"images": [{"split": "train", "imgid": 0, "filename": "f.jpg",
                              "sentences": [{"tokens": []}]}]},
     r"images\[0\] \(f\.jpg\) sentence 0 has no 'raw'"),
])
def test_missing_entry_key_names_file_and_entry(tmp_path, reader, content, message):
    path = write(tmp_path / "entries.json", content)
    with pytest.raises(ValueError, match=rf"entries\.json: {message}"):
        READERS[reader](path, tmp_path)


# ---- the synthetic set's files ----------------------------------------------------------

def test_generation_is_deterministic(synth, tmp_path):
    same = synthetic.generate(tmp_path / "same", NUM_IMAGES, SEED)
    other = synthetic.generate(tmp_path / "other", NUM_IMAGES, SEED + 1)
    names = sorted(p.name for p in (synth / "annotations").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "same" / "annotations").iterdir())
    assert len(names) == 14
    for name in names:
        data = (synth / "annotations" / name).read_bytes()
        assert data == (tmp_path / "same" / "annotations" / name).read_bytes(), name
        assert data != (tmp_path / "other" / "annotations" / name).read_bytes(), name
    def listing(root: Path, folder: str) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in (root / folder).rglob("*"))
    for folder in ("images", "vg", "nlvr2"):
        assert listing(synth, folder) == listing(tmp_path / "same", folder)
    assert same["manifest"].read_bytes() == (synth / synthetic.MANIFEST).read_bytes()
    assert other["manifest"].read_bytes() != same["manifest"].read_bytes()


def test_every_written_path_is_returned_and_regeneration_leaves_no_stale_links(tmp_path):
    paths = synthetic.generate(tmp_path, 12, 0)
    assert {p.name for p in paths.values() if p.parent.name == "annotations"} == \
        {p.name for p in (tmp_path / "annotations").iterdir()}
    synthetic.generate(tmp_path, 8, 1, val_fraction=0.25)
    assert {p.name for p in (tmp_path / "vg").iterdir()} == {f"{i + VG_ID_OFFSET}.jpg" for i in range(1, 9)}
    rows = [json.loads(x) for x in (tmp_path / "annotations" / "nlvr2_train.jsonl").read_text().splitlines()]
    folder = tmp_path / "nlvr2" / "train"
    linked = {p.relative_to(folder) for p in folder.rglob("*.png")}
    assert linked == {Path(str(r["directory"])) / f"{r['identifier'].rsplit('-', 1)[0]}-img{k}.png"
                      for r in rows for k in (0, 1)}


def test_generation_speed(tmp_path):
    start = time.perf_counter()
    synthetic.generate(tmp_path, 120, 0)
    assert time.perf_counter() - start < 5.0  # about 0.3 s alone; the machine may be shared
