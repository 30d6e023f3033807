"""RPN training: anchor labels, losses on hand cases, ProposalNetwork, checkpoint reuse."""
import logging
import math

import pytest
import torch
from _rpn_utils import COCO_C4, CONFIGS, TINY_C4, official_c4_rpn_shapes, randomize_, shapes_of
from _training_utils import trained_rpn

from regionclip.checkpoint import load_checkpoint, save_checkpoint
from regionclip.config import load_config
from regionclip.events import pop_scalars
from regionclip.modeling.box_coder import Box2BoxTransform
from regionclip.modeling.build import build_model
from regionclip.modeling.build_rpn import build_proposal_network
from regionclip.modeling.rpn_training import ProposalNetwork, RPNTraining, label_anchors, rpn_losses
from regionclip.structures import Boxes, Instances

GT = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0]]))


def test_anchor_labels_follow_the_iou_thresholds():
    anchors = Boxes(torch.tensor([
        [0.0, 0.0, 10.0, 8.0],  # IoU 0.8 -> object
        [0.0, 0.0, 10.0, 5.0],  # IoU 0.5 -> between 0.3 and 0.7: ignored
        [30.0, 30.0, 40.0, 40.0],  # IoU 0 -> background
        [0.0, 0.0, 10.0, 2.0],  # IoU 0.2 -> background
    ]))
    labels, matched = label_anchors(anchors, GT, (50, 50), RPNTraining())
    assert labels.tolist() == [1, -1, 0, 0]
    assert torch.equal(matched, GT.tensor.expand(4, 4))


def test_best_anchor_of_a_ground_truth_is_positive_whatever_its_iou():
    anchors = Boxes(torch.tensor([[0.0, 0.0, 10.0, 5.0], [0.0, 0.0, 10.0, 4.0],
                                  [0.0, 0.0, 10.0, 1.0]]))
    labels, _ = label_anchors(anchors, GT, (50, 50), RPNTraining())
    assert labels.tolist() == [1, -1, 0]  # 0.5 is gt's best match; 0.4 ignored; 0.1 negative


def test_anchors_crossing_the_boundary_are_ignored_when_asked():
    anchors = Boxes(torch.tensor([[0.0, 0.0, 10.0, 8.0], [-5.0, 20.0, 5.0, 30.0]]))
    labels, _ = label_anchors(anchors, GT, (50, 50), RPNTraining(boundary_thresh=0.0))
    assert labels.tolist() == [1, -1]
    labels, _ = label_anchors(anchors, GT, (50, 50), RPNTraining())
    assert labels.tolist() == [1, 0]


def test_anchor_sampling_caps_the_count_and_the_positive_share():
    positives = [[0.0, 0.0, 10.0, 9.5]] * 300
    negatives = [[60.0, 60.0, 70.0, 70.0]] * 300
    anchors = Boxes(torch.tensor(positives + negatives))
    labels, _ = label_anchors(anchors, GT, (100, 100), RPNTraining())
    assert int((labels == 1).sum()) == 128 and int((labels == 0).sum()) == 128
    assert int((labels == -1).sum()) == 600 - 256


def test_image_without_ground_truth_has_only_negative_anchors():
    anchors = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 9.0, 9.0]]))
    labels, matched = label_anchors(anchors, Boxes(torch.zeros((0, 4))), (50, 50), RPNTraining())
    assert labels.tolist() == [0, 0]
    assert torch.equal(matched, torch.zeros(2, 4))


