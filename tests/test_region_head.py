"""RoI pooling, region embeddings, the region head's predictions and the mask head.

References: RoIAlign worked out by hand on functions whose bilinear samples are known in
closed form, the trunk's own modules run step by step, and a numpy loop for mask pasting.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regionclip.config.variants import get_variant
from regionclip.modeling.box_predictor import InferenceSettings, TextEmbeddingPredictor
from regionclip.modeling.clip_resnet import CLIPResNet, pool_regions
from regionclip.modeling.region_head import MaskHead, RegionHead, missing_by_design, paste_masks
from regionclip.ops import roi_align  # torchvision's
from regionclip.structures import Boxes, Instances

TINY = get_variant("tiny")
STRIDE = 16


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _random_trunk(seed=0) -> CLIPResNet:
    """The tiny CLIP trunk with random frozen-BN statistics (open_clip zero-initialises some
    BN scales) and attention pool drawn from `seed`, so that every layer shapes the embeddings
    and tests do not depend on the global random state."""
    with torch.random.fork_rng():  # conv weights from `seed`, global stream untouched
        torch.manual_seed(seed)
        trunk = CLIPResNet(TINY).eval()
    gen = _gen(seed)
    for param in trunk.attnpool.parameters():
        param.data.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
    for module in trunk.modules():
        if hasattr(module, "running_var"):
            n = module.running_var.numel()
            module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return trunk


def _random_boxes(num, height, width, seed, min_size=12.0):
    """Fractional xyxy boxes inside a height x width image."""
    gen = _gen(seed)
    size = min_size + torch.rand(num, 2, generator=gen) * (torch.tensor([width, height]) / 2)
    corner = torch.rand(num, 2, generator=gen) * (torch.tensor([width, height]) - size)
    return torch.cat([corner, corner + size], dim=1)


def _head(num_classes=3, mask_head=None, **settings) -> RegionHead:
    predictor = TextEmbeddingPredictor(torch.randn(num_classes, TINY.embed_dim, generator=_gen(7)))
    return RegionHead(predictor, TINY.pooler_resolution, InferenceSettings(**settings), mask_head)


def _detect(head, trunk, res4, proposals):
    """The head's detections of proposals, embedded by the trunk (as CLIPFastRCNN does)."""
    boxes = [p.proposal_boxes.tensor for p in proposals]
    return head.predict(trunk.embed_regions(res4, boxes, head.pooler_resolution), proposals,
                        res4, trunk)


def _proposals(boxes, image_size):
    return Instances(image_size, proposal_boxes=Boxes(boxes),
                     objectness_logits=torch.ones(len(boxes)))


def _bin_centres(start, end, bins):
    """Centres of the RoIAlign bins of [start, end] (input pixels) in feature-map coordinates:
    aligned RoIAlign maps a pixel coordinate p to p / stride - 0.5."""
    lo, size = start / STRIDE - 0.5, (end - start) / STRIDE / bins
    return [lo + (i + 0.5) * size for i in range(bins)]


def _bilinear_zero_padded(mask: np.ndarray, y: float, x: float) -> float:
    """Bilinear sample of `mask` at (y, x), cell centres at integers, zeros outside."""
    y0, x0 = math.floor(y), math.floor(x)
    value = 0.0
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1]:
                value += wy * wx * mask[yy, xx]
    return value


def reference_paste(mask: np.ndarray, box, height: int, width: int) -> np.ndarray:
    """Mask probabilities at every pixel centre inside the box (NaN elsewhere): the box is
    divided into M x M cells and the mask is sampled bilinearly at the pixel centre."""
    m = mask.shape[0]
    x0, y0, x1, y1 = box
    values = np.full((height, width), np.nan)
    for py in range(height):
        for px in range(width):
            cx, cy = px + 0.5, py + 0.5
            if x0 <= cx <= x1 and y0 <= cy <= y1:
                u = (cx - x0) / (x1 - x0) * m - 0.5
                v = (cy - y0) / (y1 - y0) * m - 0.5
                values[py, px] = _bilinear_zero_padded(mask, v, u)
    return values


