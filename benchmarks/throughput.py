"""End-to-end pre-training throughput: real DeepSpeed steps of the engine beside plain baselines.

    python benchmarks/throughput.py                          # GPU: configs/x152.json, every mode
    python benchmarks/throughput.py --config configs/r50.json --steps 30 --modes engine,baseline
    python benchmarks/throughput.py --quick                  # CPU: configs/tiny.json, < 2 min on 2 cores
    python benchmarks/throughput.py --max-batch              # GPU: largest micro-batch, +- checkpointing
    python benchmarks/throughput.py --latency                # one VQA-style request, batch 1

Every mode builds what `pixelbert.engine.trainer` builds (its build_engine: the model with its
initial weights, optimiser, schedule and DeepSpeed engine; the training data of
pixelbert.engine.data with its loader, Prefetcher and BatchPreparer) and runs real steps:
forward, engine.backward, engine.step. The data are COCO-like JPEGs (benchmarks/dataloader.py's
generator, 640x480-class, tens of KB each) with five captions per image in the COCO captions
format, written to /dev/shm when present (else the temp dir) and read through `data.train`, so
images are decoded, resized to the config's resolution, normalised and padded by the real path.

Modes (one process, one after the other, the same pairs per step; world size 1):
- engine: the config as shipped with data.captions_per_image=1 (one caption per image: the
  headline ratio compares the same number of CNN passes), kernels auto, packed sequences,
  attention auto, channels-last on a GPU, DALI on a GPU when installed, the fused optimiser
  step on a GPU (train.optimizer_kernel=auto).
- engine-grouped: engine with data.captions_per_image=5 (the CNN runs once per 5 pairs).
- baseline: the same model math with the plain pieces: model.kernels=reference,
  model.packed_sequences=false, model.attention=sdpa, model.channels_last=false,
  data.decoder=pil, train.optimizer_kernel=foreach (torch.optim's default on a GPU); on a GPU
  fp32 weights under bf16 torch.autocast (DeepSpeed bf16 off).
- baseline-tuned: baseline + channels-last + torch.compile of the CNN
  (model.compile_backbone=default) + the fused optimiser step (train.optimizer_kernel=fused,
  torch's fused SGD and AdamW kernels).
- baseline-fp32: baseline in fp32 (no autocast, DeepSpeed bf16 off).
- engine-no-kernels / engine-no-packing / engine-no-decoder / engine-no-fused-optim: engine
  with one fast path off (model.kernels=reference / model.packed_sequences=false /
  data.decoder=pil / train.optimizer_kernel=foreach).
On the CPU (configs/tiny.json, fp32) baseline and baseline-fp32 are the same run, and
engine-no-decoder and engine-no-fused-optim equal engine (data.decoder=auto takes PIL and
train.optimizer_kernel=auto takes foreach on a CPU); they still run, so
every row is present.

Per mode, over the timed steps after the warm-up steps (medians):
- samples/s (image-text pairs), images/s (CNN inputs), tokens/s (real text tokens + sampled
  pixel tokens, no padding) = per-step counts / median step time;
- step: the time from the end of one optimiser step to the end of the next (CUDA events on a
  GPU, so the GPU's idle time while the host waits for data is in it; perf_counter on the CPU);
- data wait: host time blocked on the prefetcher for the step's batch;
- backbone fwd: CNN + 1x1 projection (`pixel_embeddings.backbone` pre-hook to
  `pixel_embeddings.proj` forward hook);
- enc+heads fwd: the rest of engine(batch): channels-last copy, text embeddings, pixel sampling
  and pooling, packing, the encoder, MLM/ITM heads and losses;
- backward: engine.backward (autograd + DeepSpeed's gradient reduction hooks);
- optimizer: engine.step (ZeRO partition update, clipping, parameter all-gather, LR scheduler);
- other: step - (fwd + backward + optimizer): the gap between steps (waiting for data,
  Python between steps);
- TFLOP/s: torch.utils.flop_counter.FlopCounterMode over forward + backward of the first
  warm-up step (counted per mode on its own math: the padded modes count their padding too;
  custom kernels that are not aten ops are not counted, they hold no matmul or convolution;
  baseline-tuned takes baseline's count, since its compiled CNN runs no aten ops to count),
  divided by the median step time; % peak: that over a measured large matmul (bf16 8192^3 on a
  GPU, fp32 2048^3 on the CPU);
- peak mem: torch.cuda.max_memory_allocated on a GPU, else the main process's peak RSS
  (VmHWM, reset per mode; loader worker processes not included).
Prints a table, writes --out (JSON) and a bar chart beside it (PNG), appends to --csv.

--max-batch (GPU): per mode of --max-batch-modes, the largest micro-batch (pairs) that runs two
steps, without and with activation checkpointing (model.checkpoint_backbone and
model.checkpoint_encoder). --latency: one VQA request (PixelBertForVQA, 3,129 answers), batch 1
at the config's resolution, eval mode, inference_mode: the model alone and with JPEG decoding
(data.decoder's choice, as `pixelbert.predict` makes it), tokenising and the host-to-device copy.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pixelbert import ops  # noqa: E402
from pixelbert.config import Config, load_config  # noqa: E402
from pixelbert.engine.distributed import configure_accelerator, init_distributed  # noqa: E402
from pixelbert.engine.profiling import StepProfiler  # noqa: E402
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import append_csv, git_commit  # noqa: E402
from dataloader import coco_like_jpeg  # noqa: E402

CSV_FIELDS = ["device", "date", "commit", "config", "mode", "batch_pairs", "images_per_step", "steps",
              "warmup", "samples_per_s", "images_per_s", "tokens_per_s", "step_ms", "data_wait_ms",
              "backbone_fwd_ms", "encoder_heads_ms", "backward_ms", "optimizer_ms", "other_ms",
              "gflop_per_step", "tflops", "peak_fraction", "peak_mem_mb", "vs_baseline", "error"]
ALL_MODES = ("engine", "engine-grouped", "baseline", "baseline-tuned", "baseline-fp32",
             "engine-no-kernels", "engine-no-packing", "engine-no-decoder", "engine-no-fused-optim")
GROUPED_CAPTIONS = 5  # COCO's captions per image
CHECKPOINTING = ["model.checkpoint_backbone=true", "model.checkpoint_encoder=true"]
WORDS = {  # COCO-like captions: "a small red dog sitting next to a wooden table in a kitchen"
    "det": ["a", "the", "two", "some", "an old"],
    "adj": ["small", "large", "red", "white", "black", "young", "wooden", "blue", "green", "tall",
            "little", "brown", "yellow", "empty", "busy", "open"],
    "noun": ["man", "woman", "dog", "cat", "bus", "train", "pizza", "table", "giraffe", "horse",
             "boat", "clock", "kite", "bench", "street", "plate", "bicycle", "elephant", "bird",
             "sandwich", "umbrella", "truck", "skateboard", "laptop"],
    "verb": ["sitting on", "standing next to", "walking down", "parked near", "riding", "holding",
             "looking at", "flying over", "lying on", "eating"],
    "place": ["in a kitchen", "on the beach", "in a field", "on a city street", "at the park",
              "near the water", "in a living room", "under a cloudy sky", "", ""],
}


# ---- data ----------------------------------------------------------------------------------

def caption(rng: np.random.Generator) -> str:
    pick = lambda key: WORDS[key][int(rng.integers(len(WORDS[key])))]  # noqa: E731
    words = [pick("det"), pick("adj"), pick("noun"), pick("verb"), "a", pick("adj"), pick("noun"),
             pick("place")]
    return " ".join(w for w in words if w) + "."


def _write_image(job: tuple[str, int]) -> tuple[int, int]:
    path, seed = job
    coco_like_jpeg(Path(path), seed)
    from PIL import Image
    with Image.open(path) as img:
        return img.height, img.width


def make_coco_set(root: Path, images: int, workers: int) -> dict:
    """`images` COCO-like JPEGs and a COCO captions file with five captions each."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    names = [f"COCO_bench_{i:012d}.jpg" for i in range(images)]
    jobs = [(str(root / "images" / name), i) for i, name in enumerate(names)]
    if workers > 1:
        with Pool(workers) as pool:
            sizes = pool.map(_write_image, jobs)
    else:
        sizes = [_write_image(job) for job in jobs]
    rng = np.random.default_rng(0)
    coco = {"images": [{"id": i, "file_name": name, "height": h, "width": w}
                       for i, (name, (h, w)) in enumerate(zip(names, sizes))],
            "annotations": [{"id": 5 * i + k, "image_id": i, "caption": caption(rng)}
                            for i in range(images) for k in range(GROUPED_CAPTIONS)]}
    annotations = root / "captions_bench.json"
    annotations.write_text(json.dumps(coco))
    kb = np.mean([Path(path).stat().st_size for path, _ in jobs]) / 1024
    return {"annotations": str(annotations), "images": str(root / "images"), "count": images,
            "mean_kb": round(float(kb), 1), "root": str(root)}


