"""Reference key tables and tiny offline RPNs for the offline-RPN tests."""
from pathlib import Path
from typing import Dict, Tuple

import torch
from torch import nn

from regionclip.config import get_cfg
from regionclip.modeling.build_rpn import build_offline_rpn, offline_rpn_cfg

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY_FPN = CONFIGS / "tests" / "tiny_rpn_fpn.yaml"
TINY_C4 = CONFIGS / "tests" / "tiny_rpn_c4.yaml"
LVIS_FPN = CONFIGS / "LVISv1-InstanceSegmentation" / "mask_rcnn_R_50_FPN_1x.yaml"
COCO_C4 = CONFIGS / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_C4_1x_ovd_FSD.yaml"
R50_BLOCKS = (3, 4, 6, 3)
Shapes = Dict[str, Tuple[int, ...]]


def _norm(prefix: str, n: int, sync: bool) -> Shapes:
    keys = {f"{prefix}.{k}": (n,) for k in ("weight", "bias", "running_mean", "running_var")}
    if sync:  # a live (Sync)BatchNorm also saves its step counter
        keys[f"{prefix}.num_batches_tracked"] = ()
    return keys


def _conv(name: str, out: int, inp: int, k: int, sync: bool) -> Shapes:
    return {f"{name}.weight": (out, inp, k, k), **_norm(f"{name}.norm", out, sync)}


def official_resnet_shapes(last_stage: int, sync: bool = False) -> Shapes:
    """Ordered {key: shape} of detectron2's R50 (stem 64, res2 256) up to res{last_stage}.

    Written from the reference's key table (section 10.1), independently of our modules;
    checked once against rn50_rpn.tsv (identical keys, shapes and order).
    """
    keys = _conv("stem.conv1", 64, 3, 7, sync)
    inp, out, mid = 64, 256, 64
    for stage in range(2, last_stage + 1):
        for b in range(R50_BLOCKS[stage - 2]):
            p = f"res{stage}.{b}"
            if b == 0:
                keys.update(_conv(f"{p}.shortcut", out, inp, 1, sync))
            keys.update(_conv(f"{p}.conv1", mid, inp if b == 0 else out, 1, sync))
            keys.update(_conv(f"{p}.conv2", mid, mid, 3, sync))
            keys.update(_conv(f"{p}.conv3", out, mid, 1, sync))
        inp, out, mid = out, out * 2, mid * 2
    return keys


def _rpn_head_shapes(channels: int, anchors: int, num_convs: int) -> Shapes:
    names = ["conv"] if num_convs == 1 else [f"conv.conv{k}" for k in range(num_convs)]
    keys = {}
    for name in names:
        keys.update({f"rpn_head.{name}.weight": (channels, channels, 3, 3),
                     f"rpn_head.{name}.bias": (channels,)})
    keys.update({
        "rpn_head.objectness_logits.weight": (anchors, channels, 1, 1),
        "rpn_head.objectness_logits.bias": (anchors,),
        "rpn_head.anchor_deltas.weight": (4 * anchors, channels, 1, 1),
        "rpn_head.anchor_deltas.bias": (4 * anchors,),
    })
    return keys


def official_fpn_rpn_shapes(lsj: bool = False) -> Tuple[Shapes, Shapes]:
    """(offline_backbone, offline_proposal_generator) key shapes, prefixes removed, of the
    LVIS R50-FPN RPN; `lsj`: SyncBN everywhere, normed bias-free FPN convs, two head convs."""
    keys = {}
    for level, inp in zip(range(2, 6), (256, 512, 1024, 2048)):
        for name, k, cin in ((f"fpn_lateral{level}", 1, inp), (f"fpn_output{level}", 3, 256)):
            if lsj:
                keys.update(_conv(name, 256, cin, k, sync=True))
            else:
                keys.update({f"{name}.weight": (256, cin, k, k), f"{name}.bias": (256,)})
    resnet = official_resnet_shapes(5, sync=lsj)
    keys.update({f"bottom_up.{k}": v for k, v in resnet.items()})
    return keys, _rpn_head_shapes(256, 3, 2 if lsj else 1)


def official_c4_rpn_shapes() -> Tuple[Shapes, Shapes]:
    """Key shapes of the COCO R50-C4 RPN: stem, res2..res4, 15 anchors on 1024 channels."""
    return official_resnet_shapes(4), _rpn_head_shapes(1024, 15, 1)


def shapes_of(module: nn.Module) -> Shapes:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def main_cfg(rpn_config: Path, **clip_keys):
    """A main config whose offline RPN is `rpn_config`, with MODEL.CLIP overrides."""
    cfg = get_cfg()
    cfg.MODEL.CLIP.OFFLINE_RPN_CONFIG = str(rpn_config)
    for key, value in clip_keys.items():
        setattr(cfg.MODEL.CLIP, key, value)
    return cfg


def rpn_cfg(path: Path, **clip_keys):
    """The offline RPN config at `path`, through `offline_rpn_cfg` with MODEL.CLIP overrides."""
    return offline_rpn_cfg(main_cfg(path, **clip_keys))


def build_from_file(path: Path, input_format: str = "RGB", **clip_keys):
    """(backbone, proposal_generator, offline_input) of the RPN config at `path`."""
    return build_offline_rpn(rpn_cfg(path, **clip_keys), input_format)


def randomize_(module: nn.Module, seed: int = 0, calibration_input=None) -> nn.Module:
    """Random conv weights (unit gain), biases and norm affine parameters, so that features,
    logits and deltas vary enough to make every layer, top-k and NMS matter.

    With `calibration_input` (a batch for `module`), each norm layer's running statistics are
    set to those of its input on that batch (data-dependent init), which keeps activations of
    order one through the deep random network; otherwise they are random too.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / fan_in ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            elif hasattr(m, "running_var"):
                n = m.running_var.shape[0]
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
        if calibration_input is not None:
            _calibrate_norms(module, calibration_input)
    return module


def _calibrate_norms(module: nn.Module, batch: torch.Tensor) -> None:
    def set_stats(norm, args):
        x = args[0]
        norm.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        norm.running_var.copy_(x.var(dim=(0, 2, 3)))

    norms = [m for m in module.modules() if hasattr(m, "running_var")]
    handles = [m.register_forward_pre_hook(set_stats) for m in norms]
    module(batch)
    for handle in handles:
        handle.remove()
