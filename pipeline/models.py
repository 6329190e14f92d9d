"""Model factories: the batchnorm-VGG backbone (timm), its preprocessing, the frozen conv base that
produces cached features, the dense batchnorm head trained on them, and the fast.ai course's trick of
inserting batchnorm into a plain pretrained VGG without changing what it computes.

Shapes and conventions
- Images travel as uint8 NCHW tensors until the model; :class:`Normalize` turns them into floats
  with the backbone's mean/std on whatever device the model is on.
- The conv base is ``VGG.features`` (13 convs + 5 max pools, i.e. the pool5 map, 512x7x7 at 224 px)
  followed by an adaptive average pool to a ``grid x grid`` map, flattened: ``channels * grid**2``
  values per image. Grid 2 keeps where in the frame the hands are (left/right, top/bottom) at 4 KB
  per image in fp16 for vgg16_bn, against 50 KB for the full 7x7 map (too big for 10 copies of
  22k images).
- The dense head is ``BatchNorm1d -> [Dropout -> Linear -> ReLU -> BatchNorm1d] * len(widths) ->
  Dropout -> Linear(num_classes)`` and outputs logits. Its first batchnorm normalises the cached
  features (the fast.ai course's "batchnorm on the first layer").
- ``ConvNet(conv_base, head)`` is the whole network for end-to-end training (finetune stage): the
  same conv base (trainable) in front of a head loaded from ``models/head/fold<k>/head.pt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import timm.data
import torch
from timm.models import build_model_with_cfg
from timm.models.vgg import VGG, cfgs
from torch import nn

from pipeline.config import ModelConfig

VGG16_LAYOUT: list[int | str] = list(cfgs["vgg16"])
IMAGENET_CLASSES = 1000
NARROW_VGG = "vgg16_bn_narrow"  # timm's VGG class, vgg16_bn layout, fewer channels: the CPU stand-in


# ---------------------------------------------------------------------------- backbone


def narrow_vgg16_layout(width_divisor: int) -> list[int | str]:
    """timm's vgg16 layout ("D": 13 convs, 5 max pools) with every channel count divided."""
    return [v if v == "M" else max(1, int(v) // width_divisor) for v in VGG16_LAYOUT]


def _pretrained_kwargs(model_cfg: ModelConfig) -> dict[str, Any]:
    if model_cfg.weights == "none":
        return {"pretrained": False}
    if model_cfg.weights == "file":
        if not model_cfg.weights_file:
            raise ValueError("model.weights=file needs model.weights_file")
        path = Path(model_cfg.weights_file).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"model.weights_file {path} does not exist")
        return {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
    if model_cfg.weights == "pretrain":  # a local file too: the one the pretrain stage wrote
        if model_cfg.pretrain_file is None:
            raise ValueError("model.weights=pretrain: the backbone file is located from cfg.paths; "
                             "build the ModelConfig through Config (load_profile / load_params)")
        if not Path(model_cfg.pretrain_file).exists():
            raise FileNotFoundError(f"model.weights=pretrain: {model_cfg.pretrain_file} does not exist: run the pretrain stage")
        return _pretrained_kwargs(model_cfg.model_copy(update={"weights": "file", "weights_file": str(model_cfg.pretrain_file)}))
    return {"pretrained": True}


def create_narrow_vgg16_bn(width_divisor: int, num_classes: int = IMAGENET_CLASSES, **kwargs: Any) -> VGG:
    """timm's ``VGG`` class with the vgg16_bn layout and ``1/width_divisor`` of the channels (the
    pre-logits MLP is narrowed by the same factor). Built through timm's builder under the vgg16_bn
    variant, so it carries vgg16_bn's pretrained_cfg (mean, std, input size) and can load a local
    weights file (one this project wrote, so no conversion filter) via ``pretrained_cfg_overlay``."""
    return build_model_with_cfg(
        VGG,
        "vgg16_bn",
        kwargs.pop("pretrained", False),
        model_cfg=narrow_vgg16_layout(width_divisor),
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3, 4, 5)),
        norm_layer=nn.BatchNorm2d,
        mlp_ratio=1.0 / width_divisor,
        num_classes=num_classes,
        **kwargs,
    )