# --------------------------------------------------------------------------------------------
# pool_regions
# --------------------------------------------------------------------------------------------
def test_pool_regions_on_a_linear_map_gives_the_bin_centres():
    # Bilinear sampling reproduces a linear function exactly and the samples of a bin are
    # symmetric about its centre, so each output is the function at the bin centre.
    height, width, res = 8, 10, 4
    coef = torch.tensor([[0.7, -1.3, 2.0], [-0.2, 0.5, -4.0]])  # per channel: a, b, c
    ys, xs = torch.meshgrid(torch.arange(float(height)), torch.arange(float(width)),
                            indexing="ij")
    res4 = (coef[:, 0, None, None] * xs + coef[:, 1, None, None] * ys + coef[:, 2, None, None])
    # Boxes whose samples stay in [0, size - 1] of the map, where nothing is clamped.
    boxes = torch.tensor([[8.0, 8.0, 152.0, 120.0], [20.5, 9.25, 61.75, 100.0],
                          [100.0, 40.0, 117.0, 47.5]])
    pooled = pool_regions(res4[None], [boxes], res)
    assert pooled.shape == (3, 2, res, res)
    for r, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        cy = torch.tensor(_bin_centres(y0, y1, res))[:, None]
        cx = torch.tensor(_bin_centres(x0, x1, res))[None, :]
        for ch, (a, b, c) in enumerate(coef.tolist()):
            torch.testing.assert_close(pooled[r, ch], a * cx + b * cy + c)


def test_pool_regions_samples_each_bin_on_an_adaptive_grid():
    # f(x) = x^2 bilinearly interpolated between integers is x^2 + t (1 - t), t = frac(x).
    # "sampling_ratio 0" averages ceil(bin size) evenly spaced samples per bin and axis.
    res4 = torch.arange(12.0).pow(2).expand(1, 1, 6, 12).contiguous()
    box = [16.0, 8.0, 130.0, 80.0]  # x bins are 114 / 16 / 2 = 3.56 cells wide: 4 samples
    pooled = pool_regions(res4, [torch.tensor([box])], resolution=2)
    lo, size = box[0] / STRIDE - 0.5, (box[2] - box[0]) / STRIDE / 2
    grid = math.ceil(size)
    for bin_index in range(2):
        xs = [lo + bin_index * size + (k + 0.5) * size / grid for k in range(grid)]
        expected = np.mean([x * x + (x % 1) * (1 - x % 1) for x in xs])
        assert pooled[0, 0, :, bin_index].tolist() == pytest.approx([expected] * 2, rel=1e-5)


def test_pool_regions_batched_equals_one_image_at_a_time():
    res4 = torch.randn(3, 5, 7, 9, generator=_gen(0))
    boxes = [_random_boxes(3, 112, 144, seed=1), torch.zeros(0, 4),
             _random_boxes(5, 112, 144, seed=2)]
    pooled = pool_regions(res4, boxes, 4)
    single = [pool_regions(res4[i:i + 1], [b], 4) for i, b in enumerate(boxes)]
    assert pooled.shape == (8, 5, 4, 4)
    torch.testing.assert_close(pooled, torch.cat(single))


# --------------------------------------------------------------------------------------------
# Region embeddings
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def test_embed_equals_layer4_and_attnpool_on_roi_align():
    trunk = _random_trunk()
    res4 = trunk(torch.randn(2, 3, 64, 96, generator=_gen(0)))["res4"]
    boxes = [_random_boxes(3, 64, 96, seed=1), _random_boxes(2, 64, 96, seed=2)]
    # torchvision's [K, 5] (batch index, x1, y1, x2, y2) format, ROIAlignV2 settings.
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1)
                      for i, b in enumerate(boxes)])
    crops = roi_align(res4, rois, output_size=TINY.pooler_resolution, spatial_scale=1 / 16,
                      sampling_ratio=0, aligned=True)
    expected = trunk.attnpool(trunk.layer4(crops))
    embeddings = trunk.embed_regions(res4, boxes, TINY.pooler_resolution)
    assert embeddings.shape == (5, TINY.embed_dim)
    torch.testing.assert_close(embeddings, expected)


