"""Proposal recall (ProposalRecallEvaluator) on hand cases, and RPN evaluation in train_net."""
import logging
import math
import pathlib

import numpy as np
import pytest
import torch
import torchvision
from _data_utils import make_coco_dataset
from _tool_utils import run_train_net
from PIL import Image

from regionclip.checkpoint import save_checkpoint
from regionclip.config import load_config
from regionclip.data.catalog import get_dataset_dicts
from regionclip.data.mapper import InferenceMapper, build_inference_mapper
from regionclip.evaluation import ProposalRecallEvaluator
from regionclip.evaluation.proposals import greedy_matched_overlaps
from regionclip.modeling.build import build_model
from regionclip.structures import Boxes, BoxMode, Instances

REPO = pathlib.Path(__file__).resolve().parents[1]

# Ground truth in the 100 x 100 original image (XYXY); the mapper resizes it to 50 x 50.
GT = {"A": [0, 0, 20, 20], "B": [40, 40, 60, 60], "C": [70, 0, 90, 40]}
CROWD = [0, 60, 30, 90]
# (box in original pixels, objectness); IoUs: p1-A 1, p2-B 400/600, p3-A 400/500,
# p4-C 620/800 = 0.775, p5 = the crowd region (which must not count).
PROPOSALS = [
    ([0, 0, 20, 20], 5.0),
    ([40, 40, 60, 70], 4.0),
    ([0, 0, 20, 25], 3.0),
    (CROWD, 2.0),
    ([70, 0, 90, 31], 1.0),
]


def _annotation(box, iscrowd=0):
    return {"bbox": box, "bbox_mode": BoxMode.XYXY_ABS, "category_id": 0, "iscrowd": iscrowd}


@pytest.fixture
def mapped_input(tmp_path):
    """The mapper's input dict for a 100 x 100 image resized to 50 x 50, with annotations."""
    path = tmp_path / "image.png"
    Image.fromarray(np.zeros((100, 100, 3), dtype=np.uint8)).save(path)
    record = {"file_name": str(path), "height": 100, "width": 100, "image_id": 7,
              "annotations": [*map(_annotation, GT.values()), _annotation(CROWD, iscrowd=1)]}
    inp = InferenceMapper(min_size=50, keep_annotations=True)(record)
    assert inp["instances"].image_size == (50, 50) and len(inp["instances"]) == 3
    return inp


def _proposals(entries, size=(100, 100)):
    boxes = torch.tensor([box for box, _ in entries], dtype=torch.float32).reshape(-1, 4)
    logits = torch.tensor([score for _, score in entries], dtype=torch.float32)
    return {"proposals": Instances(size, proposal_boxes=Boxes(boxes), objectness_logits=logits)}


def test_recall_and_average_recall_on_a_hand_case(mapped_input):
    evaluator = ProposalRecallEvaluator(limits=(2, 5), iou_thresholds=(0.5, 0.7))
    evaluator.reset()
    # Shuffled: the evaluator must rank by objectness itself.
    evaluator.process([mapped_input], [_proposals([PROPOSALS[i] for i in (4, 2, 0, 3, 1)])])
    metrics = evaluator.evaluate()["proposals"]
    # Top 2 (p1, p2): A 1.0, B 0.667, C missed. AR: A at 10 thresholds, B at 0.50..0.65 (4).
    # Top 5: C 0.775 too (0.50..0.75: 6 thresholds); the crowd-matching p5 adds nothing.
    expected = {"AR@2": 100 * 14 / 30, "R@2_IoU0.5": 100 * 2 / 3, "R@2_IoU0.7": 100 / 3,
                "AR@5": 100 * 20 / 30, "R@5_IoU0.5": 100.0, "R@5_IoU0.7": 100 * 2 / 3}
    assert metrics.keys() == expected.keys()
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-4), name


def test_images_without_proposals_miss_their_ground_truth(mapped_input):
    evaluator = ProposalRecallEvaluator(limits=(5,), iou_thresholds=(0.5,))
    evaluator.process([mapped_input, mapped_input], [_proposals(PROPOSALS), _proposals([])])
    assert evaluator.evaluate()["proposals"]["R@5_IoU0.5"] == pytest.approx(50.0)


def test_gathered_predictions_evaluate_like_one_process(mapped_input):
    single, shards = ProposalRecallEvaluator(), [ProposalRecallEvaluator() for _ in range(2)]
    outputs = [_proposals(PROPOSALS[:2]), _proposals(PROPOSALS)]
    single.process([mapped_input] * 2, outputs)
    for shard, output in zip(shards, outputs):
        shard.process([mapped_input], [output])
    gathered = [p for shard in shards for p in shard.predictions]
    assert ProposalRecallEvaluator().evaluate(gathered) == single.evaluate()


