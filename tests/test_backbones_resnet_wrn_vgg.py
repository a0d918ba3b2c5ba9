"""CIFAR ResNets, ImageNet ResNet-18/34, Wide ResNets and VGG-16: sizes, shapes and the Backbone contract.

Parameter counts are checked twice: against the official reference numbers (docs/backbones.md, reference sizes) and
against closed-form per-layer sums written here independently of the model code. Multiply-adds use the
official counting rule (winycg/MCL-OKD utils.py: Conv2d and Linear only) and must match them exactly.
"""
from __future__ import annotations

import re
from functools import lru_cache

import pytest
import torch
from torch import nn

from models import Head, count_parameters, create_model, model_entry
from models.resnet_imagenet import default_stem
from models.wrn import wide_resnet

CIFAR_NETS = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet110_bottleneck", "vgg16",
              "wrn_16_2", "wrn_16_4", "wrn_16_8", "wrn_22_8", "wrn_28_10", "wrn_40_1", "wrn_40_2", "wrn_20_8"]
IMAGENET_NETS = ["resnet18", "resnet34"]


@lru_cache(maxsize=None)
def build(name: str, num_classes: int = 100, **kwargs) -> nn.Module:
    """Models are only run in eval mode under no_grad below, so one instance per configuration suffices."""
    torch.manual_seed(0)
    return create_model(name, num_classes=num_classes, **kwargs).eval()


# ----------------------------------------------------------------------------------------------------
# Independent closed-form parameter counts.

def conv(cin, cout, k, bias=False):
    return cin * cout * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c


def cifar_resnet_params(blocks, num_classes, bottleneck=False, width_per_group=64):
    total, cin = conv(3, 16, 3) + bn(16), 16
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
        out = planes * (4 if bottleneck else 1)
        mid = planes * width_per_group // 64
        for i in range(blocks):
            if bottleneck:
                total += conv(cin, mid, 1) + bn(mid) + conv(mid, mid, 3) + bn(mid) + conv(mid, out, 1) + bn(out)
            else:
                total += conv(cin, out, 3) + bn(out) + conv(out, out, 3) + bn(out)
            if (stride if i == 0 else 1) != 1 or cin != out:
                total += conv(cin, out, 1) + bn(out)
            cin = out
    return total + cin * num_classes + num_classes


def wrn_params(depth, k, num_classes):
    n = (depth - 4) // 6
    total, cin = conv(3, 16, 3), 16
    for w in (16 * k, 32 * k, 64 * k):
        for _ in range(n):
            total += bn(cin) + conv(cin, w, 3) + bn(w) + conv(w, w, 3) + (conv(cin, w, 1) if cin != w else 0)
            cin = w
    return total + bn(cin) + cin * num_classes + num_classes


def vgg16_params(num_classes):
    cfg = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    total, cin = 0, 3
    for c in cfg:
        total += conv(cin, c, 3, bias=True) + bn(c)
        cin = c
    return total + 512 * num_classes + num_classes


def multiply_adds(model: nn.Module, size: int) -> int:
    """Official cal_multi_adds: Cin*Cout*kh*kw*Hout*Wout/groups per called Conv2d, weight.numel() per Linear."""
    total = 0

    def hook(m, inputs, output):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += m.in_channels * m.out_channels * m.kernel_size[0] * m.kernel_size[1] \
                * output.shape[2] * output.shape[3] // m.groups
        else:
            total += m.weight.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    for h in handles:
        h.remove()
    return total


# ----------------------------------------------------------------------------------------------------
# Parameter counts.

@pytest.mark.parametrize("name, expected", [
    ("resnet32", 472_756), ("resnet110_bottleneck", 1_170_868), ("vgg16", 14_774_436),
])
def test_spec_reference_param_counts(name, expected):
    assert count_parameters(build(name)) == expected


