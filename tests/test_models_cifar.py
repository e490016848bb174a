"""The CIFAR KD zoo: shapes, sizes, feature points, and checkpoint-compatible parameter names."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from kdray.models import create_model, list_models, model_family

CIFAR_FAMILIES = {"resnet", "wrn", "vgg", "mobilenetv2", "shufflenet"}
EXPECTED = [
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "mobilenetv2", "shufflenetv1", "shufflenetv2",
]
CIFAR_MODELS = [n for n in list_models() if model_family(n) in CIFAR_FAMILIES]

_cache: dict[str, nn.Module] = {}


def build(name: str) -> nn.Module:
    if name not in _cache:
        torch.manual_seed(0)
        _cache[name] = create_model(name, num_classes=100).eval()
    return _cache[name]


def _bn(prefix: str) -> list[str]:
    return [f"{prefix}.{k}" for k in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]


def test_all_benchmark_models_registered():
    assert sorted(CIFAR_MODELS) == sorted(EXPECTED)


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_forward_gives_logits(name):
    with torch.no_grad():
        out = build(name)(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100)
    assert torch.isfinite(out).all()


# exact counts of the reference definitions at 100 classes (each checked by loading a reference
# state_dict strictly), and the rounded figures published with the CRD benchmark (Tian et al., 2020)
PARAMS = {
    "resnet20": (278_324, 0.28e6),
    "resnet32": (472_756, 0.47e6),
    "resnet56": (861_620, 0.86e6),
    "resnet110": (1_736_564, 1.73e6),
    "resnet8x4": (1_233_540, 1.23e6),
    "resnet32x4": (7_433_860, 7.43e6),
    "wrn_16_2": (703_284, 0.70e6),
    "wrn_40_1": (569_780, 0.57e6),
    "wrn_40_2": (2_255_156, 2.26e6),
    "vgg8": (3_965_028, 3.96e6),
    "vgg13": (9_462_180, 9.46e6),
    "mobilenetv2": (812_836, 0.81e6),
    "shufflenetv1": (949_258, 0.95e6),
    "shufflenetv2": (1_355_528, 1.36e6),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts(name):
    exact, published = PARAMS[name]
    n = sum(p.numel() for p in build(name).parameters())
    assert n == exact
    assert abs(n - published) / published < 0.01


@pytest.mark.parametrize("name", CIFAR_MODELS)
def test_feature_points(name):
    model = build(name)
    modules = dict(model.named_modules())
    points = list(model.kd_stages) + [model.kd_embedding]
    assert all(p in modules for p in points), [p for p in points if p not in modules]
    fired: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    handles = [
        modules[p].register_forward_hook(lambda m, i, o, p=p: fired.append((p, o, o.clone()))) for p in points
    ]
    try:
        with torch.no_grad():
            model(torch.randn(2, 3, 32, 32))
    finally:
        for h in handles:
            h.remove()
    assert [p for p, _, _ in fired] == points  # each fires once, shallow to deep, embedding last
    for path, out, snapshot in fired:
        assert torch.equal(out, snapshot), f"{path} output was modified in place after the hook"
    for path, out, _ in fired[:-1]:
        assert out.dim() == 4 and out.shape[0] == 2, path
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    assert fired[-1][1].flatten(1).shape == (2, head.in_features)


def _resnet_keys(n: int, downsample_at=((2, 0), (3, 0))) -> list[str]:
    keys = ["conv1.weight", *_bn("bn1")]
    for stage in (1, 2, 3):
        for b in range(n):
            p = f"layer{stage}.{b}"
            keys += [f"{p}.conv1.weight", *_bn(f"{p}.bn1"), f"{p}.conv2.weight", *_bn(f"{p}.bn2")]
            if (stage, b) in downsample_at:
                keys += [f"{p}.downsample.0.weight", *_bn(f"{p}.downsample.1")]
    return keys + ["fc.weight", "fc.bias"]


def _wrn_keys(n: int, shortcut_at) -> list[str]:
    keys = ["conv1.weight"]
    for stage in (1, 2, 3):
        for b in range(n):
            p = f"block{stage}.layer.{b}"
            keys += [*_bn(f"{p}.bn1"), f"{p}.conv1.weight", *_bn(f"{p}.bn2"), f"{p}.conv2.weight"]
            if (stage, b) in shortcut_at:
                keys.append(f"{p}.convShortcut.weight")
    return keys + [*_bn("bn1"), "fc.weight", "fc.bias"]


def _vgg_keys(convs_per_block) -> list[str]:
    keys = []
    for blk, n in enumerate(convs_per_block):
        for j in range(n):  # Sequential of conv, bn, relu, ... with the last relu dropped
            conv, bn = f"block{blk}.{3 * j}", f"block{blk}.{3 * j + 1}"
            keys += [f"{conv}.weight", f"{conv}.bias", *_bn(bn)]
    return keys + ["classifier.weight", "classifier.bias"]


# names and layout of the RepDistiller / mdistiller checkpoints (models/resnet.py, wrn.py, vgg.py)
STATE_DICTS = {
    "resnet56": (
        _resnet_keys(9),
        344,
        {"conv1.weight": (16, 3, 3, 3), "layer1.0.conv1.weight": (16, 16, 3, 3),
         "layer2.0.downsample.0.weight": (32, 16, 1, 1), "layer3.8.bn2.weight": (64,),
         "layer3.8.conv2.weight": (64, 64, 3, 3), "fc.weight": (100, 64)},
    ),
    "wrn_40_2": (
        _wrn_keys(6, {(1, 0), (2, 0), (3, 0)}),
        227,
        {"conv1.weight": (16, 3, 3, 3), "block1.layer.0.convShortcut.weight": (32, 16, 1, 1),
         "block3.layer.5.conv2.weight": (128, 128, 3, 3), "bn1.running_var": (128,), "fc.weight": (100, 128)},
    ),
    "vgg13": (
        _vgg_keys([2, 2, 2, 2, 2]),
        72,
        {"block0.0.weight": (64, 3, 3, 3), "block0.0.bias": (64,), "block0.4.running_mean": (64,),
         "block2.3.weight": (256, 256, 3, 3), "block4.4.weight": (512,), "classifier.weight": (100, 512)},
    ),
}


@pytest.mark.parametrize("name", sorted(STATE_DICTS))
def test_state_dict_keys_match_reference(name):
    expected, size, shapes = STATE_DICTS[name]
    sd = build(name).state_dict()
    assert len(sd) == size == len(expected)
    assert list(sd) == expected  # same names, same order
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    # a checkpoint with exactly these keys loads strictly
    fresh = create_model(name, num_classes=100)
    fresh.load_state_dict({k: v.clone() for k, v in sd.items()}, strict=True)


def test_wrn_without_projection_in_first_group():
    keys = list(build("wrn_16_1").state_dict())
    assert keys == _wrn_keys(2, {(2, 0), (3, 0)})


def test_knobs():
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert create_model("resnet20", 10, width_mult=0.5).eval()(x).shape == (2, 10)
        assert create_model("vgg8", 10, width_mult=0.25).eval()(x).shape == (2, 10)
        assert create_model("wrn_16_2", 10, depth=10, widen_factor=1, dropout=0.3).eval()(x).shape == (2, 10)
        assert create_model("mobilenetv2", 10, width_mult=1.0).eval()(x).shape == (2, 10)
        assert create_model("shufflenetv2", 10, net_size=0.5).eval()(x).shape == (2, 10)
    with pytest.raises(ValueError):
        create_model("shufflenetv2", 10, net_size=0.7)
    with pytest.raises(ValueError):
        create_model("wrn_40_2", 10, depth=41)
