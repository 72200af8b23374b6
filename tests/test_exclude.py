"""data.exclude: the COCO images of held-out sources never reach training, whichever source
holds them (COCO captions, Visual Genome through its image_data.json, VQA), by COCO id."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pixelbert.config import ConfigError, load_config
from tests.helpers import split_records
from pixelbert.engine.distributed import DistInfo

DIST = DistInfo(0, 1, 0, torch.device("cpu"))


def write(path: Path, obj) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.fixture
def files(tmp_path) -> dict[str, str]:
    """COCO images 1, 2, 3 with two captions each; VG images 101-104, of which 101 is COCO 1 and
    103 is COCO 3 (VG numbers its own images); VQA questions on COCO 1 and 2; a Karpathy file
    whose test split holds COCO 1 and 3 and whose train split holds COCO 2."""
    (tmp_path / "vg").mkdir()
    for vg_id in (101, 102, 103, 104):
        (tmp_path / "vg" / f"{vg_id}.jpg").write_bytes(b"jpeg")
    region = {"region_id": 1, "x": 0, "y": 0, "width": 2, "height": 2}
    return {
        "coco": write(tmp_path / "captions_train2014.json", {
            "images": [{"id": i, "file_name": f"COCO_train2014_{i:012d}.jpg"} for i in (1, 2, 3)],
            "annotations": [{"id": 10 * i + k, "image_id": i, "caption": f"caption {k} of {i}"}
                            for i in (1, 2, 3) for k in (0, 1)]}),
        "vg": write(tmp_path / "region_descriptions.json", [
            {"id": i, "regions": [{**region, "image_id": i, "phrase": f"region of {i}"}]} for i in (101, 102, 103, 104)]),
        "image_data": write(tmp_path / "image_data.json", [
            {"image_id": 101, "coco_id": 1}, {"image_id": 102, "coco_id": None},
            {"image_id": 103, "coco_id": 3}, {"image_id": 104, "coco_id": 2}]),
        "vqa": write(tmp_path / "questions.json", {"data_subtype": "train2014", "questions": [
            {"image_id": i, "question": f"what is in {i}?", "question_id": 100 * i} for i in (1, 2)]}),
        "karpathy": write(tmp_path / "dataset_coco.json", {"images": [
            {"filepath": "val2014", "filename": f"{i}.jpg", "imgid": n, "cocoid": i, "split": split,
             "sentences": [{"raw": "a test caption"}]}
            for n, (i, split) in enumerate(((1, "test"), (3, "test"), (2, "train")))]}),
        "root": str(tmp_path),
    }


def config(files, *overrides: str):
    return load_config("configs/tiny.json", [f"train.output_dir={files['root']}/run", "train.eval_every=0", *overrides])


def source(**fields) -> str:
    return json.dumps(fields)


def test_held_out_images_leave_every_training_source(files, capsys):
    held_out = f'data.exclude=[{source(format="karpathy", annotations=files["karpathy"], split="test")}]'
    train = (f'data.train=[{source(format="coco_captions", annotations=files["coco"], images=files["root"])}, '
             f'{source(format="vg_regions", annotations=files["vg"], images=files["root"] + "/vg", image_data=files["image_data"])}]')
    coco, vg = split_records(config(files, train, held_out), "train", DIST)
    assert [r.text for r in coco] == ["caption 0 of 2", "caption 1 of 2"]
    assert [r.image_id for r in vg] == [102, 104]  # 101 and 103 are COCO 1 and 3
    assert "holds out 2 COCO images: removed 6 training records of 2 of them (per source: [4, 2])" \
        in capsys.readouterr().out
    everything = split_records(config(files, train), "train", DIST)
    assert [len(records) for records in everything] == [6, 4]
    # Validation data is what it is: only training loses the held-out images.
    val = config(files, train.replace("data.train", "data.val"), held_out)
    assert [len(records) for records in split_records(val, "val", DIST)] == [6, 4]
    # Fine-tuning too: VQA's questions on a held-out image go.
    vqa = config(files, "train.task=vqa", held_out,
                 f'data.train=[{source(format="vqa", questions=files["vqa"], images=files["root"])}]')
    assert [r.question_id for s in split_records(vqa, "train") for r in s] == [200]


def test_exclude_needs_coco_ids(files):
    vg = source(format="vg_regions", annotations=files["vg"], images=files["root"] + "/vg")
    held_out = f'data.exclude=[{source(format="karpathy", annotations=files["karpathy"], split="test")}]'
    with pytest.raises(ConfigError, match=r"data.train\[0\] \(vg_regions\) needs image_data"):
        config(files, f"data.train=[{vg}]", held_out)  # VG's COCO images would stay unnoticed
    with pytest.raises(ConfigError, match=r"data.exclude\[0\].format must be one of"):
        config(files, f'data.exclude=[{source(format="nlvr2", annotations=files["vg"], images="x")}]')
    with pytest.raises(ConfigError, match=r"data.train\[0\].image_data is Visual Genome's"):
        config(files, f'data.train=[{source(format="coco_captions", annotations=files["coco"], images="x", image_data="y")}]')
    flickr = write(Path(files["root"]) / "dataset_flickr30k.json", {"images": [
        {"filename": "1.jpg", "imgid": 0, "split": "test", "sentences": [{"raw": "a caption"}]}]})
    cfg = config(files, f'data.exclude=[{source(format="karpathy", annotations=flickr, split="test")}]',
                 f'data.train=[{source(format="coco_captions", annotations=files["coco"], images=files["root"])}]')
    with pytest.raises(ValueError, match=r"names no COCO image"):
        split_records(cfg, "train", DIST)


def test_synthetic_set_holds_out_its_karpathy_test_images_from_coco_and_vg(tmp_path):
    """Pre-training on all of the synthetic set's COCO captions and VG regions (train and val)
    with its Karpathy test split held out: exactly the test images leave both, VG's through its
    own ids and image_data.json."""
    from pixelbert.data import synthetic
    from pixelbert.data.formats import read_karpathy
    root = tmp_path / "synthetic"
    synthetic.generate(root, num_images=40, seed=3, val_fraction=0.25)
    ann = root / "annotations"
    test_ids = {r.coco_id for r in read_karpathy(ann / "dataset_synthetic.json", root, "test")}
    assert len(test_ids) == 5
    sources = [source(format="coco_captions", annotations=str(ann / f"captions_{split}.json"), images=str(root / "images"))
               for split in ("train", "val")]
    sources += [source(format="vg_regions", annotations=str(ann / f"region_descriptions_{split}.json"),
                       images=str(root / "vg"), image_data=str(ann / "image_data.json")) for split in ("train", "val")]
    train = f"data.train=[{', '.join(sources)}]"
    held_out = f'data.exclude=[{source(format="karpathy", annotations=str(ann / "dataset_synthetic.json"), split="test")}]'
    files = {"root": str(tmp_path)}
    everything = split_records(config(files, train), "train", DIST)
    kept = split_records(config(files, train, held_out), "train", DIST)
    for before, after in zip(everything, kept):
        assert [r for r in before if r.coco_id not in test_ids] == after
    assert [{r.coco_id for r in records} & test_ids for records in everything] == [set(), test_ids, set(), test_ids]
    assert all(r.image_id != r.coco_id for r in kept[2] + kept[3])  # VG's numbering, mapped back