def test_rpn_losses_on_a_hand_case_with_one_positive_anchor():
    anchors = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]))
    logits = torch.tensor([[2.0, -1.0]], requires_grad=True)
    deltas = torch.tensor([[[0.1, 0.2, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]]], requires_grad=True)
    labels = torch.tensor([[1, 0]], dtype=torch.int8)
    # The positive anchor's gt is shifted right by 2 px: target deltas (0.2, 0, 0, 0).
    matched = torch.tensor([[[2.0, 0.0, 12.0, 10.0], [0.0, 0.0, 0.0, 0.0]]])
    losses = rpn_losses(anchors, logits, deltas, labels, matched,
                        Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0)), RPNTraining())
    bce = math.log(1 + math.exp(-2.0)) + math.log(1 + math.exp(-1.0))
    assert losses["loss_rpn_cls"].item() == pytest.approx(bce / 256)
    assert losses["loss_rpn_loc"].item() == pytest.approx((0.1 + 0.2) / 256)
    sum(losses.values()).backward()
    assert torch.equal(deltas.grad[0, 1], torch.zeros(4))  # the negative has no box loss


def test_rpn_losses_index_anchors_within_their_own_image():
    """Two images: the only positive anchor is anchor 0 of image 1 (an image index and an
    anchor index must not be confused)."""
    anchors = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]))
    logits = torch.tensor([[-1.0, 0.0], [3.0, 0.0]])
    labels = torch.tensor([[0, -1], [1, -1]], dtype=torch.int8)
    deltas = torch.zeros(2, 2, 4)
    matched = torch.zeros(2, 2, 4)
    matched[1, 0] = torch.tensor([2.0, 0.0, 12.0, 10.0])  # target deltas (0.2, 0, 0, 0)
    losses = rpn_losses(anchors, logits, deltas, labels, matched,
                        Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0)), RPNTraining())
    bce = math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-3.0))
    assert losses["loss_rpn_cls"].item() == pytest.approx(bce / 512)
    assert losses["loss_rpn_loc"].item() == pytest.approx(0.2 / 512)


def test_rpn_loss_weights_and_ignored_anchors():
    anchors = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]))
    logits = torch.tensor([[0.0, 5.0], [0.0, 0.0]])
    labels = torch.tensor([[0, -1], [-1, -1]], dtype=torch.int8)
    settings = RPNTraining(batch_size_per_image=4, objectness_weight=2.0, box_weight=3.0)
    losses = rpn_losses(anchors, logits, torch.zeros(2, 2, 4), labels, torch.zeros(2, 2, 4),
                        Box2BoxTransform(), settings)
    # One valid anchor (logit 0, negative): log 2, divided by 4 anchors x 2 images.
    assert losses["loss_rpn_cls"].item() == pytest.approx(2.0 * math.log(2) / 8)
    assert losses["loss_rpn_loc"].item() == 0.0


def _tiny_cfg(*overrides):
    return load_config(str(TINY_C4), ["MODEL.META_ARCHITECTURE", "ProposalNetwork",
                                      "MODEL.DEVICE", "cpu", *overrides])


def _input(seed=0, size=(48, 64), original=(96, 128)):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, *size), generator=gen).float()
    boxes = Boxes(torch.tensor([[4.0, 4.0, 30.0, 40.0], [32.0, 10.0, 60.0, 30.0]]))
    return {"image": image, "height": original[0], "width": original[1],
            "instances": Instances(size, gt_boxes=boxes, gt_classes=torch.tensor([0, 1]))}


def test_proposal_network_trains_rpn_and_unfrozen_backbone_only():
    torch.manual_seed(0)
    model = build_model(_tiny_cfg())
    assert isinstance(model, ProposalNetwork)
    model.train()
    pop_scalars()
    losses = model([_input(0), _input(1)])
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    # detectron2's per-image anchor counts: at least each image's two ground-truth boxes' best
    # anchors positive, and no more than its sample of 256 labelled.
    scalars = pop_scalars()
    assert scalars["rpn/num_pos_anchors"] >= 2
    assert 2 < scalars["rpn/num_pos_anchors"] + scalars["rpn/num_neg_anchors"] <= \
        _tiny_cfg().MODEL.RPN.BATCH_SIZE_PER_IMAGE
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert grads["proposal_generator.rpn_head.objectness_logits.weight"].abs().sum() > 0
    assert grads["proposal_generator.rpn_head.anchor_deltas.weight"].abs().sum() > 0
    assert grads["backbone.res3.0.conv1.weight"].abs().sum() > 0
    # FREEZE_AT 2: stem and res2 are frozen.
    assert grads["backbone.stem.conv1.weight"] is None
    assert grads["backbone.res2.0.conv1.weight"] is None