@torch.no_grad()
def test_embed_batched_equals_unbatched():
    trunk = _random_trunk()
    res4 = trunk(torch.randn(2, 3, 64, 96, generator=_gen(0)))["res4"]
    boxes = [_random_boxes(4, 64, 96, seed=1), _random_boxes(1, 64, 96, seed=2)]
    head = _head()
    batched = trunk.embed_regions(res4, boxes, head.pooler_resolution)
    single = [trunk.embed_regions(res4[i:i + 1], [b], head.pooler_resolution)
              for i, b in enumerate(boxes)]
    torch.testing.assert_close(batched, torch.cat(single), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_larger_vocabulary_leaves_embeddings_and_known_logits_unchanged():
    trunk = _random_trunk()
    res4 = trunk(torch.randn(1, 3, 64, 64, generator=_gen(0)))["res4"]
    boxes = [_random_boxes(4, 64, 64, seed=1)]
    head = _head(num_classes=3).eval()
    vocabulary = head.box_predictor.cls_score.weight.clone()
    embeddings = trunk.embed_regions(res4, boxes, head.pooler_resolution)
    logits = head.box_predictor(embeddings)[0]
    head.box_predictor.set_test_embeddings(torch.cat([vocabulary, torch.randn(2, 32)]))
    grown = trunk.embed_regions(res4, boxes, head.pooler_resolution)
    grown_logits = head.box_predictor(grown)[0]
    assert torch.equal(grown, embeddings)
    assert grown_logits.shape == (4, 6)
    torch.testing.assert_close(grown_logits[:, :3], logits[:, :3])
    assert torch.equal(grown_logits[:, 5], logits[:, 3])  # background, still 0


@torch.no_grad()
def test_forward_scores_each_image_against_its_own_proposals():
    trunk = _random_trunk()
    images = torch.randn(2, 3, 64, 96, generator=_gen(0))
    res4 = trunk(images)["res4"]
    proposals = [_proposals(_random_boxes(5, 64, 96, seed=1), (64, 96)),
                 _proposals(_random_boxes(3, 48, 80, seed=2), (48, 80))]
    head = _head(score_thresh=-1.0, nms_thresh=1.0, detections_per_image=1000,
                 no_box_delta=True)
    results = _detect(head, trunk, res4, proposals)
    for i, (result, proposal) in enumerate(zip(results, proposals)):
        embeddings = trunk.embed_regions(res4[i:i + 1], [proposal.proposal_boxes.tensor],
                                         head.pooler_resolution)
        probs = F.softmax(head.box_predictor(embeddings)[0], dim=1)
        assert result.image_size == proposal.image_size
        assert len(result) == 3 * len(proposal)  # every (box, class): no threshold, no NMS
        expected = probs[result.proposal_index, result.pred_classes]
        torch.testing.assert_close(result.scores, expected)
        assert torch.equal(result.pred_boxes.tensor,
                           proposal.proposal_boxes.tensor[result.proposal_index])


# --------------------------------------------------------------------------------------------
# Mask head
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_classes", [1, 3])
def test_mask_head_doubles_the_res5_grid(num_classes):
    grid = TINY.pooler_resolution // 2
    head = MaskHead(TINY.attnpool_dim, conv_dim=16, num_classes=num_classes)
    out = head(torch.randn(5, TINY.attnpool_dim, grid, grid))
    assert out.shape == (5, num_classes, 2 * grid, 2 * grid)


def test_mask_head_is_deconv_relu_then_1x1():
    head = MaskHead(6, conv_dim=4, num_classes=2)
    for p in head.parameters():
        torch.nn.init.normal_(p, generator=_gen(0))
    x = torch.randn(3, 6, 2, 2, generator=_gen(1))
    # A 2x2 stride-2 transposed conv writes each input cell into its own 2x2 output block.
    up = torch.einsum("rcij,cokl->roikjl", x, head.deconv.weight).reshape(3, 4, 4, 4)
    hidden = (up + head.deconv.bias[:, None, None]).clamp(min=0)
    expected = torch.einsum("rohw,po->rphw", hidden, head.predictor.weight[:, :, 0, 0])
    expected = expected + head.predictor.bias[:, None, None]
    torch.testing.assert_close(head(x), expected)


@torch.no_grad()
@pytest.mark.parametrize("agnostic", [True, False])
def test_predicted_masks_are_mask_head_probabilities_of_the_detections(agnostic):
    trunk = _random_trunk()
    res4 = trunk(torch.randn(1, 3, 64, 96, generator=_gen(0)))["res4"]
    proposals = [_proposals(_random_boxes(6, 64, 96, seed=1), (64, 96))]
    mask_head = MaskHead(TINY.attnpool_dim, conv_dim=8, num_classes=1 if agnostic else 3)
    head = _head(mask_head=mask_head, score_thresh=0.01, no_box_delta=True)
    result = _detect(head, trunk, res4, proposals)[0]
    assert len(result) > 0
    logits = mask_head(trunk.layer4(pool_regions(res4, [result.pred_boxes.tensor], 4)))
    channel = torch.zeros_like(result.pred_classes) if agnostic else result.pred_classes
    expected = logits[torch.arange(len(result)), channel][:, None].sigmoid()
    assert result.pred_masks.shape == (len(result), 1, 4, 4)
    torch.testing.assert_close(result.pred_masks, expected)


@torch.no_grad()
def test_no_detections_give_empty_masks():
    trunk = _random_trunk()
    res4 = trunk(torch.randn(1, 3, 64, 64, generator=_gen(0)))["res4"]
    head = _head(mask_head=MaskHead(TINY.attnpool_dim, conv_dim=8), score_thresh=1.0)
    proposals = [_proposals(_random_boxes(3, 64, 64, seed=1), (64, 64))]
    result = _detect(head, trunk, res4, proposals)[0]
    assert len(result) == 0
    assert result.pred_masks.shape == (0, 1, 4, 4)


# --------------------------------------------------------------------------------------------
# paste_masks
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_paste_masks_matches_pixel_loop(seed):
    height, width, m = 18, 23, 5
    gen = _gen(seed)
    # Mostly above 0.5, so that pixels near the box edges, where bilinear sampling blends in
    # the zero padding, decide the outline.
    masks = torch.rand(7, 1, m, m, generator=gen).sqrt()
    boxes = torch.tensor([
        [2.3, 1.7, 15.6, 12.7],     # inside, fractional
        [-4.5, -3.2, 9.7, 8.8],     # beyond the top-left corner
        [14.2, 9.6, 30.7, 25.3],    # beyond the bottom-right corner
        [0.0, 0.0, 23.0, 18.0],     # the whole image
        [5.5, 6.5, 8.75, 8.75],     # smaller than the mask
        [0.6, 3.7, 4.8, 16.9],      # narrow
        [-10.0, 4.0, -2.0, 9.0],    # entirely outside
    ])
    boxes += torch.rand(7, 4, generator=gen) * 0.2
    pasted = paste_masks(masks, boxes, (height, width))
    assert pasted.shape == (7, height, width) and pasted.dtype == torch.bool
    for i in range(7):
        values = reference_paste(masks[i, 0].double().numpy(), boxes[i].tolist(), height, width)
        expected = np.nan_to_num(values, nan=0.0) >= 0.5
        # Float32 vs float64 may only disagree on values within rounding of the threshold.
        decided = ~(np.abs(values - 0.5) < 1e-5)
        assert (pasted[i].numpy() == expected)[decided].all(), f"box {i}"
    assert pasted[:6].any(dim=(1, 2)).all() and not pasted[6].any()


def test_paste_masks_of_no_detections():
    pasted = paste_masks(torch.zeros(0, 1, 4, 4), torch.zeros(0, 4), (7, 9))
    assert pasted.shape == (0, 7, 9) and pasted.dtype == torch.bool


def _model_with(head: RegionHead) -> nn.Module:
    model = nn.Module()
    model.roi_heads = head
    return model


def test_missing_by_design_follows_box_deltas_mask_head_and_training():
    bg, bbox = "roi_heads.box_predictor.cls_bg_score", "roi_heads.box_predictor.bbox_pred"
    zero_shot = _model_with(_head(no_box_delta=True))
    assert set(missing_by_design(zero_shot, training=False)) == {bg, bbox}
    # deltas are applied: a checkpoint without bbox_pred is a real gap, not one by design
    assert set(missing_by_design(_model_with(_head()), training=False)) == {bg}
    masks = _model_with(_head(mask_head=MaskHead(TINY.attnpool_dim, conv_dim=8)))
    assert set(missing_by_design(masks, training=True)) == {bg, bbox, "roi_heads.mask_head"}
    assert set(missing_by_design(masks, training=False)) == {bg}
    assert missing_by_design(nn.Module(), training=True) == {}
    keys = list(masks.state_dict())
    for prefix in missing_by_design(masks, training=True):
        assert any(k.startswith(prefix + ".") for k in keys), prefix
