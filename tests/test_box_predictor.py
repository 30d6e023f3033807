"""Text-embedding classifier, RPN-score fusion and per-image detection post-processing.

References: hand-computed cases, and a plain per-class loop over torchvision's `nms`.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from regionclip.modeling.box_predictor import (
    InferenceSettings,
    TextEmbeddingPredictor,
    detect_images,
    fusion_can_pass,
    predict_boxes,
    predict_probs,
)
from regionclip.ops import box_iou, nms  # torchvision's, the independent reference
from regionclip.structures import Boxes, Instances

IMAGE_SIZE = (60, 80)  # (height, width)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _proposals(boxes, objectness=None, image_size=IMAGE_SIZE):
    boxes = torch.as_tensor(boxes, dtype=torch.float32)
    if objectness is None:
        objectness = torch.ones(len(boxes))
    return Instances(image_size, proposal_boxes=Boxes(boxes),
                     objectness_logits=torch.as_tensor(objectness, dtype=torch.float32))


def _random_detection_inputs(seed, num_boxes=60, num_classes=4):
    """Boxes crowded around a few centres (so NMS matters), some reaching outside the image
    (so clipping matters), a few rows non-finite, and softmax scores with background last."""
    gen = _gen(seed)
    centres = torch.rand(5, 2, generator=gen) * torch.tensor([90.0, 70.0]) - 5
    ctr = centres[torch.randint(5, (num_boxes,), generator=gen)]
    ctr = ctr + torch.randn(num_boxes, 2, generator=gen) * 4
    size = 8 + torch.rand(num_boxes, 2, generator=gen) * 25
    boxes = torch.cat([ctr - size / 2, ctr + size / 2], dim=1)
    logits = torch.randn(num_boxes, num_classes + 1, generator=gen) * 2
    scores = F.softmax(logits, dim=1)
    scores[3, 1] = float("nan")
    boxes[7, 2] = float("inf")
    return boxes, scores


def reference_detect(boxes, scores, image_size, score_thresh, nms_thresh, topk):
    """The post-processing written out: drop non-finite rows, clip, then for each class
    threshold and NMS on its own, merge all classes by score, keep the top k.

    Returns lists (boxes, scores, classes, proposal indices) in output order.
    """
    height, width = image_size
    finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    clipped = boxes.clone()
    clipped[finite, 0::2] = clipped[finite, 0::2].clamp(0, width)
    clipped[finite, 1::2] = clipped[finite, 1::2].clamp(0, height)
    detections = []
    for c in range(scores.shape[1] - 1):
        rows = [i for i in range(len(boxes)) if finite[i] and scores[i, c] > score_thresh]
        if not rows:
            continue
        kept = nms(clipped[rows], scores[rows, c], nms_thresh)
        detections += [(float(scores[rows[k], c]), c, rows[k]) for k in kept.tolist()]
    detections.sort(key=lambda d: -d[0])
    if topk >= 0:
        detections = detections[:topk]
    return (
        [clipped[i].tolist() for _, _, i in detections],
        [s for s, _, _ in detections],
        [c for _, c, _ in detections],
        [i for _, _, i in detections],
    )


def _cosine(x, embeddings):
    return F.normalize(x, dim=1) @ F.normalize(embeddings, dim=1).t()


def _detect(boxes, scores, unfused=None, **settings):
    unfused = scores if unfused is None else unfused
    return detect_images([boxes], [scores], [unfused], [IMAGE_SIZE],
                         InferenceSettings(**settings))[0]


# --------------------------------------------------------------------------------------------
# Classifier
# --------------------------------------------------------------------------------------------
def test_logits_are_cosine_over_temperature_with_zero_background():
    x = torch.tensor([[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]])  # rows normalise to (.6, .8, 0), e_z
    embeddings = torch.tensor([[5.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 3.0, 4.0]])
    logits, _ = TextEmbeddingPredictor(embeddings, temperature=0.01)(x)
    expected = torch.tensor([[60.0, 80.0, 48.0, 0.0], [0.0, 0.0, 80.0, 0.0]])
    torch.testing.assert_close(logits, expected)
    assert torch.equal(logits[:, -1], torch.zeros(2))  # exactly 0, not merely close


def test_text_and_background_embeddings_are_frozen():
    predictor = TextEmbeddingPredictor(torch.randn(3, 8), torch.randn(5, 8))
    assert torch.equal(predictor.cls_bg_score.weight, torch.zeros(1, 8))
    frozen = [predictor.cls_score, predictor.cls_bg_score, predictor.test_cls_score]
    assert not any(layer.weight.requires_grad for layer in frozen)
    assert predictor.bbox_pred.weight.requires_grad


def test_test_embeddings_are_used_only_in_eval_mode():
    train, test = torch.randn(3, 8, generator=_gen(0)), torch.randn(5, 8, generator=_gen(1))
    predictor = TextEmbeddingPredictor(train, test)
    x = torch.randn(4, 8, generator=_gen(2))
    assert predictor.num_classes == 3
    torch.testing.assert_close(predictor(x)[0][:, :3], _cosine(x, train) / 0.01)
    predictor.eval()
    assert predictor.num_classes == 5
    logits = predictor(x)[0]
    assert logits.shape == (4, 6)
    torch.testing.assert_close(logits[:, :5], _cosine(x, test) / 0.01)


def test_set_test_embeddings_checks_width():
    predictor = TextEmbeddingPredictor(torch.randn(3, 8)).eval()
    with pytest.raises(ValueError, match=r"\[C, 8\]"):
        predictor.set_test_embeddings(torch.randn(4, 7))
    with pytest.raises(ValueError, match=r"\[C, 8\]"):
        predictor.set_test_embeddings(torch.randn(8))
    assert predictor.num_classes == 3


def test_set_test_embeddings_accepts_unnormalised_rows():
    predictor = TextEmbeddingPredictor(torch.randn(3, 8)).eval()
    vocabulary = torch.randn(4, 8, generator=_gen(0))
    x = torch.randn(2, 8, generator=_gen(1))
    predictor.set_test_embeddings(vocabulary)
    logits = predictor(x)[0]
    predictor.set_test_embeddings(vocabulary * torch.tensor([[1.0], [7.0], [0.1], [3.0]]))
    assert predictor.num_classes == 4
    torch.testing.assert_close(predictor(x)[0], logits)


def test_a_vocabulary_set_after_the_model_moved_follows_it():
    """As Detector.set_vocabulary on a model already on the GPU; a dtype move stands in for the
    device move on machines without one (the layer was always made on the CPU in float32)."""
    predictor = TextEmbeddingPredictor(torch.randn(3, 8)).to(torch.float64).eval()
    predictor.set_test_embeddings(torch.randn(4, 8))
    assert predictor.test_cls_score.weight.dtype == torch.float64
    assert predictor(torch.randn(2, 8, dtype=torch.float64))[0].shape == (2, 5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_vocabulary_set_on_a_gpu_model_stays_on_the_gpu():
    predictor = TextEmbeddingPredictor(torch.randn(3, 8)).cuda().eval()
    predictor.set_test_embeddings(torch.randn(4, 8))
    assert predictor(torch.randn(2, 8, device="cuda"))[0].shape == (2, 5)


def test_bbox_pred_sees_the_unnormalised_embedding():
    predictor = TextEmbeddingPredictor(torch.randn(3, 8))
    torch.nn.init.normal_(predictor.bbox_pred.bias)
    x = torch.randn(5, 8, generator=_gen(0)) * 10
    logits, deltas = predictor(x)
    weight, bias = predictor.bbox_pred.weight, predictor.bbox_pred.bias
    torch.testing.assert_close(deltas, x @ weight.t() + bias)
    logits2, deltas2 = predictor(2 * x)
    torch.testing.assert_close(logits2, logits)  # classification is scale invariant ...
    torch.testing.assert_close(deltas2 - bias, 2 * (deltas - bias))  # ... regression is not


def test_permuting_the_vocabulary_permutes_score_columns_only():
    vocabulary, x = torch.randn(6, 8, generator=_gen(0)), torch.randn(4, 8, generator=_gen(1))
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    predictor = TextEmbeddingPredictor(vocabulary)
    logits, deltas = predictor(x)
    predictor.cls_score.weight.data.copy_(vocabulary[perm])
    permuted_logits, permuted_deltas = predictor(x)
    torch.testing.assert_close(permuted_logits[:, :6], logits[:, perm])
    assert torch.equal(permuted_logits[:, 6], logits[:, 6])
    assert torch.equal(permuted_deltas, deltas)


# --------------------------------------------------------------------------------------------
# Probabilities, RPN-score fusion, box decoding
# --------------------------------------------------------------------------------------------
def test_fusion_is_sqrt_of_probability_times_raw_logit():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 1.0]])
    proposals = [_proposals([[0, 0, 5, 5], [1, 1, 6, 6]], [4.0, 0.25]),
                 _proposals([[2, 2, 9, 9]], [-1.0])]
    fused, unfused = predict_probs(logits, proposals, fuse_rpn=True)
    probs = F.softmax(logits, dim=1)
    assert [len(f) for f in fused] == [2, 1] and [len(u) for u in unfused] == [2, 1]
    torch.testing.assert_close(torch.cat(unfused), probs)
    torch.testing.assert_close(fused[0][0], (probs[0] * 4.0).sqrt())
    torch.testing.assert_close(fused[0][1], (probs[1] * 0.25).sqrt())
    assert torch.isnan(fused[1]).all()  # a raw negative logit, not sigmoid(logit)


def test_without_fusion_scores_are_the_softmax():
    logits = torch.randn(5, 4, generator=_gen(0))
    proposals = [_proposals(torch.rand(2, 4), [-3.0, 2.0]), _proposals(torch.rand(3, 4))]
    fused, unfused = predict_probs(logits, proposals, fuse_rpn=False)
    torch.testing.assert_close(torch.cat(fused), F.softmax(logits, dim=1))
    torch.testing.assert_close(torch.cat(unfused), F.softmax(logits, dim=1))


def test_negative_objectness_rows_and_only_those_are_dropped():
    boxes, _ = _random_detection_inputs(seed=0)
    boxes[7, 2] = 30.0  # all rows finite here: only the objectness may remove rows
    logits = torch.randn(len(boxes), 5, generator=_gen(1)) * 3
    objectness = torch.randn(len(boxes), generator=_gen(2)) * 2
    negative = objectness < 0
    assert 5 < int(negative.sum()) < len(boxes) - 5
    fused, unfused = predict_probs(logits, [_proposals(boxes, objectness)], fuse_rpn=True)
    settings = dict(score_thresh=0.05, nms_thresh=0.5, detections_per_image=1000)
    result, index = _detect(boxes, fused[0], unfused[0], **settings)

    kept_rows = (~negative).nonzero().squeeze(1)
    expected, expected_index = _detect(boxes[kept_rows], fused[0][kept_rows],
                                       unfused[0][kept_rows], **settings)
    assert not negative[index].any()
    assert index.tolist() == kept_rows[expected_index].tolist()
    assert torch.equal(result.pred_boxes.tensor, expected.pred_boxes.tensor)
    assert torch.equal(result.scores, expected.scores)
    assert torch.equal(result.pred_classes, expected.pred_classes)


def test_fused_scores_can_exceed_one():
    logits = torch.tensor([[10.0, 0.0, 0.0]])  # p(class 0) ~ 1
    fused, unfused = predict_probs(logits, [_proposals([[5, 5, 30, 30]], [9.0])], fuse_rpn=True)
    result, _ = _detect(torch.tensor([[5.0, 5.0, 30.0, 30.0]]), fused[0], unfused[0])
    assert result.pred_classes.tolist() == [0]
    torch.testing.assert_close(result.scores, (F.softmax(logits, 1)[:, 0] * 9.0).sqrt())
    assert result.scores.item() > 2.9


def test_reported_unfused_scores_with_selection_on_fused_scores():
    # Rows 0 and 1 overlap (IoU 0.8): NMS keeps row 1, whose fused score is higher although
    # its probability is lower. Row 2 is probable but its fused score is below the threshold.
    boxes = torch.tensor([[0.0, 0.0, 20.0, 20.0], [0.0, 0.0, 20.0, 16.0], [40, 40, 60, 60]])
    unfused = torch.tensor([[0.9, 0.1], [0.5, 0.5], [0.9, 0.1]])
    objectness = torch.tensor([0.1, 4.0, 0.001])
    fused = (unfused * objectness[:, None]).sqrt()
    for report_unfused, expected_score in ((False, math.sqrt(2.0)), (True, 0.5)):
        result, index = _detect(boxes, fused, unfused, score_thresh=0.05,
                                report_unfused_scores=report_unfused)
        assert index.tolist() == [1]
        assert result.pred_classes.tolist() == [0]
        torch.testing.assert_close(result.scores, torch.tensor([expected_score]))


def test_predict_boxes_applies_deltas_unless_told_not_to():
    proposals = [_proposals([[10.0, 20.0, 30.0, 60.0]]), _proposals([[0.0, 0.0, 8.0, 4.0]])]
    # dx = 1 shifts by width / 10; dw = 5 * log(2) doubles the width (weights 10, 10, 5, 5).
    deltas = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5 * math.log(2.0), 0.0]])
    decoded = predict_boxes(deltas, proposals, InferenceSettings())
    torch.testing.assert_close(decoded[0], torch.tensor([[12.0, 20.0, 32.0, 60.0]]))
    torch.testing.assert_close(decoded[1], torch.tensor([[-4.0, 0.0, 12.0, 4.0]]))
    as_is = predict_boxes(deltas, proposals, InferenceSettings(no_box_delta=True))
    assert torch.equal(as_is[0], proposals[0].proposal_boxes.tensor)
    assert torch.equal(as_is[1], proposals[1].proposal_boxes.tensor)


# --------------------------------------------------------------------------------------------
# detect_images
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("topk", [7, 1000])
def test_detect_images_matches_per_class_reference(seed, topk):
    boxes, scores = _random_detection_inputs(seed)
    result, index = _detect(boxes, scores, score_thresh=0.05, nms_thresh=0.5,
                            detections_per_image=topk)
    ref_boxes, ref_scores, ref_classes, ref_index = reference_detect(
        boxes, scores, IMAGE_SIZE, 0.05, 0.5, topk
    )
    all_index = reference_detect(boxes, scores, IMAGE_SIZE, 0.05, 0.5, -1)[3]
    # Non-trivial inputs: top-k truncates, NMS suppresses, a non-finite row is dropped.
    candidates = (scores[:, :-1] > 0.05).sum().item()
    assert 7 < len(all_index) < candidates - 10 and 3 not in all_index and 7 not in all_index
    assert result.pred_classes.tolist() == ref_classes
    assert index.tolist() == ref_index
    torch.testing.assert_close(result.pred_boxes.tensor, torch.tensor(ref_boxes))
    torch.testing.assert_close(result.scores, torch.tensor(ref_scores))
    assert result.image_size == IMAGE_SIZE


def test_negative_detections_per_image_keeps_everything():
    boxes, scores = _random_detection_inputs(seed=1)
    everything, _ = _detect(boxes, scores, detections_per_image=10**6)
    result, _ = _detect(boxes, scores, detections_per_image=-1)
    assert len(everything) > 1
    assert torch.equal(result.scores, everything.scores)


def test_class_agnostic_box_is_reported_once_per_class():
    # GitHub issue #30: without class-specific regression the same box can carry several
    # classes; NMS runs per class, so both survive.
    boxes = torch.tensor([[10.0, 10.0, 40.0, 30.0]])
    scores = torch.tensor([[0.45, 0.35, 0.02, 0.18]])
    result, index = _detect(boxes, scores, score_thresh=0.05)
    assert result.pred_classes.tolist() == [0, 1]
    assert index.tolist() == [0, 0]
    assert torch.equal(result.pred_boxes.tensor, boxes.repeat(2, 1))
    torch.testing.assert_close(result.scores, torch.tensor([0.45, 0.35]))


@pytest.mark.parametrize("report_unfused", [False, True])
def test_soft_nms_reports_rescored_scores(report_unfused):
    # Rows 0 and 1 (class 0) have IoU 0.6: hard NMS at 0.5 would drop row 1; gaussian
    # soft-NMS keeps it at 0.8 * exp(-0.6^2 / 0.5). Row 2 (class 1) is alone.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 6.0], [50, 30, 70, 50]])
    scores = torch.tensor([[0.9, 0.0, 0.1], [0.8, 0.0, 0.2], [0.0, 0.7, 0.3]])
    assert math.isclose(box_iou(boxes[:1], boxes[1:2]).item(), 0.6, rel_tol=1e-6)
    hard, _ = _detect(boxes, scores, score_thresh=0.05, nms_thresh=0.5)
    assert hard.scores.tolist() == pytest.approx([0.9, 0.7])
    unfused = torch.full_like(scores, 0.25)  # must not be reported with soft-NMS
    result, index = _detect(boxes, scores, unfused, score_thresh=0.05, nms_thresh=0.5,
                            soft_nms=True, soft_nms_method="gaussian", soft_nms_sigma=0.5,
                            report_unfused_scores=report_unfused)
    assert index.tolist() == [0, 2, 1]
    assert result.pred_classes.tolist() == [0, 1, 0]
    torch.testing.assert_close(result.scores, torch.tensor([0.9, 0.7, 0.8 * math.exp(-0.72)]))
    assert torch.equal(result.pred_boxes.tensor, boxes[[0, 2, 1]])


@pytest.mark.parametrize("soft_nms", [False, True])
def test_no_proposals_give_no_detections(soft_nms):
    result, index = _detect(torch.zeros(0, 4), torch.zeros(0, 4), soft_nms=soft_nms)
    assert len(result) == 0 and len(index) == 0
    assert result.pred_boxes.tensor.shape == (0, 4)
    assert result.pred_classes.dtype == torch.int64


@pytest.mark.parametrize("soft_nms", [False, True])
def test_scores_at_or_below_threshold_give_no_detections(soft_nms):
    boxes, scores = _random_detection_inputs(seed=2)
    scores[:, :-1] = scores[:, :-1].clamp(max=0.3)
    scores[0, 0] = 0.3  # the threshold is strict: equal does not pass
    result, index = _detect(boxes, scores, score_thresh=0.3, soft_nms=soft_nms)
    assert len(result) == 0 and len(index) == 0


@pytest.mark.parametrize("soft_nms", [False, True])
def test_a_batch_of_images_equals_each_image_alone(soft_nms):
    # Different sizes (clipping per image), top-k cutting, overlapping boxes across images
    # that must not suppress each other, and an image with nothing above the threshold.
    sizes = [(60, 80), (40, 100), (70, 50)]
    inputs = [_random_detection_inputs(seed) for seed in (4, 5)]
    inputs.append((inputs[0][0][:5], torch.full((5, 5), 0.01)))
    settings = InferenceSettings(score_thresh=0.05, nms_thresh=0.5, detections_per_image=9,
                                 soft_nms=soft_nms, soft_nms_prune=0.1)
    batch = detect_images([b for b, _ in inputs], [s for _, s in inputs],
                          [s for _, s in inputs], sizes, settings)
    for (boxes, scores), size, (result, index) in zip(inputs, sizes, batch):
        alone, alone_index = detect_images([boxes], [scores], [scores], [size], settings)[0]
        assert result.image_size == size
        assert torch.equal(index, alone_index) and torch.equal(result.scores, alone.scores)
        assert torch.equal(result.pred_classes, alone.pred_classes)
        assert torch.equal(result.pred_boxes.tensor, alone.pred_boxes.tensor)
    assert [len(r) for r, _ in batch] == [9, 9, 0]


def test_soft_nms_first_pick_is_per_image_in_a_batch():
    # Image 1's only box scores below the prune level: it survives as that image's first
    # pick, as it would alone, although image 0 holds the batch's top box.
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    scores = [torch.tensor([[0.9, 0.1]]), torch.tensor([[0.0005, 0.9995]])]
    settings = InferenceSettings(score_thresh=0.0001, soft_nms=True, soft_nms_prune=0.001)
    batch = detect_images([boxes[:1], boxes[1:]], scores, scores, [IMAGE_SIZE] * 2, settings)
    assert [r.scores.tolist() for r, _ in batch] == [[pytest.approx(0.9)],
                                                     [pytest.approx(0.0005)]]


def test_proposals_fusion_cannot_lift_over_the_threshold_are_found():
    # sqrt(p * logit) <= sqrt(logit): a proposal with logit <= thresh^2 never passes, for any
    # probability, including p = 1 exactly; one just above the bound can.
    thresh = 0.05
    gen = _gen(0)
    logits = torch.cat([torch.rand(4000, generator=gen) * 2 * thresh**2,
                        torch.tensor([-1.0, 0.0, float("nan"), thresh**2, 1.0])])
    can_pass = fusion_can_pass(logits, thresh)
    probs = torch.cat([F.softmax(torch.randn(len(logits), 6, generator=gen) * 30, dim=1),
                       torch.ones(len(logits), 1)], dim=1)
    fused = (probs * logits[:, None]) ** 0.5
    assert not (fused[~can_pass] > thresh).any()
    assert (fused[can_pass] > thresh).any(dim=1).float().mean() > 0.99
    assert can_pass[-1] and not can_pass[-5:-2].any()
    assert fusion_can_pass(torch.tensor([0.0, -1.0]), -0.5).all()  # every score passes
