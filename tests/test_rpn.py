"""Offline RPN: detectron2 key names, ResNet/FPN maths, anchors, proposals, preprocessing."""
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from _rpn_utils import (
    COCO_C4,
    LVIS_FPN,
    TINY_C4,
    TINY_FPN,
    build_from_file,
    main_cfg,
    official_c4_rpn_shapes,
    official_fpn_rpn_shapes,
    randomize_,
    rpn_cfg,
    shapes_of,
)
from torch import nn

from regionclip.modeling.build_rpn import build_offline_rpn, is_unit_scale, offline_rpn_cfg
from regionclip.modeling.resnet_fpn import BottleneckBlock, build_resnet
from regionclip.modeling.rpn import (
    DefaultAnchorGenerator,
    OfflineRPNInput,
    cell_anchors,
    find_top_rpn_proposals,
    offline_proposals,
)
from regionclip.ops import FrozenBatchNorm2d

DETECTRON2_BGR_MEAN = (103.530, 116.280, 123.675)
SCALE_CLAMP = math.log(1000.0 / 16)


# ---------------------------------------------------------------- state-dict names and shapes


def test_lvis_fpn_rpn_keys_match_official():
    with torch.device("meta"):
        backbone, generator, _ = build_from_file(LVIS_FPN)
    want_backbone, want_rpn = official_fpn_rpn_shapes()
    assert list(shapes_of(backbone).items()) == list(want_backbone.items())
    assert list(shapes_of(generator).items()) == list(want_rpn.items())


def test_lsj_rpn_keys_have_syncbn_and_two_head_convs():
    with torch.device("meta"):
        backbone, generator, _ = build_from_file(LVIS_FPN, OFFLINE_RPN_LSJ_PRETRAINED=True)
    want_backbone, want_rpn = official_fpn_rpn_shapes(lsj=True)
    assert shapes_of(backbone) == want_backbone
    assert shapes_of(generator) == want_rpn
    assert isinstance(backbone.fpn_lateral2.norm, nn.SyncBatchNorm)
    assert isinstance(backbone.bottom_up.stem.conv1.norm, nn.SyncBatchNorm)  # FREEZE_AT 0


def test_coco_c4_rpn_keys():
    with torch.device("meta"):
        backbone, generator, _ = build_from_file(COCO_C4)
    want_backbone, want_rpn = official_c4_rpn_shapes()
    assert list(shapes_of(backbone).items()) == list(want_backbone.items())
    assert shapes_of(generator) == want_rpn
    assert backbone.size_divisibility == 0


# ---------------------------------------------------------------- config overrides


def test_offline_rpn_cfg_overrides():
    cfg = offline_rpn_cfg(main_cfg(TINY_FPN, OFFLINE_RPN_NMS_THRESH=0.9,
                                   OFFLINE_RPN_POST_NMS_TOPK_TEST=7))
    assert cfg.MODEL.RPN.NMS_THRESH == pytest.approx(0.9)
    assert cfg.MODEL.RPN.POST_NMS_TOPK_TEST == 7
    assert cfg.MODEL.RPN.CONV_DIMS == [-1]
    lsj = offline_rpn_cfg(main_cfg(TINY_FPN, OFFLINE_RPN_LSJ_PRETRAINED=True))
    assert (lsj.MODEL.BACKBONE.FREEZE_AT, lsj.MODEL.RESNETS.NORM, lsj.MODEL.FPN.NORM) == (
        0, "SyncBN", "SyncBN")
    assert list(lsj.MODEL.RPN.CONV_DIMS) == [-1, -1]
    assert lsj.MODEL.RPN.NMS_THRESH == pytest.approx(0.7)  # unset keys keep the file's value


def test_pretraining_takes_post_nms_topk_from_pretrain_rpn_regions():
    cfg = main_cfg(TINY_FPN, PRETRAIN_RPN_REGIONS=300, OFFLINE_RPN_POST_NMS_TOPK_TEST=5)
    cfg.MODEL.META_ARCHITECTURE = "PretrainFastRCNN"
    assert offline_rpn_cfg(cfg).MODEL.RPN.POST_NMS_TOPK_TEST == 300


# ---------------------------------------------------------------- backbone maths


def _randomize_norms(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            n = m.weight.shape[0]
            m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)


def _torchvision_name(key: str) -> str:
    """Our detectron2 key -> torchvision resnet50 key."""
    key = key.replace("stem.conv1.norm", "bn1").replace("stem.conv1", "conv1")
    for stage in range(2, 6):
        key = key.replace(f"res{stage}.", f"layer{stage - 1}.")
    key = key.replace("shortcut.norm", "downsample.1").replace("shortcut", "downsample.0")
    for i in (1, 2, 3):
        key = key.replace(f"conv{i}.norm", f"bn{i}")
    return key


