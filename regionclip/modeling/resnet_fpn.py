"""detectron2-compatible ResNet (C4 outputs) and ResNet-FPN, used only by the offline RPN.

The offline RPN checkpoints are ordinary detectron2 detectors, so every module here keeps
detectron2's parameter names (`stem.conv1.norm.weight`, `res2.0.shortcut.weight`,
`fpn_lateral2.weight`, ...) and its MSRA bottleneck layout (stride in the 1x1 conv when
`stride_in_1x1`). torchvision's ResNet puts the stride in the 3x3 conv and cannot stand in.
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import FrozenBatchNorm2d
from .clip_resnet import ShapeSpec

NUM_BLOCKS_PER_DEPTH = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STAGE_INDEX = {"res2": 2, "res3": 3, "res4": 4, "res5": 5}
STEM_STRIDE = 4
GN_GROUPS = 32  # detectron2's "GN" norm
_NORMS = {
    "FrozenBN": FrozenBatchNorm2d,
    "BN": nn.BatchNorm2d,
    # In eval mode nn.SyncBatchNorm uses running stats and needs no process group (CPU works).
    "SyncBN": nn.SyncBatchNorm,
    "GN": lambda channels: nn.GroupNorm(GN_GROUPS, channels),
}


def get_norm(norm: str, channels: int) -> Optional[nn.Module]:
    """Norm layer by detectron2 name ("" = none, "FrozenBN", "BN", "SyncBN", "GN")."""
    if norm == "":
        return None
    if norm not in _NORMS:
        raise ValueError(f"Unknown norm {norm!r}; valid: '', {', '.join(_NORMS)}")
    return _NORMS[norm](channels)


class Conv2d(nn.Conv2d):
    """nn.Conv2d followed by an optional `norm` child and activation (detectron2 naming)."""

    def __init__(self, *args, norm: Optional[nn.Module] = None, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class Freezable(nn.Module):
    """A module that can be frozen for good: no gradients, and eval mode even when a trainer
    calls `model.train()` (the offline RPN must use running BN stats and TEST settings)."""

    frozen = False

    def freeze_all(self) -> "Freezable":
        self.requires_grad_(False)
        self.frozen = True
        return self.eval()

    def train(self, mode: bool = True) -> "Freezable":
        return super().train(mode and not self.frozen)


def _msra_fill(conv: nn.Conv2d) -> None:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def c2_xavier_fill(layer: nn.Module) -> None:
    """detectron2's (Caffe2) XavierFill: kaiming-uniform with a = 1, zero bias."""
    nn.init.kaiming_uniform_(layer.weight, a=1)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def freeze_norms_(module: nn.Module) -> nn.Module:
    """Turn off grads and replace every BatchNorm2d/SyncBatchNorm by FrozenBatchNorm2d.

    Same effect as detectron2's `CNNBlockBase.freeze()`: the frozen layers lose
    `num_batches_tracked`, which is why FrozenBN checkpoints carry 4 tensors per norm.
    """
    for p in module.parameters():
        p.requires_grad_(False)
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).copy_(getattr(child, key).detach())
            setattr(module, name, frozen)
        else:
            freeze_norms_(child)
    return module


