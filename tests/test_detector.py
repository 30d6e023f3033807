"""CLIPFastRCNN end to end (tiny CLIP) and its post-processing to the original image size.

The reference pipeline is written out in the test from the trunk's modules and torchvision:
CLIP normalisation, stem..layer3, RoIAlign, layer4, attention pool, cosine / 0.01, softmax,
per-class NMS.
"""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _rpn_utils import TINY_FPN, randomize_

from regionclip.config import load_config
from regionclip.config.variants import get_variant
from regionclip.modeling.build import build_model
from regionclip.modeling.detector import postprocess
from regionclip.modeling.region_head import paste_masks
from regionclip.modeling.text_encoder import save_embeddings
from regionclip.ops import nms, roi_align  # torchvision's
from regionclip.structures import Boxes, Instances

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tests" / "tiny.yaml"
TINY = get_variant("tiny")
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])
NUM_CLASSES = 3  # configs/tests/tiny.yaml


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _class_embeddings(num_classes=NUM_CLASSES, seed=0):
    """Embeddings close to +-one direction: cosine / 0.01 then spreads probabilities over
    the classes on a region's side instead of giving one class ~1, and every region has a
    class with a positive cosine, so that not everything is background (logit 0)."""
    gen = _gen(seed)
    side = torch.tensor([1.0 if c % 3 < 2 else -1.0 for c in range(num_classes)])[:, None]
    base = torch.randn(1, TINY.embed_dim, generator=gen)
    return side * base + 0.05 * torch.randn(num_classes, TINY.embed_dim, generator=gen)


def _embedding_file(tmp_path, embeddings, name="classes.pth") -> str:
    path = str(tmp_path / name)
    save_embeddings(embeddings, path)
    return path


def _randomize_trunk_(model, seed=0):
    """Random trunk convolutions, frozen-BN statistics (open_clip zero-initialises some BN
    scales) and attention pool, drawn from `seed`, so that every layer shapes the region
    embeddings and tests do not depend on the global random state."""
    gen = _gen(seed)
    with torch.no_grad():
        for param in model.backbone.attnpool.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) / param.shape[-1] ** 0.5)
        for module in model.backbone.modules():
            if isinstance(module, torch.nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / fan_in**0.5)
            elif hasattr(module, "running_var"):
                n = module.running_var.numel()
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


def _build(tmp_path, *overrides, embeddings=None):
    path = _embedding_file(tmp_path, _class_embeddings() if embeddings is None else embeddings)
    cfg = load_config(TINY_CONFIG, ["MODEL.CLIP.TEXT_EMB_PATH", path, *overrides])
    return _randomize_trunk_(build_model(cfg)).eval()


def _image(height, width, seed):
    return torch.randint(0, 256, (3, height, width), generator=_gen(seed), dtype=torch.uint8)


def _boxes(num, height, width, seed, margin=8.0):
    """Fractional boxes at least `margin` px inside the right/bottom image border."""
    gen = _gen(seed)
    limit = torch.tensor([width, height]) - margin
    size = 10 + torch.rand(num, 2, generator=gen) * (limit / 2)
    corner = torch.rand(num, 2, generator=gen) * (limit - size)
    return torch.cat([corner, corner + size], dim=1)


def _input(image, boxes, **extra):
    instances = Instances(tuple(image.shape[-2:]), gt_boxes=Boxes(boxes))
    return {"image": image, "instances": instances, **extra}


@torch.no_grad()
def manual_detections(model, image, boxes, embeddings, score_thresh, nms_thresh, topk):
    """(boxes, scores, classes, proposal indices) of the zero-shot pipeline, written out."""
    trunk = model.backbone
    x = (image.float() / 255 - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]
    x = trunk.avgpool(trunk.act3(trunk.bn3(trunk.conv3(trunk.act2(trunk.bn2(trunk.conv2(
        trunk.act1(trunk.bn1(trunk.conv1(x[None]))))))))))
    res4 = trunk.layer3(trunk.layer2(trunk.layer1(x)))
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], dim=1)
    crops = roi_align(res4, rois, TINY.pooler_resolution, 1 / 16, 0, True)
    regions = trunk.attnpool(trunk.layer4(crops))
    cosine = F.normalize(regions, dim=1) @ F.normalize(embeddings, dim=1).t()
    logits = torch.cat([cosine, torch.zeros(len(boxes), 1)], dim=1) / 0.01
    probs = F.softmax(logits, dim=1)[:, :-1]
    detections = []
    for c in range(probs.shape[1]):
        rows = (probs[:, c] > score_thresh).nonzero().squeeze(1)
        for k in nms(boxes[rows], probs[rows, c], nms_thresh).tolist():
            detections.append((float(probs[rows[k], c]), c, int(rows[k])))
    detections = sorted(detections, key=lambda d: -d[0])[:topk]
    return (boxes[[i for _, _, i in detections]], torch.tensor([s for s, _, _ in detections]),
            [c for _, c, _ in detections], [i for _, _, i in detections])


