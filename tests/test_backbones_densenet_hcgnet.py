"""DenseNet-40-12 and HCGNet-A1/A2/A3 backbones: exact sizes (docs/backbones.md), shapes, and the Backbone contract."""
import pytest
import torch
from torch import nn

from models import count_parameters, create_model, model_entry

# (part path, params) at 100 classes; official models, docs/backbones.md.
DENSENET_PARTS = {
    "stem": 648, "stages.0.block": 47_880, "stages.0.transition": 4_800, "stages.1.block": 55_080,
    "stages.1.transition": 7_440, "stages.2": 58_680, "head.norm": 264, "head.fc": 13_300,
}
HCGNET_PARTS = {
    "stem": 648, "stages.0.block": 46_440, "stages.0.transition": 70_638, "stages.1.block": 185_208,
    "stages.1.transition": 306_213, "stages.2": 451_176, "head.norm": 828, "head.fc": 41_500,
    # first and last SMG module of each hybrid block
    "stages.0.block.SMG1": 3_705, "stages.0.block.SMG8": 7_905,
    "stages.1.block.SMG1": 14_919, "stages.1.block.SMG8": 31_383,
    "stages.2.SMG1": 38_001, "stages.2.SMG8": 74_793,
}
CASES = [("densenet40_12", 188_092, [48, 60, 132], DENSENET_PARTS),
         ("hcgnet_a1", 1_102_651, [60, 126, 414], HCGNET_PARTS)]


@pytest.mark.parametrize("name,total,widths,parts", CASES)
def test_param_counts(name, total, widths, parts):
    model = create_model(name, num_classes=100)
    assert count_parameters(model) == total
    assert sum(parts[p] for p in ("stem", "head.norm", "head.fc")) + sum(
        count_parameters(s) for s in model.stages) == total
    for path, expected in parts.items():
        assert count_parameters(model.get_submodule(path)) == expected, path
    assert model.stage_widths == widths and model.feature_dim == widths[-1]
    assert model_entry(name).image_size == 32


def test_num_classes_changes_only_fc():
    assert count_parameters(create_model("densenet40_12", num_classes=10)) == 188_092 - 13_300 + 1_330
    assert count_parameters(create_model("hcgnet_a1", num_classes=10)) == 1_102_651 - 41_500 + 4_150


@pytest.mark.parametrize("name", ["densenet40_12", "hcgnet_a1"])
@pytest.mark.parametrize("size", [32, 64])
def test_forward_shapes_and_stages(name, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=100)
    x = torch.randn(2, 3, size, size)
    assert create_model(name, num_classes=100)(x).shape == (2, 100)
    out = model(x, return_features=True, return_stages=True)
    assert out.logits.shape == (2, 100) and torch.isfinite(out.logits).all()
    assert out.features.shape == (2, model.feature_dim)
    assert [s.shape[1] for s in out.stages] == model.stage_widths
    assert [s.shape[-1] for s in out.stages] == [size // 2, size // 4, size // 4]
    model.eval()
    with torch.no_grad():
        a = model(x)
        b = model(x, return_features=True).logits
    torch.testing.assert_close(a, b)


def test_densenet_init():
    model = create_model("densenet40_12")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0)
    assert torch.all(model.head.fc.bias == 0)
    # conv0 has no BN/ReLU after it: the stem is a bare conv
    assert isinstance(model.stem, nn.Conv2d) and model.stem.bias is None


@pytest.mark.parametrize("name,total,widths", [("hcgnet_a2", 3_133_679, [120, 204, 716]),
                                               ("hcgnet_a3", 11_363_647, [252, 414, 1374])])
def test_hcgnet_a2_a3_sizes(name, total, widths):
    """Official HCGNet_CIFAR.py configs; README lists 3.1M and 11.4M params (CIFAR-100 head)."""
    model = create_model(name, num_classes=100)
    assert count_parameters(model) == total
    assert model.stage_widths == widths
