"""CLIP's ModifiedResNet image trunk as a detection backbone.

Built on open_clip's ``ModifiedResNet``, whose module names (``conv1``, ``bn1``, ...,
``layer1``..``layer4``, ``attnpool``, downsample children ``"-1"``, ``"0"``, ``"1"``) already
equal the official RegionCLIP ``backbone.*`` names, so both OpenAI CLIP ``visual.*`` weights
and RegionCLIP checkpoints load by renaming the prefix only.

As in RegionCLIP's C4 detectors the backbone returns ``res4`` (stride 16); regions are embedded
by :meth:`CLIPResNet.embed_regions`: RoIAlign on res4 -> ``layer4`` (res5) -> ``attnpool``, the
regional analogue of CLIP's ``encode_image`` and the one implementation that inference,
fine-tuning, pretraining (student and teacher) and the tools share.
"""
from typing import Dict, List, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from torch import nn

from ..config.variants import CLIPVariant
from ..ops import FrozenBatchNorm2d, roi_align

# detectron2 feature names -> ModifiedResNet stage attributes.
STAGES = {"res2": "layer1", "res3": "layer2", "res4": "layer3", "res5": "layer4"}
STAGE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
MAX_FREEZE_AT = 5  # 1 = stem, k >= 2 = stem and layer1..layer{k-1}
INFERENCE_CHUNK = 128  # regions per res5 pass without gradients


class ShapeSpec(NamedTuple):
    """Channels and stride (in input pixels) of one output feature map."""

    channels: int
    stride: int


class GridAttentionPool2d(AttentionPool2d):
    """open_clip's CLIP attention pool with a readable error for a wrong input grid.

    The positional embedding is NOT interpolated (neither was the original's), so the input
    must be exactly ``grid x grid`` = (CLIP image size / 32)^2: 7x7 for RN50, 9x9 for RN50x4.
    Region features therefore enter ``layer4`` at ``2 * grid`` (the pooler resolution).
    Only the pooled token 0 is used as a query: the original (and open_clip) query with all
    HW + 1 tokens and keep token 0, which gives the same output at several times the cost when
    a thousand regions are pooled per image.
    """

    def __init__(self, grid: int, embed_dim: int, num_heads: int, output_dim: int):
        super().__init__(grid, embed_dim, num_heads, output_dim)
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, grid, grid] -> [N, output_dim]."""
        if tuple(x.shape[-2:]) != (self.grid, self.grid):
            raise ValueError(
                f"CLIP attention pool expects a {self.grid}x{self.grid} input (its positional "
                f"embedding is not interpolated), got {tuple(x.shape[-2:])}; RoI features must "
                f"be pooled to {2 * self.grid}x{2 * self.grid} before layer4"
            )
        tokens = x.flatten(2).permute(2, 0, 1)  # [HW, N, C]
        tokens = torch.cat([tokens.mean(dim=0, keepdim=True), tokens], dim=0)
        tokens = tokens + self.positional_embedding[:, None, :].to(tokens.dtype)
        pooled, _ = F.multi_head_attention_forward(
            query=tokens[:1], key=tokens, value=tokens,
            embed_dim_to_check=tokens.shape[-1],
            num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight,
            k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True,
            training=self.training,
            need_weights=False,
        )
        return pooled[0]


def pool_regions(
    res4: torch.Tensor, boxes: List[torch.Tensor], resolution: int, stride: int = 16
) -> torch.Tensor:
    """RoIAlign ("ROIAlignV2": aligned, adaptive sampling) of xyxy boxes given per image.

    res4: [N, C, H, W]; boxes: N tensors [R_i, 4] in input-image pixels -> [sum R_i, C, S, S].
    """
    return roi_align(res4, boxes, resolution, spatial_scale=1.0 / stride, sampling_ratio=0,
                     aligned=True)


def convert_frozen_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d in ``module`` (in place) by a FrozenBatchNorm2d copy.

    Frozen BN keeps exactly weight/bias/running_mean/running_var, the official key set
    (no ``num_batches_tracked``), and never updates statistics in training mode.
    """
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            for key in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, key).data.copy_(getattr(child, key).data)
            setattr(module, name, frozen)
        else:
            convert_frozen_batchnorm(child)
    return module