# --------------------------------------------------------------------------------------------
# postprocess
# --------------------------------------------------------------------------------------------
def _result(boxes, image_size=(40, 60), **fields):
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    return Instances(image_size, pred_boxes=Boxes(boxes), scores=torch.rand(len(boxes)),
                     pred_classes=torch.arange(len(boxes)), **fields)


def test_postprocess_scales_boxes_to_the_original_size_and_clips():
    result = _result([[10.0, 4.0, 30.0, 20.0], [50.0, 30.0, 70.0, 45.0]])
    out = postprocess(result, 100, 90)  # scale x 1.5, y 2.5
    assert out.image_size == (100, 90)
    expected = torch.tensor([[15.0, 10.0, 45.0, 50.0], [75.0, 75.0, 90.0, 100.0]])
    torch.testing.assert_close(out.pred_boxes.tensor, expected)
    assert out.pred_classes.tolist() == [0, 1]


def test_postprocess_removes_boxes_that_become_empty():
    result = _result([[10.0, 4.0, 30.0, 20.0], [62.0, 5.0, 70.0, 9.0], [5.0, 7.0, 9.0, 7.0]])
    out = postprocess(result, 40, 60)  # row 1 lies right of the image, row 2 has no height
    assert out.pred_classes.tolist() == [0]
    torch.testing.assert_close(out.scores, result.scores[:1])


def test_postprocess_pastes_masks_at_the_original_size():
    masks = torch.rand(2, 1, 4, 4, generator=_gen(0))
    result = _result([[3.0, 2.0, 25.0, 30.0], [20.0, 10.0, 58.0, 38.0]], pred_masks=masks)
    out = postprocess(result, 80, 90)
    scaled = torch.tensor([[4.5, 4.0, 37.5, 60.0], [30.0, 20.0, 87.0, 76.0]])
    assert out.pred_masks.shape == (2, 80, 90) and out.pred_masks.dtype == torch.bool
    assert torch.equal(out.pred_masks, paste_masks(masks, scaled, (80, 90)))
    assert out.pred_masks.any(dim=(1, 2)).all()


# --------------------------------------------------------------------------------------------
# CLIPFastRCNN with ground-truth boxes
# --------------------------------------------------------------------------------------------
def test_detections_equal_the_manual_pipeline(tmp_path):
    embeddings = _class_embeddings()
    model = _build(tmp_path, "MODEL.ROI_HEADS.NMS_THRESH_TEST", "0.3", embeddings=embeddings)
    image, boxes = _image(64, 96, seed=1), _boxes(12, 64, 96, seed=2)
    result = model([_input(image, boxes)])[0]["instances"]
    exp_boxes, exp_scores, exp_classes, exp_index = manual_detections(
        model, image, boxes, embeddings, score_thresh=0.001, nms_thresh=0.3, topk=10)
    assert len(set(exp_classes)) > 1 and len(exp_index) == 10  # several classes, top-k cuts
    assert result.pred_classes.tolist() == exp_classes
    assert result.proposal_index.tolist() == exp_index
    assert torch.equal(result.pred_boxes.tensor, exp_boxes)  # GT boxes are never regressed
    torch.testing.assert_close(result.scores, exp_scores, rtol=1e-4, atol=1e-6)


def test_images_of_different_sizes_batched_equal_one_by_one(tmp_path):
    # The trunk's convolutions see a neighbour's padding instead of their own zero padding,
    # which changes the last two res4 rows / columns before it (as in the original), so the
    # boxes keep 40 px clear of the borders that get padded.
    model = _build(tmp_path)
    inputs = [_input(_image(128, 160, seed=1), _boxes(6, 128, 160, seed=2, margin=40),
                     height=256, width=320),
              _input(_image(192, 96, seed=3), _boxes(4, 192, 96, seed=4, margin=40))]
    batched = model(inputs)
    for x, out in zip(inputs, batched):
        alone = model([x])[0]["instances"]
        out = out["instances"]
        assert out.image_size == alone.image_size
        assert out.pred_classes.tolist() == alone.pred_classes.tolist()
        assert out.proposal_index.tolist() == alone.proposal_index.tolist()
        torch.testing.assert_close(out.pred_boxes.tensor, alone.pred_boxes.tensor)
        torch.testing.assert_close(out.scores, alone.scores, rtol=1e-4, atol=1e-6)
    assert batched[0]["instances"].image_size == (256, 320)
    assert len(batched[0]["instances"]) > 0 and len(batched[1]["instances"]) > 0