def test_assignment_is_greedy_and_one_to_one():
    gt = Boxes(torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 12]]))
    # P matches G1 with IoU 1 and G2 with 100/120; Q matches G1 with 0.5 and G2 with 0.6.
    p, q = [0.0, 0, 10, 10], [0.0, 0, 10, 20]
    only_p = greedy_matched_overlaps(Boxes(torch.tensor([p])), gt)
    torch.testing.assert_close(only_p, torch.tensor([1.0, 0.0]))
    both = greedy_matched_overlaps(Boxes(torch.tensor([q, p])), gt)
    torch.testing.assert_close(both, torch.tensor([1.0, 0.6]))


def test_no_ground_truth_gives_no_recall(caplog):
    evaluator = ProposalRecallEvaluator(limits=(10,), iou_thresholds=())
    with caplog.at_level(logging.WARNING):
        assert evaluator.evaluate() == {}
    assert "No ground-truth boxes" in caplog.text


def test_inputs_without_ground_truth_are_rejected():
    with pytest.raises(ValueError, match="keep_annotations"):
        ProposalRecallEvaluator().process([{"image_id": 1}], [_proposals(PROPOSALS)])


def _independent_recalls(model, cfg, dataset, limit):
    """Per ground-truth box (one per image) the best IoU of the top-``limit`` proposals, by
    torchvision against the json's boxes in original pixels."""
    mapper = build_inference_mapper(cfg)
    best = []
    for record in get_dataset_dicts(dataset):
        with torch.no_grad():
            proposals = model([mapper(record)])[0]["proposals"]
        order = proposals.objectness_logits.argsort(descending=True)[:limit]
        (x, y, w, h), = [ann["bbox"] for ann in record["annotations"]]
        gt = torch.tensor([[x, y, x + w, y + h]])
        best.append(torchvision.ops.box_iou(proposals.proposal_boxes.tensor[order], gt).max())
    return torch.stack(best)


def test_train_net_evaluates_an_rpn_by_proposal_recall(tmp_path):
    json_path, image_dir = make_coco_dataset(tmp_path / "data", num_images=4, image_size=(48, 64),
                                             boxes_per_image=1)
    dataset = f"coco_json:{json_path}:{image_dir}"
    config = str(REPO / "configs" / "tests" / "tiny_rpn_fpn.yaml")
    options = ["MODEL.META_ARCHITECTURE", "ProposalNetwork", "MODEL.DEVICE", "cpu",
               "INPUT.MIN_SIZE_TEST", "64", "MODEL.RPN.PRE_NMS_TOPK_TEST", "3000",
               "MODEL.RPN.POST_NMS_TOPK_TEST", "3000"]
    cfg = load_config(config, [*options, "MODEL.WEIGHTS", ""])
    model = build_model(cfg).eval()
    # Zero box deltas: the proposals are the anchors (clipped), so some cover the rectangles.
    for parameter in model.proposal_generator.rpn_head.anchor_deltas.parameters():
        parameter.detach().zero_()
    save_checkpoint(str(tmp_path / "rpn.pth"), model.state_dict())
    results = run_train_net([
        "--eval-only", "--config-file", config, *options,
        "MODEL.WEIGHTS", str(tmp_path / "rpn.pth"),
        "DATASETS.TEST", f'("{dataset}",)', "DATALOADER.NUM_WORKERS", "0",
        "OUTPUT_DIR", str(tmp_path / "out"),
    ])
    metrics = results[dataset]["proposals"]
    assert {"AR@100", "AR@1000", "R@100_IoU0.5", "R@1000_IoU0.7"} <= set(metrics)
    assert all(math.isfinite(v) for v in metrics.values())
    # One box per image: the greedy assignment is the best proposal of each box.
    for limit in (100, 1000):
        best = _independent_recalls(model, cfg, dataset, limit)
        for t in (0.5, 0.7):
            expected = 100 * (best >= t).float().mean()
            assert metrics[f"R@{limit}_IoU{t}"] == pytest.approx(float(expected)), (limit, t)
        thresholds = torch.arange(0.5, 0.951, 0.05, dtype=torch.float32)
        ar = 100 * (best[None] >= thresholds[:, None]).float().mean()
        assert metrics[f"AR@{limit}"] == pytest.approx(float(ar), abs=1e-4)
    assert metrics["R@1000_IoU0.5"] > 0