@torch.no_grad()
def test_resnet_with_stride_in_3x3_matches_torchvision():
    reference = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d).eval()
    _randomize_norms(reference, seed=1)
    ours = build_resnet(depth=50, out_features=["res2", "res3", "res4", "res5"],
                        stride_in_1x1=False).eval()
    theirs = reference.state_dict()
    ours.load_state_dict({k: theirs[_torchvision_name(k)] for k in ours.state_dict()})
    x = torch.randn(1, 3, 64, 96)
    feats = ours(x)
    y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
    for stage in range(2, 6):
        y = getattr(reference, f"layer{stage - 1}")(y)
        torch.testing.assert_close(feats[f"res{stage}"], y, rtol=1e-4, atol=1e-4)


def _conv_norm(conv, x, stride=1, padding=0, relu=True):
    n = conv.norm
    y = F.conv2d(x, conv.weight, stride=stride, padding=padding)
    y = (y - n.running_mean.view(-1, 1, 1)) / torch.sqrt(n.running_var.view(-1, 1, 1) + 1e-5)
    y = y * n.weight.view(-1, 1, 1) + n.bias.view(-1, 1, 1)
    return y.clamp(min=0) if relu else y


@torch.no_grad()
def test_msra_bottleneck_puts_stride_in_the_1x1_conv():
    block = BottleneckBlock(8, 16, bottleneck_channels=4, stride=2, stride_in_1x1=True).eval()
    _randomize_norms(block, seed=2)
    x = torch.randn(2, 8, 10, 14)
    y = _conv_norm(block.conv1, x, stride=2)
    y = _conv_norm(block.conv2, y, padding=1)
    y = _conv_norm(block.conv3, y, relu=False)
    expected = (y + _conv_norm(block.shortcut, x, stride=2, relu=False)).clamp(min=0)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_fpn_top_down_pathway():
    backbone, _, _ = build_from_file(TINY_FPN)
    x = torch.randn(1, 3, 64, 96)
    randomize_(backbone, seed=3, calibration_input=x)
    bottom = backbone.bottom_up(x)
    out, prev = {}, None
    for level in (5, 4, 3, 2):
        lateral = getattr(backbone, f"fpn_lateral{level}")
        inner = F.conv2d(bottom[f"res{level}"], lateral.weight, lateral.bias)
        if prev is not None:
            inner = inner + prev.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        output = getattr(backbone, f"fpn_output{level}")
        out[f"p{level}"] = F.conv2d(inner, output.weight, output.bias, padding=1)
        prev = inner
    out["p6"] = out["p5"][:, :, ::2, ::2]
    feats = backbone(x)
    assert list(feats) == ["p2", "p3", "p4", "p5", "p6"]
    for name, expected in out.items():
        torch.testing.assert_close(feats[name], expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- anchors


def test_cell_anchors_hand_computed():
    r = math.sqrt(2.0) * 16  # sides of a 32x32-area anchor with ratio 2 or 1/2
    expected = torch.tensor([
        [-r, -r / 2, r, r / 2],  # ratio 0.5: wide
        [-16.0, -16.0, 16.0, 16.0],
        [-r / 2, -r, r / 2, r],  # ratio 2: tall
    ])
    torch.testing.assert_close(cell_anchors([32], [0.5, 1.0, 2.0]), expected)


def test_grid_anchors_order_and_offset():
    generator = DefaultAnchorGenerator([[4, 8]], [[1.0]], strides=[8], offset=0.0)
    (anchors,) = generator([torch.zeros(1, 1, 2, 3)])
    expected = [
        [x - s / 2, y - s / 2, x + s / 2, y + s / 2]
        for y in (0, 8) for x in (0, 8, 16) for s in (4, 8)  # rows, columns, sizes
    ]
    torch.testing.assert_close(anchors.tensor, torch.tensor(expected))
    assert generator.state_dict() == {}


def test_anchor_sizes_broadcast_or_match_levels():
    generator = DefaultAnchorGenerator([[32, 64]], [[0.5, 1.0, 2.0]], strides=[4, 8])
    assert generator.num_cell_anchors == [6, 6]
    with pytest.raises(ValueError, match="SIZES"):
        DefaultAnchorGenerator([[32], [64]], [[1.0]], strides=[4, 8, 16])


# ---------------------------------------------------------------- proposals


def _reference_anchors(height, width, stride, sizes, ratios):
    """Anchors of one level with (row, column, anchor index), enumerated by hand."""
    boxes, index = [], []
    for y in range(height):
        for x in range(width):
            for a, (size, ratio) in enumerate((s, r) for s in sizes for r in ratios):
                w = math.sqrt(size * size / ratio)
                h = ratio * w
                boxes.append([x * stride - w / 2, y * stride - h / 2,
                              x * stride + w / 2, y * stride + h / 2])
                index.append((a, y, x))
    return torch.tensor(boxes), torch.tensor(index)


def _decode(deltas, anchors):
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + w / 2, anchors[:, 1] + h / 2
    dx, dy, dw, dh = deltas.unbind(1)
    px, py = cx + dx * w, cy + dy * h
    pw, ph = w * torch.exp(dw.clamp(max=SCALE_CLAMP)), h * torch.exp(dh.clamp(max=SCALE_CLAMP))
    return torch.stack([px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2], dim=1)


def _reference_level(feature, head, stride, sizes, ratios, pre_nms_topk):
    """Top-k decoded boxes and logits of one image and level, from the head modules."""
    t = head.conv(feature[None])
    logits, deltas = head.objectness_logits(t)[0], head.anchor_deltas(t)[0]
    anchors, index = _reference_anchors(*logits.shape[-2:], stride, sizes, ratios)
    a, y, x = index.unbind(1)
    scores = logits[a, y, x]
    deltas = deltas.view(-1, 4, *deltas.shape[-2:])[a, :, y, x]
    top = scores.topk(min(pre_nms_topk, len(scores))).indices
    return _decode(deltas[top], anchors[top]), scores[top]


def _reference_proposals(backbone, head, batch, image_sizes, cfg):
    """[(boxes, logits)] per image, following detectron2's recipe step by step."""
    feats = backbone(batch)
    rpn, anchor_cfg = cfg.MODEL.RPN, cfg.MODEL.ANCHOR_GENERATOR
    sizes = anchor_cfg.SIZES * (len(rpn.IN_FEATURES) if len(anchor_cfg.SIZES) == 1 else 1)
    results = []
    for n, (img_h, img_w) in enumerate(image_sizes):
        boxes, scores, levels = [], [], []
        for level, name in enumerate(rpn.IN_FEATURES):
            stride = backbone.output_shape()[name].stride
            b, s = _reference_level(feats[name][n], head, stride, sizes[level],
                                    anchor_cfg.ASPECT_RATIOS[0], rpn.PRE_NMS_TOPK_TEST)
            boxes, scores, levels = boxes + [b], scores + [s], levels + [torch.full(s.shape, level)]
        boxes, scores, levels = torch.cat(boxes), torch.cat(scores), torch.cat(levels)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, img_w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, img_h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = torchvision.ops.batched_nms(boxes, scores, levels, rpn.NMS_THRESH)
        keep = keep[: rpn.POST_NMS_TOPK_TEST]
        results.append((boxes[keep], scores[keep]))
    return results


def _random_images(sizes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, h, w), generator=gen, dtype=torch.uint8) for h, w in sizes]


