"""The paper's optimiser split and learning-rate schedule.

Pixel-BERT trains the CNN with SGD (momentum) and everything else with AdamW, each with its
own learning rate and weight decay. DeepSpeed takes one optimiser, and ZeRO replaces each
parameter group's tensors with flat fp32 partitions, so both rules live in one
`torch.optim.Optimizer` whose groups carry an `algorithm` key: ZeRO keeps the groups (and that
key) and the step applies the right rule to whatever tensors a group holds.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from pixelbert.config import TrainConfig


class SGDAdamW(torch.optim.Optimizer):
    """Per-group SGD with momentum (`algorithm="sgd"`) or AdamW (`algorithm="adamw"`).

    SGD follows torch.optim.SGD (coupled L2 decay, no dampening); AdamW follows
    torch.optim.AdamW (decoupled decay, bias-corrected moments).
    """

    def __init__(self, param_groups, *, lr=1e-3, momentum=0.9, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        defaults = dict(lr=lr, momentum=momentum, betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, algorithm="adamw")
        super().__init__(param_groups, defaults)
        for group in self.param_groups:
            if group["algorithm"] not in ("sgd", "adamw"):
                raise ValueError(f"unknown optimiser algorithm {group['algorithm']!r}")

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
            if group["algorithm"] == "sgd":
                self._sgd(group, params)
            else:
                self._adamw(group, params)
        return loss

    def _sgd(self, group, params):
        grads = [p.grad for p in params]
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        if group["momentum"]:
            buffers = []
            for p, g in zip(params, grads):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.detach().clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                buffers.append(state["momentum_buffer"])
            grads = buffers
        torch._foreach_add_(params, grads, alpha=-group["lr"])

    def _adamw(self, group, params):
        beta1, beta2 = group["betas"]
        for p in params:
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            step = state["step"]
            p.mul_(1 - group["lr"] * group["weight_decay"])
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            step_size = group["lr"] / (1 - beta1 ** step)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
            p.addcdiv_(state["exp_avg"], denom, value=-step_size)


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
    return SGDAdamW(param_groups(model, cfg))


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
