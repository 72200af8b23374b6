"""The paper's optimiser split and learning-rate schedule.

Pixel-BERT trains the CNN with SGD (momentum) and everything else with AdamW, each with its
own learning rate and weight decay. DeepSpeed takes one optimiser, and ZeRO replaces each
parameter group's tensors with flat fp32 partitions, so both rules live in one
`torch.optim.Optimizer` whose groups carry an `algorithm` key: ZeRO keeps the groups (and that
key) and the step applies the right rule to whatever tensors a group holds.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.adamw import adamw as adamw_update
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.sgd import sgd as sgd_update

from pixelbert.config import TrainConfig


class SGDAdamW(torch.optim.Optimizer):
    """Per-group SGD with momentum (`algorithm="sgd"`) or AdamW (`algorithm="adamw"`).

    The update rules are torch's own (torch.optim.sgd.sgd and torch.optim.adamw.adamw: SGD
    with coupled L2 decay and no dampening, AdamW with decoupled decay and bias-corrected
    moments), run as one fused kernel per group (`kernel="fused"`) or as multi-tensor foreach
    ops (`"foreach"`); `"auto"` picks fused when a group's tensors are all on the GPU.
    """

    def __init__(self, param_groups, *, lr=1e-3, momentum=0.9, betas=(0.9, 0.999), eps=1e-8,
                 weight_decay=0.0, kernel="auto"):
        if kernel not in ("auto", "fused", "foreach"):
            raise ValueError(f"unknown optimiser kernel {kernel!r}: auto, fused or foreach")
        defaults = dict(lr=lr, momentum=momentum, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, algorithm="adamw")
        super().__init__(param_groups, defaults)
        self.kernel = kernel
        for group in self.param_groups:
            if group["algorithm"] not in ("sgd", "adamw"):
                raise ValueError(f"unknown optimiser algorithm {group['algorithm']!r}")

    def _fused(self, params: list[torch.Tensor]) -> bool:
        if self.kernel == "auto":
            return all(p.is_cuda for p in params)
        return self.kernel == "fused"

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            fused = self._fused(params)
            if group["algorithm"] == "sgd":
                self._sgd(group, params, fused)
            else:
                self._adamw(group, params, fused)
        return loss

    def _sgd(self, group, params, fused):
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        sgd_update(params, [p.grad for p in params], buffers, foreach=not fused, fused=fused,
                   weight_decay=group["weight_decay"], momentum=group["momentum"],
                   lr=group["lr"], dampening=0.0, nesterov=False, maximize=False)
        if group["momentum"]:
            for p, buffer in zip(params, buffers):  # sgd() creates the buffers on the first step
                self.state[p]["momentum_buffer"] = buffer

    def _adamw(self, group, params, fused):
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            # The step count is a float tensor: on the parameter's device for the fused kernel,
            # on the CPU for foreach. Checkpoints load it onto the CPU (or as an int, written
            # by older versions), so it is placed here, where the kernel is known.
            device = p.device if fused else torch.device("cpu")
            step = state["step"]
            if not torch.is_tensor(step) or step.device != device:
                state["step"] = torch.as_tensor(step, dtype=torch.float32, device=device)
        states = [self.state[p] for p in params]
        beta1, beta2 = group["betas"]
        adamw_update(
            params, [p.grad for p in params], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states],
            foreach=not fused, fused=fused, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)


def _no_decay(name: str, param: nn.Parameter) -> bool:
    # BERT's rule: biases, LayerNorm/BatchNorm weights and 1-d type vectors are not decayed.
    return param.ndim <= 1 or name.endswith(".bias")


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """SGD groups for the CNN backbone (AdamW with `train.backbone_optimizer="adamw"`), AdamW
    groups for the rest, each split by weight decay; groups carry `backbone` for the logs."""
    backbone_ids = {id(p) for p in model.pixel_embeddings.backbone.parameters()}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        algorithm = "sgd" if id(param) in backbone_ids else "adamw"
        buckets.setdefault((algorithm, _no_decay(name, param)), []).append(param)
    groups = []
    for (algorithm, no_decay), params in sorted(buckets.items()):
        if algorithm == "sgd" and cfg.backbone_optimizer == "adamw":
            # A CNN trained from scratch (no ImageNet weights) learns far too slowly with SGD.
            groups.append(dict(params=params, algorithm="adamw", lr=cfg.backbone_lr, betas=tuple(cfg.adam_betas),
                               eps=cfg.adam_eps, weight_decay=0.0 if no_decay else cfg.backbone_weight_decay,
                               backbone=True))
        elif algorithm == "sgd":
            groups.append(dict(params=params, algorithm="sgd", lr=cfg.backbone_lr,
                               momentum=cfg.backbone_momentum,
                               weight_decay=0.0 if no_decay else cfg.backbone_weight_decay, backbone=True))
        else:
            groups.append(dict(params=params, algorithm="adamw", lr=cfg.lr, betas=tuple(cfg.adam_betas),
                               eps=cfg.adam_eps, weight_decay=0.0 if no_decay else cfg.weight_decay, backbone=False))
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> SGDAdamW:
    return SGDAdamW(param_groups(model, cfg), kernel=cfg.optimizer_kernel)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then linear decay to 0 at max_steps, step decay, or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "linear":
        remaining = cfg.max_steps - step
        return max(0.0, remaining / max(1, cfg.max_steps - cfg.warmup_steps))
    if cfg.lr_schedule == "step":
        return cfg.decay_gamma ** sum(step >= m for m in cfg.decay_milestones)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))