def _padded_bgr_batch(images_rgb, divisibility):
    """Flip to BGR, subtract detectron2's mean, zero-pad right/bottom to a common size."""
    h = max(x.shape[1] for x in images_rgb)
    w = max(x.shape[2] for x in images_rgb)
    if divisibility:
        h, w = -(-h // divisibility) * divisibility, -(-w // divisibility) * divisibility
    batch = torch.zeros(len(images_rgb), 3, h, w)
    mean = torch.tensor(DETECTRON2_BGR_MEAN).view(3, 1, 1)
    for i, x in enumerate(images_rgb):
        batch[i, :, : x.shape[1], : x.shape[2]] = x.flip(0).float() - mean
    return batch


@pytest.mark.parametrize("config, divisibility", [(TINY_FPN, 32), (TINY_C4, 0)])
@torch.no_grad()
def test_proposals_match_step_by_step_reference(config, divisibility):
    cfg = rpn_cfg(config)
    backbone, generator, offline_input = build_offline_rpn(cfg, "RGB")
    sizes = [(60, 90), (64, 70)]
    images = _random_images(sizes, seed=6)
    batch = _padded_bgr_batch(images, divisibility)
    randomize_(backbone, seed=4, calibration_input=batch)
    randomize_(generator, seed=5)
    generator.rpn_head.anchor_deltas.weight.mul_(0.3)  # boxes move, but not all off-image
    proposals = offline_proposals(backbone, generator, offline_input, images)
    assert backbone.size_divisibility == divisibility
    reference = _reference_proposals(backbone, generator.rpn_head, batch, sizes, cfg)
    for result, size, (boxes, logits) in zip(proposals, sizes, reference):
        assert result.image_size == size
        assert len(boxes) > 5  # NMS and top-k leave a non-trivial set
        torch.testing.assert_close(result.proposal_boxes.tensor, boxes, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(result.objectness_logits, logits, rtol=1e-4, atol=1e-4)
        assert len(result) <= cfg.MODEL.RPN.POST_NMS_TOPK_TEST
        assert torch.all(result.objectness_logits[:-1] >= result.objectness_logits[1:])


# ---------------------------------------------------------------- preprocessing and freezing


def _backbone_input(backbone, generator, offline_input, images):
    seen = []
    handle = backbone.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    offline_proposals(backbone, generator, offline_input, images)
    handle.remove()
    return seen[0]


def test_proposal_selection_clips_then_drops_small_and_non_finite_boxes():
    """One image of 20 x 30: boxes are clipped to it first, then those with a side of at most
    MIN_SIZE (3) and the non-finite ones go; NMS and the top-k keep the rest by logit."""
    boxes = torch.tensor([[[0.0, 0.0, 2.0, 9.0],      # 2 px wide: dropped
                           [0.0, 0.0, 10.0, 10.0],
                           [28.0, 5.0, 40.0, 15.0],   # clipped to 28..30: 2 px wide, dropped
                           [5.0, 5.0, float("inf"), 9.0],
                           [10.0, 10.0, 20.0, 19.0]]])
    logits = torch.tensor([[5.0, 1.0, 4.0, 3.0, 2.0]])
    [kept] = find_top_rpn_proposals([boxes], [logits], [(20, 30)], nms_thresh=0.7,
                                    pre_nms_topk=10, post_nms_topk=10, min_box_size=3.0)
    assert kept.objectness_logits.tolist() == [2.0, 1.0]
    assert kept.proposal_boxes.tensor.tolist() == [[10.0, 10.0, 20.0, 19.0], [0, 0, 10, 10]]


@pytest.mark.parametrize("input_format", ["RGB", "BGR"])
def test_backbone_receives_bgr_minus_detectron2_mean(input_format):
    backbone, generator, offline_input = build_from_file(TINY_FPN, input_format)
    rgb = torch.tensor([200.0, 100.0, 50.0])
    colour = rgb if input_format == "RGB" else rgb.flip(0)
    image = colour.view(3, 1, 1).expand(3, 40, 50)
    x = _backbone_input(backbone, generator, offline_input, [image])
    assert x.shape == (1, 3, 64, 64)  # padded to a multiple of the FPN's 32
    expected = torch.tensor([50.0, 100.0, 200.0]) - torch.tensor(DETECTRON2_BGR_MEAN)
    torch.testing.assert_close(x[0, :, :40, :50], expected.view(3, 1, 1).expand(3, 40, 50))
    assert torch.all(x[0, :, 40:] == 0) and torch.all(x[0, :, :, 50:] == 0)


def test_unit_scale_mean_divides_by_255():
    assert is_unit_scale((0.5, 0.5, 0.5)) and not is_unit_scale(DETECTRON2_BGR_MEAN)
    spec = OfflineRPNInput("RGB", "RGB", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), unit_scale=True)
    out = spec.normalize(torch.full((3, 2, 2), 255, dtype=torch.uint8))
    torch.testing.assert_close(out, torch.full((3, 2, 2), 2.0))
    with pytest.raises(ValueError, match="INPUT.FORMAT"):
        OfflineRPNInput("RGB", "YUV-BT.601", (0.0,) * 3, (1.0,) * 3)


def test_offline_rpn_is_frozen_and_stays_in_eval():
    backbone, generator, offline_input = build_from_file(TINY_FPN)
    detector = nn.ModuleDict(
        {"offline_backbone": backbone, "offline_proposal_generator": generator})
    detector.train()
    assert not any(m.training for m in detector.modules() if m is not detector)
    assert not any(p.requires_grad for p in detector.parameters())
    proposals = offline_proposals(backbone, generator, offline_input, _random_images([(32, 32)], 7))
    assert not proposals[0].proposal_boxes.tensor.requires_grad


def test_lsj_syncbn_rpn_runs_on_cpu():
    backbone, generator, offline_input = build_from_file(TINY_FPN, OFFLINE_RPN_LSJ_PRETRAINED=True)
    randomize_(backbone, seed=8, calibration_input=torch.randn(1, 3, 64, 64) * 50)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    backbone.train()
    (result,) = offline_proposals(backbone, generator, offline_input, _random_images([(48, 64)], 9))
    assert 0 < len(result) <= 25
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched


def test_unsupported_backbone_name_is_rejected():
    cfg = rpn_cfg(TINY_FPN)
    cfg.MODEL.BACKBONE.NAME = "build_clip_resnet_backbone"
    with pytest.raises(ValueError, match="build_resnet_fpn_backbone"):
        build_offline_rpn(cfg, "RGB")
