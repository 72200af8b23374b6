"""Where a trained model's text tokens look in the image: the paper's Figure 3.

    python -m pixelbert.visualize --config RUN/config.json --checkpoint RUN \
        [--image IMG --text "a red circle"] [--tokens red circle] [--layer 0] [--head N] \
        [--alpha 0.6] [--out attention.png] [--device cpu]

For one (image, text) pair the encoder runs on the single stream `[CLS] text [SEP] pixels`
with every valid pixel cell (no sampling, eval mode). For each chosen text token (default:
every word piece but [CLS]/[SEP]/[PAD], at most MAX_DEFAULT_TOKENS) the attention it pays in
encoder layer `--layer` (averaged over heads, or head `--head`) to each pixel token is painted
over the image region that token's pooled cell covers (2 x 32 = 64 input pixels a side, clipped
to the image), colours scaled per panel from the token's least to its most attended cell. The
panel title gives the token and the share of its attention mass that goes to pixels (the rest
goes to text). The PNG holds one row: the resized image (titled with the text), then a panel
per token. Next to it, OUT.json holds the numbers (see `describe`):

    image, text, layer, head, image_size [h, w] (resized), cell_size, grid_size [rows, cols],
    text_tokens, and per chosen token: token, position (in the text sequence), pixel_share,
    text_share, sum (of the grid), grid (rows x cols of attention weights; null where the
    image has no pixel token), text_attention (to each text token), panel [x0, y0, x1, y1].

`--checkpoint` takes what pixelbert.engine.weights.load_weights takes (a run folder, its
checkpoints/ folder, a step_N/ folder or a weights file); the tokenizer is the run's (the
run folder the checkpoint is in, else train.output_dir). Without --image and
--text the first caption of the run's validation data (the synthetic set's when data.train is
empty) is used.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from pixelbert.config import CAPTION_FORMATS, Config, load_config
from pixelbert.data.errors import BadSample
from pixelbert.data.images import load_image, pad_images
from pixelbert.data.tokenizer import CLS, PAD, SEP, TextTokenizer, run_tokenizer
from pixelbert.engine.data import run_dir_of
from pixelbert.fileio import write_atomic

MAX_DEFAULT_TOKENS = 6
DEFAULT_ALPHA = 0.6
GAP = 8  # white pixels between panels
BACKGROUND = (255, 255, 255)
# An "inferno"-like ramp (black -> purple -> red -> orange -> pale yellow): perceptually ordered,
# its luminance rises monotonically, so brighter always means more attention.
COLORMAP_ANCHORS = np.array([
    [0, 0, 4], [40, 11, 84], [101, 21, 110], [159, 42, 99], [212, 72, 66],
    [245, 125, 21], [250, 193, 39], [252, 255, 164],
], dtype=np.float64)


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (any shape) -> RGB float64 [..., 3] in [0, 255] along COLORMAP_ANCHORS."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    knots = np.linspace(0.0, 1.0, len(COLORMAP_ANCHORS))
    return np.stack([np.interp(values, knots, COLORMAP_ANCHORS[:, ch]) for ch in range(3)], axis=-1)


# ---- inputs -----------------------------------------------------------------------------------
def default_example(cfg: Config) -> tuple[str, str]:
    """(image path, caption) of the first record of the run's validation data: the first caption
    source of data.val, else the synthetic set's val captions when data.train is empty, else the
    first caption source of data.train."""
    from pixelbert.engine.data import named_sources, read_source

    sources = [*cfg.data.val, *cfg.data.train] or \
        [s for s in named_sources(cfg, "val", "pretrain") if Path(s.annotations).is_file()]  # the synthetic set's
    for source in sources:
        if source.format in CAPTION_FORMATS:
            records = read_source(source)
            if records:
                return records[0].image, records[0].text
    raise FileNotFoundError("no --image/--text given and the config names no validation captions "
                            f"(nor is there a synthetic set at {cfg.data.synthetic_dir}): pass "
                            "--image and --text")


def make_batch(image_path: str | Path, text: str, cfg: Config,
               tokenizer: TextTokenizer) -> tuple[dict, list[str], np.ndarray]:
    """The model batch of one pair, the token strings of its text sequence (`[CLS] ... [SEP]`),
    and the resized, unnormalised image as uint8 [h, w, 3]."""
    image = load_image(image_path, cfg.data.image_shorter, cfg.data.image_longer, cfg.data.pixel_norm())
    images, sizes = pad_images([image], cfg.data.pad_multiple)
    ids = tokenizer.encode(text, cfg.data.max_text_len)
    # encode() keeps the first max_len - 2 pieces of the same WordPiece encoding tokenize() gives.
    tokens = [CLS, *tokenizer.tokenize(text)[:len(ids) - 2], SEP]
    assert len(tokens) == len(ids), (tokens, ids)
    input_ids = torch.tensor([ids], dtype=torch.int64)
    batch = {"images": images, "image_sizes": sizes, "input_ids": input_ids,
             "attention_mask": torch.ones_like(input_ids), "token_type_ids": torch.zeros_like(input_ids)}
    rgb = cfg.data.pixel_norm().undo(image).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return batch, tokens, np.ascontiguousarray(rgb)


# ---- attention --------------------------------------------------------------------------------
def pixel_cells(model, batch: dict) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) in the pooled grid of each pixel token of the batch's one image, in stream
    order, by the model's own selection (PixelEmbeddings.valid_grid / select, no sampling)."""
    pe = model.pixel_embeddings
    height, width = batch["images"].shape[-2:]
    feat_h, feat_w = pe.backbone.feature_size(height, width)
    grid_h, grid_w = feat_h // 2, feat_w // 2
    valid = pe.valid_grid(batch["image_sizes"].cpu(), grid_h, grid_w)
    positions, mask = pe.select(valid, grid_h, grid_w, sample=False, seeds=None)
    flat = positions[0][mask[0]].numpy()
    return flat // grid_w, flat % grid_w


