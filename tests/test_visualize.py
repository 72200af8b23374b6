"""pixelbert.visualize: attention heat maps of a tiny model, checked against model.attention_maps."""
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from pixelbert import visualize
from pixelbert.data.images import IMAGENET_NORM, load_image, pad_images
from pixelbert.data.tokenizer import TextTokenizer
from pixelbert.model.pixelbert import PixelBert
from tests.helpers import tiny_config

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
         "a", "red", "circle", "left", "of", "blue", "square", "the"]
TEXT = "A red circle left of a blue square"
# 301x157 -> resized (shorter 160, longer 256) to 134x256: a 3x4 grid of 64 px cells over the
# image, of which the model has tokens for 2x4 (134 px spans 5 stride-32 rows: 2 whole 2x2 cells).
IMAGE_WH = (301, 157)
RESIZED = (134, 256)
GRID, VALID = (3, 4), (2, 4)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    model = PixelBert(tiny_config()).eval()
    with torch.no_grad():  # sharper first-layer attention than BERT's init gives
        attention = model.encoder.layer[0].attention.self
        attention.query.weight.mul_(30)
        attention.key.weight.mul_(30)
    torch.save(model.state_dict(), root / "weights.pt")
    (root / "tokenizer").mkdir()
    (root / "tokenizer" / "vocab.txt").write_text("".join(t + "\n" for t in VOCAB))
    config = {"model": dataclasses.asdict(tiny_config()),
              "data": {"image_shorter": 160, "image_longer": 256, "max_text_len": 12},
              "train": {"output_dir": str(root)},
              "deepspeed": {"train_micro_batch_size_per_gpu": 1}}
    (root / "config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    Image.fromarray(blocks).resize(IMAGE_WH, Image.Resampling.NEAREST).save(root / "image.jpg", quality=95)
    return root, model


def cli(root, out, *extra):
    return visualize.main(["--config", str(root / "config.json"), "--checkpoint", str(root / "weights.pt"),
                           "--image", str(root / "image.jpg"), "--text", TEXT, "--out", str(out), *extra])


def reference_rows(root, model, head=None):
    """Attention of every text token to every key, straight from model.attention_maps."""
    tokenizer = TextTokenizer.from_vocab_file(root / "tokenizer" / "vocab.txt")
    images, sizes = pad_images([load_image(root / "image.jpg", 160, 256, IMAGENET_NORM)], 32)
    ids = torch.tensor([tokenizer.encode(TEXT, 12)])
    batch = {"images": images, "image_sizes": sizes, "input_ids": ids,
             "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
    probs, key_mask = model.attention_maps(batch, layer=0)
    assert key_mask.all()
    probs = probs[0].double()
    return (probs.mean(dim=0) if head is None else probs[head]), ids.shape[1]


def figure_panels(png, summary):
    figure = np.asarray(Image.open(png).convert("RGB")).astype(np.float64)
    h, w = summary["image_size"]
    _, top = visualize.title_height(w)
    image = figure[top:top + h, :w]
    return figure, image, [figure[y0:y1, x0:x1] for x0, y0, x1, y1 in (t["panel"] for t in summary["tokens"])]


def cell_centre(r, c):
    return min(r * 64 + 32, RESIZED[0] - 1), c * 64 + 32


def luminance(rgb):
    return rgb @ np.array([0.299, 0.587, 0.114])


def test_default_tokens_layout_and_sums(run, tmp_path):
    root, model = run
    out = tmp_path / "fig.png"
    summary = cli(root, out)
    assert json.loads(out.with_suffix(".json").read_text()) == summary

    # Default: every word piece but [CLS]/[SEP], at most six.
    assert summary["text_tokens"] == ["[CLS]", *TEXT.lower().split(), "[SEP]"]
    assert [t["token"] for t in summary["tokens"]] == TEXT.lower().split()[:visualize.MAX_DEFAULT_TOKENS]
    assert summary["image_size"] == list(RESIZED) and summary["grid_size"] == list(GRID)

    # Layout: the image then one panel per token, in one row under a title strip.
    h, w = RESIZED
    panels = 1 + len(summary["tokens"])
    _, top = visualize.title_height(w)
    assert Image.open(out).size == (panels * w + (panels - 1) * visualize.GAP, top + h)

    rows, text_len = reference_rows(root, model)
    for t in summary["tokens"]:
        grid = np.array([[np.nan if v is None else v for v in row] for row in t["grid"]])
        assert grid.shape == GRID
        assert np.isnan(grid[VALID[0]:]).all() and not np.isnan(grid[:VALID[0]]).any()
        share = rows[t["position"], text_len:].sum().item()
        assert np.nansum(grid) == pytest.approx(share, abs=1e-5)
        assert t["sum"] == pytest.approx(share, abs=1e-5) and 0 < t["pixel_share"] < 1
        assert t["pixel_share"] + t["text_share"] == pytest.approx(1.0, abs=1e-6)
        # Cell (r, c) holds pixel token r * cols + c (row-major over the valid cells).
        expected = rows[t["position"], text_len:].numpy().reshape(VALID)
        np.testing.assert_allclose(grid[:VALID[0]], expected, atol=1e-6)
        np.testing.assert_allclose(t["text_attention"], rows[t["position"], :text_len].numpy(), atol=1e-6)


def test_panels_show_the_heat_map(run, tmp_path):
    root, model = run
    out = tmp_path / "fig.png"
    summary = cli(root, out)
    figure, image, panels = figure_panels(out, summary)

    # The first panel is the resized image, unnormalised.
    pil = Image.open(root / "image.jpg").convert("RGB").resize(RESIZED[::-1], Image.Resampling.BILINEAR)
    assert np.abs(image - np.asarray(pil, dtype=np.float64)).max() <= 1

    alpha = visualize.DEFAULT_ALPHA
    for t, panel in zip(summary["tokens"], panels):
        grid = np.array([[np.nan if v is None else v for v in row] for row in t["grid"]])
        hot = np.unravel_index(np.nanargmax(grid), grid.shape)
        cold = np.unravel_index(np.nanargmin(grid), grid.shape)
        assert grid[hot] > grid[cold]
        # Undo the blend: what was painted is the colormap's top at the hottest cell, its bottom
        # at the coldest, and nothing where there is no pixel token.
        painted = (panel - (1 - alpha) * image) / alpha
        hy, hx = cell_centre(*hot)
        cy, cx = cell_centre(*cold)
        np.testing.assert_allclose(painted[hy, hx], visualize.colormap(1.0), atol=3)
        np.testing.assert_allclose(painted[cy, cx], visualize.colormap(0.0), atol=3)
        assert luminance(painted[hy, hx]) > luminance(painted[cy, cx]) + 100
        np.testing.assert_array_equal(panel[VALID[0] * 64:], image[VALID[0] * 64:])


def test_chosen_tokens_one_head_opaque(run, tmp_path):
    root, model = run
    out = tmp_path / "sub" / "fig.png"
    summary = cli(root, out, "--tokens", "Red", "circle", "--head", "1", "--alpha", "1")
    assert [t["token"] for t in summary["tokens"]] == ["red", "circle"] and summary["head"] == 1
    _, image, panels = figure_panels(out, summary)
    rows, text_len = reference_rows(root, model, head=1)
    for t, panel in zip(summary["tokens"], panels):
        grid = np.array(t["grid"][:VALID[0]], dtype=np.float64)
        share = rows[t["position"], text_len:].sum().item()
        assert grid.sum() == pytest.approx(share, abs=1e-5)
        # Opaque: every pixel of a cell is the colormap of the cell's min-max scaled value.
        scaled = (grid - grid.min()) / (grid.max() - grid.min())
        for r in range(VALID[0]):
            for c in range(VALID[1]):
                region = panel[r * 64:(r + 1) * 64, c * 64:(c + 1) * 64].reshape(-1, 3)
                np.testing.assert_allclose(region, np.broadcast_to(visualize.colormap(scaled[r, c]), region.shape),
                                           atol=0.5)
        hot, cold = np.unravel_index(grid.argmax(), grid.shape), np.unravel_index(grid.argmin(), grid.shape)
        assert luminance(panel[cell_centre(*hot)]) > luminance(panel[cell_centre(*cold)]) + 100


def test_colormap_brightens_monotonically():
    values = luminance(visualize.colormap(np.linspace(0, 1, 101)))
    assert (np.diff(values) > 0).all()


def test_unknown_token(run, tmp_path):
    root, _ = run
    with pytest.raises(SystemExit, match="'triangle' is not a word piece"):
        cli(root, tmp_path / "fig.png", "--tokens", "triangle")


def test_missing_checkpoint_and_image(run, tmp_path):
    root, _ = run
    missing = tmp_path / "no_such_run"
    with pytest.raises(SystemExit, match=re.escape(f"--checkpoint: {missing} does not exist")):
        visualize.main(["--config", str(root / "config.json"), "--checkpoint", str(missing),
                        "--image", str(root / "image.jpg"), "--text", TEXT])
    with pytest.raises(SystemExit, match="--image: .*nope.jpg does not exist"):
        visualize.main(["--config", str(root / "config.json"), "--checkpoint", str(root / "weights.pt"),
                        "--image", str(tmp_path / "nope.jpg"), "--text", TEXT])
    # A folder that is not a run: load_weights' own message.
    with pytest.raises(SystemExit, match="no checkpoint at"):
        visualize.main(["--config", str(root / "config.json"), "--checkpoint", str(tmp_path),
                        "--image", str(root / "image.jpg"), "--text", TEXT])


def test_usage_without_config(capsys):
    with pytest.raises(SystemExit) as e:
        visualize.main([])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "--config" in err and "--checkpoint" in err


def test_default_example_is_the_first_validation_caption(tmp_path):
    """Without --image/--text: data.val's first caption; with no data named, the synthetic set's
    val captions; with neither, an error that says what to pass."""
    from pixelbert.config import load_config
    from pixelbert.data import synthetic
    from pixelbert.data.formats import read_coco_captions
    root = tmp_path / "synthetic"
    cfg = load_config("configs/tiny.json", [f"data.synthetic_dir={root}"])
    with pytest.raises(FileNotFoundError, match="pass --image and --text"):
        visualize.default_example(cfg)
    synthetic.generate(root, 40, 0)
    first = read_coco_captions(root / "annotations" / "captions_val.json", root / "images")[0]
    assert visualize.default_example(cfg) == (first.image, first.text)
    train = read_coco_captions(root / "annotations" / "captions_train.json", root / "images")[0]
    source = json.dumps([{"format": "coco_captions", "annotations": str(root / "annotations" / "captions_train.json"),
                          "images": str(root / "images")}])
    assert visualize.default_example(load_config("configs/tiny.json", [f"data.val={source}"])) == (train.image, train.text)
