"""Model factories: the batchnorm-VGG backbone (timm), its preprocessing, the frozen conv base that
produces cached features, the dense batchnorm head trained on them, and the course's trick of
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
  features (the course's "batchnorm on the first layer").
- ``ConvNet(conv_base, head)`` is the whole network for end-to-end training (finetune stage): the
  same conv base (trainable) in front of a head loaded from ``models/head/head.pt``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import timm
import timm.data
import torch
from timm.models._builder import build_model_with_cfg
from timm.models.vgg import VGG, ConvMlp, cfgs
from torch import nn

from pipeline.config import ModelConfig

VGG16_LAYOUT: list[int | str] = list(cfgs["vgg16"])
IMAGENET_CLASSES = 1000


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
    weights file via ``pretrained_cfg_overlay=dict(file=...)``."""
    from timm.models.vgg import _filter_fn

    return build_model_with_cfg(
        VGG,
        "vgg16_bn",
        kwargs.pop("pretrained", False),
        model_cfg=narrow_vgg16_layout(width_divisor),
        feature_cfg=dict(flatten_sequential=True, out_indices=(0, 1, 2, 3, 4, 5)),
        pretrained_filter_fn=_filter_fn,
        norm_layer=nn.BatchNorm2d,
        mlp_ratio=1.0 / width_divisor,
        num_classes=num_classes,
        **kwargs,
    )


def create_backbone(model_cfg: ModelConfig, num_classes: int = IMAGENET_CLASSES) -> VGG:
    """The batchnorm-VGG from ``cfg.model``: weights from the HF hub, a local file, the pretrain
    stage's file, or random."""
    if model_cfg.arch == "vgg16_bn_narrow" and model_cfg.weights == "hub":
        raise ValueError("vgg16_bn_narrow has no published weights: use model.weights=pretrain, file or none")
    kwargs = _pretrained_kwargs(model_cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_cfg.init_seed)  # the same random init in every stage (weights=none)
        if model_cfg.arch == "vgg16_bn":
            return timm.create_model(model_cfg.hub_tag, num_classes=num_classes, **kwargs)
        return create_narrow_vgg16_bn(model_cfg.width_divisor, num_classes=num_classes, **kwargs)


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


def feature_channels(model: VGG) -> int:
    return int(model.num_features)


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
    """Normalise, run VGG's conv layers (to pool5), average-pool to ``grid x grid``, flatten."""

    def __init__(self, features: nn.Module, mean: Sequence[float], std: Sequence[float], grid: int,
                 channels: int):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.grid = grid
        self.channels = channels

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


def create_conv_base(backbone: VGG, data_cfg: dict[str, Any], grid: int, frozen: bool = True) -> ConvBase:
    """The conv part of ``backbone`` as a feature extractor. Frozen (for caching, the default): a
    batchnorm-folded copy in eval mode without gradients, channels-last (2x faster convs on CPU
    too). Trainable: ``backbone.features`` itself, batchnorm layers kept."""
    features = fuse_conv_batchnorm(backbone.features) if frozen else backbone.features
    base = ConvBase(features, data_cfg["mean"], data_cfg["std"], grid, feature_channels(backbone))
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
    """The conv base's layers in blocks, first to last, for staged unfreezing and layer-wise learning
    rates: VGG's conv stack split after each max pool (5 blocks for the vgg16 layout)."""
    blocks: list[list[nn.Module]] = [[]]
    for layer in conv_base.features:
        blocks[-1].append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append([])
    return [b for b in blocks if b]


class ConvNet(nn.Module):
    """The whole network: conv base (uint8 images in) followed by the dense head (logits out)."""

    def __init__(self, conv_base: ConvBase, head: nn.Module):
        super().__init__()
        self.conv_base = conv_base
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv_base(x))


# ---------------------------------------------------------------------------- batchnorm insertion

BatchnormPlace = Literal["conv", "dense", "both"]


def identity_batchnorm(mean: torch.Tensor, var: torch.Tensor, eps: float = 1e-5) -> nn.BatchNorm2d:
    """A BatchNorm2d whose eval-mode output equals its input: running stats are the measured mean
    and (biased) variance, weight = sqrt(var + eps), bias = mean. On the calibration batch the
    train-mode output is the input too (batch stats = measured stats)."""
    bn = nn.BatchNorm2d(len(mean), eps=eps).to(device=mean.device, dtype=mean.dtype)
    with torch.no_grad():
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(torch.sqrt(var + eps))
        bn.bias.copy_(mean)
    return bn


@torch.no_grad()
def _measure_channel_stats(model: nn.Module, modules: list[nn.Module], batch: torch.Tensor
                           ) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and biased variance of each module's output on ``batch`` (model in eval)."""
    stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        dims = [d for d in range(output.dim()) if d != 1]
        stats[module] = (output.mean(dim=dims), output.var(dim=dims, unbiased=False))

    handles = [m.register_forward_hook(hook) for m in modules]
    was_training = model.training
    try:
        model.eval()
        model(batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats


def _recompute_feature_taps(model: VGG) -> None:
    """VGG.forward_intermediates indexes ``features`` by position: refresh after inserting layers."""
    ends = [i - 1 for i, layer in enumerate(model.features) if isinstance(layer, nn.MaxPool2d)]
    ends.append(len(model.features) - 1)
    model.feature_ends = ends
    for info, end in zip(model.feature_info, ends, strict=False):
        info["module"] = f"features.{end}"


def insert_batchnorm(model: VGG, calibration_batch: torch.Tensor, where: BatchnormPlace = "both",
                     eps: float = 1e-5) -> VGG:
    """Insert batchnorm into a plain (BN-less) VGG so that it computes the same function.

    ``conv``: a BatchNorm2d after every conv of ``features`` (before its ReLU): the result has the
    vgg16_bn layout. ``dense``: a BatchNorm2d after each activation of the pre-logits MLP (the
    course's BN in the dense block; timm's dense layers are 7x7 and 1x1 convs). Each BN is
    initialised from the activation statistics measured on ``calibration_batch`` (the input the
    model normally receives) so it starts as the identity, and training can then move it.
    Modifies ``model`` in place and returns it."""
    if getattr(model, "use_norm", False) or any(isinstance(m, nn.BatchNorm2d) for m in model.features):
        raise ValueError("insert_batchnorm expects a plain VGG without batchnorm (e.g. timm 'vgg16')")
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)] if where in ("conv", "both") else []
    dense: list[nn.Module] = []
    mlp = model.pre_logits
    if where in ("dense", "both") and isinstance(mlp, ConvMlp):
        dense = [mlp.act1, mlp.act2]
    stats = _measure_channel_stats(model, convs + dense, calibration_batch)

    if convs:
        layers: list[nn.Module] = []
        for layer in model.features:
            layers.append(layer)
            if layer in stats and isinstance(layer, nn.Conv2d):
                layers.append(identity_batchnorm(*stats[layer], eps=eps))
        model.features = nn.Sequential(*layers)
        model.use_norm = True
        _recompute_feature_taps(model)
    if dense:
        for name in ("act1", "act2"):
            act = getattr(mlp, name)
            setattr(mlp, name, nn.Sequential(act, identity_batchnorm(*stats[act], eps=eps)))
    return model.train(model.training)  # the new layers take the model's train/eval mode
