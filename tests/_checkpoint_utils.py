"""State dicts with the official RegionCLIP key names, shapes and dtypes, for checkpoint tests.

Shapes are generated from the module patterns of the original (reference §10.1), so the tests
need no data files; ``test_checkpoint.py`` checks the generator against the official key lists
(``official_state_dict_keys/*.tsv``) wherever those are available.

Values are random but cheap: every tensor is one random vector along its last dimension,
broadcast (a stride-0 view) over the leading ones. ``torch.save`` keeps the view, so an RN50x4
checkpoint is a few hundred kilobytes, and no two tensors are alike, so a mix-up of two keys
of equal shape is still caught.
"""
import os
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch
from torch import nn

from regionclip.config.variants import CLIPVariant, get_variant

Shapes = Dict[str, Tuple[int, ...]]

NUM_CLASSES = 65  # the official key lists were dumped with the 65-class COCO vocabulary
_BN = ("weight", "bias", "running_mean", "running_var")
_R50_BLOCKS = (3, 4, 6, 3)
_FPN_CHANNELS = 256
_TSV_ENV = "REGIONCLIP_OFFICIAL_KEYS"  # folder holding rn50.tsv, rn50_rpn.tsv, ...


def _norm(shapes: Shapes, name: str, channels: int) -> None:
    shapes.update({f"{name}.{s}": (channels,) for s in _BN})