class BasicStem(nn.Module):
    """conv 7x7/2 + norm + ReLU + max-pool 3x3/2: [N, C, H, W] -> [N, out, H/4, W/4]."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm: str = "FrozenBN"):
        super().__init__()
        self.out_channels = out_channels
        self.conv1 = Conv2d(
            in_channels, out_channels, kernel_size=7, stride=2, padding=3, bias=False,
            norm=get_norm(norm, out_channels),
        )
        _msra_fill(self.conv1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu_(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (grouped, dilated) -> 1x1 residual block with a projection shortcut;
    `stride_in_1x1=True` is the MSRA layout of detectron2's ImageNet-initialised models."""

    def __init__(
        self, in_channels: int, out_channels: int, *, bottleneck_channels: int, stride: int = 1,
        num_groups: int = 1, norm: str = "FrozenBN", stride_in_1x1: bool = True,
        dilation: int = 1,
    ):
        super().__init__()
        self.out_channels = out_channels
        self.stride = stride
        self.shortcut = None
        if in_channels != out_channels:
            self.shortcut = Conv2d(
                in_channels, out_channels, kernel_size=1, stride=stride, bias=False,
                norm=get_norm(norm, out_channels),
            )
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = Conv2d(
            in_channels, bottleneck_channels, kernel_size=1, stride=stride_1x1, bias=False,
            norm=get_norm(norm, bottleneck_channels),
        )
        self.conv2 = Conv2d(
            bottleneck_channels, bottleneck_channels, kernel_size=3, stride=stride_3x3,
            padding=dilation, bias=False, groups=num_groups, dilation=dilation,
            norm=get_norm(norm, bottleneck_channels),
        )
        self.conv3 = Conv2d(
            bottleneck_channels, out_channels, kernel_size=1, bias=False,
            norm=get_norm(norm, out_channels),
        )
        for conv in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if conv is not None:
                _msra_fill(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out = out + (x if self.shortcut is None else self.shortcut(x))
        return F.relu_(out)


class ResNet(Freezable):
    """Stem plus stages `res2`, `res3`, ...; forward returns {name: feature} for `out_features`.
    `size_divisibility` is 0: a plain ResNet accepts any input size."""

    size_divisibility = 0

    def __init__(self, stem: BasicStem, stages: List[List[nn.Module]], out_features: Sequence[str]):
        super().__init__()
        self.stem = stem
        self.stage_names = []
        self._shapes = {}
        stride = STEM_STRIDE
        for i, blocks in enumerate(stages):
            name = f"res{i + 2}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            for block in blocks:
                stride *= block.stride
            self._shapes[name] = ShapeSpec(blocks[-1].out_channels, stride)
        unknown = set(out_features) - set(self.stage_names)
        if unknown:
            raise ValueError(f"out_features {sorted(unknown)} not in {self.stage_names}")
        self.out_features = list(out_features)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x: [N, 3, H, W] normalised image -> {res_k: [N, C_k, H/s_k, W/s_k]}."""
        outputs = {}
        x = self.stem(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {name: self._shapes[name] for name in self.out_features}

    def freeze(self, freeze_at: int) -> "ResNet":
        """Freeze the stem (freeze_at >= 1) and stages res2..res{freeze_at} (FrozenBN)."""
        if freeze_at >= 1:
            freeze_norms_(self.stem)
        for idx, name in enumerate(self.stage_names, start=2):
            if freeze_at >= idx:
                freeze_norms_(getattr(self, name))
        return self


def build_resnet(
    *, depth: int, out_features: Sequence[str], norm: str = "FrozenBN", freeze_at: int = 2,
    stem_out_channels: int = 64, res2_out_channels: int = 256, num_groups: int = 1,
    width_per_group: int = 64, stride_in_1x1: bool = True, res5_dilation: int = 1,
    in_channels: int = 3,
) -> ResNet:
    """Bottleneck ResNet with detectron2's `build_resnet_backbone` stage arithmetic; only the
    stages up to the deepest requested output are built (C4: res2..res4)."""
    if depth not in NUM_BLOCKS_PER_DEPTH:
        raise ValueError(f"RESNETS.DEPTH {depth} unsupported; valid: {list(NUM_BLOCKS_PER_DEPTH)}")
    if res5_dilation not in (1, 2):
        raise ValueError(f"RESNETS.RES5_DILATION must be 1 or 2, got {res5_dilation}")
    stem = BasicStem(in_channels, stem_out_channels, norm)
    last_stage = max(STAGE_INDEX[f] for f in out_features)
    channels_in, channels_out = stem_out_channels, res2_out_channels
    bottleneck = num_groups * width_per_group
    stages = []
    for stage_idx in range(2, last_stage + 1):
        dilation = res5_dilation if stage_idx == 5 else 1
        first_stride = 1 if stage_idx == 2 or dilation == 2 else 2
        blocks = []
        for b in range(NUM_BLOCKS_PER_DEPTH[depth][stage_idx - 2]):
            blocks.append(BottleneckBlock(
                channels_in if b == 0 else channels_out, channels_out,
                bottleneck_channels=bottleneck, stride=first_stride if b == 0 else 1,
                num_groups=num_groups, norm=norm, stride_in_1x1=stride_in_1x1,
                dilation=dilation,
            ))
        stages.append(blocks)
        channels_in, channels_out, bottleneck = channels_out, channels_out * 2, bottleneck * 2
    return ResNet(stem, stages, out_features).freeze(freeze_at)


class FPN(Freezable):
    """Feature pyramid over a ResNet: outputs p2..p5 and p6 = max-pool(kernel 1, stride 2) of p5
    (detectron2's `LastLevelMaxPool` top block, which has no parameters).

    Child names follow detectron2 (`fpn_lateral{k}`, `fpn_output{k}`, `bottom_up`); they are
    registered lateral/output per level first, then `bottom_up`, as detectron2 does.
    `size_divisibility` is the stride of the coarsest input level, so the 2x nearest
    upsampling lines up with the lateral maps.
    """

    def __init__(
        self, bottom_up: ResNet, in_features: Sequence[str], out_channels: int,
        norm: str = "", fuse_type: str = "sum",
    ):
        super().__init__()
        if fuse_type not in ("sum", "avg"):
            raise ValueError(f"FPN.FUSE_TYPE must be 'sum' or 'avg', got {fuse_type!r}")
        shapes = bottom_up.output_shape()
        self.in_features = list(in_features)
        self.levels = [shapes[f].stride.bit_length() - 1 for f in self.in_features]
        use_bias = norm == ""
        for f, level in zip(self.in_features, self.levels):
            lateral = Conv2d(shapes[f].channels, out_channels, kernel_size=1, bias=use_bias,
                             norm=get_norm(norm, out_channels))
            output = Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=use_bias,
                            norm=get_norm(norm, out_channels))
            c2_xavier_fill(lateral)
            c2_xavier_fill(output)
            self.add_module(f"fpn_lateral{level}", lateral)
            self.add_module(f"fpn_output{level}", output)
        self.bottom_up = bottom_up
        self.fuse_type = fuse_type
        self.size_divisibility = shapes[self.in_features[-1]].stride
        top = self.levels[-1] + 1
        self._shapes = {f"p{k}": ShapeSpec(out_channels, 2 ** k) for k in self.levels + [top]}

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x: [N, 3, H, W], H and W multiples of size_divisibility -> {p_k: [N, C, H/2^k, W/2^k]}.
        """
        bottom_up = self.bottom_up(x)
        results = []
        prev = None
        for f, level in zip(reversed(self.in_features), reversed(self.levels)):
            lateral = getattr(self, f"fpn_lateral{level}")(bottom_up[f])
            if prev is not None:
                lateral = lateral + F.interpolate(prev, scale_factor=2.0, mode="nearest")
                if self.fuse_type == "avg":
                    lateral = lateral / 2
            prev = lateral
            results.insert(0, getattr(self, f"fpn_output{level}")(prev))
        results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return dict(zip(self._shapes, results))

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return dict(self._shapes)