def token_attention(model, batch: dict, layer: int, head: Optional[int]) -> tuple[np.ndarray, int, int]:
    """Attention rows of the text tokens in `layer` (mean over heads, or one head): float64
    [L, L + P] over the text then the P pixel tokens; also L and P."""
    probs, key_mask = model.attention_maps(batch, layer=layer)
    heads = probs.shape[1]
    if head is not None and not 0 <= head < heads:
        raise ValueError(f"--head must be in [0, {heads}), got {head}")
    rows = probs[0, :, :, :] if head is None else probs[0, head:head + 1]
    text_len = batch["input_ids"].shape[1]
    keys = key_mask[0].cpu()
    pixels = int(keys[text_len:].sum())
    rows = rows.double().mean(dim=0)[:text_len][:, keys]  # the one image: its keys are all real
    return rows.cpu().numpy(), text_len, pixels


def choose_positions(tokens: list[str], wanted: Optional[list[str]], lowercase: bool) -> list[int]:
    """Positions in the text sequence to draw: every occurrence of each wanted word piece (in
    text order), or by default every piece but [CLS]/[SEP]/[PAD], at most MAX_DEFAULT_TOKENS."""
    if not wanted:
        return [i for i, t in enumerate(tokens) if t not in (CLS, SEP, PAD)][:MAX_DEFAULT_TOKENS]
    positions = []
    for word in wanted:
        key = word.lower() if lowercase else word
        found = [i for i, t in enumerate(tokens) if t == key and i not in positions]
        if not found:
            pieces = [t for t in tokens if t not in (CLS, SEP, PAD)]
            raise ValueError(f"--tokens: {word!r} is not a word piece of the text; its pieces are {pieces}")
        positions.extend(found)
    return sorted(positions)


def describe(rows: np.ndarray, text_len: int, cells: tuple[np.ndarray, np.ndarray],
             grid_size: tuple[int, int], tokens: list[str], positions: list[int]) -> list[dict]:
    """Per chosen token: its pixel attention as a grid (None where no pixel token), shares, etc."""
    grid_rows, grid_cols = grid_size
    cell_rows, cell_cols = cells
    out = []
    for pos in positions:
        grid: list[list[Optional[float]]] = [[None] * grid_cols for _ in range(grid_rows)]
        to_pixels = rows[pos, text_len:]
        for r, c, value in zip(cell_rows.tolist(), cell_cols.tolist(), to_pixels.tolist()):
            grid[r][c] = value
        to_text = rows[pos, :text_len]
        out.append({"token": tokens[pos], "position": pos, "pixel_share": float(to_pixels.sum()),
                    "text_share": float(to_text.sum()), "sum": float(to_pixels.sum()), "grid": grid,
                    "text_attention": [float(v) for v in to_text]})
    return out


