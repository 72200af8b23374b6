"""Image-loading throughput: JPEG files -> resized, normalised, padded float32 batches, images/s.

    python benchmarks/dataloader.py             # 512 images, batch 32, 1/2/4 workers
    python benchmarks/dataloader.py --quick     # 64 images, batch 16, 1/2 workers: < 1 min on 2 cores

Paths, side by side on the same files and settings:
- dali-mixed (only with CUDA): DaliImageDecoder(device_id=0), nvJPEG / the hardware decoder,
  `--workers` values as its CPU threads.
- dali-cpu: DaliImageDecoder(device_id=None), each `--workers` value as its thread count.
- pil: a torch DataLoader whose worker processes run images.load_image, collated by
  images.pad_images, each `--workers` value as its number of processes.
For DALI the main process reads the file bytes (in training the loader workers do); the PIL
workers read their own. Every configuration first runs a warm-up (pipeline build, worker
start-up, first allocations) and then times one pass over all `--images`.

The images are COCO-like JPEGs generated into a temporary directory: 640x480, 480x640,
640x427 or 500x375, smooth noise with drawn shapes and sensor-like grain, quality 90, about
60-110 KB each. Prints a table and appends rows to benchmarks/dataloader.csv.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pixelbert.data.dali_decode import DaliImageDecoder, dali_available  # noqa: E402
from pixelbert.data.images import IMAGENET_NORM, load_image, pad_images  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_csv, git_commit  # noqa: E402

CSV_FIELDS = ["path", "workers", "images", "batch", "shorter", "longer", "seconds", "images_per_s",
              "device", "date", "commit"]
COCO_SIZES = [(480, 640), (640, 480), (427, 640), (375, 500)]  # (h, w), the common COCO shapes


def coco_like_jpeg(path: Path, seed: int) -> None:
    """A photo-like JPEG: two scales of smooth noise, 6-13 filled shapes, grain; quality 90."""
    rng = np.random.default_rng(seed)
    h, w = COCO_SIZES[seed % len(COCO_SIZES)]
    base = np.zeros((h, w, 3), np.float32)
    for factor, weight in ((32, 1.0), (8, 0.35)):
        small = rng.uniform(0, 255, (h // factor, w // factor, 3)).astype(np.uint8)
        smooth = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
        base += weight * np.asarray(smooth, np.float32)
    img = Image.fromarray((base / 1.35).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 14))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = (x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2)))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape(box, fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    grain = rng.normal(0, rng.uniform(3, 9), (h, w, 3))  # sets the file size: 60-110 KB
    pixels = (np.asarray(img, np.float32) + grain).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


class FileImages(Dataset):
    """The PIL path over files; `limit` (read in the main process by the sampler) picks how many."""

    def __init__(self, paths: list[Path], shorter: int, longer: int):
        self.paths, self.shorter, self.longer, self.limit = paths, shorter, longer, len(paths)

    def __len__(self) -> int:
        return self.limit

    def __getitem__(self, index: int) -> torch.Tensor:
        return load_image(self.paths[index], self.shorter, self.longer, IMAGENET_NORM)


def collate_padded(images: list[torch.Tensor], multiple: int):
    return pad_images(images, multiple)


def one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # one process per core; the normalisation needs no intra-op threads


def time_pil(paths, args, workers: int) -> float:
    dataset = FileImages(paths, args.shorter, args.longer)
    loader = DataLoader(dataset, batch_size=args.batch, num_workers=workers, persistent_workers=True,
                        collate_fn=functools.partial(collate_padded, multiple=args.pad_multiple),
                        worker_init_fn=one_thread)
    dataset.limit = min(len(paths), args.batch * workers)  # warm-up: start the workers, one batch each
    for _ in loader:
        pass
    dataset.limit = len(paths)
    start = time.perf_counter()
    count = sum(len(sizes) for _, sizes in loader)
    seconds = time.perf_counter() - start
    assert count == len(paths)
    return seconds


def time_dali(paths, args, threads: int, device_id: int | None) -> float:
    decoder = DaliImageDecoder(args.shorter, args.longer, args.pad_multiple, norm=IMAGENET_NORM, device_id=device_id,
                               num_threads=threads, max_batch_size=args.batch)
    batches = [paths[i:i + args.batch] for i in range(0, len(paths), args.batch)]

    def run(batch):
        out = decoder([np.fromfile(p, dtype=np.uint8) for p in batch])
        assert not out.failed, out.failed
        return len(out.sizes)

    for batch in batches[:2]:  # warm-up: first allocations, decoder state
        run(batch)
    if device_id is not None:
        torch.cuda.synchronize()
    start = time.perf_counter()
    count = sum(run(batch) for batch in batches)
    if device_id is not None:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert count == len(paths)
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shorter", type=int, default=800)
    parser.add_argument("--longer", type=int, default=1333)
    parser.add_argument("--pad-multiple", type=int, default=32)
    parser.add_argument("--images", type=int, default=None, help="timed images (512; 64 with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (32; 16 with --quick)")
    parser.add_argument("--workers", default=None,
                        help="comma-separated PIL worker processes / DALI threads (1,2,4; 1,2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="a small run: < 1 minute on 2 CPU cores")
    parser.add_argument("--csv", default=str(ROOT / "benchmarks" / "dataloader.csv"))
    args = parser.parse_args(argv)
    args.images = args.images or (64 if args.quick else 512)
    args.batch = args.batch or (16 if args.quick else 32)
    workers = [int(w) for w in (args.workers or ("1,2" if args.quick else "1,2,4")).split(",")]

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu_name = f"CPU ({cores} cores)"
    gpu = torch.cuda.is_available()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / f"{i:06d}.jpg" for i in range(args.images)]
        for i, path in enumerate(paths):
            coco_like_jpeg(path, i)
        kb = np.mean([p.stat().st_size for p in paths]) / 1024
        print(f"{args.images} COCO-like JPEGs, mean {kb:.0f} KB -> {args.shorter}/{args.longer}, "
              f"batch {args.batch}, {cpu_name}" + (f", {torch.cuda.get_device_name()}" if gpu else ""))
        configs = []
        if dali_available():
            if gpu:
                configs += [("dali-mixed", w) for w in workers]
            configs += [("dali-cpu", w) for w in workers]
        configs += [("pil", w) for w in workers]
        for path_name, count in configs:
            if path_name == "pil":
                seconds = time_pil(paths, args, count)
            else:
                seconds = time_dali(paths, args, count, 0 if path_name == "dali-mixed" else None)
            device = f"{torch.cuda.get_device_name()} + {cpu_name}" if path_name == "dali-mixed" else cpu_name
            rows.append({"path": path_name, "workers": count, "images": args.images, "batch": args.batch,
                         "shorter": args.shorter, "longer": args.longer, "seconds": f"{seconds:.3f}",
                         "images_per_s": f"{args.images / seconds:.1f}", "device": device,
                         "date": stamp, "commit": git_commit()})

    append_csv(args.csv, CSV_FIELDS, rows)

    baseline = next((float(r["images_per_s"]) for r in rows
                     if r["path"] == "pil" and r["workers"] == workers[0]), float("nan"))
    print(f"| path | workers / threads | seconds | images/s | vs pil, {workers[0]} worker(s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        ips = float(r["images_per_s"])
        print(f"| {r['path']} | {r['workers']} | {r['seconds']} | {ips:.1f} | {ips / baseline:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