class CLIPResNet(ModifiedResNet):
    """CLIP ModifiedResNet with frozen BN, detectron2-style features and freezing.

    Args:
        variant: the CLIP variant (block counts, width, embedding size, image size).
        freeze_at: 0 trains everything; 1 freezes the stem; k >= 2 also freezes
            layer1..layer{k-1} (detectron2's ``MODEL.BACKBONE.FREEZE_AT``).
        out_features: subset of res2..res5 returned by :meth:`forward`.
    """

    size_divisibility = 0  # as the original: images are padded only to the batch maximum

    def __init__(
        self,
        variant: CLIPVariant,
        freeze_at: int = 2,
        out_features: Sequence[str] = ("res4",),
    ):
        super().__init__(
            layers=list(variant.layers),
            output_dim=variant.embed_dim,
            heads=variant.attnpool_heads,
            image_size=variant.image_size,
            width=variant.width,
        )
        self.variant = variant
        self.out_features = _check_out_features(out_features)
        self.attnpool = GridAttentionPool2d(
            variant.image_size // 32, variant.attnpool_dim, variant.attnpool_heads,
            variant.embed_dim,
        )
        self.init_parameters()  # re-run so the replaced pool gets open_clip's initialisation
        convert_frozen_batchnorm(self)
        self.freeze(freeze_at)

    def freeze(self, freeze_at: int) -> None:
        """Set ``requires_grad=False`` on the stem (>= 1) and layer1..layer{freeze_at-1}."""
        if not 0 <= freeze_at <= MAX_FREEZE_AT:
            raise ValueError(f"freeze_at must be in [0, {MAX_FREEZE_AT}], got {freeze_at}")
        frozen = []
        if freeze_at >= 1:
            frozen += [self.conv1, self.conv2, self.conv3, self.bn1, self.bn2, self.bn3]
        frozen += [getattr(self, f"layer{i}") for i in range(1, freeze_at)]
        for module in frozen:
            for param in module.parameters():
                param.requires_grad = False

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """[N, 3, H, W] normalised RGB -> {name: [N, C, H/stride, W/stride]} for out_features."""
        outputs = {}
        x = self.stem(x)
        last = max(self.out_features, key=STAGE_STRIDES.get)
        for name, attr in STAGES.items():
            x = getattr(self, attr)(x)
            if name in self.out_features:
                outputs[name] = x
            if name == last:
                break
        return outputs

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] with S = variant.image_size -> [N, embed_dim] CLIP image embedding.

        Equals open_clip's ``CLIP.encode_image`` (unnormalised) for the same weights.
        """
        x = self.stem(x)
        for attr in STAGES.values():
            x = getattr(self, attr)(x)
        return self.attnpool(x)

    def region_features(self, res4: torch.Tensor, boxes: List[torch.Tensor],
                        resolution: int) -> torch.Tensor:
        """res5 maps [sum R_i, C5, S/2, S/2] of the boxes (per image, input pixels)."""
        return self.layer4(pool_regions(res4, boxes, resolution))

    def embed_regions(self, res4: torch.Tensor, boxes: List[torch.Tensor],
                      resolution: int) -> torch.Tensor:
        """Unnormalised region embeddings [sum R_i, D] of the boxes.

        ``resolution`` is the RoIAlign size on res4: twice the attention-pool grid. Without
        gradients, regions go through res5 in chunks: the res5 activations of a thousand
        RN50x4 regions alone would take gigabytes.
        """
        pooled = pool_regions(res4, boxes, resolution)
        if torch.is_grad_enabled():
            return self.attnpool(self.layer4(pooled))
        chunks = pooled.split(INFERENCE_CHUNK) if len(pooled) else [pooled]
        return torch.cat([self.attnpool(self.layer4(chunk)) for chunk in chunks])

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """Channels and strides of the features :meth:`forward` returns."""
        channels = dict(zip(STAGES, self.variant.stage_channels))
        return {n: ShapeSpec(channels[n], STAGE_STRIDES[n]) for n in self.out_features}

    def res5_shape(self) -> ShapeSpec:
        """Channels and stride of ``layer4``'s output, whether or not it is an out_feature."""
        return ShapeSpec(self.variant.stage_channels[3], STAGE_STRIDES["res5"])


def _check_out_features(out_features: Sequence[str]) -> tuple:
    out_features = tuple(out_features)
    unknown = [f for f in out_features if f not in STAGES]
    if unknown or not out_features:
        raise ValueError(
            f"CLIPResNet out_features must be a non-empty subset of {list(STAGES)}, "
            f"got {list(out_features)}"
        )
    return out_features
