"""RegionCLIP's detector with Detic's weak supervision (``WITH_IMAGE_LABELS`` on CLIPFastRCNN):
the image loss equals Detic's losses of its regions, gradients, and mixed training by
train_net with an exact resume."""
import pytest
import torch
import torch.nn.functional as F
from _detic_utils import tiny_detic_data
from _e2e_utils import TINY_CONFIG, save_embedding_file, tiny_checkpoint
from _rpn_utils import CONFIGS, TINY_C4
from _tool_utils import run_train_net

from regionclip.checkpoint import read_checkpoint
from regionclip.config import load_config
from regionclip.modeling.build import build_model
from regionclip.modeling.detic.clip_weak import WeaklySupervisedCLIPFastRCNN
from regionclip.modeling.detic.weak_losses import CaptionBatch, top_proposals, weak_losses
from regionclip.prompts import tokenize
from regionclip.structures import Boxes, Instances

SIZE = (64, 96)
WEAK = ("WITH_IMAGE_LABELS", "True", "MODEL.WITH_CAPTION", "True",
        "MODEL.CLIP.CROP_REGION_TYPE", "RPN", "MODEL.CLIP.OFFLINE_RPN_CONFIG", str(TINY_C4),
        "MODEL.ROI_BOX_HEAD.ADD_IMAGE_BOX", "True", "MODEL.ROI_BOX_HEAD.WS_NUM_PROPS", "5",
        "MODEL.ROI_BOX_HEAD.SOFTMAX_WEAK_LOSS", "True", "MODEL.ROI_BOX_HEAD.NEG_CAP_WEIGHT", "1.0")


def _input(ann_type, seed=0):
    gen = torch.Generator().manual_seed(seed)
    instances = Instances(SIZE, gt_boxes=Boxes(torch.tensor([[4.0, 4, 40, 44]])),
                          gt_classes=torch.tensor([1]))
    return {"image": torch.rand(3, *SIZE, generator=gen) * 255, "instances": instances,
            "ann_type": ann_type, "pos_category_ids": [0, 2],
            "captions": [f"a photo {seed}", f"another photo {seed}"]}


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(load_config(TINY_CONFIG, list(WEAK))).train()


