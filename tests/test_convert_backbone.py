"""pixelbert.tools.convert_backbone: a Detectron (Caffe2) ResNeXt pickle becomes a backbone
that computes what Detectron's network computes, checked against a plain implementation of
Detectron's forward pass on its own blobs (BGR input minus its mean, affine normalisation)."""
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pixelbert.config import ConfigError, load_config
from pixelbert.data.images import PixelNorm
from pixelbert.model.backbone import SPECS, BackboneSpec, build_backbone
from pixelbert.tools import convert_backbone
from pixelbert.tools.convert_backbone import DETECTRON_PIXEL_MEAN_BGR, read_detectron_blobs

# A ResNeXt small enough for the CPU: grouped 3x3 convolutions, two blocks in one stage.
SPEC = BackboneSpec("tinyx", (1, 2, 1, 1), groups=4, width_per_group=8, stem_width=16, planes=(16, 32, 64, 128))


@pytest.fixture(autouse=True)
def tiny_resnext(monkeypatch):
    monkeypatch.setitem(SPECS, SPEC.name, SPEC)


def detectron_blobs(spec: BackboneSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under Detectron's names and shapes (what its ResNeXt builder makes)."""
    rng = np.random.default_rng(seed)
    blobs = {}

    def conv(name, out, inp, k):
        blobs[name + "_w"] = (rng.standard_normal((out, inp, k, k)) * np.sqrt(2.0 / (inp * k * k))).astype(np.float32)

    def affine(name, n):
        blobs[name + "_bn_s"] = rng.uniform(0.5, 1.0, n).astype(np.float32)
        blobs[name + "_bn_b"] = rng.uniform(-0.2, 0.2, n).astype(np.float32)

    conv("conv1", spec.stem_width, 3, 7)
    affine("res_conv1", spec.stem_width)
    inplanes = spec.stem_width
    for stage in range(4):
        planes = spec.planes[stage]
        width, out = planes * spec.width_per_group // 64 * spec.groups, planes * 4
        for block in range(spec.layers[stage]):
            prefix = f"res{stage + 2}_{block}"
            if block == 0:
                conv(prefix + "_branch1", out, inplanes, 1)
                affine(prefix + "_branch1", out)
            conv(prefix + "_branch2a", width, inplanes, 1)
            affine(prefix + "_branch2a", width)
            conv(prefix + "_branch2b", width, width // spec.groups, 3)
            affine(prefix + "_branch2b", width)
            conv(prefix + "_branch2c", out, width, 1)
            affine(prefix + "_branch2c", out)
            inplanes = out
    blobs["pred_w"] = rng.standard_normal((10, inplanes)).astype(np.float32)  # the classifier: ignored
    blobs["pred_b"] = np.zeros(10, np.float32)
    blobs["res2_0_branch2a_w_momentum"] = np.zeros_like(blobs["res2_0_branch2a_w"])  # solver state: ignored
    return blobs


def detectron_forward(blobs: dict[str, np.ndarray], spec: BackboneSpec, bgr: torch.Tensor) -> torch.Tensor:
    """Detectron's ResNeXt trunk (STRIDE_1X1 false, AffineChannel) on BGR pixels minus its mean."""
    w = {k: torch.from_numpy(v) for k, v in blobs.items()}

    def affine(x, name):
        return x * w[name + "_bn_s"].view(1, -1, 1, 1) + w[name + "_bn_b"].view(1, -1, 1, 1)

    x = F.relu(affine(F.conv2d(bgr, w["conv1_w"], stride=2, padding=3), "res_conv1"))
    x = F.max_pool2d(x, 3, stride=2, padding=1)
    for stage in range(4):
        for block in range(spec.layers[stage]):
            p, stride = f"res{stage + 2}_{block}", 2 if stage > 0 and block == 0 else 1
            shortcut = affine(F.conv2d(x, w[p + "_branch1_w"], stride=stride), p + "_branch1") \
                if p + "_branch1_w" in w else x
            y = F.relu(affine(F.conv2d(x, w[p + "_branch2a_w"]), p + "_branch2a"))
            y = F.relu(affine(F.conv2d(y, w[p + "_branch2b_w"], stride=stride, padding=1, groups=spec.groups),
                              p + "_branch2b"))
            x = F.relu(affine(F.conv2d(y, w[p + "_branch2c_w"]), p + "_branch2c") + shortcut)
    return x


def write_pickle(path, obj, numpy1_names: bool = False) -> None:
    data = pickle.dumps(obj, protocol=2)  # Detectron's files are Python 2 pickles
    if numpy1_names:  # as numpy 1 wrote them
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(data)


@pytest.mark.parametrize("numpy1_names", [False, True])
def test_converted_weights_compute_what_detectron_computes(tmp_path, capsys, numpy1_names):
    blobs = detectron_blobs(SPEC)
    write_pickle(tmp_path / "X-tiny.pkl", {"blobs": blobs, "lr": np.float32(0.1)}, numpy1_names)
    out = tmp_path / "tinyx.safetensors"
    assert convert_backbone.main([str(tmp_path / "X-tiny.pkl"), "--arch", "tinyx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    mean_rgb = list(DETECTRON_PIXEL_MEAN_BGR)[::-1]
    assert f"'data.pixel_mean={json.dumps(mean_rgb)}' 'data.pixel_std=[1.0, 1.0, 1.0]'" in printed

    rgb = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (2, 3, 75, 101)).astype(np.float32))
    want = detectron_forward(blobs, SPEC, rgb.flip(1) - torch.tensor(DETECTRON_PIXEL_MEAN_BGR).view(1, 3, 1, 1))
    model = build_backbone("tinyx", frozen_bn=True, weights=out).eval()
    norm = PixelNorm(tuple(mean_rgb), (1.0, 1.0, 1.0))
    with torch.no_grad():
        got = model(torch.stack([norm.apply(image) for image in rgb]))
    assert got.shape == want.shape == (2, 512, 3, 4)
    assert want.abs().mean() > 0.1  # a live network, not one that died to zeros
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_the_engine_takes_the_normalisation_from_the_file(tmp_path, capsys):
    write_pickle(tmp_path / "X-tiny.pkl", {"blobs": detectron_blobs(SPEC)})
    out = tmp_path / "tinyx.safetensors"
    convert_backbone.main([str(tmp_path / "X-tiny.pkl"), "--arch", "tinyx", "--out", str(out)])
    mean = json.dumps(list(DETECTRON_PIXEL_MEAN_BGR)[::-1])
    weights = [f"model.backbone_weights={out}"]
    right = [f"data.pixel_mean={mean}", "data.pixel_std=[1, 1, 1]", "model.frozen_bn=true"]
    cfg = load_config("configs/tiny.json", weights + right)
    assert cfg.data.pixel_norm() == PixelNorm(tuple(json.loads(mean)), (1.0, 1.0, 1.0))
    with pytest.raises(ConfigError, match=r"trained on inputs with pixel_mean \[122.7717, 115.9465, 102.9801\].*"
                                          r"set 'data.pixel_mean=\[122.7717, 115.9465, 102.9801\]'"):
        load_config("configs/tiny.json", weights + ["model.frozen_bn=true"])  # ImageNet's default
    with pytest.raises(ConfigError, match=r"trained on inputs with pixel_std"):
        load_config("configs/tiny.json", weights + [f"data.pixel_mean={mean}", "model.frozen_bn=true"])
    with pytest.raises(ConfigError, match=r"fixed affine.*set model.frozen_bn=true"):
        load_config("configs/tiny.json", weights + right[:2] + ["model.frozen_bn=false"])


def test_bad_pickles_are_refused_with_a_reason(tmp_path, capsys):
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"blobs": {"conv1_w": os.getcwd}}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load (posix|os|nt)\.getcwd"):
        read_detectron_blobs(evil)
    blobs = detectron_blobs(SPEC)
    write_pickle(tmp_path / "other.pkl", {"blobs": {**blobs, "fpn_inner_res5_w": np.zeros((1, 1, 1, 1), np.float32)}})
    def refused(pickle_file: str) -> str:  # the command's one-line error (exit 2), no traceback
        assert convert_backbone.main([str(tmp_path / pickle_file), "--arch", "tinyx",
                                      "--out", str(tmp_path / "o.safetensors")]) == 2
        assert not (tmp_path / "o.safetensors").exists()
        return capsys.readouterr().err
    assert re.search(r"^error: blobs that are not a Detectron ResNet/ResNeXt trunk.*fpn_inner_res5_w", refused("other.pkl"))
    write_pickle(tmp_path / "short.pkl", {"blobs": {k: v for k, v in blobs.items() if not k.startswith("res5_")}})
    assert re.search(r"^error: not a tinyx: missing \['layer4.0.bn1.bias'", refused("short.pkl"))
    assert "refusing to load" in refused("evil.pkl") and "No such file" in refused("nowhere.pkl")
    (tmp_path / "empty.pkl").write_bytes(b"")
    (tmp_path / "text.pkl").write_text("<html>not found</html>")
    assert refused("empty.pkl").startswith("error: ") and refused("text.pkl").startswith("error: ")
    with pytest.raises(ValueError, match=r"wrong shapes \['conv1.weight \(16, 3, 7, 7\) vs \(64, 3, 7, 7\)"):
        convert_backbone.check_fits(convert_backbone.convert(blobs)[0], "resnet50")
    with pytest.raises(SystemExit):  # the metadata needs safetensors
        convert_backbone.main([str(tmp_path / "short.pkl"), "--arch", "tinyx", "--out", str(tmp_path / "x.pth")])