def clip_resnet_shapes(variant: CLIPVariant) -> Shapes:
    """The CLIP ModifiedResNet (``backbone.*`` / ``visual.*`` without the prefix)."""
    w, shapes = variant.width, {}
    for i, (out, inp) in enumerate([(w // 2, 3), (w // 2, w // 2), (w, w // 2)], start=1):
        shapes[f"conv{i}.weight"] = (out, inp, 3, 3)
        _norm(shapes, f"bn{i}", out)
    inplanes = w
    for stage, blocks in enumerate(variant.layers):
        planes = w * 2**stage
        for b in range(blocks):
            p = f"layer{stage + 1}.{b}."
            shapes[p + "conv1.weight"] = (planes, inplanes, 1, 1)
            _norm(shapes, p + "bn1", planes)
            shapes[p + "conv2.weight"] = (planes, planes, 3, 3)
            _norm(shapes, p + "bn2", planes)
            shapes[p + "conv3.weight"] = (4 * planes, planes, 1, 1)
            _norm(shapes, p + "bn3", 4 * planes)
            if b == 0:
                shapes[p + "downsample.0.weight"] = (4 * planes, inplanes, 1, 1)
                _norm(shapes, p + "downsample.1", 4 * planes)
            inplanes = 4 * planes
    e, d, grid = variant.attnpool_dim, variant.embed_dim, variant.image_size // 32
    shapes["attnpool.positional_embedding"] = (grid * grid + 1, e)
    for proj in ("k_proj", "q_proj", "v_proj"):
        shapes.update({f"attnpool.{proj}.weight": (e, e), f"attnpool.{proj}.bias": (e,)})
    shapes.update({"attnpool.c_proj.weight": (d, e), "attnpool.c_proj.bias": (d,)})
    return shapes


def text_shapes(variant: CLIPVariant) -> Shapes:
    """The CLIP text tower (``lang_encoder.*`` without the prefix; OpenAI's top-level names)."""
    w, shapes = variant.text_width, {}
    shapes["token_embedding.weight"] = (variant.vocab_size, w)
    shapes["positional_embedding"] = (variant.context_length, w)
    for i in range(variant.text_layers):
        p = f"transformer.resblocks.{i}."
        shapes.update({
            p + "attn.in_proj_weight": (3 * w, w), p + "attn.in_proj_bias": (3 * w,),
            p + "attn.out_proj.weight": (w, w), p + "attn.out_proj.bias": (w,),
            p + "ln_1.weight": (w,), p + "ln_1.bias": (w,),
            p + "mlp.c_fc.weight": (4 * w, w), p + "mlp.c_fc.bias": (4 * w,),
            p + "mlp.c_proj.weight": (w, 4 * w), p + "mlp.c_proj.bias": (w,),
            p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
        })
    shapes.update({"ln_final.weight": (w,), "ln_final.bias": (w,),
                   "text_projection": (w, variant.embed_dim)})
    return shapes


def r50_fpn_rpn_shapes() -> Shapes:
    """detectron2 R50-FPN backbone (``backbone.*``) and RPN head (``proposal_generator.*``)
    of ``mask_rcnn_R_50_FPN_1x``, with the detectron2 names."""
    shapes = {"backbone.bottom_up.stem.conv1.weight": (64, 3, 7, 7)}
    _norm(shapes, "backbone.bottom_up.stem.conv1.norm", 64)
    inp = 64
    for stage, blocks in enumerate(_R50_BLOCKS):
        mid, out = 64 * 2**stage, 256 * 2**stage
        for b in range(blocks):
            p = f"backbone.bottom_up.res{stage + 2}.{b}."
            convs = [("conv1", (mid, inp, 1, 1)), ("conv2", (mid, mid, 3, 3)),
                     ("conv3", (out, mid, 1, 1))]
            for name, shape in ([("shortcut", (out, inp, 1, 1))] if b == 0 else []) + convs:
                shapes[p + name + ".weight"] = shape
                _norm(shapes, p + name + ".norm", shape[0])
            inp = out
    for level, channels in zip(range(2, 6), (256, 512, 1024, 2048)):
        f = _FPN_CHANNELS
        shapes.update({f"backbone.fpn_lateral{level}.weight": (f, channels, 1, 1),
                       f"backbone.fpn_lateral{level}.bias": (f,),
                       f"backbone.fpn_output{level}.weight": (f, f, 3, 3),
                       f"backbone.fpn_output{level}.bias": (f,)})
    head = "proposal_generator.rpn_head."
    for name, out, k in (("conv", _FPN_CHANNELS, 3), ("objectness_logits", 3, 1),
                         ("anchor_deltas", 12, 1)):
        shapes.update({f"{head}{name}.weight": (out, _FPN_CHANNELS, k, k),
                       f"{head}{name}.bias": (out,)})
    return shapes


def mask_rcnn_roi_heads_shapes(num_classes: int = 80) -> Shapes:
    """The detectron2 Mask R-CNN FPN ROI heads an ``rpn_*.pth`` file also carries."""
    return {
        "roi_heads.box_head.fc1.weight": (1024, _FPN_CHANNELS * 7 * 7),
        "roi_heads.box_head.fc1.bias": (1024,),
        "roi_heads.box_predictor.cls_score.weight": (num_classes + 1, 1024),
        "roi_heads.box_predictor.bbox_pred.weight": (4 * num_classes, 1024),
        "roi_heads.mask_head.predictor.weight": (num_classes, _FPN_CHANNELS, 1, 1),
    }


def box_predictor_shapes(embed_dim: int, num_classes: int = NUM_CLASSES) -> Shapes:
    p = "roi_heads.box_predictor."
    return {p + "cls_score.weight": (num_classes, embed_dim),
            p + "cls_bg_score.weight": (1, embed_dim),
            p + "bbox_pred.weight": (4, embed_dim), p + "bbox_pred.bias": (4,)}


def prefixed(prefix: str, shapes: Shapes) -> Shapes:
    return {prefix + k: s for k, s in shapes.items()}


def offline_rpn_shapes() -> Shapes:
    """The offline R50-FPN RPN of the official key lists (RPN mode)."""
    renames = (("backbone.", "offline_backbone."),
               ("proposal_generator.", "offline_proposal_generator."))
    out = {}
    for key, shape in r50_fpn_rpn_shapes().items():
        src, dst = next(r for r in renames if key.startswith(r[0]))
        out[dst + key[len(src):]] = shape
    return out


def finetuned_shapes(variant_name: str, rpn: bool) -> Shapes:
    """A fine-tuned CLIPFastRCNN state dict: exactly the official ``rn50[x4][_rpn].tsv``."""
    variant = get_variant(variant_name)
    shapes = prefixed("backbone.", clip_resnet_shapes(variant))
    if rpn:
        shapes.update(offline_rpn_shapes())
    shapes.update(box_predictor_shapes(variant.embed_dim))
    return shapes


def pretrained_shapes(variant_name: str, rpn: bool, teacher: Optional[str] = None) -> Shapes:
    """A PretrainFastRCNN state dict: student, teacher copy, text tower (+ offline RPN)."""
    variant = get_variant(variant_name)
    shapes = prefixed("backbone.", clip_resnet_shapes(variant))
    if rpn:
        shapes.update(offline_rpn_shapes())
    shapes.update(prefixed("teacher_backbone.",
                           clip_resnet_shapes(get_variant(teacher or variant_name))))
    shapes.update(prefixed("lang_encoder.", text_shapes(variant)))
    return shapes


def make_state_dict(shapes: Shapes, seed: int = 0, dtype=torch.float32):
    """Random tensors of the given shapes; see the module docstring for the cheap layout."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in shapes.items():
        if not shape:
            out[key] = torch.randn((), generator=gen, dtype=dtype)
        else:
            out[key] = torch.randn(shape[-1], generator=gen, dtype=dtype).expand(shape)
        if key.endswith("running_var"):
            out[key] = out[key].abs() + 0.5  # a valid (positive) variance keeps forwards finite
    return out


class _Node(nn.Module):
    """A bare module that only holds tensors (no forward)."""


def module_from_shapes(shapes: Shapes, device: str = "cpu") -> nn.Module:
    """A module tree whose state dict has exactly ``shapes`` (zeros; ``meta`` allocates
    nothing, for tests that only look at names and shapes)."""
    root = _Node()
    for key, shape in shapes.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, _Node())
            node = getattr(node, part)
        node.register_buffer(leaf, torch.zeros(shape, device=device))
    return root


def official_tsv_dir() -> Optional[Path]:
    """Folder of the official key lists: $REGIONCLIP_OFFICIAL_KEYS or tests/data/...; None
    when neither exists."""
    candidates = [os.environ.get(_TSV_ENV, ""),
                  Path(__file__).parent / "data" / "official_state_dict_keys"]
    return next((Path(c) for c in candidates if c and Path(c).is_dir()), None)


def read_tsv(path: Path) -> Dict[str, Tuple[Tuple[int, ...], str]]:
    """key -> (shape, dtype name) from one official key list."""
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, dtype = line.split("\t")
            out[key] = (tuple(int(s) for s in shape.strip("()").split(",") if s.strip()), dtype)
    return out


def keys_under(keys: Iterable[str], prefix: str):
    return sorted(k for k in keys if k.startswith(prefix))