# ---- modes ---------------------------------------------------------------------------------

@dataclasses.dataclass
class Mode:
    name: str
    overrides: list[str]
    autocast: bool = False  # bf16 torch.autocast around the forward (the GPU baselines)
    # FLOPs taken from this mode's count: the same math, but compiled code runs no aten ops for
    # FlopCounterMode to see.
    flops_from: str | None = None


def build_modes(on_gpu: bool, bf16: bool, compile_cnn: bool = True) -> dict[str, Mode]:
    engine = ["data.captions_per_image=1"] + (["model.channels_last=true"] if on_gpu else [])
    plain = ["model.kernels=reference", "model.packed_sequences=false", "model.attention=sdpa",
             "model.channels_last=false", "data.decoder=pil", "data.captions_per_image=1",
             "train.optimizer_kernel=foreach"]
    fp32 = ['deepspeed.bf16={"enabled": false}']
    # A plain PyTorch bf16 run keeps fp32 weights and autocasts; on the CPU everything is fp32.
    mixed = on_gpu and bf16
    baseline = plain + (fp32 if mixed else [])
    tuned = (baseline + ["model.channels_last=true", "train.optimizer_kernel=fused"]
             + (["model.compile_backbone=default"] if compile_cnn else []))
    return {m.name: m for m in [
        Mode("engine", engine),
        Mode("engine-grouped", engine + [f"data.captions_per_image={GROUPED_CAPTIONS}"]),
        Mode("baseline", baseline, autocast=mixed),
        Mode("baseline-tuned", tuned, autocast=mixed, flops_from="baseline" if compile_cnn else None),
        Mode("baseline-fp32", plain + fp32),
        Mode("engine-no-kernels", engine + ["model.kernels=reference"]),
        Mode("engine-no-packing", engine + ["model.packed_sequences=false"]),
        Mode("engine-no-decoder", engine + ["data.decoder=pil"]),
        Mode("engine-no-fused-optim", engine + ["train.optimizer_kernel=foreach"]),
    ]}