def test_image_loss_is_detics_loss_of_the_top_proposals_and_image_box(model):
    assert isinstance(model, WeaklySupervisedCLIPFastRCNN)
    batch = [_input("captiontag", 0), _input("captiontag", 1)]
    torch.manual_seed(5)
    losses = model(batch)
    assert set(losses) == {"loss_cls", "loss_box_reg", "image_loss"}
    assert losses["loss_cls"].item() == 0 and losses["image_loss"].item() > 0
    torch.manual_seed(5)  # the same random caption choice
    captions = [x["captions"][int(torch.randint(2, ()))] for x in batch]
    with torch.no_grad():
        text = model.lang_encoder.encode_text(tokenize(captions))
        regions = top_proposals(model.get_proposals(batch), model.weak)
        emb = model.embed_regions(batch, [r.proposal_boxes.tensor for r in regions])
        logits, _ = model.roi_heads.box_predictor(emb)
        caption_logits = F.normalize(emb, dim=1) @ F.normalize(text, dim=1).t() / 0.01
    expected = weak_losses(torch.cat([logits, caption_logits], 1), regions, [[0, 2], [0, 2]],
                           CaptionBatch(text, 0), "captiontag", model.weak)
    assert losses["image_loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    for region in regions:  # up to 5 proposals + the image box
        assert 2 <= len(region) <= 6
        assert region.proposal_boxes.tensor[-1].tolist() == [0, 0, SIZE[1], SIZE[0]]


def test_weak_batches_train_the_trunk_not_the_text_tower(model):
    losses = model([_input("captiontag", 0)])
    sum(losses.values()).backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    for part in ("backbone.layer4.", "backbone.attnpool.", "backbone.layer3."):
        assert sum(g.abs().sum() for n, g in grads.items() if n.startswith(part)) > 0, part
    assert all(g is None for n, g in grads.items() if n.startswith(("lang_encoder.", "offline_")))
    assert not model.lang_encoder.training


def test_box_batches_keep_regionclips_losses_and_report_a_zero_image_loss(model):
    losses = model([_input("box", 0)])
    assert set(losses) == {"loss_cls", "loss_box_reg", "image_loss"}
    assert losses["image_loss"].item() == 0 and losses["loss_cls"].item() > 0


def test_ground_truth_regions_are_refused():
    cfg = load_config(TINY_CONFIG, [*WEAK, "MODEL.CLIP.CROP_REGION_TYPE", "GT"])
    with pytest.raises(ValueError, match="CROP_REGION_TYPE RPN"):
        build_model(cfg)


@pytest.mark.slow
def test_mixed_fine_tuning_through_train_net_resumes_exactly(tmp_path):
    detection, labels, images = tiny_detic_data(tmp_path / "data")
    weights = tiny_checkpoint(tmp_path / "init.pth", rpn=False, text=True)
    emb = save_embedding_file(tmp_path / "emb.pth", 3, 32)

    def argv(output, max_iter, *extra):
        return ["--config-file", TINY_CONFIG, *WEAK, "MODEL.WEIGHTS", weights,
                "MODEL.CLIP.TEXT_EMB_PATH", emb, "DATASETS.TRAIN",
                f"('coco_json:{detection}:{images}', 'image_labels:{labels}:{images}')",
                "DATASETS.TEST", f"('coco_json:{detection}:{images}',)",
                "DATALOADER.SAMPLER_TRAIN", "MultiDatasetSampler",
                "DATALOADER.DATASET_RATIO", "[1, 4]", "DATALOADER.USE_DIFF_BS_SIZE", "True",
                "DATALOADER.DATASET_BS", "[1, 2]", "DATALOADER.MULTI_DATASET_GROUPING", "True",
                "DATALOADER.DATASET_ANN", "['box', 'captiontag']",
                "INPUT.CUSTOM_AUG", "ResizeShortestEdge", "INPUT.MIN_SIZE_TRAIN_SAMPLING", "range",
                "DATALOADER.DATASET_MIN_SIZES", "[[64, 80], [48, 64]]",
                "DATALOADER.DATASET_MAX_SIZES", "[128, 96]", "SOLVER.MAX_ITER", str(max_iter),
                "SOLVER.CHECKPOINT_PERIOD", "100", "OUTPUT_DIR", output, *extra]

    run_train_net(argv(tmp_path / "straight", 6))
    run_train_net(argv(tmp_path / "resumed", 3))
    run_train_net(["--resume", *argv(tmp_path / "resumed", 6)])
    ours, theirs = (read_checkpoint(str(tmp_path / d / "model_final.pth"))
                    for d in ("resumed", "straight"))
    changed = [k for k, v in theirs["model"].items() if not torch.equal(v, ours["model"][k])]
    assert ours["iteration"] == 6 and not changed
    initial = read_checkpoint(weights)["model"]
    assert not torch.equal(theirs["model"]["backbone.attnpool.c_proj.weight"],
                           initial["backbone.attnpool.c_proj.weight"])
    assert torch.equal(theirs["model"]["lang_encoder.text_projection"],
                       initial["lang_encoder.text_projection"])


def test_the_regionclip_weak_config_builds_the_weakly_supervised_detector():
    cfg = load_config(CONFIGS / "COCO-InstanceSegmentation" /
                      "CLIP_fast_rcnn_R_50_C4_ovd_detic-weak.yaml",
                      ["MODEL.CLIP.VARIANT", "tiny", "MODEL.DEVICE", "cpu",
                       "MODEL.CLIP.OFFLINE_RPN_CONFIG", str(TINY_C4)])
    model = build_model(cfg)
    assert isinstance(model, WeaklySupervisedCLIPFastRCNN) and model.lang_encoder is not None
    assert model.weak.softmax and model.weak.add_image_box and model.weak.num_proposals == 32
    assert model.roi_heads.num_train_classes == 80