def test_an_input_without_boxes_gives_no_detections(tmp_path):
    model = _build(tmp_path)
    out = model([{"image": _image(64, 64, seed=0)}])[0]["instances"]
    assert len(out) == 0 and out.image_size == (64, 64)


# --------------------------------------------------------------------------------------------
# CLIPFastRCNN with offline RPN proposals
# --------------------------------------------------------------------------------------------
def _rpn_model(tmp_path, *overrides):
    model = _build(tmp_path, "MODEL.CLIP.CROP_REGION_TYPE", "RPN",
                   "MODEL.CLIP.OFFLINE_RPN_CONFIG", str(TINY_FPN), *overrides)
    calibration = model.offline_input.normalize(_image(64, 96, seed=0))[None]
    randomize_(model.offline_backbone, seed=1, calibration_input=calibration)
    randomize_(model.offline_proposal_generator, seed=2)
    with torch.no_grad():  # boxes move, but not all off the image
        model.offline_proposal_generator.rpn_head.anchor_deltas.weight.mul_(0.3)
    return model


def test_rpn_proposals_give_boxes_inside_the_original_image(tmp_path):
    model = _rpn_model(tmp_path)
    image = _image(64, 96, seed=0)
    proposals = model.get_proposals([{"image": image}])[0]
    out = model([{"image": image, "height": 100, "width": 150}])[0]["instances"]
    assert len(proposals) > 5 and len(out) > 0
    assert out.image_size == (100, 150)
    box = out.pred_boxes.tensor
    assert (box >= 0).all() and (box[:, 0::2] <= 150).all() and (box[:, 1::2] <= 100).all()
    assert out.pred_boxes.nonempty().all() and torch.isfinite(out.scores).all()
    assert (out.proposal_index < len(proposals)).all()


@torch.no_grad()
def test_rpn_score_fusion_drops_negative_logits_and_may_exceed_one(tmp_path, monkeypatch):
    model = _rpn_model(tmp_path, "MODEL.CLIP.MULTIPLY_RPN_SCORE", "True",
                       "MODEL.CLIP.NO_BOX_DELTA", "True")
    image = _image(64, 96, seed=0)
    proposals = model.get_proposals([{"image": image}])
    logits = torch.where(torch.arange(len(proposals[0])) % 2 == 0, 50.0, -1.0)
    proposals[0].objectness_logits = logits
    monkeypatch.setattr(model, "get_proposals", lambda batched_inputs: proposals)
    out = model.inference([{"image": image}])[0]["instances"]
    assert len(out) > 0
    assert (logits[out.proposal_index] > 0).all()
    assert (out.scores > 1).any()


@torch.no_grad()
def test_regions_whose_fused_score_cannot_pass_are_not_embedded(tmp_path, monkeypatch):
    # Objectness logits on both sides of score_thresh^2 = 0.0025, NaN and negative ones: the
    # detections, their indices and embeddings equal those of embedding every proposal (up to
    # float rounding: a smaller batch of regions may take other GEMM kernels).
    model = _rpn_model(tmp_path, "MODEL.CLIP.MULTIPLY_RPN_SCORE", "True",
                       "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.05")
    image = _image(64, 96, seed=0)
    proposals = model.get_proposals([{"image": image}])
    n = len(proposals[0])
    logits = torch.tensor([0.3, 0.002, -1.0, 0.0026, float("nan"), 0.05])[torch.arange(n) % 6]
    proposals[0].objectness_logits = logits
    monkeypatch.setattr(model, "get_proposals", lambda batched_inputs: proposals)
    embedded = []
    monkeypatch.setattr(model.backbone, "embed_regions", _recording(
        model.backbone.embed_regions, embedded))
    skipping = model.inference([{"image": image}], keep_embeddings=True)[0]["instances"]
    monkeypatch.setattr(model.roi_heads, "scorable", lambda proposals, given: [
        torch.arange(len(p)) for p in proposals])
    everything = model.inference([{"image": image}], keep_embeddings=True)[0]["instances"]
    assert embedded[0] == sum(1 for i in range(n) if i % 6 in (0, 3, 5))  # 0.3, 0.0026, 0.05
    assert embedded[1] == n and len(everything) > 3
    assert torch.equal(skipping.proposal_index, everything.proposal_index)
    assert torch.equal(skipping.pred_classes, everything.pred_classes)
    assert torch.equal(skipping.pred_boxes.tensor, everything.pred_boxes.tensor)
    torch.testing.assert_close(skipping.region_embeddings, everything.region_embeddings)
    torch.testing.assert_close(skipping.scores, everything.scores, rtol=1e-5, atol=1e-6)


