"""The SGD+AdamW split against torch's own optimisers, and the learning-rate schedule."""
import dataclasses

import pytest
import torch

from pixelbert.config import TrainConfig
from pixelbert.engine.optim import SGDAdamW, build_optimizer, build_scheduler, lr_multiplier
from pixelbert.model import PixelBert
from tests.helpers import tiny_config


def _hybrid(params, kernel):
    return SGDAdamW([
        dict(params=params[:2], algorithm="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4),
        dict(params=params[2:], algorithm="adamw", lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1),
    ], kernel=kernel)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("kernel", ["fused", "foreach", "auto"])
def test_matches_torch_sgd_and_adamw(kernel, device):
    """Every kernel takes the steps torch.optim.SGD and AdamW (their plain for-loop versions)
    take, also across a state_dict save and load in the middle of the run."""
    torch.manual_seed(0)
    params = [torch.randn(7, 5), torch.randn(13), torch.randn(3, 3, 2, 1), torch.randn(4), torch.randn(1)]
    ours = [p.clone().to(device).requires_grad_() for p in params]
    theirs = [p.clone().to(device).requires_grad_() for p in params]
    hybrid = _hybrid(ours, kernel)
    sgd = torch.optim.SGD(theirs[:2], lr=0.05, momentum=0.9, weight_decay=5e-4, foreach=False)
    adamw = torch.optim.AdamW(theirs[2:], lr=1e-2, betas=(0.8, 0.99), eps=1e-8, weight_decay=0.1, foreach=False)
    for step in range(8):
        if step == 4:  # resume into a fresh optimiser
            state = hybrid.state_dict()
            hybrid = _hybrid(ours, kernel)
            hybrid.load_state_dict(state)
        grads = [torch.randn_like(p) for p in params]
        for group in (ours, theirs):
            for p, g in zip(group, grads):
                p.grad = g.to(device)
        hybrid.step()
        sgd.step()
        adamw.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(a.cpu(), p) for a, p in zip(ours, params))  # they did move


def test_resumes_state_written_with_an_int_step():
    """Checkpoints of older versions hold AdamW's step as an int; both kernels take them."""
    torch.manual_seed(0)
    params = [torch.randn(6, requires_grad=True) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    reference = _hybrid(params, "foreach")
    reference.step()
    state = reference.state_dict()
    for entry in state["state"].values():
        if "step" in entry:
            entry["step"] = int(entry["step"])
    for kernel in ("fused", "foreach"):
        resumed = _hybrid([p.detach().clone().requires_grad_() for p in params], kernel)
        resumed.load_state_dict(state)
        for p in resumed.param_groups[1]["params"]:
            p.grad = torch.ones_like(p)
        resumed.step()
        assert all(float(resumed.state[p]["step"]) == 2.0 for p in resumed.param_groups[1]["params"])


def test_unknown_kernel_is_rejected():
    with pytest.raises(ValueError, match="unknown optimiser kernel"):
        _hybrid([torch.zeros(1, requires_grad=True)] * 3, "apex")


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