# ---- drawing ----------------------------------------------------------------------------------
def heat_overlay(image: np.ndarray, grid: list[list[Optional[float]]], cell: int, alpha: float) -> np.ndarray:
    """`image` uint8 [h, w, 3] with each non-null grid cell painted over its cell x cell region
    (clipped to the image): colour = colormap of the value scaled from the grid's min to max."""
    values = np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=np.float64)
    known = ~np.isnan(values)
    low, high = values[known].min(), values[known].max()
    scaled = (values - low) / (high - low) if high > low else np.where(known, 1.0, np.nan)
    h, w = image.shape[:2]
    per_pixel = np.repeat(np.repeat(scaled, cell, axis=0), cell, axis=1)[:h, :w]
    painted = ~np.isnan(per_pixel)
    out = image.astype(np.float64)
    out[painted] = (1 - alpha) * out[painted] + alpha * colormap(per_pixel[painted])
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def title_height(width: int) -> tuple[int, int]:
    """(font size, title strip height) for panels `width` pixels wide."""
    size = max(10, min(32, width // 16))
    return size, size + 10


def render(image: np.ndarray, text: str, results: list[dict], cell: int, alpha: float) -> Image.Image:
    """One row: the image titled with the text, then a heat-map panel per token; each result's
    "panel" gets its [x0, y0, x1, y1] box in the figure."""
    h, w = image.shape[:2]
    size, top = title_height(w)
    font = _font(size)
    panels = 1 + len(results)
    figure = Image.new("RGB", (panels * w + (panels - 1) * GAP, top + h), BACKGROUND)
    draw = ImageDraw.Draw(figure)
    titles = [text] + [f"{r['token']}  {r['pixel_share']:.1%} to pixels" for r in results]
    arrays = [image] + [heat_overlay(image, r["grid"], cell, alpha) for r in results]
    for i, (title, array) in enumerate(zip(titles, arrays)):
        x0 = i * (w + GAP)
        figure.paste(Image.fromarray(array), (x0, top))
        draw.text((x0 + 4, 4), _fit(draw, title, font, w - 8), fill=(0, 0, 0), font=font)
        if i:
            results[i - 1]["panel"] = [x0, top, x0 + w, top + h]
    return figure


# ---- command line -----------------------------------------------------------------------------
def visualize(args: argparse.Namespace) -> dict:
    from pixelbert.engine.weights import load_weights
    from pixelbert.model.pixelbert import PixelBert

    for flag, path in (("--config", args.config), ("--checkpoint", args.checkpoint), ("--image", args.image)):
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"{flag}: {path} does not exist")
    if (args.image is None) != (args.text is None):
        raise ValueError("give --image and --text together (or neither, for the first validation caption)")
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must name a .png file, got {out}")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")

    cfg = load_config(args.config, args.override)
    checkpoint = Path(args.checkpoint)
    tokenizer = run_tokenizer(cfg.data, run_dir_of(checkpoint, default=Path(cfg.train.output_dir)))
    image_path, text = (args.image, args.text) if args.image is not None else default_example(cfg)

    cfg.model.backbone_weights = None  # the checkpoint holds the CNN
    model = PixelBert(cfg.model)
    report = load_weights(model, checkpoint)
    if not report.loaded:
        raise ValueError(f"{checkpoint}: none of its tensors belong to this model")
    if report.initialised:
        print(f"warning: {len(report.initialised)} model tensor(s) not in {checkpoint} keep their random "
              f"initialisation, e.g. {report.initialised[:3]}", file=sys.stderr)
    model.to(args.device).eval()

    batch, tokens, image = make_batch(image_path, text, cfg, tokenizer)
    batch = {k: v.to(args.device) for k, v in batch.items()}
    rows, text_len, pixels = token_attention(model, batch, args.layer, args.head)
    cells = pixel_cells(model, batch)
    if len(cells[0]) != pixels:
        raise AssertionError(f"{pixels} pixel tokens in the stream but {len(cells[0])} cells selected")
    cell = 2 * model.pixel_embeddings.backbone.stride  # 2x2 pooling of the stride-32 map
    h, w = image.shape[:2]
    grid_size = (math.ceil(h / cell), math.ceil(w / cell))
    positions = choose_positions(tokens, args.tokens, cfg.data.lowercase)
    results = describe(rows, text_len, cells, grid_size, tokens, positions)

    figure = render(image, text, results, cell, args.alpha)
    summary = {"image": str(image_path), "text": text, "layer": args.layer,
               "head": "mean" if args.head is None else args.head, "image_size": [h, w],
               "cell_size": cell, "grid_size": list(grid_size), "text_tokens": tokens,
               "figure_size": [figure.height, figure.width], "tokens": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(out)
    write_atomic(out.with_suffix(".json"), json.dumps(summary, indent=1) + "\n")
    for r in results:
        print(f"{r['token']:>12s}  {r['pixel_share']:6.1%} of its attention to pixels")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pixelbert.visualize",
                                     description="Draw text-to-pixel attention maps (Pixel-BERT Figure 3).")
    parser.add_argument("--config", required=True, help="the run's config.json")
    parser.add_argument("--checkpoint", required=True,
                        help="run folder, its checkpoints/ folder, a step_N/ folder or a weights file")
    parser.add_argument("--image", help="image file (default: the first validation caption's image)")
    parser.add_argument("--text", help="the text paired with --image")
    parser.add_argument("--tokens", nargs="+", metavar="TOKEN",
                        help=f"word pieces to draw (default: every piece, at most {MAX_DEFAULT_TOKENS})")
    parser.add_argument("--layer", type=int, default=0, help="encoder layer (default 0, the first)")
    parser.add_argument("--head", type=int, default=None, help="one attention head (default: mean of all)")
    parser.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="heat-map opacity in [0, 1]")
    parser.add_argument("--out", default="attention.png", help="PNG to write; OUT.json is written beside it")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--override", nargs="*", default=[], metavar="KEY=VALUE",
                        help="config overrides, as for training")
    return parser


def main(argv: Optional[list[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    try:
        return visualize(args)
    except (FileNotFoundError, ValueError, BadSample) as e:  # ConfigError is a ValueError
        raise SystemExit(f"pixelbert.visualize: error: {e}") from None


if __name__ == "__main__":
    main()