def is_vgg(backbone: nn.Module) -> bool:
    return isinstance(backbone, VGG)


def create_backbone(model_cfg: ModelConfig, num_classes: int = IMAGENET_CLASSES) -> nn.Module:
    """Any timm CNN by name (``model.arch``; ``vgg16_bn`` the State Farm default) or the narrow
    VGG-16-bn: weights from the HF hub (``model.hub_tag``, else timm's default tag), a local file, the
    pretrain stage's file, or random. Non-VGG models are built without their classifier: the pipeline
    puts its own dense head on the pooled feature map."""
    if model_cfg.arch == NARROW_VGG:
        if model_cfg.weights == "hub":
            raise ValueError("vgg16_bn_narrow has no published weights: use model.weights=pretrain, file or none")
    elif not timm.is_model(model_cfg.arch):
        raise ValueError(f"model.arch={model_cfg.arch!r} is not a timm model (timm.list_models() lists them) "
                         f"nor {NARROW_VGG!r}")
    kwargs = _pretrained_kwargs(model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_cfg.init_seed)  # the same random init in every stage (weights=none)
        if model_cfg.arch == NARROW_VGG:
            return create_narrow_vgg16_bn(model_cfg.width_divisor, num_classes=num_classes, **kwargs)
        name = model_cfg.hub_tag if model_cfg.weights == "hub" and model_cfg.hub_tag else model_cfg.arch
        # Only VGG keeps its classifier (its pretrained files and the pretrain stage's carry one).
        classes = num_classes if model_cfg.arch.startswith("vgg") else 0
        return timm.create_model(name, num_classes=classes, **kwargs)


def resolve_preprocessing(model: nn.Module, model_cfg: ModelConfig) -> dict[str, Any]:
    """timm's resolved data config (input size, mean, std, ...); ``model.input_size`` overrides the
    size. Frames are squashed to the input size (no centre crop: it could cut off the hands)."""
    data_cfg = dict(timm.data.resolve_data_config({}, model=model))
    if model_cfg.input_size is not None:
        h, w = model_cfg.input_size
        data_cfg["input_size"] = (3, int(h), int(w))
    data_cfg["crop_pct"] = 1.0
    return data_cfg


def input_hw(data_cfg: dict[str, Any]) -> tuple[int, int]:
    _, h, w = data_cfg["input_size"]
    return int(h), int(w)


def feature_channels(model: nn.Module) -> int:
    return int(model.num_features)


class FeatureTrunk(nn.Module):
    """A timm model's ``forward_features`` (its last feature map, before pooling) as a module: the
    conv part of any timm CNN, the way ``VGG.features`` is VGG's."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_features(x)


# ---------------------------------------------------------------------------- conv base


class Normalize(nn.Module):
    """uint8 (or float 0-255) NCHW -> float, ``(x/255 - mean)/std``, on the model's device."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        mean_t = torch.tensor([float(m) * 255.0 for m in mean]).view(1, -1, 1, 1)
        std_t = torch.tensor([float(s) * 255.0 for s in std]).view(1, -1, 1, 1)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("inv_std", 1.0 / std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.mean.dtype if not torch.is_floating_point(x) else x.dtype
        return (x.to(dtype) - self.mean.to(dtype)) * self.inv_std.to(dtype)


class ConvBase(nn.Module):
    """Normalise, run the backbone's conv layers (VGG: to pool5), average-pool to ``grid x grid``,
    flatten. ``stage_ends`` names (inside ``features``) the last module of each resolution stage, from
    timm's ``feature_info``: the blocks of staged unfreezing (``backbone_blocks``)."""

    def __init__(self, features: nn.Module, mean: Sequence[float], std: Sequence[float], grid: int,
                 channels: int, stage_ends: Sequence[str] = ()):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.grid = grid
        self.channels = channels
        self.stage_ends = list(stage_ends)

    @property
    def out_features(self) -> int:
        return self.channels * self.grid * self.grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x).contiguous(memory_format=torch.channels_last)
        return torch.flatten(self.pool(self.features(x)), 1)


