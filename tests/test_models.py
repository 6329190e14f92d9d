"""Model factories: narrow VGG layout, weights sources, preprocessing, conv base, head, BN insertion."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vgg import VGG
from torch import nn

from pipeline.config import ModelConfig
from pipeline.models import (
    ConvBase,
    ConvNet,
    Normalize,
    backbone_blocks,
    create_backbone,
    create_conv_base,
    create_dense_head,
    input_hw,
    narrow_vgg16_layout,
    resolve_preprocessing,
)

NARROW = ModelConfig(arch="vgg16_bn_narrow", width_divisor=16, weights="none", input_size=(48, 64))


def layer_types(features: nn.Sequential) -> list[type]:
    return [type(m) for m in features]


def conv_widths(features: nn.Sequential) -> list[int]:
    return [m.out_channels for m in features if isinstance(m, nn.Conv2d)]


def test_narrow_vgg_has_the_vgg16_bn_layout_with_fewer_channels():
    with torch.device("meta"):  # the real vgg16_bn without allocating its 138M parameters
        full = timm.create_model("vgg16_bn", pretrained=False)
    narrow = create_backbone(NARROW)
    assert type(narrow) is type(full) is VGG
    assert layer_types(narrow.features) == layer_types(full.features)  # 13 x (conv, bn, relu) + 5 max pools
    assert len(narrow.features) == len(full.features) == 44
    assert conv_widths(narrow.features) == [w // 16 for w in conv_widths(full.features)]
    assert narrow_vgg16_layout(16).count("M") == 5
    assert narrow.num_features == 32 and narrow.feature_info[-1]["num_chs"] == 32


def test_random_init_is_the_same_in_every_stage():
    a, b = create_backbone(NARROW), create_backbone(NARROW)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    other = create_backbone(NARROW.model_copy(update={"init_seed": 1}))
    assert not torch.equal(other.features[0].weight, a.features[0].weight)


def test_weights_from_a_local_file(tmp_path):
    source = create_backbone(NARROW.model_copy(update={"init_seed": 7}))
    with torch.no_grad():
        source.features[1].running_mean.uniform_()
    path = tmp_path / "narrow.pth"
    torch.save(source.state_dict(), path)
    loaded = create_backbone(NARROW.model_copy(update={"weights": "file", "weights_file": str(path)}))
    for (name, pa), pb in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    with pytest.raises(FileNotFoundError):
        create_backbone(NARROW.model_copy(update={"weights": "file", "weights_file": str(tmp_path / "missing.pth")}))
    with pytest.raises(ValueError, match="no published weights"):
        create_backbone(NARROW.model_copy(update={"weights": "hub"}))


def test_preprocessing_comes_from_timm_with_the_configured_size():
    model = create_backbone(NARROW)
    data_cfg = resolve_preprocessing(model, NARROW)
    assert input_hw(data_cfg) == (48, 64)
    assert data_cfg["mean"] == pytest.approx((0.485, 0.456, 0.406)) and data_cfg["std"] == pytest.approx((0.229, 0.224, 0.225))
    assert input_hw(resolve_preprocessing(model, NARROW.model_copy(update={"input_size": None}))) == (224, 224)


def test_normalize_turns_uint8_into_standardised_floats():
    norm = Normalize((0.5, 0.5, 0.5), (0.25, 0.5, 1.0))
    x = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(1, 3, 1, 2)
    out = norm(x)
    assert out.dtype == torch.float32
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([-2.0, -1.0, -0.5]))
    assert torch.allclose(out[0, :, 0, 1], torch.tensor([2.0, 1.0, 0.5]))


def test_frozen_conv_base_shapes_and_batchnorm_folding():
    backbone = create_backbone(NARROW)
    with torch.no_grad():  # non-trivial BN statistics so folding has something to fold
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 2)
                m.bias.normal_(0, 0.1)
    data_cfg = resolve_preprocessing(backbone, NARROW)
    x = torch.randint(0, 256, (4, 3, 48, 64), dtype=torch.uint8)
    frozen = create_conv_base(backbone, data_cfg, grid=2)
    trainable = create_conv_base(backbone, data_cfg, grid=2, frozen=False).eval()
    assert isinstance(frozen, ConvBase) and frozen.out_features == 32 * 4
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.features)
    assert any(p.requires_grad for p in trainable.parameters())
    with torch.no_grad():
        a, b = frozen(x), trainable(x)
    assert a.shape == (4, 128)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_dense_head_layout_and_full_network():
    head = create_dense_head(128, [64, 32])
    types = [type(m) for m in head]
    assert types == [nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.ReLU, nn.BatchNorm1d,
                     nn.Dropout, nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Dropout, nn.Linear]
    assert [m.p for m in head if isinstance(m, nn.Dropout)] == [0.5, 0.5, 0.5]
    assert [m.out_features for m in head if isinstance(m, nn.Linear)] == [64, 32, 10]
    backbone = create_backbone(NARROW)
    net = ConvNet(create_conv_base(backbone, resolve_preprocessing(backbone, NARROW), 2, frozen=False), head)
    logits = net(torch.randint(0, 256, (3, 3, 48, 64), dtype=torch.uint8))
    assert logits.shape == (3, 10)
    logits.sum().backward()
    assert backbone.features[0].weight.grad is not None


def plain_narrow_vgg16(divisor: int = 16) -> VGG:
    """timm's plain (BN-less) vgg16 class and layout, narrowed, random init."""
    torch.manual_seed(0)
    return VGG(cfg=narrow_vgg16_layout(divisor), norm_layer=None, mlp_ratio=1 / divisor, num_classes=10).eval()