@pytest.mark.parametrize("name, expected", [("resnet18", 11_689_512), ("resnet34", 21_797_672)])
def test_imagenet_resnet_param_counts_at_1000_classes(name, expected):
    assert count_parameters(build(name, 1000, image_size=224)) == expected


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_basic_cifar_resnet_matches_formula(depth):
    assert count_parameters(build(f"resnet{depth}")) == cifar_resnet_params((depth - 2) // 6, 100)


def test_bottleneck_nets_match_formula():
    assert count_parameters(build("resnet110_bottleneck")) == cifar_resnet_params(12, 100, bottleneck=True)
    wrn20_8 = cifar_resnet_params(2, 100, bottleneck=True, width_per_group=512)
    assert count_parameters(build("wrn_20_8")) == wrn20_8 == 6_871_220


@pytest.mark.parametrize("depth, k, expected", [
    (16, 2, 703_284), (16, 4, 2_772_020), (16, 8, 11_007_540), (22, 8, 17_204_276),
    (28, 10, 36_536_884), (40, 1, 569_780), (40, 2, 2_255_156),
])
def test_wrn_matches_formula(depth, k, expected):
    assert count_parameters(build(f"wrn_{depth}_{k}")) == wrn_params(depth, k, 100) == expected


def test_vgg16_matches_formula():
    assert count_parameters(build("vgg16")) == vgg16_params(100)


@pytest.mark.parametrize("name", CIFAR_NETS + IMAGENET_NETS)
def test_registry_description_count_is_true(name):
    """Where a description quotes a parameter count at C=100, it must be the measured one."""
    found = re.search(r"([\d,]{5,}) params at C=100", model_entry(name).description) or \
        re.search(r"([\d,]{5,}) params at 100 classes", model_entry(name).description)
    if found:
        assert int(found.group(1).replace(",", "")) == count_parameters(build(name))


# ----------------------------------------------------------------------------------------------------
# Multiply-adds (official reference values, docs/backbones.md): pins strides and stage layout, not only layer sizes.

@pytest.mark.parametrize("name, num_classes, size, kwargs, expected", [
    ("resnet32", 100, 32, {}, 69_130_496),
    ("resnet110_bottleneck", 100, 32, {}, 167_453_696),
    ("vgg16", 100, 32, {}, 313_247_744),
    ("resnet18", 1000, 224, {"image_size": 224}, 1_814_073_344),
    ("resnet34", 1000, 224, {"image_size": 224}, 3_663_761_408),
])
def test_multiply_adds_match_spec(name, num_classes, size, kwargs, expected):
    assert multiply_adds(build(name, num_classes, **kwargs), size) == expected


# ----------------------------------------------------------------------------------------------------
# Forward shapes and the Backbone contract.

def check_forward(model, size, num_classes, final_hw):
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits = model(x)
        out = model(x, return_features=True, return_stages=True)
    assert logits.shape == (2, num_classes)
    assert torch.allclose(out.logits, logits)
    assert out.features.shape == (2, model.feature_dim)
    assert len(out.stages) == model.num_stages == len(model.stage_widths)
    assert [s.shape[1] for s in out.stages] == model.stage_widths
    assert tuple(out.stages[-1].shape[2:]) == (final_hw, final_hw)
    assert isinstance(model.head, Head) and model.head.fc.out_features == num_classes


@pytest.mark.parametrize("name", CIFAR_NETS)
@pytest.mark.parametrize("size", [32, 64])
def test_cifar_nets_forward(name, size):
    final = size // 32 if name == "vgg16" else size // 4
    check_forward(build(name), size, 100, final)


@pytest.mark.parametrize("name", IMAGENET_NETS)
@pytest.mark.parametrize("size, final", [(32, 4), (64, 8), (224, 7)])
def test_imagenet_resnets_forward(name, size, final):
    # 32 and 64 share one small-stem instance (built for CIFAR); 224 uses the 1000-class ImageNet one.
    model = build(name, 1000, image_size=224) if size == 224 else build(name, image_size=32)
    check_forward(model, size, model.num_classes, final)


def test_stem_choice():
    assert [default_stem(s) for s in (28, 32, 64, 127, 128, 224)] == ["small"] * 4 + ["imagenet"] * 2
    assert model_entry("resnet18").image_size == 224
    small, imagenet = build("resnet18", image_size=32), build("resnet18", 1000, image_size=224)
    assert list(dict(small.stem.named_children())) == ["conv", "bn", "relu"]
    assert small.stem.conv.kernel_size == (3, 3) and small.stem.conv.stride == (1, 1)
    assert list(dict(imagenet.stem.named_children())) == ["conv", "bn", "relu", "maxpool"]
    assert imagenet.stem.conv.kernel_size == (7, 7) and imagenet.stem.conv.stride == (2, 2)
    assert create_model("resnet18", image_size=64).stem.conv.kernel_size == (3, 3)       # TinyImageNet
    assert create_model("resnet18", image_size=64, stem="imagenet").stem.conv.kernel_size == (7, 7)
    with pytest.raises(ValueError, match="stem"):
        create_model("resnet18", stem="tiny")


def test_stage_widths_and_features():
    assert build("resnet32").stage_widths == [16, 32, 64] and build("resnet32").feature_dim == 64
    assert build("resnet110_bottleneck").stage_widths == [64, 128, 256]
    assert build("wrn_20_8").stage_widths == [64, 128, 256] and build("wrn_20_8").feature_dim == 256
    assert build("vgg16").stage_widths == [128, 256, 512, 512]
    assert build("wrn_28_10").stage_widths == [160, 320, 640]
    assert build("resnet34", image_size=32).stage_widths == [64, 128, 256, 512]


# ----------------------------------------------------------------------------------------------------
# WRN specifics.

@pytest.mark.parametrize("depth", [20, 9, 4, 27])
def test_wrn_depth_check(depth):
    with pytest.raises(ValueError, match="6n\\+4"):
        wide_resnet(depth, 8)


def test_wrn_dropout_and_training_step():
    model = create_model("wrn_16_2", num_classes=10, dropout=0.3)
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 6
    assert not any(isinstance(m, nn.Dropout) for m in build("wrn_16_2").modules())
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2]))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert isinstance(model.head.norm[0], nn.BatchNorm2d)   # pre-activation nets end with BN+ReLU


# ----------------------------------------------------------------------------------------------------
# Initialisation conventions.

def test_init_conventions():
    vgg = build("vgg16")
    assert torch.count_nonzero(vgg.head.fc.bias) == 0
    assert 0.005 < vgg.head.fc.weight.std().item() < 0.015
    assert all(torch.count_nonzero(m.bias) == 0 for m in vgg.modules() if isinstance(m, nn.Conv2d))
    wrn = build("wrn_16_2")
    assert torch.count_nonzero(wrn.head.fc.bias) == 0
    resnet = build("resnet32")
    assert torch.count_nonzero(resnet.head.fc.bias) > 0       # Linear keeps the PyTorch default
    for model in (vgg, wrn, resnet):
        conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3))
        fan_out = conv.out_channels * 9
        assert abs(conv.weight.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.2
        bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