# ---- timing --------------------------------------------------------------------------------

class Clock:
    """Marks on the GPU's timeline (CUDA events, read after one synchronize at the end) or
    the host's (perf_counter; CPU ops run synchronously)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start, end) -> float:
        return start.elapsed_time(end) if self.cuda else (end - start) * 1e3


def pixel_token_count(model, batch: dict) -> torch.Tensor:
    """Sampled pixel tokens of the batch's pairs: min(pixel_samples, valid pooled cells of the
    pair's image), as the model draws them (computed on the device, no synchronisation)."""
    backbone = model.pixel_embeddings.backbone
    images, sizes = batch["images"], batch["image_sizes"]
    grid_h, grid_w = (s // 2 for s in backbone.feature_size(images.shape[-2], images.shape[-1]))
    feat_h, feat_w = backbone.feature_size(sizes[:, 0], sizes[:, 1])
    cells = (feat_h // 2).clamp(max=grid_h) * (feat_w // 2).clamp(max=grid_w)
    pair_image = batch.get("pair_image")
    if pair_image is not None:
        cells = cells[pair_image]
    return cells.clamp(max=model.cfg.pixel_samples).sum()


def peak_matmul_tflops(cuda: bool) -> dict:
    """A large matmul's rate: the denominator of the model-FLOP fraction."""
    if cuda:
        n, dtype, reps = 8192, torch.bfloat16, 20
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / reps
    else:
        n, dtype = 2048, torch.float32
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        times = []
        for _ in range(10):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        seconds = min(times)  # the best: other processes share these cores
    return {"tflops": 2 * n ** 3 / seconds / 1e12, "shape": f"{n}x{n}x{n}", "dtype": str(dtype).split(".")[-1]}


def reset_peak_memory(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        return
    with contextlib.suppress(OSError):  # Linux >= 4.0: "5" resets VmHWM to the current RSS
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(cuda: bool) -> float:
    if cuda:
        return torch.cuda.max_memory_allocated() / 2 ** 20
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- one mode ------------------------------------------------------------------------------

def mode_config(args, mode: Mode, batch: int, data: dict, out_dir: Path) -> Config:
    source = json.dumps([{"format": "coco_captions", "annotations": data["annotations"], "images": data["images"]}])
    return load_config(args.config, [
        f"train.output_dir={out_dir}", f"data.train={source}",
        f"data.tokenizer_cache={Path(data['root']) / 'tokenizers'}",
        f"deepspeed.train_micro_batch_size_per_gpu={batch}", "deepspeed.gradient_accumulation_steps=1",
        "model.backbone_weights=null",  # speed does not depend on the CNN's starting weights
        "train.eval_every=0",  # steps only: no validation split is generated for it
        *mode.overrides, *args.override])


def training_step(engine, batch: dict, autocast, flop_counter=contextlib.nullcontext(),
                  mark=lambda key: None) -> dict:
    """One step as the trainer takes it: forward (under `autocast`), backward, optimiser step.
    `mark(key)` is called after each (`forward_end`, `backward_end`, `step_end`); the FLOP
    counter sees the forward and backward only."""
    with flop_counter:
        with autocast:
            out = engine(batch)
        mark("forward_end")
        engine.backward(out["loss"])
    mark("backward_end")
    engine.step()
    mark("step_end")
    return out


def run_mode(cfg: Config, mode: Mode, dist, clock: Clock, warmup: int, steps: int,
             count_flops: bool = True, profile: int = 0, profile_prefix: Path | None = None) -> dict:
    """Build the engine as the trainer does and time `steps` real steps after `warmup`; then,
    untimed, profile `profile` more into `<profile_prefix>-<mode>.json.gz` and `.txt`."""
    from torch.utils.flop_counter import FlopCounterMode

    from pixelbert.data.skips import SkipCounter
    from pixelbert.engine.batches import BatchPreparer, Prefetcher
    from pixelbert.engine.data import build_training_data
    from pixelbert.engine.trainer import attention_plan, build_engine

    cuda = clock.cuda
    reset_peak_memory(cuda)
    data = build_training_data(cfg, dist)
    engine, _, dtype = build_engine(cfg, dist, data)  # the same initial weights in every mode
    model = engine.module
    plan = attention_plan(cfg, dist.device, torch.bfloat16 if mode.autocast else dtype)
    batches = Prefetcher(iter(data.make_loader(0)), BatchPreparer(dist.device, dtype, SkipCounter(), data.decoder),
                         dist.device)
    marks: dict = {}

    @torch.compiler.disable  # a compiled CNN (model.compile_backbone) runs its hooks eagerly
    def mark_backbone(key: str) -> None:
        marks[key] = clock.mark()

    hooks = [model.pixel_embeddings.backbone.register_forward_pre_hook(lambda *_: mark_backbone("backbone_start")),
             model.pixel_embeddings.proj.register_forward_hook(lambda *_: mark_backbone("backbone_end"))]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if mode.autocast else contextlib.nullcontext()
    records, flops = [], None
    try:
        engine.train()
        previous_end = clock.mark()
        wall_start = None
        for i in range(warmup + steps):
            if i == warmup:
                if cuda:
                    torch.cuda.synchronize()
                wall_start = time.perf_counter()
            waited = batches.wait_s
            batch, stats = next(batches)
            waited = batches.wait_s - waited
            marks.clear()
            counting = i == 0 and count_flops and mode.flops_from is None
            counter = FlopCounterMode(display=False) if counting else contextlib.nullcontext()
            step_marks = {"start": clock.mark()}
            out = training_step(engine, batch, autocast, counter,
                                mark=lambda key: step_marks.__setitem__(key, clock.mark()))
            if counting:
                flops = counter.get_total_flops()
            records.append({"previous_end": previous_end, **step_marks, "wait_s": waited,
                            "backbone": (marks.get("backbone_start"), marks.get("backbone_end")),
                            "pairs": len(batch["input_ids"]), "images": stats["images"],
                            "text_tokens": batch["attention_mask"].sum(),
                            "pixel_tokens": pixel_token_count(model, batch), "loss": out["loss"].detach()})
            previous_end = step_marks["step_end"]
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - wall_start
        peak_mb = peak_memory_mb(cuda)
        if profile:
            profiler = StepProfiler(1, profile, profile_prefix.parent, f"{profile_prefix.name}-{mode.name}", cuda)
            for k in range(1, profile + 1):
                profiler.before(k)
                training_step(engine, next(batches)[0], autocast)
                profiler.after(k)
            print(f"  {mode.name}: profile of {profile} steps in {', '.join(map(str, profiler.written))}", flush=True)
    finally:
        for hook in hooks:
            hook.remove()
        batches.close()
    losses = [float(r["loss"]) for r in records]
    timed = records[warmup:]
    ms = clock.ms

    def median(values):
        return statistics.median(values)

    step_ms = median([ms(r["previous_end"], r["step_end"]) for r in timed])
    fwd = [ms(r["start"], r["forward_end"]) for r in timed]
    backbone = [ms(*r["backbone"]) if None not in r["backbone"] else 0.0 for r in timed]
    bwd = [ms(r["forward_end"], r["backward_end"]) for r in timed]
    opt = [ms(r["backward_end"], r["step_end"]) for r in timed]
    other = [ms(r["previous_end"], r["step_end"]) - f - b - o for r, f, b, o in zip(timed, fwd, bwd, opt)]
    pairs = statistics.mean(r["pairs"] for r in timed)
    images = statistics.mean(r["images"] for r in timed)
    tokens = statistics.mean(int(r["text_tokens"]) + int(r["pixel_tokens"]) for r in timed)
    result = {
        "mode": mode.name, "overrides": mode.overrides, "autocast_bf16": mode.autocast,
        "dtype": str(torch.bfloat16 if mode.autocast else dtype).split(".")[-1],
        "data": data.description, "attention": plan,
        "kernels": cfg.model.kernels if cfg.model.kernels != "auto" else
        f"auto ({ops.resolve_backend('pool_sample', None, dist.device, dtype)})",
        "captions_per_image": cfg.data.captions_per_image, "batch_pairs": cfg.micro_batch_size,
        "steps": steps, "warmup": warmup,
        "pairs_per_step": pairs, "images_per_step": images, "tokens_per_step": tokens,
        "samples_per_s": pairs / step_ms * 1e3, "images_per_s": images / step_ms * 1e3,
        "tokens_per_s": tokens / step_ms * 1e3,
        "wall_samples_per_s": sum(r["pairs"] for r in timed) / wall,
        "step_ms": step_ms, "data_wait_ms": median([r["wait_s"] * 1e3 for r in timed]),
        "backbone_fwd_ms": median(backbone), "encoder_heads_ms": median([f - b for f, b in zip(fwd, backbone)]),
        "backward_ms": median(bwd), "optimizer_ms": median(opt), "other_ms": median(other),
        "flops_per_step": flops, "flops_from": mode.flops_from, "peak_mem_mb": peak_mb, "losses": losses,
    }
    del engine, model, batches, data, records, timed
    reset_peak_memory(cuda)
    return result


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# ---- report --------------------------------------------------------------------------------

def device_name(cuda: bool) -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpu = f"CPU ({cores} cores, {torch.get_num_threads()} threads)"
    return f"{torch.cuda.get_device_name()} + {cpu}" if cuda else cpu


def add_ratios(results: list[dict], peak: dict) -> dict:
    """TFLOP/s, share of the matmul peak and speed against baseline per mode (failed modes keep
    only their error); returns the headline ratios."""
    ok = {r["mode"]: r for r in results if "error" not in r}
    base = ok.get("baseline")
    for r in ok.values():
        source = ok.get(r.pop("flops_from") or "")
        if r["flops_per_step"] is None and source is not None:
            r["flops_per_step"], r["flops_counted_on"] = source["flops_per_step"], source["mode"]
        r["tflops"] = r["flops_per_step"] / r["step_ms"] * 1e3 / 1e12 if r["flops_per_step"] else None
        r["peak_fraction"] = r["tflops"] / peak["tflops"] if r["tflops"] else None
        r["vs_baseline"] = r["samples_per_s"] / base["samples_per_s"] if base else None
    pairs = [("engine", other) for other in ("baseline", "baseline-tuned", "baseline-fp32")]
    pairs += [("engine-grouped", "baseline"), ("engine-grouped", "engine")]
    pairs += [("engine", ablation) for ablation in ALL_MODES if ablation.startswith("engine-no-")]
    return {f"{a}/{b}": ok[a]["samples_per_s"] / ok[b]["samples_per_s"] for a, b in pairs if a in ok and b in ok}


def fmt(value, digits=1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_table(results: list[dict], peak: dict, mem_label: str) -> None:
    print(f"| mode | pairs/s | images/s | tokens/s | step ms | data wait | backbone fwd | enc+heads fwd "
          f"| backward | optimizer | other | TFLOP/s | % of {peak['dtype']} matmul | {mem_label} | vs baseline | loss@1 |")
    print("| --- |" + " ---: |" * 16)
    for r in results:
        if "error" in r:
            print(f"| {r['mode']} | FAILED: {r['error']} |" + " |" * 15)
            continue
        print(f"| {r['mode']} | {fmt(r['samples_per_s'])} | {fmt(r['images_per_s'])} | {fmt(r['tokens_per_s'], 0)} "
              f"| {fmt(r['step_ms'])} | {fmt(r['data_wait_ms'])} | {fmt(r['backbone_fwd_ms'])} "
              f"| {fmt(r['encoder_heads_ms'])} | {fmt(r['backward_ms'])} | {fmt(r['optimizer_ms'])} "
              f"| {fmt(r['other_ms'])} | {fmt(r['tflops'], 3)} "
              f"| {fmt(None if r['peak_fraction'] is None else 100 * r['peak_fraction'])} "
              f"| {fmt(r['peak_mem_mb'], 0)} | {fmt(r['vs_baseline'], 2)}{'x' if r['vs_baseline'] else ''} | {r['losses'][0]:.4f} |")


def csv_rows(results: list[dict], meta: dict) -> list[dict]:
    rows = []
    for r in results:
        row = {"device": meta["device"], "date": meta["date"], "commit": meta["commit"],
               "config": meta["config"], "mode": r["mode"], "batch_pairs": meta["batch_pairs"],
               "steps": meta["steps"], "warmup": meta["warmup"], "error": r.get("error", "")}
        if "error" not in r:
            row.update({
                "images_per_step": f"{r['images_per_step']:.1f}",
                "gflop_per_step": "" if r["flops_per_step"] is None else f"{r['flops_per_step'] / 1e9:.2f}",
                "tflops": "" if r["tflops"] is None else f"{r['tflops']:.4f}",
                "peak_fraction": "" if r["peak_fraction"] is None else f"{r['peak_fraction']:.4f}",
                "vs_baseline": "" if r["vs_baseline"] is None else f"{r['vs_baseline']:.3f}"})
            for key in ("samples_per_s", "images_per_s", "tokens_per_s", "step_ms", "data_wait_ms",
                        "backbone_fwd_ms", "encoder_heads_ms", "backward_ms", "optimizer_ms", "other_ms",
                        "peak_mem_mb"):
                row[key] = f"{r[key]:.2f}"
        rows.append(row)
    return rows


def bar_chart(path: Path, results: list[dict], title: str) -> None:
    """Pairs/s per mode, horizontal bars (PIL: matplotlib is not a dependency)."""
    from PIL import Image, ImageDraw
    row, left, width = 34, 190, 520
    img = Image.new("RGB", (left + width + 160, 60 + row * len(results)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((10, 10), title, fill="black")
    draw.text((10, 26), "image-text pairs / s (median step); label: vs baseline", fill="gray")
    top = max([r["samples_per_s"] for r in results if "error" not in r], default=1.0)
    for i, r in enumerate(results):
        y = 50 + i * row
        draw.text((10, y + 8), r["mode"], fill="black")
        if "error" in r:
            draw.text((left, y + 8), "failed (see the JSON)", fill=(200, 0, 0))
            continue
        length = int(width * r["samples_per_s"] / top)
        colour = (31, 119, 180) if r["mode"].startswith("engine") else (255, 127, 14)
        draw.rectangle((left, y + 4, left + max(length, 1), y + row - 6), fill=colour)
        ratio = f" ({r['vs_baseline']:.2f}x)" if r["vs_baseline"] else ""
        draw.text((left + length + 6, y + 8), f"{r['samples_per_s']:.1f}{ratio}", fill="black")
    img.save(path)


# ---- max batch and latency -----------------------------------------------------------------

def largest_fitting(fits, start: int, granularity: int = 1) -> tuple[int, int | None]:
    """(largest batch b, a multiple of `granularity`, with fits(b); smallest b seen not to fit):
    down from `start` by halves until one fits, up by doubling until one does not, then
    bisection to within max(granularity, b / 16). (0, first failure) when nothing fits."""
    hi = None
    batch = max(granularity, start - start % granularity)
    while not fits(batch):
        hi = batch
        if batch <= granularity:
            return 0, hi
        batch = max(granularity, batch // 2 - (batch // 2) % granularity)
    lo = batch
    while hi is None:
        if fits(2 * lo):
            lo *= 2
        else:
            hi = 2 * lo
    while hi - lo > max(granularity, lo // 16):
        mid = (lo + hi) // 2
        mid -= mid % granularity
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, hi


def search_max_batch(args, mode: Mode, data: dict, run_dir: Path, dist, clock: Clock, start: int) -> dict:
    """Largest micro-batch (pairs) of `mode` that runs two steps without running out of GPU memory."""
    granularity = GROUPED_CAPTIONS if any(o.endswith(f"captions_per_image={GROUPED_CAPTIONS}")
                                          for o in mode.overrides) else 1
    tried: dict[int, bool] = {}

    def fits(batch: int) -> bool:
        if batch not in tried:
            try:
                cfg = mode_config(args, mode, batch, data, run_dir / f"max-{mode.name}-{batch}")
                run_mode(cfg, mode, dist, clock, warmup=1, steps=1, count_flops=False)
                tried[batch] = True
            except Exception as error:  # noqa: BLE001 - only out-of-memory is an answer
                if not is_oom(error):
                    raise
                tried[batch] = False
            gc.collect()
            torch.cuda.empty_cache()
            print(f"  {mode.name}: micro-batch {batch} pairs {'fits' if tried[batch] else 'out of memory'}",
                  flush=True)
        return tried[batch]

    best, first_oom = largest_fitting(fits, start, granularity)
    return {"mode": mode.name, "max_batch_pairs": best, "first_oom_pairs": first_oom, "tried": tried}


def measure_latency(args, cfg: Config, data: dict, dist, repeats: int) -> dict:
    """One VQA-style request: batch 1 at the config's resolution, eval mode, no grad."""
    from pixelbert.data.tokenizer import build_tokenizer
    from pixelbert.engine.batches import to_device
    from pixelbert.engine.decoding import build_decoder
    from pixelbert.engine.trainer import training_dtype
    from pixelbert.model.tasks import PixelBertForVQA
    from pixelbert.predict import Request, request_batch

    cuda = dist.device.type == "cuda"
    dtype = training_dtype(cfg)
    captions = [a["caption"] for a in json.loads(Path(data["annotations"]).read_text())["annotations"]]
    tokenizer = build_tokenizer(cfg.data, captions, Path(data["root"]) / "latency-tokenizer",
                                cfg.model.vocab_size, cfg.data.tokenizer_cache)
    ops.set_default_backend(cfg.model.kernels)
    torch.manual_seed(0)
    model = PixelBertForVQA(cfg.model, num_answers=3129).to(dist.device, dtype).eval()  # VQA v2's answers
    question = "what color is the small animal sitting next to the wooden table?"
    paths = sorted(Path(data["images"]).glob("*.jpg"))
    decoder, decoder_name = build_decoder(cfg.data, dist.device, max_batch_size=1)  # data.decoder's, as predict's

    def prepare(path: Path) -> dict:  # what `python -m pixelbert.predict` does to a request
        batch = request_batch(Request([str(path)], [question]), cfg, "vqa", tokenizer, decoder)
        return to_device(batch, dist.device, dtype)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    model_ms, total_ms = [], []
    with torch.inference_mode():
        ready = prepare(paths[0])
        for _ in range(5):  # warm-up: allocations, kernel selection
            model.logits(ready).argmax(-1).item()
        for i in range(repeats):
            sync()
            t = time.perf_counter()
            model.logits(ready).argmax(-1).item()
            model_ms.append((time.perf_counter() - t) * 1e3)
            t = time.perf_counter()
            model.logits(prepare(paths[i % len(paths)])).argmax(-1).item()  # decode + tokenise + copy + model
            total_ms.append((time.perf_counter() - t) * 1e3)
    quantile = lambda v, q: float(np.quantile(v, q))  # noqa: E731
    return {"task": "vqa (3,129 answers)", "batch": 1, "resolution": f"{cfg.data.image_shorter}/{cfg.data.image_longer}",
            "dtype": str(dtype).split(".")[-1], "decoder": decoder_name, "repeats": repeats,
            "model_ms_median": quantile(model_ms, 0.5), "model_ms_p90": quantile(model_ms, 0.9),
            "end_to_end_ms_median": quantile(total_ms, 0.5), "end_to_end_ms_p90": quantile(total_ms, 0.9)}


# ---- main ----------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=None, help="configs/x152.json on a GPU; configs/tiny.json without one")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per mode (GPU 20, CPU 10, --quick 8)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (GPU 5, CPU 3, --quick 2)")
    parser.add_argument("--modes", default=",".join(ALL_MODES), help=f"comma-separated, of {', '.join(ALL_MODES)}")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"pairs per step in every mode (default: the config's micro-batch rounded down "
                             f"to a multiple of {GROUPED_CAPTIONS}, so engine-grouped holds whole images; "
                             f"--quick: {2 * GROUPED_CAPTIONS})")
    parser.add_argument("--images", type=int, default=None, help="generated JPEGs (GPU 512, CPU 96, --quick 48)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny, a few steps, < 2 min on 2 cores")
    parser.add_argument("--max-batch", action="store_true", help="GPU: search the largest micro-batch that fits")
    parser.add_argument("--max-batch-modes", default="engine", help="modes searched by --max-batch")
    parser.add_argument("--latency", action="store_true", help="single-request VQA-style inference latency")
    parser.add_argument("--out", default=None, help="JSON results (default runs/throughput/<config>.json; PNG beside)")
    parser.add_argument("--csv", default=str(ROOT / "benchmarks" / "throughput.csv"))
    parser.add_argument("--keep-data", action="store_true", help="keep the generated images and runs")
    parser.add_argument("--profile", type=int, default=0,
                        help="after the timed steps, profile this many more (torch.profiler) beside --out")
    parser.add_argument("--profile-modes", default="engine", help="modes --profile applies to")
    parser.add_argument("override", nargs="*", help="key.path=value applied to every mode")
    args = parser.parse_args(argv)

    configure_accelerator()
    cuda = torch.cuda.is_available()
    if args.config is None:
        args.config = "configs/x152.json" if cuda and not args.quick else "configs/tiny.json"
    if not cuda and Path(args.config).name != "tiny.json":
        print(f"no GPU: running configs/tiny.json on the CPU instead of {args.config}")
        args.config = "configs/tiny.json"
    args.config = str(ROOT / args.config) if not Path(args.config).is_absolute() else args.config
    steps = args.steps or (8 if args.quick else 20 if cuda else 10)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5 if cuda else 3)
    warmup = max(warmup, 1)  # the first step is the FLOP-counted one, never timed
    modes_wanted = [m for m in args.modes.split(",") if m]
    unknown = sorted(set(modes_wanted) - set(ALL_MODES))
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {ALL_MODES}")

    dist = init_distributed()
    import deepspeed
    deepspeed.utils.logger.setLevel(logging.WARNING)
    base_cfg = load_config(args.config, args.override)
    bf16 = bool(base_cfg.deepspeed.get("bf16", {}).get("enabled"))
    batch = args.batch or (2 * GROUPED_CAPTIONS if args.quick else
                           max(GROUPED_CAPTIONS, base_cfg.micro_batch_size - base_cfg.micro_batch_size % GROUPED_CAPTIONS))
    modes = build_modes(cuda, bf16, compile_cnn=not args.quick)
    clock = Clock(cuda)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    meta = {"device": device_name(cuda), "date": stamp, "commit": git_commit(),
            "config": os.path.relpath(args.config, ROOT), "batch_pairs": batch, "steps": steps, "warmup": warmup,
            "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "notes": [
                "baseline-tuned: torch.compile of the CNN (model.compile_backbone=default, compiled in its "
                "warm-up steps; a new padded image size may recompile); its FLOPs are baseline's count"
                if not args.quick else "baseline-tuned: --quick leaves torch.compile out (compiling the CNN "
                "takes about a minute on 2 CPU cores): channels-last only",
                "gradient_accumulation_steps forced to 1: a step is one micro-batch and one optimiser step",
            ]}
    if not cuda:
        meta["notes"].append("CPU: every mode runs fp32 (tiny.json has no bf16), so baseline = baseline-fp32; "
                             "data.decoder=auto takes PIL and train.optimizer_kernel=auto takes foreach on "
                             "a CPU, so engine-no-decoder = engine-no-fused-optim = engine")

    shm = Path("/dev/shm")
    tmp = Path(tempfile.mkdtemp(prefix="pixelbert-throughput-", dir=shm if shm.is_dir() else None))
    out = Path(args.out) if args.out else ROOT / "runs" / "throughput" / f"{Path(args.config).stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {**meta}
    try:
        images = args.images or (48 if args.quick else 512 if cuda else 96)
        t = time.perf_counter()
        data = make_coco_set(tmp / "coco", images, min(16, os.cpu_count() or 1))
        print(f"{data['count']} COCO-like JPEGs (mean {data['mean_kb']} KB, 5 captions each) in {tmp} "
              f"({time.perf_counter() - t:.1f} s); {meta['config']} on {meta['device']}; "
              f"{batch} pairs per step; {warmup} warm-up + {steps} timed steps per mode", flush=True)
        report["data"] = {k: data[k] for k in ("count", "mean_kb")}

        if args.latency:
            if not cuda and Path(args.config).name != "tiny.json":
                print("--latency: skipped on the CPU for configs other than tiny")
            else:
                cfg = mode_config(args, modes["engine"], batch, data, tmp / "latency")
                report["latency"] = measure_latency(args, cfg, data, dist, repeats=50 if cuda else 20)
                lat = report["latency"]
                print(f"latency (VQA, batch 1, {lat['resolution']}, {lat['dtype']}, eval, no grad): model "
                      f"{lat['model_ms_median']:.2f} ms median / {lat['model_ms_p90']:.2f} p90; with JPEG decode "
                      f"({lat['decoder']}), "
                      f"tokenising and copy {lat['end_to_end_ms_median']:.2f} / {lat['end_to_end_ms_p90']:.2f} ms")
        if args.max_batch:
            if not cuda:
                print("--max-batch: skipped (needs a GPU: there is no device memory limit to find on the CPU)")
            else:
                report["max_batch"] = []
                for name in filter(None, args.max_batch_modes.split(",")):
                    # Without, then with activation checkpointing (CNN stages and encoder layers).
                    checkpointed = Mode(f"{name}+checkpointing", modes[name].overrides + CHECKPOINTING,
                                        modes[name].autocast)
                    for mode in (modes[name], checkpointed):
                        try:
                            result = search_max_batch(args, mode, data, tmp, dist, clock, base_cfg.micro_batch_size)
                        except Exception as error:  # noqa: BLE001 - not memory: report it, go on
                            reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                            report["max_batch"].append({"mode": mode.name, "error": reason})
                            print(f"max micro-batch, {mode.name}: FAILED: {reason}", flush=True)
                            continue
                        report["max_batch"].append(result)
                        print(f"max micro-batch, {mode.name}: {result['max_batch_pairs']} pairs "
                              f"(first out of memory: {result['first_oom_pairs']})", flush=True)
        if not (args.latency or args.max_batch):
            peak = peak_matmul_tflops(cuda)
            report["peak_matmul"] = peak
            print(f"measured {peak['dtype']} matmul {peak['shape']}: {peak['tflops']:.3f} TFLOP/s", flush=True)
            results = []
            for name in modes_wanted:
                t = time.perf_counter()
                cfg = mode_config(args, modes[name], batch, data, tmp / f"run-{name}")
                try:
                    results.append(run_mode(cfg, modes[name], dist, clock, warmup, steps,
                                            profile=args.profile if name in args.profile_modes.split(",") else 0,
                                            profile_prefix=out.with_name(f"{out.stem}-profile")))
                except Exception as error:  # noqa: BLE001 - one broken path must not hide the others
                    reason = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                    results.append({"mode": name, "overrides": modes[name].overrides, "error": reason})
                    print(f"  {name}: FAILED: {reason}", flush=True)
                    reset_peak_memory(cuda)
                    continue
                print(f"  {name}: {results[-1]['samples_per_s']:.1f} pairs/s ({time.perf_counter() - t:.0f} s)",
                      flush=True)
            report["ratios"] = add_ratios(results, peak)
            report["modes"] = results
            print()
            print_table(results, peak, "peak GPU MB" if cuda else "peak RSS MB")
            print()
            for key, value in report["ratios"].items():
                print(f"{key}: {value:.2f}x")
            for note in meta["notes"]:
                print(f"note: {note}")
            append_csv(args.csv, CSV_FIELDS, csv_rows(results, meta))
            bar_chart(out.with_suffix(".png"), results, f"{meta['config']} on {meta['device']}, {meta['date']}")
        out.write_text(json.dumps(report, indent=2, default=str))
        print(f"results: {out}" + (f", {out.with_suffix('.png')}, {args.csv}" if "modes" in report else ""))
    finally:
        if not args.keep_data:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
