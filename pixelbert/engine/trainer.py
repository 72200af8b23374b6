"""The training loop of every task (pre-training and fine-tuning): build -> DeepSpeed -> steps ->
logs and checkpoints."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pixelbert import ops
from pixelbert.attention import resolve_varlen_backend
from pixelbert.config import Config, ConfigError, resume_changes
from pixelbert.engine import checkpoint
from pixelbert.data import skips as skip_counts
from pixelbert.data.skips import SkipCounter
from pixelbert.engine.batches import BatchPreparer, Prefetcher
from pixelbert.engine.data import build_training_data
from pixelbert.engine.distributed import DistInfo, all_reduce_sum, broadcast_buffers, init_distributed, log
from pixelbert.engine.eval_setup import EvalSetup, eval_decoder
from pixelbert.engine.evaluator import evaluate, read_eval_records
from pixelbert.engine.metrics import JsonlLog, MetricsWindow
from pixelbert.engine.monitors import RunPosition, cut_back_monitors, monitor_events
from pixelbert.engine.optim import build_optimizer, build_scheduler
from pixelbert.engine.preemption import StopSignals, StoppedBySignal
from pixelbert.engine.profiling import StepProfiler
from pixelbert.engine.weights import load_initial_weights
from pixelbert.fileio import write_atomic
from pixelbert.model.tasks import build_model


def deepspeed_config(cfg: Config) -> dict:
    """The config's `deepspeed` section plus what the engine needs to say itself."""
    ds = dict(cfg.deepspeed)
    # SGDAdamW is the engine's own optimiser (tested against torch's SGD and AdamW); ZeRO only
    # accepts optimisers it does not know when told so.
    ds.setdefault("zero_allow_untested_optimizer", True)
    ds.setdefault("steps_per_print", 10 ** 9)  # the engine logs; keep DeepSpeed's own log quiet
    if optimizer_offloaded(ds):
        # ZeRO-Offload steps the optimiser on the CPU partitions. DeepSpeed refuses a client
        # optimiser there unless told; SGDAdamW then runs torch's foreach kernels on the CPU
        # (DeepSpeedCPUAdam has no SGD for the CNN's part).
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