def freeze(module: nn.Module) -> nn.Module:
    """No gradients and eval mode (batchnorm uses its running statistics)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def fuse_conv_batchnorm(features: nn.Sequential) -> nn.Sequential:
    """Inference copy of a conv stack with every (Conv2d, BatchNorm2d) pair folded into one conv
    (eval-mode batchnorm is an affine map per channel): the same outputs, ~15% less CPU time."""
    layers: list[nn.Module] = []
    for layer in features:
        if isinstance(layer, nn.BatchNorm2d) and layers and isinstance(layers[-1], nn.Conv2d):
            layers[-1] = torch.nn.utils.fusion.fuse_conv_bn_eval(layers[-1].eval(), layer.eval())
        else:
            layers.append(layer)
    return nn.Sequential(*layers)


def stage_ends(backbone: nn.Module, prefix: str) -> list[str]:
    """timm's ``feature_info`` module names (the end of each resolution stage), relative to the
    module that holds them under ``prefix``."""
    names = [info["module"] for info in backbone.feature_info]
    return [name[len(prefix):] if name.startswith(prefix) else name for name in names]


def create_conv_base(backbone: nn.Module, data_cfg: dict[str, Any], grid: int, frozen: bool = True) -> ConvBase:
    """The conv part of ``backbone`` as a feature extractor: VGG's ``features`` stack, or any timm CNN's
    ``forward_features``. Frozen (for caching, the default): eval mode without gradients,
    channels-last (2x faster convs on CPU too), VGG's batchnorm folded into its convs. Trainable: the
    backbone's own modules, batchnorm layers kept."""
    if is_vgg(backbone):
        features: nn.Module = fuse_conv_batchnorm(backbone.features) if frozen else backbone.features
        ends = stage_ends(backbone, "features.")
    else:
        features, ends = FeatureTrunk(backbone), stage_ends(backbone, "")
        ends = [f"backbone.{name}" for name in ends]
    base = ConvBase(features, data_cfg["mean"], data_cfg["std"], grid, feature_channels(backbone), ends)
    if not frozen:
        return base
    return freeze(base).to(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------- dense head


def create_dense_head(in_features: int, widths: Sequence[int], dropout: float = 0.5,
                      num_classes: int = 10) -> nn.Sequential:
    """``BatchNorm1d -> [Dropout -> Linear -> ReLU -> BatchNorm1d]* -> Dropout -> Linear``: logits."""
    layers: list[nn.Module] = [nn.BatchNorm1d(in_features)]
    prev = in_features
    for width in widths:
        layers += [nn.Dropout(dropout), nn.Linear(prev, int(width)), nn.ReLU(inplace=True), nn.BatchNorm1d(int(width))]
        prev = int(width)
    layers += [nn.Dropout(dropout), nn.Linear(prev, num_classes)]
    return nn.Sequential(*layers)


def backbone_blocks(conv_base: ConvBase) -> list[list[nn.Module]]:
    """The conv base's leaf modules in blocks, first to last, for staged unfreezing and layer-wise
    learning rates: one block per resolution stage of timm's ``feature_info`` (VGG-16: the 5 conv
    blocks between max pools; ResNet: stem, layer1..4; ConvNeXt: its stages). Blocks without
    parameters are dropped."""
    ends = conv_base.stage_ends
    blocks: list[list[nn.Module]] = [[] for _ in range(len(ends) + 1)]
    stage, inside = 0, False
    for name, module in conv_base.features.named_modules():
        if not name or next(module.children(), None) is not None:
            continue  # leaves only
        while stage < len(ends):
            if name == ends[stage] or name.startswith(ends[stage] + "."):
                inside = True
                break
            if not inside:
                break
            stage, inside = stage + 1, False  # past this stage's last module
        blocks[stage].append(module)
    return [block for block in blocks if any(True for m in block for _ in m.parameters())]


class ConvNet(nn.Module):
    """The whole network: conv base (uint8 images in) followed by the dense head (logits out)."""

    def __init__(self, conv_base: ConvBase, head: nn.Module):
        super().__init__()
        self.conv_base = conv_base
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv_base(x))