@pytest.mark.slow
def test_real_vgg16_bn_extracts_features_on_tiny_inputs():
    cfg = ModelConfig(arch="vgg16_bn", weights="none", input_size=(32, 32))
    backbone = create_backbone(cfg)
    assert conv_widths(backbone.features)[-1] == 512 and len(backbone.features) == 44
    data_cfg = resolve_preprocessing(backbone, cfg)
    base = create_conv_base(backbone, data_cfg, grid=2)
    with torch.no_grad():
        out = base(torch.randint(0, 256, (2, 3, *input_hw(data_cfg)), dtype=torch.uint8))
    assert out.shape == (2, 512 * 4) and torch.isfinite(out).all()
    assert out.half().dtype == torch.float16 and torch.isfinite(out.half()).all()


@pytest.mark.parametrize("arch, n_blocks", [("resnet18", 5), ("convnext_atto", 5)])
def test_any_timm_cnn_is_a_backbone_with_stage_blocks(arch, n_blocks):
    """Not only VGG: the conv base is the model's forward_features, pooled to the grid, and its blocks
    for staged unfreezing are timm's feature_info stages."""
    cfg = ModelConfig(arch=arch, weights="none", input_size=(32, 32))
    backbone = create_backbone(cfg)
    data_cfg = resolve_preprocessing(backbone, cfg)
    frozen, trainable = (create_conv_base(backbone, data_cfg, 2, frozen=f) for f in (True, False))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(frozen(images), trainable.eval()(images))
    assert frozen.out_features == backbone.num_features * 4
    blocks = backbone_blocks(trainable)
    assert len(blocks) == n_blocks
    in_blocks = {id(p) for block in blocks for m in block for p in m.parameters()}
    stem = next(iter(trainable.features.parameters()))
    assert id(stem) in {id(p) for m in blocks[0] for p in m.parameters()}  # first block = the stem
    assert len(in_blocks) >= 0.9 * len(list(trainable.parameters()))


def test_an_unknown_arch_is_refused_by_name():
    with pytest.raises(ValueError, match="model.arch='no_such_net' is not a timm model"):
        create_backbone(ModelConfig(arch="no_such_net", weights="none"))
