"""The SGD+AdamW split against torch's own optimisers, and the learning-rate schedule."""
import dataclasses

import pytest
import torch

from pixelbert.config import TrainConfig
from pixelbert.engine.optim import SGDAdamW, build_optimizer, build_scheduler, lr_multiplier
from pixelbert.model import PixelBert
from tests.helpers import tiny_config


def test_matches_torch_sgd_and_adamw():
    torch.manual_seed(0)
    params = [torch.randn(7, 5), torch.randn(13), torch.randn(3, 3), torch.randn(4)]
    ours = [p.clone().requires_grad_() for p in params]
    theirs = [p.clone().requires_grad_() for p in params]
    hybrid = SGDAdamW([
        dict(params=ours[:2], algorithm="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4),
        dict(params=ours[2:], algorithm="adamw", lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1),
    ])
    sgd = torch.optim.SGD(theirs[:2], lr=0.05, momentum=0.9, weight_decay=5e-4)
    adamw = torch.optim.AdamW(theirs[2:], lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1)
    for step in range(6):
        grads = [torch.randn_like(p) for p in params]
        for group, opt in ((ours, hybrid), (theirs, None)):
            for p, g in zip(group, grads):
                p.grad = g.clone()
        hybrid.step()
        sgd.step()
        adamw.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    state = hybrid.state_dict()  # round-trips like any torch optimiser
    SGDAdamW([dict(params=ours[:2], algorithm="sgd"), dict(params=ours[2:], algorithm="adamw")]).load_state_dict(state)


def test_param_groups_split_backbone_and_decay():
    model = PixelBert(tiny_config())
    cfg = TrainConfig(backbone_lr=0.02, lr=3e-4, weight_decay=0.01, backbone_weight_decay=5e-4)
    opt = build_optimizer(model, cfg)
    backbone = {id(p) for p in model.pixel_embeddings.backbone.parameters()}
    seen = set()
    for group in opt.param_groups:
        for p in group["params"]:
            assert (group["algorithm"] == "sgd") == (id(p) in backbone)
            assert (group["weight_decay"] == 0) == (p.ndim <= 1)
            seen.add(id(p))
    assert seen == {id(p) for p in model.parameters() if p.requires_grad}
    assert {g["lr"] for g in opt.param_groups if g["algorithm"] == "sgd"} == {0.02}
    assert {g["lr"] for g in opt.param_groups if g["algorithm"] == "adamw"} == {3e-4}


def test_unknown_algorithm_is_rejected():
    with pytest.raises(ValueError, match="unknown optimiser algorithm"):
        SGDAdamW([dict(params=[torch.zeros(1, requires_grad=True)], algorithm="lamb")])


def test_schedules():
    cfg = TrainConfig(max_steps=100, warmup_steps=10, lr_schedule="linear")
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(55, cfg) == pytest.approx(0.5)
    assert lr_multiplier(100, cfg) == 0.0
    step = dataclasses.replace(cfg, lr_schedule="step", decay_milestones=[50, 80], decay_gamma=0.1)
    assert [lr_multiplier(s, step) for s in (20, 49, 50, 79, 80)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    # Every group follows the multiplier from its own base rate.
    model = PixelBert(tiny_config())
    opt = build_optimizer(model, dataclasses.replace(cfg, backbone_lr=0.02, lr=1e-3))
    sched = build_scheduler(opt, cfg)
    for _ in range(55):
        opt.step()
        sched.step()
    rates = {g["algorithm"]: g["lr"] for g in opt.param_groups}
    assert rates["sgd"] == pytest.approx(0.01) and rates["adamw"] == pytest.approx(5e-4)


def test_backbone_can_train_with_adamw_from_scratch():
    model = PixelBert(tiny_config())
    cfg = TrainConfig(backbone_optimizer="adamw", backbone_lr=5e-4, lr=1e-3)
    opt = build_optimizer(model, cfg)
    backbone = {id(p) for p in model.pixel_embeddings.backbone.parameters()}
    for group in opt.param_groups:
        assert group["algorithm"] == "adamw"
        on_backbone = {id(p) in backbone for p in group["params"]}
        assert on_backbone == {group["backbone"]}
        assert group["lr"] == (5e-4 if group["backbone"] else 1e-3)