def optimizer_offloaded(ds: dict) -> bool:
    """Whether the `deepspeed` section offloads the optimiser state (ZeRO-Offload, CPU or NVMe)."""
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") not in ("none", None)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def training_dtype(cfg: Config) -> torch.dtype:
    """The dtype the `deepspeed` section trains in (its master weights stay fp32)."""
    if cfg.deepspeed.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if cfg.deepspeed.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The current learning rates of the CNN (`backbone_lr`) and of everything else (`lr`)."""
    rates = {}
    for group in optimizer.param_groups:
        key = "backbone_lr" if group["backbone"] else "lr"
        rates.setdefault(key, group["lr"])
    return rates


def plain_grad_norm(engine) -> torch.Tensor | None:
    """The global gradient norm before clipping, where DeepSpeed leaves the gradients in the
    parameters (no ZeRO, fp32): called after the last micro-batch's backward, which averaged them
    over the ranks. None otherwise: then the ZeRO / bf16 / fp16 optimiser computes it in the
    step (get_global_grad_norm; with gradient_clipping > 0)."""
    if engine.zero_optimization() or engine.bfloat16_enabled() or engine.fp16_enabled():
        return None
    norms = [torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64)
             for p in engine.module.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else None


def attention_plan(cfg: Config, device: torch.device, dtype: torch.dtype) -> str:
    """Which attention runs, said at start-up; a forced backend that cannot run here fails now,
    not at the first step."""
    if not cfg.model.packed_sequences:
        return f"padded encoder (model.packed_sequences=false), {cfg.model.attention} attention"
    heads = cfg.model.num_attention_heads
    probe = torch.empty(1, heads, cfg.model.hidden_size // heads, device=device, dtype=dtype)
    dropout = cfg.model.attention_probs_dropout_prob
    train_backend = resolve_varlen_backend(cfg.model.attention, probe, dropout)
    eval_backend = resolve_varlen_backend(cfg.model.attention, probe, 0.0)
    plan = f"packed sequences, varlen attention: {train_backend}"
    if eval_backend != train_backend:
        plan += (f" in training ({eval_backend} has no attention dropout, and "
                 f"attention_probs_dropout_prob={dropout}), {eval_backend} in evaluation")
    return plan


class BestValidation:
    """train.best_metric: the best validation value so far (checkpoints/best.json's on resume)."""

    def __init__(self, cfg: Config, ckpt_dir: Path):
        self.metric, self.higher = cfg.train.best_metric, cfg.train.best_mode == "max"
        record = checkpoint.best_record(ckpt_dir) if cfg.train.resume else None
        self.value = record["value"] if record and record["metric"] == self.metric else None

    def improves(self, report: dict) -> bool:
        """Whether `report` beats every earlier validation (then it becomes the best)."""
        if self.metric not in report:  # e.g. a VQA split without annotations has no accuracy
            raise ValueError(f"train.best_metric={self.metric!r} is not in this validation's report "
                             f"(it has {sorted(k for k, v in report.items() if isinstance(v, float))})")
        value = float(report[self.metric])
        if value != value:  # NaN is never better
            return False
        if self.value is not None and not (value > self.value if self.higher else value < self.value):
            return False
        self.value = value
        return True


class Validation:
    """`train.eval_every`: the evaluation `python -m pixelbert.evaluate` runs, on data.val, during
    training, appended to eval.jsonl (cut back to the checkpoint's step on resume, like
    metrics.jsonl). The ranks split the work; under ZeRO-3 every forward pass gathers
    parameters collectively, so each rank makes as many passes as the busiest one
    (EvalSetup.equal_passes). The RNG state is put back afterwards, so a run with validation
    trains exactly as one without."""

    def __init__(self, cfg: Config, data, dist: DistInfo, float_dtype: torch.dtype, start_step: int):
        self.cfg, self.dist = cfg, dist
        self.records = read_eval_records(cfg, "val", dist, cfg.train.eval_records)
        zero3 = cfg.deepspeed.get("zero_optimization", {}).get("stage", 0) == 3
        decoder, decoder_name = eval_decoder(cfg, dist.device)
        self.setup = EvalSetup(cfg, data.tokenizer, dist, data.answers, float_dtype, equal_passes=zero3,
                               decoder=decoder)
        output_dir = Path(cfg.train.output_dir)
        self.log = JsonlLog(output_dir / "eval.jsonl", start_step if cfg.train.resume else None) \
            if dist.is_main else None
        log(dist, f"validation every {cfg.train.eval_every} steps on {len(self.records)} val records, "
                  f"images decoded by {decoder_name}")

    def run(self, engine, step: int) -> dict:
        start = time.perf_counter()
        self.setup.results_suffix = f"_step{step}"
        devices = [self.dist.device] if self.dist.device.type == "cuda" else []
        engine.eval()
        skips = SkipCounter()
        with torch.random.fork_rng(devices=devices):
            report = evaluate(engine.module, self.setup, self.records, "val", skips)
        engine.train()
        report = {"step": step, **report, "skipped": skips.totals()[0], "eval_s": time.perf_counter() - start}
        if self.log:
            self.log.write(report)
        if engine.monitor.enabled:  # DeepSpeed's TensorBoard / W&B / Comet / CSV (rank 0 writes)
            engine.monitor.write_events(monitor_events("Eval", report, step))
        shown = {k: round(v, 4) for k, v in report.items() if isinstance(v, float) and k != "eval_s"}
        log(self.dist, f"validation at step {step}: {shown}")
        return report


def build_engine(cfg: Config, dist: DistInfo, data, load_universal: bool = False) -> tuple:
    """The task's model with its initial weights, its optimiser and schedule, wrapped by
    DeepSpeed: (engine, optimizer, the training float dtype). `load_universal`: the engine
    will resume from DeepSpeed's universal checkpoint layout (checkpoint.needs_universal)."""
    import deepspeed  # after init_distributed chose the accelerator
    ops.set_default_backend(cfg.model.kernels)
    seed_everything(cfg.train.seed)  # the same initial weights on every rank, whatever ran before
    model = build_model(cfg, len(data.answers.answers) if data.answers else None, backbone_weights=False)
    load_initial_weights(model, cfg.model.backbone_weights, cfg.model.bert_checkpoint, cfg.task.init_from,
                         lambda line: log(dist, line))
    if cfg.model.frozen_bn and not (cfg.model.backbone_weights or cfg.task.init_from):
        log(dist, "warning: model.frozen_bn without model.backbone_weights trains a CNN with no "
                  "normalisation at all; give ImageNet weights or set model.frozen_bn=false")
    log(dist, attention_plan(cfg, dist.device, training_dtype(cfg)))
    if optimizer_offloaded(cfg.deepspeed):
        log(dist, "ZeRO-Offload: the optimiser step (SGD for the CNN, AdamW for the rest) runs on the CPU "
                  "with torch's foreach kernels, not DeepSpeed's CPUAdam")
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    float_dtype = training_dtype(cfg)
    # DeepSpeed casts parameters only; BatchNorm statistics and other buffers must follow.
    model.to(float_dtype)
    seed_everything(cfg.train.seed + 1 + dist.rank)  # dropout differs per rank; data order does not
    ds_config = deepspeed_config(cfg)
    if load_universal:
        ds_config["checkpoint"] = {**ds_config.get("checkpoint", {}), "load_universal": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine, optimizer, float_dtype


def resume(engine, cfg: Config, ckpt_dir: Path, dist: DistInfo) -> int:
    """With train.resume, load the latest checkpoint into `engine` and say (or, with
    train.resume_strict, refuse) what the config changes; the step to go on from."""
    if not cfg.train.resume:
        return 0
    client_state = checkpoint.load(engine, ckpt_dir, dist)
    if client_state is None:
        log(dist, f"train.resume: no checkpoint in {ckpt_dir}, starting from step 0")
        return 0
    log(dist, f"resumed from {ckpt_dir} at step {client_state['step']}")
    changes = resume_changes(client_state.get("config"), cfg.to_dict())
    saved_ranks = client_state.get("world_size", dist.world_size)  # older checkpoints: not recorded
    if saved_ranks != dist.world_size:  # the global batch (so the data stream) and the ranks' random streams
        saved_ds = (client_state.get("config") or {}).get("deepspeed", cfg.deepspeed)
        saved_pairs = saved_ranks * saved_ds["train_micro_batch_size_per_gpu"] * saved_ds.get("gradient_accumulation_steps", 1)
        changes.append(f"ranks: {saved_ranks} -> {dist.world_size} (a step's pairs: {saved_pairs} -> "
                       f"{dist.world_size * cfg.micro_batch_size * cfg.grad_accum_steps})")
    if changes and cfg.train.resume_strict:
        raise ConfigError(f"train.resume_strict: the config differs from the checkpoint's in {ckpt_dir} in what "
                          "the run computes: " + "; ".join(changes))
    if changes:
        log(dist, "warning: the config differs from the checkpoint's in what the run computes, so it "
                  "goes on as an uninterrupted run would not: " + "; ".join(changes))
    return client_state["step"]


class TrainLog:
    """Each train.log_every steps: the window's losses, rates, throughput, data wait, gradient
    norm and skips into metrics.jsonl (main rank), DeepSpeed's monitors and the progress bar;
    stops the run when the skips pass data.max_bad_fraction."""

    def __init__(self, cfg: Config, engine, dist: DistInfo, output_dir: Path, start_step: int):
        self.cfg, self.engine, self.dist = cfg, engine, dist
        self.metrics = JsonlLog(output_dir / "metrics.jsonl", start_step if cfg.train.resume else None) \
            if dist.is_main else None
        if engine.monitor.enabled and dist.is_main:  # rank 0 writes the monitors' files
            for folder, dropped in cut_back_monitors(engine.monitor,
                                                     RunPosition(start_step, engine.global_samples)).items():
                if dropped:
                    log(dist, f"monitor: dropped {dropped} events logged past step {start_step} from {folder}")
        self.window = MetricsWindow(dist.device)
        self.grad_norms: list[torch.Tensor] = []  # one per optimiser step since the last log line
        self.progress = tqdm(total=cfg.train.max_steps, initial=start_step, disable=not dist.is_main,
                             desc=cfg.train.task, dynamic_ncols=True)
        self.window_start = time.perf_counter()
        self.last: dict = {}

    def step_done(self, step_norm) -> None:
        if step_norm is not None:  # a device tensor, or a float (inf on an fp16 overflow): no sync here
            self.grad_norms.append(torch.as_tensor(step_norm, dtype=torch.float64, device=self.dist.device))
        self.progress.update(1)

    def write(self, step: int, rates: dict, batches: Prefetcher, skips: SkipCounter) -> None:
        elapsed = time.perf_counter() - self.window_start
        summary = self.window.summary()
        skipped, attempts = skips.totals(all_reduce_sum, self.dist.device)
        last = {"step": step, **{k: v for k, v in summary.items() if k not in ("samples", "images")},
                **rates,
                "samples_per_s": summary["samples"] / elapsed,
                "images_per_s": summary["images"] / elapsed,
                "data_wait_fraction": batches.wait_s / elapsed,
                "skipped": skipped}
        if self.grad_norms:  # the steps' global gradient norms before clipping, averaged
            last["grad_norm"] = torch.stack(self.grad_norms).mean().item()
            self.grad_norms.clear()
        if self.metrics:
            self.metrics.write(last)
        if self.engine.monitor.enabled:
            self.engine.monitor.write_events(monitor_events("Train", last, step))
        shown = {k.removesuffix("_loss"): f"{v:.3f}" for k, v in last.items() if k.endswith("_loss")}
        self.progress.set_postfix(loss=f"{last['loss']:.3f}", **shown, sps=f"{last['samples_per_s']:.1f}")
        self.window.reset()
        self.window_start, batches.wait_s = time.perf_counter(), 0.0
        self.last = last
        skips.check(skipped, attempts, self.cfg.data.max_bad_fraction, self.cfg.data.min_items_before_bad_check)

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (a validation) out of the window's samples_per_s."""
        self.window_start += seconds


def train(cfg: Config) -> dict:
    """Run pre-training or fine-tuning (train.task) as configured; returns the last logged
    metrics (on every rank). A stop signal ends it with StoppedBySignal, after its checkpoint."""
    dist = init_distributed()
    output_dir = Path(cfg.train.output_dir)
    ckpt_dir = output_dir / "checkpoints"
    if dist.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(output_dir / "config.json", json.dumps(cfg.to_dict(), indent=2))

    data = build_training_data(cfg, dist)
    log(dist, data.description)
    skips = SkipCounter()
    if dist.is_main and data.startup_skips:  # every rank read them; count them once
        skips.add(data.startup_skips, attempts=data.startup_attempts)
    zero_stage = cfg.deepspeed.get("zero_optimization", {}).get("stage", 0)
    load_universal = cfg.train.resume and checkpoint.needs_universal(ckpt_dir, dist.world_size, zero_stage)
    if load_universal:
        log(dist, f"the latest checkpoint holds ZeRO-{zero_stage} partitions of {checkpoint.saved_ranks(ckpt_dir)} "
                  f"ranks: resuming on {dist.world_size} through DeepSpeed's universal layout (written once, "
                  "into the checkpoint's zero/ folder)")
    engine, optimizer, float_dtype = build_engine(cfg, dist, data, load_universal)
    start_step = resume(engine, cfg, ckpt_dir, dist)
    train_log = TrainLog(cfg, engine, dist, output_dir, start_step)
    validation = Validation(cfg, data, dist, float_dtype, start_step) if cfg.train.eval_every else None
    best = BestValidation(cfg, ckpt_dir) if cfg.train.best_metric else None
    batches = Prefetcher(iter(data.make_loader(start_step)),
                         BatchPreparer(dist.device, float_dtype, skips, data.decoder), dist.device)
    accum = cfg.grad_accum_steps
    stop_step = cfg.train.stop_at_step or cfg.train.max_steps
    profiler = StepProfiler(*cfg.train.profile_steps, output_dir, f"profile_rank{dist.rank}",
                            dist.device.type == "cuda") if cfg.train.profile_steps else None
    stop_signals, stopped_by = StopSignals(cfg.train.stop_signals), None
    engine.train()
    try:  # the loader workers end with the loop, also on an error
        for step in range(start_step + 1, stop_step + 1):
            if profiler:
                profiler.before(step)
            rates = learning_rates(optimizer)  # the rates this step's update uses
            for micro in range(accum):
                batch, stats = next(batches)
                out = engine(batch)
                engine.backward(out["loss"])
                train_log.window.add(out, samples=len(batch["input_ids"]), images=stats["images"],
                                     padded_fraction=stats["padded_fraction"])
                if micro == accum - 1:
                    nonfinite, signalled = train_log.window.step_check(stop_signals.received is not None)
                    if nonfinite:
                        raise FloatingPointError(f"non-finite loss at step {step}; the optimiser did not step. "
                                                 "Lower the learning rates or check the data of this step.")
                    own_norm = plain_grad_norm(engine)
                engine.step()
            train_log.step_done(own_norm if own_norm is not None else engine.get_global_grad_norm())
            if profiler:
                profiler.after(step)
            if step % cfg.train.log_every == 0 or step == stop_step or signalled:
                train_log.write(step, rates, batches, skips)
            validate = validation and (step % cfg.train.eval_every == 0 or step == stop_step)
            save = (cfg.train.save_every and step % cfg.train.save_every == 0) or step == stop_step or signalled
            if validate or save:
                broadcast_buffers(engine.module)
            new_best = False
            if validate:
                report = validation.run(engine, step)
                train_log.pause(report["eval_s"])  # samples_per_s counts training time only
                new_best = best is not None and best.improves(report)
            if save or new_best:
                run_state = {"config": cfg.to_dict(), "world_size": dist.world_size}
                saved = checkpoint.save(engine, ckpt_dir, step, dist, run_state, keep=cfg.train.keep_checkpoints,
                                        best={"metric": best.metric, "value": best.value} if new_best else None)
                if new_best:
                    log(dist, f"best validation so far ({best.metric} {best.value:.4f}): {saved}")
            if signalled:  # every rank agreed at this step's check (a scheduler's notice: no validation)
                stopped_by = (f"{stop_signals.received or 'a stop signal (on another rank)'}: saved {saved} and "
                              "stopped; go on with train.resume=true")
                log(dist, stopped_by)
                stop_step = step
                break
    finally:
        stop_signals.close()
        if profiler:
            profiler.close()
            if profiler.written:
                log(dist, f"profile of steps {profiler.first}-{profiler.last}: {', '.join(map(str, profiler.written))}")
        train_log.progress.close()
        batches.close()
    skipped, attempts = skips.totals(all_reduce_sum, dist.device)
    log(dist, f"bad records skipped: {skip_counts.summary(skipped)} (of {attempts} read)")
    # Parameter and optimiser-state bytes this rank holds (ZeRO partitions), one file per rank.
    from pixelbert.engine.memory import state_bytes
    (output_dir / f"state_bytes_rank{dist.rank}.json").write_text(json.dumps(state_bytes(engine), indent=2))
    log(dist, f"stopped at step {stop_step}; metrics in {output_dir / 'metrics.jsonl'}, "
              f"checkpoints in {ckpt_dir}")
    if stopped_by:
        raise StoppedBySignal(stopped_by)
    return train_log.last