def _recording(embed_regions, counts):
    def record(res4, boxes, resolution):
        counts.append(sum(len(b) for b in boxes))
        return embed_regions(res4, boxes, resolution)
    return record


# --------------------------------------------------------------------------------------------
# build_model checks and the mask head
# --------------------------------------------------------------------------------------------
def test_rpn_score_fusion_with_ground_truth_boxes_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="MULTIPLY_RPN_SCORE.*CROP_REGION_TYPE"):
        _build(tmp_path, "MODEL.CLIP.MULTIPLY_RPN_SCORE", "True")


def test_per_class_box_regression_is_refused_not_ignored(tmp_path):
    # The box predictor is class-agnostic; False used to be accepted and silently ignored.
    with pytest.raises(ValueError, match="CLS_AGNOSTIC_BBOX_REG False.*set it to True"):
        _build(tmp_path, "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "False")


def test_a_learnt_linear_classifier_is_refused_not_ignored(tmp_path):
    with pytest.raises(ValueError, match="USE_TEXT_EMB_CLASSIFIER False.*set it to True"):
        _build(tmp_path, "MODEL.CLIP.USE_TEXT_EMB_CLASSIFIER", "False")


def test_embedding_width_mismatch_is_rejected_naming_the_file(tmp_path):
    path = _embedding_file(tmp_path, torch.randn(NUM_CLASSES, 16), name="narrow.pth")
    cfg = load_config(TINY_CONFIG, ["MODEL.CLIP.TEXT_EMB_PATH", path])
    with pytest.raises(ValueError, match="narrow.pth.*16.*32"):
        build_model(cfg)


def test_embedding_row_count_must_equal_num_classes(tmp_path):
    path = _embedding_file(tmp_path, torch.randn(5, TINY.embed_dim), name="five.pth")
    cfg = load_config(TINY_CONFIG, ["MODEL.CLIP.TEXT_EMB_PATH", path])
    with pytest.raises(ValueError, match="five.pth.*5.*NUM_CLASSES is 3"):
        build_model(cfg)


def test_mask_head_takes_the_variants_res5_channels(tmp_path):
    model = _build(tmp_path, "MODEL.MASK_ON", "True", "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK",
                   "True")
    res5 = model.backbone.layer4(torch.zeros(1, TINY.stage_channels[2], 4, 4))
    mask_head = model.roi_heads.mask_head
    assert mask_head.deconv.in_channels == res5.shape[1] == TINY.stage_channels[3]
    assert mask_head.predictor.out_channels == 1


@torch.no_grad()
def test_class_specific_masks_refuse_a_test_vocabulary(tmp_path):
    """Their channels are the training classes; a test vocabulary's class ids would pick
    another class's mask (or none)."""
    model = _build(tmp_path, "MODEL.MASK_ON", "True")
    assert model.roi_heads.mask_head.predictor.out_channels == 3
    image, boxes = _image(64, 96, seed=1), _boxes(5, 64, 96, seed=2)
    assert len(model([_input(image, boxes)])[0]["instances"]) > 0  # training classes: fine
    model.roi_heads.box_predictor.set_test_embeddings(torch.randn(8, TINY.embed_dim))
    with pytest.raises(ValueError, match="CLS_AGNOSTIC_MASK False.*test vocabulary"):
        model([_input(image, boxes)])


@torch.no_grad()
def test_detector_returns_pasted_masks(tmp_path):
    model = _build(tmp_path, "MODEL.MASK_ON", "True", "MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK",
                   "True")
    torch.nn.init.normal_(model.roi_heads.mask_head.predictor.weight, std=0.5, generator=_gen(0))
    image, boxes = _image(64, 96, seed=1), _boxes(5, 64, 96, seed=2)
    out = model([_input(image, boxes, height=96, width=144)])[0]["instances"]
    assert len(out) > 0
    assert out.pred_masks.shape == (len(out), 96, 144) and out.pred_masks.dtype == torch.bool
    # The mask head on res5 of the detected boxes, pasted into the 1.5x original image.
    trunk = model.backbone
    res4 = trunk(model.preprocess([{"image": image}]).tensor)["res4"]
    detected = boxes[out.proposal_index]
    crops = roi_align(res4, [detected], TINY.pooler_resolution, 1 / 16, 0, True)
    probs = model.roi_heads.mask_head(trunk.layer4(crops)).sigmoid()
    expected = paste_masks(probs, detected * 1.5, (96, 144))
    assert torch.equal(out.pred_masks, expected)
    assert out.pred_masks.any()
