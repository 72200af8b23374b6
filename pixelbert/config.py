"""One JSON file -> typed, validated config.

`load_config(path, overrides)` reads the sections `model`, `data`, `train` and `deepspeed`.
The first three become dataclasses whose every key is checked for name, type and range at
load time; `deepspeed` stays the plain dict handed to `deepspeed.initialize`. Overrides are
`key.path=value` strings; the value is parsed as JSON when it can be (`20`, `true`,
`[1,2]`, `null`) and taken as a string otherwise.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import signal
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pixelbert.data.images import IMAGENET_NORM, PixelNorm


class ConfigError(ValueError):
    """A config key is unknown, of the wrong type, or holds an impossible value."""


BACKBONES = ("tiny", "resnet50", "resnext101_32x8d", "resnext152_32x8d")
KERNEL_BACKENDS = ("auto", "reference", "triton", "ext")
ATTENTION_BACKENDS = ("auto", "flash_attn", "torch_varlen", "sdpa", "math")
HIDDEN_ACTS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")
SOURCE_FORMATS = ("coco_captions", "vg_regions", "vqa", "nlvr2", "karpathy")
# Formats that give image-caption pairs, i.e. can feed MLM + ITM pre-training.
CAPTION_FORMATS = ("coco_captions", "vg_regions", "karpathy")
# The validation numbers train.best_metric can follow, by task.
BEST_METRICS = {"pretrain": ("loss", "mlm_loss", "itm_loss", "mlm_acc", "itm_acc"),
                "vqa": ("overall",), "nlvr2": ("accuracy", "consistency"),
                "retrieval": ("mean", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")}
EXCLUDE_FORMATS = ("coco_captions", "karpathy", "vqa")  # sources that name COCO image ids
DECODERS = ("auto", "dali", "pil")
LR_SCHEDULES = ("linear", "step", "constant")
TASKS = ("pretrain", "vqa", "nlvr2", "retrieval")
OPTIMIZER_KERNELS = ("auto", "fused", "foreach")
# train.py's exit codes besides 0 and train.signal_exit_code: an uncaught error, a config or
# data-format error, too many unreadable records, divergence.
RESERVED_EXIT_CODES = (1, 2, 3, 4)
# A vocabulary without tokenizer_config.json is judged cased when more than CASED_SHARE of its
# words hold a capital and uncased under UNCASED_SHARE; with fewer
# than CASING_MIN_WORDS words it is not judged.
CASED_SHARE, UNCASED_SHARE, CASING_MIN_WORDS = 0.05, 0.001, 1000
# The source format each fine-tuning task trains and evaluates on.
TASK_FORMATS = {"vqa": ("vqa",), "nlvr2": ("nlvr2",), "retrieval": ("karpathy", "coco_captions")}


@dataclass
class ModelConfig:
    # Transformer keys use Hugging Face BertConfig names so a BERT checkpoint maps 1:1.
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    # Visual side.
    backbone: str = "resnet50"
    backbone_weights: Optional[str] = None  # local torchvision-layout state dict (.pth/.safetensors)
    frozen_bn: bool = True  # BatchNorm folded into a fixed per-channel affine
    freeze_stem: bool = True  # stem + first stage get no gradient
    channels_last: bool = False
    pixel_samples: int = 100  # positions sampled per image in pre-training
    # Initialisation of the pooler and of the ITM / task heads: "bert" (normal, std
    # initializer_range) or "fan_in" (normal, std 1/sqrt(fan-in)). ITM is a pure interaction
    # task: at BERT's small init its loss sits at ln 2 far longer (measured on the tiny model).
    head_init: str = "bert"
    # Text side initialisation: local Hugging Face BERT folder or weights file.
    bert_checkpoint: Optional[str] = None
    # Backends.
    kernels: str = "auto"
    attention: str = "auto"  # flash_attn > torch_varlen > sdpa > math (pixelbert.attention)
    # One packed sequence per pair through the encoder (no padding); false: the padded reference.
    packed_sequences: bool = True
    # Activation checkpointing (recompute in backward, trade compute for memory): the CNN's four
    # stages, and every encoder layer.
    checkpoint_backbone: bool = False
    checkpoint_encoder: bool = False
    # torch.compile of the CNN: "" off, else the mode ("default", "reduce-overhead", "max-autotune").
    compile_backbone: str = ""

    def validate(self) -> None:
        _positive(self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                  "intermediate_size", "max_position_embeddings", "type_vocab_size", "pixel_samples")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"model.hidden_size ({self.hidden_size}) must be divisible by "
                              f"model.num_attention_heads ({self.num_attention_heads})")
        _choice(self, "backbone", BACKBONES)
        _choice(self, "hidden_act", HIDDEN_ACTS)
        _choice(self, "kernels", KERNEL_BACKENDS)
        _choice(self, "attention", ATTENTION_BACKENDS)
        _choice(self, "head_init", ("bert", "fan_in"))
        _choice(self, "compile_backbone", ("", "default", "reduce-overhead", "max-autotune",
                                           "max-autotune-no-cudagraphs"))
        _probability(self, "hidden_dropout_prob", "attention_probs_dropout_prob")
        if not 0 < self.layer_norm_eps < 1:
            raise ConfigError(f"model.layer_norm_eps must be in (0, 1), got {self.layer_norm_eps}")


@dataclass
class SourceConfig:
    """One data source in its published format (see pixelbert.data.formats).

    `annotations`: the captions / region descriptions / VQA annotations / NLVR2 jsonl / Karpathy
    JSON; `questions`: the VQA questions file (VQA's `annotations` may be empty for a test split);
    `images`: the image folder (VG: folders joined with ","); `split`: the Karpathy split
    ("train", "val", "test", "restval", or several joined with "+"); `weight`: how many times
    per epoch this source's items are drawn relative to once (0.5 = a random half each epoch);
    `image_data`: VG only, its `image_data.json`, which names the COCO id of the images VG took
    from COCO (needed for data.exclude to reach them).
    """
    format: str = "coco_captions"
    annotations: str = ""
    questions: str = ""
    images: str = ""
    split: str = ""
    weight: float = 1.0
    image_data: str = ""

    def validate(self, where: str, needs_images: bool = True) -> None:
        if self.format not in SOURCE_FORMATS:
            raise ConfigError(f"{where}.format must be one of {SOURCE_FORMATS}, got {self.format!r}")
        required = {"vqa": ("questions", "images"), "karpathy": ("annotations", "images", "split")}
        for key in required.get(self.format, ("annotations", "images")):
            if key == "images" and not needs_images:  # data.exclude reads only the image ids
                continue
            if not getattr(self, key):
                raise ConfigError(f"{where}.{key} must name a path" if key != "split" else
                                  f"{where}.split must name the Karpathy split (train, val, test, "
                                  f"restval, or several joined with '+')")
        if not self.weight > 0:
            raise ConfigError(f"{where}.weight must be > 0, got {self.weight}")
        if self.image_data and self.format != "vg_regions":
            raise ConfigError(f"{where}.image_data is Visual Genome's image_data.json: only for "
                              f"format vg_regions, not {self.format}")


@dataclass
class DataConfig:
    # Empty `train` means the embedded synthetic set, generated into `synthetic_dir`.
    train: list[SourceConfig] = field(default_factory=list)
    val: list[SourceConfig] = field(default_factory=list)
    # Held-out images: the COCO images of these sources (formats coco_captions, karpathy, vqa;
    # e.g. the Karpathy val and test splits) are removed from data.train, by COCO id, so that
    # no task trains on an image it is evaluated on. Visual Genome holds about 51K COCO images:
    # a vg_regions source then needs its image_data.
    exclude: list[SourceConfig] = field(default_factory=list)
    synthetic_dir: str = "data/synthetic"
    synthetic_images: int = 2000
    synthetic_seed: int = 0
    # Tokenizer: a local BERT folder (vocab.txt). None: WordPiece trained on the captions, cached.
    tokenizer: Optional[str] = None
    # Trained vocabularies are shared here by caption fingerprint, so that every run on the same
    # captions gets the same token ids (the WordPiece trainer is not deterministic).
    tokenizer_cache: str = "~/.cache/pixelbert/tokenizers"
    # The records read from the sources are packed once per run, in the run folder (""), or in
    # this folder shared by runs, one entry per fingerprint of sources, settings and reading code,
    # so that fine-tuning runs on the same data read the annotation files once. It must be on a
    # file system every rank sees. An entry no run is using may be deleted.
    records_cache: str = ""
    lowercase: bool = True
    max_text_len: int = 40  # including [CLS] and [SEP]
    # Resize keeping aspect ratio: shorter side to image_shorter, longer side at most image_longer.
    image_shorter: int = 800
    image_longer: int = 1333
    pad_multiple: int = 32  # padded batch sizes are multiples of this (the backbone stride)
    # The CNN's input normalisation, (pixel - mean) / std per RGB channel on 0-255 pixels: what
    # model.backbone_weights were trained with. Default: torchvision's ImageNet weights. Weights
    # converted from Detectron (pixelbert.tools.convert_backbone) name theirs, and a mismatch
    # stops the run.
    pixel_mean: list[float] = field(default_factory=lambda: list(IMAGENET_NORM.mean))
    pixel_std: list[float] = field(default_factory=lambda: list(IMAGENET_NORM.std))
    # "dali": decode + resize + normalise with NVIDIA DALI (GPU "mixed" decoding when a GPU is
    # used, CPU otherwise); "pil": PIL in the loader workers; "auto": DALI when installed.
    decoder: str = "auto"
    dali_hw_decoder_load: float = 0.65  # share of JPEG work given to the A100/H100 hardware decoder
    dali_threads: int = 4
    # Image-grouped batches: a micro-batch of train_micro_batch_size_per_gpu pairs holds
    # micro / captions_per_image images, each with up to captions_per_image of its captions;
    # the CNN runs once per image and ITM negatives take captions of other in-batch images.
    captions_per_image: int = 1
    # Sort the images of each window of `aspect_grouping_window` steps by aspect ratio so a
    # step's images pad little (1: off). Changes which images share a step, never the epoch.
    aspect_grouping_window: int = 8
    # Bad records (undecodable image, empty caption, ...) are skipped and counted; above this
    # fraction of the items read so far (after min_items_before_bad_check) the run stops.
    max_bad_fraction: float = 0.01
    min_items_before_bad_check: int = 200
    mlm_probability: float = 0.15
    itm_negative_probability: float = 0.5
    num_workers: int = 2
    prefetch_factor: int = 2

    def pixel_norm(self) -> PixelNorm:
        return PixelNorm(tuple(self.pixel_mean), tuple(self.pixel_std))

    def validate(self) -> None:
        for name in ("train", "val", "exclude"):
            for i, source in enumerate(getattr(self, name)):
                source.validate(f"data.{name}[{i}]", needs_images=name != "exclude")
        for i, source in enumerate(self.exclude):
            if source.format not in EXCLUDE_FORMATS:
                raise ConfigError(f"data.exclude[{i}].format must be one of {EXCLUDE_FORMATS} (sources "
                                  f"of COCO images), got {source.format!r}")
        if self.exclude:
            for i, source in enumerate(self.train):
                if source.format == "vg_regions" and not source.image_data:
                    raise ConfigError(f"data.train[{i}] (vg_regions) needs image_data (Visual Genome's "
                                      "image_data.json) for data.exclude to remove the COCO images it holds")
        _positive(self, "synthetic_images", "max_text_len", "image_shorter", "image_longer",
                  "pad_multiple", "prefetch_factor", "dali_threads", "captions_per_image",
                  "aspect_grouping_window")
        _choice(self, "decoder", DECODERS)
        _probability(self, "dali_hw_decoder_load", "max_bad_fraction")
        if self.min_items_before_bad_check < 0:
            raise ConfigError(f"data.min_items_before_bad_check must be >= 0, "
                              f"got {self.min_items_before_bad_check}")
        if self.max_text_len < 3:
            raise ConfigError("data.max_text_len must be >= 3 ([CLS], a word, [SEP])")
        if self.image_shorter < 64:
            raise ConfigError("data.image_shorter must be >= 64: the backbone has stride 32 and "
                              "the 2x2 pixel pooling needs at least one whole cell")
        if self.image_longer < self.image_shorter:
            raise ConfigError(f"data.image_longer ({self.image_longer}) must be >= "
                              f"data.image_shorter ({self.image_shorter})")
        if self.num_workers < 0:
            raise ConfigError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ConfigError(f"data.pixel_mean and data.pixel_std are three numbers each (R, G, B; 0-255 "
                              f"scale), std > 0; got {self.pixel_mean} and {self.pixel_std}")
        _probability(self, "mlm_probability", "itm_negative_probability")


@dataclass
class TrainConfig:
    task: str = "pretrain"  # pretrain (MLM + ITM) | vqa | nlvr2 | retrieval
    output_dir: str = "runs/default"
    seed: int = 42
    max_steps: int = 1000  # optimiser steps; the learning-rate schedule spans them
    stop_at_step: Optional[int] = None  # end early (job time slot) without changing the schedule
    log_every: int = 10
    save_every: int = 0  # 0: only at the end
    # Keep the newest this many checkpoints, deleting older ones once a newer one is complete
    # (an X152 checkpoint with its optimiser state is several GB). 0: keep every one.
    keep_checkpoints: int = 0
    # With eval_every > 0: a validation whose `best_metric` (a number of the task's report, see
    # BEST_METRICS) beats every earlier one (higher with best_mode "max", lower with "min") saves
    # a checkpoint, named in checkpoints/best.json and never deleted by keep_checkpoints. "": off.
    best_metric: str = ""
    best_mode: str = "max"
    # [first, last]: profile these optimiser steps (torch.profiler, CPU and CUDA activity) into
    # profile_rank<R>.json.gz (a Perfetto / chrome://tracing trace) and profile_rank<R>.txt (ops
    # by self time) in output_dir. []: off.
    profile_steps: list[int] = field(default_factory=list)
    # Evaluate on data.val (or the synthetic set's val split) every this many steps and at the
    # end, into eval.jsonl: the task's report (VQA accuracy, NLVR2 accuracy, retrieval recall) or,
    # for pre-training, MLM/ITM loss and accuracy on the val captions. 0: never. eval_records > 0
    # evaluates only the split's first that many records; eval_batch_size: VQA/NLVR2 items per
    # forward pass (retrieval scores 8x as many pairs per pass against one image's features).
    eval_every: int = 0
    eval_records: int = 0
    eval_batch_size: int = 32
    resume: bool = False
    # With resume: refuse (exit 2) a resume whose config differs from the checkpoint's in what
    # the run computes, instead of going on with a warning (resume_changes below).
    resume_strict: bool = False
    # The paper's optimiser split: SGD for the CNN, AdamW for everything else. A CNN trained from
    # scratch (no backbone_weights) needs "adamw" to learn in time; configs/tiny.json keeps
    # "adamw" for its small synthetic-label CNN too (the setting its ITM runs were measured with).
    backbone_optimizer: str = "sgd"
    backbone_lr: float = 1e-2
    backbone_momentum: float = 0.9
    backbone_weight_decay: float = 5e-4
    lr: float = 1e-4
    weight_decay: float = 1e-2
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    lr_schedule: str = "linear"  # warm-up, then linear decay to 0 / step decay / constant
    warmup_steps: int = 0
    decay_milestones: list[int] = field(default_factory=list)  # for "step": steps where lr *= decay_gamma
    decay_gamma: float = 0.1
    # How the optimiser step runs: "fused" (one kernel per parameter group: torch's
    # _fused_sgd_/_fused_adamw_), "foreach" (multi-tensor ops), or "auto" (fused when every
    # parameter is on the GPU, else foreach). Same math either way (tested against torch.optim).
    optimizer_kernel: str = "auto"
    # Signals that stop the run cleanly: the ranks finish the step in flight, save a checkpoint
    # there and exit with signal_exit_code (engine/preemption.py), for schedulers that warn
    # before they kill. []: off. The code is not 0, so that a job system never takes a stopped
    # run for a finished one (a Kubernetes Job would count it complete): 75 is EX_TEMPFAIL of
    # sysexits.h, "try again later"; 0 restores the plain exit.
    stop_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    signal_exit_code: int = 75

    def validate(self) -> None:
        _positive(self, "max_steps", "log_every", "eval_batch_size")
        if self.seed < 0:
            raise ConfigError(f"train.seed must be >= 0, got {self.seed}")
        _choice(self, "best_mode", ("max", "min"))
        if self.profile_steps and not (len(self.profile_steps) == 2
                                       and 1 <= self.profile_steps[0] <= self.profile_steps[1] <= self.max_steps):
            raise ConfigError(f"train.profile_steps must be [first, last] with 1 <= first <= last <= "
                              f"train.max_steps, got {self.profile_steps}")
        for key in ("save_every", "keep_checkpoints", "eval_every", "eval_records"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.stop_at_step is not None and not 0 < self.stop_at_step <= self.max_steps:
            raise ConfigError(f"train.stop_at_step must be in [1, train.max_steps], got {self.stop_at_step}")
        for key in ("backbone_lr", "lr"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ConfigError(f"train.adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        _choice(self, "lr_schedule", LR_SCHEDULES)
        _choice(self, "task", TASKS)
        _choice(self, "backbone_optimizer", ("sgd", "adamw"))
        _choice(self, "optimizer_kernel", OPTIMIZER_KERNELS)
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise ConfigError(f"train.warmup_steps must be in [0, train.max_steps], got {self.warmup_steps}")
        if sorted(self.decay_milestones) != self.decay_milestones or any(m < 1 for m in self.decay_milestones):
            raise ConfigError(f"train.decay_milestones must be increasing positive steps, got {self.decay_milestones}")
        catchable = [s.name for s in signal.Signals if s.name not in ("SIGKILL", "SIGSTOP")]
        wrong = [name for name in self.stop_signals if name not in catchable]
        if wrong:
            raise ConfigError(f"train.stop_signals: {wrong} are not signals a process can catch here "
                              "(e.g. SIGTERM, SIGUSR1, SIGUSR2)")
        if not 0 <= self.signal_exit_code <= 255 or self.signal_exit_code in RESERVED_EXIT_CODES:
            raise ConfigError(f"train.signal_exit_code must be in [0, 255] and not one of train.py's own codes "
                              f"{sorted(RESERVED_EXIT_CODES)}, got {self.signal_exit_code}")


@dataclass
class TaskConfig:
    """Fine-tuning settings (train.task != "pretrain")."""
    # Weights to start from: a pre-training run folder, a step_N checkpoint or a weights file.
    # Heads the checkpoint lacks are initialised, its tensors the task lacks are ignored (logged).
    init_from: Optional[str] = None
    # VQA: answers (normalised as the official evaluation does) seen at least this often in the
    # training annotations form the answer vocabulary (9 gives the usual 3,129 on VQA v2 train+val).
    min_answer_count: int = 9
    # Retrieval: random negative texts scored per image, and the hardest of them that carry the loss.
    negatives: int = 20
    hard_negatives: int = 5
    # Retrieval: > 0 adds an image-text contrastive loss (ALBEF's ITC, not in the paper) at this
    # weight to the ITM loss, training projections (to contrastive_dim) of text-only and
    # image-only passes whose similarity can shortlist pairs at evaluation (over the global
    # batch: ranks gather each other's vectors).
    contrastive_weight: float = 0.0
    contrastive_dim: int = 256
    # Retrieval evaluation: 0 ranks every pair with the cross-encoder; k > 0 scores only each
    # image's k nearest texts and each text's k nearest images by the contrastive similarity
    # (needs contrastive_weight > 0; the report names the mode used).
    shortlist: int = 0
    # Retrieval evaluation: > 1 also reports recalls averaged over this many folds of the images
    # (equal runs of the split's order), each ranked only among its own images and texts, with its
    # own shortlists: the paper's COCO "1K test" is 5 folds of the Karpathy 5K test split.
    retrieval_folds: int = 0

    def validate(self) -> None:
        _positive(self, "min_answer_count", "negatives", "hard_negatives", "contrastive_dim")
        if not self.contrastive_weight >= 0:
            raise ConfigError(f"task.contrastive_weight must be >= 0, got {self.contrastive_weight}")
        if self.hard_negatives > self.negatives:
            raise ConfigError(f"task.hard_negatives ({self.hard_negatives}) must be <= task.negatives "
                              f"({self.negatives})")
        if self.shortlist < 0:
            raise ConfigError(f"task.shortlist must be >= 0, got {self.shortlist}")
        if self.retrieval_folds < 0 or self.retrieval_folds == 1:
            raise ConfigError(f"task.retrieval_folds must be 0 (off) or at least 2, got {self.retrieval_folds}")
        if self.shortlist and not self.contrastive_weight:
            raise ConfigError("task.shortlist needs the contrastive similarity: a retrieval model trained "
                              "with task.contrastive_weight > 0 (or task.shortlist=0, every pair scored)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    deepspeed: dict = field(default_factory=dict)

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.task.validate()
        if self.model.bert_checkpoint:
            self.take_bert_vocabulary()
        if self.data.tokenizer:
            self.check_tokenizer_casing()
        if self.model.backbone_weights:
            self.check_backbone_input()
        if self.train.best_metric:
            if self.train.best_metric not in BEST_METRICS[self.train.task]:
                raise ConfigError(f"train.best_metric={self.train.best_metric!r} is not a validation number of "
                                  f"train.task={self.train.task!r}: one of {BEST_METRICS[self.train.task]}")
            if not self.train.eval_every:
                raise ConfigError("train.best_metric needs validation: set train.eval_every > 0")
        if self.train.eval_every and self.data.train and not self.data.val:
            raise ConfigError("train.eval_every validates on data.val, which is empty while data.train names "
                              "sources (the synthetic set's val split would stand in): name data.val, or set "
                              "train.eval_every=0")
        if self.train.task != "pretrain":
            for i, source in enumerate(self.data.train + self.data.val):
                if source.format not in TASK_FORMATS[self.train.task]:
                    raise ConfigError(f"data sources of train.task={self.train.task!r} must be "
                                      f"{TASK_FORMATS[self.train.task]}, got {source.format!r}")
        if self.data.max_text_len > self.model.max_position_embeddings:
            raise ConfigError(f"data.max_text_len ({self.data.max_text_len}) exceeds model.max_position_embeddings "
                              f"({self.model.max_position_embeddings}): every text position needs an embedding")
        ds = self.deepspeed
        for key in ("train_micro_batch_size_per_gpu",):
            if not isinstance(ds.get(key), int) or ds[key] < 1:
                raise ConfigError(f"deepspeed.{key} must be a positive integer")
        accum = ds.get("gradient_accumulation_steps", 1)
        if not isinstance(accum, int) or accum < 1:
            raise ConfigError("deepspeed.gradient_accumulation_steps must be a positive integer")
        if "train_batch_size" in ds:
            raise ConfigError("deepspeed.train_batch_size: leave it out; it is derived from "
                              "train_micro_batch_size_per_gpu x gradient_accumulation_steps x ranks")
        if ds["train_micro_batch_size_per_gpu"] % self.data.captions_per_image:
            raise ConfigError(f"deepspeed.train_micro_batch_size_per_gpu "
                              f"({ds['train_micro_batch_size_per_gpu']}) must be a multiple of "
                              f"data.captions_per_image ({self.data.captions_per_image}): a "
                              f"micro-batch holds whole images")
        if "optimizer" in ds or "scheduler" in ds:
            raise ConfigError("deepspeed.optimizer/scheduler: leave them out; the engine builds the "
                              "paper's SGD+AdamW split and schedule from the train section")

    @property
    def micro_batch_size(self) -> int:
        return self.deepspeed["train_micro_batch_size_per_gpu"]

    @property
    def grad_accum_steps(self) -> int:
        return self.deepspeed.get("gradient_accumulation_steps", 1)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check_backbone_input(self) -> None:
        """Weights that name the input normalisation they were trained with (the safetensors
        metadata pixelbert.tools.convert_backbone writes) must get it, and affine-normalised
        ones (Detectron's) need frozen BatchNorm: either mismatch would train on wrong inputs."""
        path = Path(self.model.backbone_weights).expanduser()
        if path.suffix != ".safetensors" or not path.is_file():
            return
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        for key in ("pixel_mean", "pixel_std"):
            if key in metadata:
                want = json.loads(metadata[key])
                if any(abs(a - b) > 1e-3 for a, b in zip(want, getattr(self.data, key))):
                    raise ConfigError(f"model.backbone_weights={path} was trained on inputs with {key} {want} "
                                      f"(its metadata), but data.{key} is {getattr(self.data, key)}: set "
                                      f"'data.{key}={json.dumps(want)}'")
        if metadata.get("batch_norm") == "affine" and not self.model.frozen_bn:
            raise ConfigError(f"model.backbone_weights={path} normalises with a fixed affine (Detectron's), "
                              "not BatchNorm statistics: set model.frozen_bn=true")

    def take_bert_vocabulary(self) -> None:
        """BERT's embeddings are indexed by its own vocabulary: without data.tokenizer, a
        vocabulary trained on the captions would give every row a different word. Take the
        checkpoint's `vocab.txt` then (recorded in the run's config.json), and check that its
        `tokenizer_config.json` casing agrees with data.lowercase."""
        checkpoint = Path(self.model.bert_checkpoint).expanduser()
        folder = checkpoint if checkpoint.is_dir() or not checkpoint.suffix else checkpoint.parent
        if not self.data.tokenizer:
            if checkpoint.exists() and not (folder / "vocab.txt").is_file():
                raise ConfigError(f"model.bert_checkpoint={self.model.bert_checkpoint}: no vocab.txt in {folder}; set "
                                  "data.tokenizer to the BERT vocabulary (the checkpoint's embeddings follow its ids)")
            self.data.tokenizer = str(folder)

    def check_tokenizer_casing(self) -> None:
        """data.lowercase must be the casing of data.tokenizer's vocabulary: its
        tokenizer_config.json's do_lower_case (Hugging Face's folders) or, without one (Google's
        BERT releases hold vocab.txt alone), whether its words hold capitals. Lowercased text
        never reaches a cased vocabulary's capitalised words, and cased text finds no capitalised
        word in an uncased one: either way words silently become [UNK] or pieces."""
        path = Path(self.data.tokenizer).expanduser()
        vocab = path / "vocab.txt" if path.is_dir() else path
        from pixelbert.data.tokenizer import SETTINGS_FILE, read_casing
        wanted = f"data.lowercase={str(self.data.lowercase).lower()}"
        lower = read_casing(vocab.parent)
        if lower is not None:
            if lower != self.data.lowercase:
                raise ConfigError(f"{wanted} but the tokenizer has do_lower_case={str(lower).lower()} "
                                  f"({vocab.parent / SETTINGS_FILE}): set data.lowercase={str(lower).lower()}")
            return
        if not vocab.is_file():
            return  # the tokenizer's own error names the path
        words = [token.removeprefix("##") for token in vocab.read_text(encoding="utf-8").splitlines()
                 if not (token.startswith("[") and token.endswith("]"))]
        alphabetic = [word for word in words if any(ch.isalpha() for ch in word)]
        if len(alphabetic) < CASING_MIN_WORDS:
            return  # too few words to tell
        capitalised = [word for word in alphabetic if any(ch.isupper() for ch in word)]
        share = len(capitalised) / len(alphabetic)
        if self.data.lowercase and share > CASED_SHARE:
            raise ConfigError(f"{wanted} but {vocab} is a cased vocabulary ({share:.0%} of its words hold capitals, "
                              f"e.g. {', '.join(capitalised[:3])}) and has no tokenizer_config.json to say so: "
                              "lowercased text never reaches those words; set data.lowercase=false")
        if not self.data.lowercase and share < UNCASED_SHARE:
            raise ConfigError(f"{wanted} but {vocab} is an uncased vocabulary (almost no word holds a capital) and has no "
                              "tokenizer_config.json to say so: every capitalised word of the text would become "
                              "[UNK] or pieces; set data.lowercase=true")


# Settings a resumed run may change without changing what it computes from there on: where and
# how often it logs, saves and validates, when this job stops, how its data is loaded.
RUN_CONTROL_KEYS = frozenset({
    "train.resume", "train.resume_strict", "train.stop_signals", "train.signal_exit_code", "train.output_dir", "train.stop_at_step",
    "train.log_every", "train.save_every", "train.keep_checkpoints", "train.best_metric", "train.best_mode",
    "train.profile_steps", "train.eval_every", "train.eval_records", "train.eval_batch_size", "data.num_workers",
    "data.prefetch_factor", "data.records_cache", "data.tokenizer_cache"})


def resume_changes(saved: Optional[dict], current: dict, prefix: str = "") -> list[str]:
    """'key: saved -> current' for each setting that differs from the checkpoint's config
    (nested sections as dotted keys), leaving out RUN_CONTROL_KEYS; [] without a saved config
    (a checkpoint written before checkpoints held it)."""
    if saved is None:
        return []
    changes = []
    for key in sorted(set(saved) | set(current)):
        name, old, new = prefix + key, saved.get(key), current.get(key)
        if name in RUN_CONTROL_KEYS or old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            changes += resume_changes(old, new, name + ".")
        else:
            changes.append(f"{name}: {_brief(old)} -> {_brief(new)}")
    return changes


def _brief(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


def load_config(path: str | Path, overrides=()) -> Config:
    """Read `path`, apply `key.path=value` overrides, and return a validated Config."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be an object")
    for item in overrides:
        _apply_override(raw, item)
    return config_from_dict(raw)


def config_from_dict(raw: dict) -> Config:
    raw = copy.deepcopy(raw)
    unknown = set(raw) - {f.name for f in dataclasses.fields(Config)}
    if unknown:
        raise ConfigError(f"unknown config section(s): {sorted(unknown)}")
    deepspeed_section = raw.pop("deepspeed", {})
    if not isinstance(deepspeed_section, dict):
        raise ConfigError("deepspeed must be an object")
    cfg = _build(Config, raw, "")
    cfg.deepspeed = deepspeed_section
    cfg.validate()
    return cfg


def _apply_override(raw: dict, item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, text = item.split("=", 1)
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = value


def _build(cls, raw: Any, where: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{where or 'config'} must be an object, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {sorted(names)})")
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}" if where else name)
              for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(tp, value, where: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {type(value).__name__}")
        (item_type,) = typing.get_args(tp)
        return [_coerce(item_type, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be an object, got {type(value).__name__}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    raise TypeError(f"config type {tp} at {where} is not supported")


def _positive(section, *keys: str) -> None:
    name = _section_name(section)
    for key in keys:
        if getattr(section, key) < 1:
            raise ConfigError(f"{name}.{key} must be >= 1, got {getattr(section, key)}")


def _probability(section, *keys: str) -> None:
    name = _section_name(section)
    for key in keys:
        if not 0.0 <= getattr(section, key) <= 1.0:
            raise ConfigError(f"{name}.{key} must be in [0, 1], got {getattr(section, key)}")


def _choice(section, key: str, choices) -> None:
    if getattr(section, key) not in choices:
        raise ConfigError(f"{_section_name(section)}.{key} must be one of {list(choices)}, "
                          f"got {getattr(section, key)!r}")


def _section_name(section) -> str:
    return {ModelConfig: "model", DataConfig: "data", TrainConfig: "train", TaskConfig: "task"}[type(section)]