def test_proposal_network_eval_returns_proposals_at_the_original_size():
    cfg = _tiny_cfg("MODEL.RPN.POST_NMS_TOPK_TEST", "7")
    model = build_model(cfg).eval()
    with torch.no_grad():
        outputs = model([_input(0)])
    proposals = outputs[0]["proposals"]
    assert proposals.image_size == (96, 128)
    assert 0 < len(proposals) <= 7
    boxes = proposals.proposal_boxes.tensor
    assert boxes[:, 2].max() <= 128 and boxes[:, 3].max() <= 96
    assert boxes[:, 2].max() > 64  # scaled up from the 48 x 64 input


def test_training_needs_ground_truth():
    model = build_model(_tiny_cfg()).train()
    with pytest.raises(ValueError, match="instances"):
        model([{"image": torch.zeros(3, 32, 32)}])


def test_mask_rcnn_config_builds_only_the_rpn_with_official_key_names(caplog):
    cfg = load_config(str(COCO_C4), ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and cfg.MODEL.MASK_ON
    with caplog.at_level(logging.INFO, logger="regionclip"):
        model = build_proposal_network(cfg)
    assert "ROI box and mask heads are neither built nor trained" in caplog.text
    backbone, generator = official_c4_rpn_shapes()
    assert shapes_of(model.backbone) == backbone
    assert shapes_of(model.proposal_generator) == generator
    assert {k.split(".")[0] for k in model.state_dict()} == {"backbone", "proposal_generator"}


def test_other_meta_architectures_are_rejected():
    cfg = _tiny_cfg("MODEL.META_ARCHITECTURE", "CustomRCNN")
    with pytest.raises(ValueError, match="GeneralizedRCNN"):
        build_proposal_network(cfg)


def test_trained_checkpoint_works_as_offline_rpn_weights(tmp_path):
    torch.manual_seed(0)
    rpn = build_model(_tiny_cfg()).eval()
    batch = rpn.preprocess([_input(0), _input(1)]).tensor
    randomize_(rpn.proposal_generator, seed=1)
    randomize_(rpn.backbone, seed=2, calibration_input=batch)
    path = tmp_path / "rpn.pth"
    save_checkpoint(str(path), rpn.state_dict(), iteration=10)

    detector_cfg = load_config(str(CONFIGS / "tests" / "tiny.yaml"), [
        "MODEL.CLIP.CROP_REGION_TYPE", "RPN", "MODEL.CLIP.OFFLINE_RPN_CONFIG", str(TINY_C4)])
    detector = build_model(detector_cfg)
    report = load_checkpoint(detector, str(path), offline_rpn=True)
    assert not report.missing and not report.unexpected and not report.mismatched
    # The detector (RGB input) proposes what the RPN (BGR input) proposed on the same pixels.
    image = _input(0, original=(48, 64))
    with torch.no_grad():
        expected = rpn([image])[0]["proposals"]
        got = detector.get_proposals([{**image, "image": image["image"].flip(0)}])[0]
    assert torch.allclose(got.proposal_boxes.tensor, expected.proposal_boxes.tensor)
    assert torch.allclose(got.objectness_logits, expected.objectness_logits)


# Held-out recall of the top 100 proposals that the trained RPN must reach at IoU 0.5 / 0.7.
# Measured: 0.99 / 0.60; untrained 0.57 / 0.06, trained with zeroed losses 0.58 / 0.09, with
# objectness labels inverted 0.36 / 0.03.
MIN_RECALL = {0.5: 0.85, 0.7: 0.3}


@pytest.mark.slow
def test_rpn_trained_from_random_init_covers_held_out_shapes():
    _, recall_50, recall_70 = trained_rpn()
    assert recall_50 >= MIN_RECALL[0.5]
    assert recall_70 >= MIN_RECALL[0.7]
