"""PretrainFastRCNN (tiny CLIP, tiny offline RPN, CPU): layout, initialisation, losses,
frozen parts and the whole-image boxes."""
from pathlib import Path

import pytest
import torch
from _checkpoint_utils import make_state_dict, pretrained_shapes
from _clip_utils import openclip_reference

import regionclip.modeling.clip_resnet as clip_resnet_module
import regionclip.modeling.pretrainer as pretrainer_module
from regionclip.checkpoint import load_checkpoint, save_checkpoint
from regionclip.config import load_config
from regionclip.events import pop_scalars
from regionclip.modeling.build import build_model
from regionclip.modeling.pretrainer import LOSS_KEYS, PretrainFastRCNN, context_squares
from regionclip.modeling.text_encoder import save_embeddings
from regionclip.prompts import tokenize

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRETRAIN = CONFIGS / "pretrain" / "RegionCLIP_RN50.yaml"
TINY = CONFIGS / "tests" / "tiny.yaml"
TINY_RPN = CONFIGS / "tests" / "tiny_rpn_fpn.yaml"
NUM_CONCEPTS = 6
SAMPLE_REGIONS = 4
RPN_REGIONS = 10


def _cfg(tmp_path, *overrides):
    concepts = tmp_path / "concepts.pth"
    if not concepts.exists():
        save_embeddings(torch.randn(NUM_CONCEPTS, 32, generator=torch.Generator().manual_seed(1)),
                        str(concepts))
    return load_config(str(PRETRAIN), [
        "MODEL.CLIP.VARIANT", "tiny", "MODEL.CLIP.TEACHER_VARIANT", "tiny",
        "MODEL.CLIP.OFFLINE_RPN_CONFIG", str(TINY_RPN), "MODEL.CLIP.CONCEPT_POOL_EMB",
        str(concepts), "MODEL.DEVICE", "cpu", "MODEL.CLIP.PRETRAIN_RPN_REGIONS", str(RPN_REGIONS),
        "MODEL.CLIP.PRETRAIN_SAMPLE_REGIONS", str(SAMPLE_REGIONS), *map(str, overrides)])


def _model(tmp_path, *overrides) -> PretrainFastRCNN:
    torch.manual_seed(0)
    return build_model(_cfg(tmp_path, *overrides)).train()


def _batch(sizes=((64, 96), (80, 48)), seed=0):
    """Image-text records as the data pipeline yields them: [0, 1] RGB floats, 1-3 captions."""
    gen = torch.Generator().manual_seed(seed)
    captions = (["a dog on grass", "a brown dog"], ["a red car"], ["a cat", "two cats", "cats"])
    return [{"image": torch.rand(3, h, w, generator=gen), "tokens": tokenize(captions[i % 3]),
             "height": h, "width": w} for i, (h, w) in enumerate(sizes)]


def _from_clip(tmp_path, *overrides) -> PretrainFastRCNN:
    """A model initialised as pretraining starts: student and teacher from the same CLIP
    weights (random, with random BN statistics, so no residual branch is switched off the
    way open_clip's zero-initialised last BN of each block does)."""
    path = tmp_path / "clip.pt"
    if not path.exists():
        torch.save(openclip_reference("tiny").state_dict(), path)
    model = _model(tmp_path, *overrides)
    load_checkpoint(model, path)
    return model


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_teacher_temperature_is_the_config_key(tmp_path):
    """MODEL.CLIP.TEACHER_TEMP sets the teacher's label distributions: with the student equal
    to the teacher the distillation vanishes exactly when it matches CLSS_TEMP."""
    for teacher_temp, vanishes in ((0.1, True), (0.01, False)):
        model = _from_clip(tmp_path, "MODEL.CLIP.CLSS_TEMP", 0.1,
                           "MODEL.CLIP.TEACHER_TEMP", teacher_temp)
        assert model.teacher_temperature == teacher_temp
        torch.manual_seed(0)
        distill = model(_batch())["loss_region_distill"].item()
        assert (distill < 1e-4) == vanishes, (teacher_temp, distill)


def test_context_squares_by_hand():
    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [0.0, 0.0, 8.0, 2.0]])
    expected = torch.tensor([[-10.0, 10.0, 50.0, 70.0], [-2.0, -5.0, 10.0, 7.0]])
    assert torch.equal(context_squares(boxes, 1.5), expected)


def test_teacher_crop_encodes_the_resampled_region_as_a_whole_image(tmp_path):
    """TEACHER_CROP_CONTEXT 1 on a box spanning a 32 px square image: the teacher's embedding
    is its CLIP image embedding of the image upsampled to the 64 px input size (bilinear)."""
    model = _from_clip(tmp_path, "MODEL.CLIP.TEACHER_CROP_CONTEXT", 1.0)
    assert model.teacher_crop_context == 1.0
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    got = model.teacher_regions(image, [torch.tensor([[0.0, 0.0, 32.0, 32.0]])])
    size = model.teacher_backbone.variant.image_size
    resized = torch.nn.functional.interpolate(image, size=size, mode="bilinear",
                                              align_corners=False)
    with torch.no_grad():
        expected = model.teacher_backbone.encode_image(resized)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    roialign = _from_clip(tmp_path).teacher_regions(image, [torch.tensor([[0.0, 0.0, 32.0, 32.0]])])
    assert not torch.allclose(roialign, expected, atol=1e-3)  # the original's way differs
    for teacher in (model, _from_clip(tmp_path)):  # an image without proposals
        assert teacher.teacher_regions(image, [torch.zeros(0, 4)]).shape == (0, expected.shape[1])


def test_teacher_crops_train_and_a_negative_context_is_refused(tmp_path):
    model = _model(tmp_path, "MODEL.CLIP.TEACHER_CROP_CONTEXT", 1.5)
    losses = model(_batch())
    assert set(losses) == set(LOSS_KEYS.values())
    assert all(torch.isfinite(v) for v in losses.values())
    with pytest.raises(ValueError, match="TEACHER_CROP_CONTEXT must be >= 0"):
        _model(tmp_path, "MODEL.CLIP.TEACHER_CROP_CONTEXT", -1.0)


# ------------------------------------------------------------------------------------------
# Checkpoint layout and initialisation
# ------------------------------------------------------------------------------------------
def test_state_dict_has_the_official_pretrained_layout(tmp_path):
    state = _model(tmp_path).state_dict()
    official = pretrained_shapes("tiny", rpn=True)
    assert set(state) == set(official)
    for key, shape in official.items():
        if not key.startswith("offline_"):  # the test RPN is the R50-FPN layout, but narrow
            assert tuple(state[key].shape) == shape, key


def test_pretrained_checkpoint_loads_unchanged_into_the_zero_shot_detector(tmp_path):
    pretrained = _model(tmp_path)
    save_checkpoint(tmp_path / "pretrained.pth", pretrained.state_dict(), iteration=3)
    cfg = load_config(str(TINY), ["MODEL.CLIP.CROP_REGION_TYPE", "RPN",
                                  "MODEL.CLIP.OFFLINE_RPN_CONFIG", str(TINY_RPN),
                                  "MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST", str(RPN_REGIONS)])
    detector = build_model(cfg)
    report = load_checkpoint(detector, tmp_path / "pretrained.pth")
    assert not [k for k in report.missing if not k.startswith("roi_heads.")]
    assert not report.mismatched and not report.unexpected
    expected = pretrained.state_dict()
    for key, value in detector.state_dict().items():
        if not key.startswith("roi_heads."):
            assert torch.equal(value, expected[key]), key
    # Same offline RPN, same resized image: the pretrainer's [0, 1] input is scaled to 0-255
    # for the RPN exactly as the detector's 0-255 input is.
    image = _batch()[0]["image"]
    pretrained.sample_regions = 0
    boxes = pretrained.sample_proposals([image])[0]
    reference = detector.get_proposals([{"image": image * 255.0}])[0].proposal_boxes.tensor
    assert len(boxes) > 0 and torch.equal(boxes, reference)
    detector.eval()
    with torch.no_grad():
        detector([{"image": (image * 255).to(torch.uint8)}])


def _load_equal(model, prefix, reference_state):
    state = model.state_dict()
    for key, value in reference_state.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(state[prefix + key], value), prefix + key


def test_openai_clip_weights_initialise_teacher_student_and_text_tower(tmp_path):
    reference = openclip_reference("tiny")
    torch.save(reference.state_dict(), tmp_path / "tiny_openai.pt")
    model = _model(tmp_path)
    report = load_checkpoint(model, tmp_path / "tiny_openai.pt")
    assert report.format == "openai_clip"
    assert {k.split(".")[0] for k in report.missing} == {"offline_backbone",
                                                         "offline_proposal_generator"}
    visual = reference.visual.state_dict()
    _load_equal(model, "backbone.", visual)
    _load_equal(model, "teacher_backbone.", visual)
    text = {k: v for k, v in reference.state_dict().items()
            if not k.startswith("visual.") and k != "logit_scale"}
    _load_equal(model, "lang_encoder.", text)


def test_teacher_student_oai_clip_file_in_regionclip_naming(tmp_path):
    stored = make_state_dict(pretrained_shapes("tiny", rpn=False), seed=3)
    save_checkpoint(tmp_path / "teacher_tiny_student_tiny_OAI_CLIP.pth", stored)
    model = _model(tmp_path)
    report = load_checkpoint(model, tmp_path / "teacher_tiny_student_tiny_OAI_CLIP.pth")
    assert len(report.loaded) == len(stored) and not report.unexpected
    _load_equal(model, "", stored)


def test_distillation_vanishes_when_student_equals_teacher(tmp_path):
    """Both trunks start from the same CLIP weights: on the same regions and the same concept
    pool the student's distribution equals the teacher's, so KL(teacher || student) = 0."""
    model = _from_clip(tmp_path, "MODEL.CLIP.CLSS_TEMP", 0.01)
    torch.manual_seed(0)
    losses = model(_batch())
    assert losses["loss_region_distill"].item() == pytest.approx(0.0, abs=1e-4)
    with torch.no_grad():
        model.backbone.attnpool.c_proj.weight.add_(0.1 * torch.randn_like(
            model.backbone.attnpool.c_proj.weight))
    torch.manual_seed(0)
    assert model(_batch())["loss_region_distill"].item() > 1e-3


# ------------------------------------------------------------------------------------------
# Training behaviour
# ------------------------------------------------------------------------------------------
def test_losses_are_finite_and_named(tmp_path):
    losses = _model(tmp_path)(_batch())
    assert set(losses) == set(LOSS_KEYS.values())
    assert all(torch.isfinite(v) and v.dim() == 0 for v in losses.values())


def test_the_share_of_regions_with_a_pseudo_label_is_reported(tmp_path, monkeypatch):
    """``pretrain/pseudo_label_kept``: the share of sampled regions whose teacher concept
    passes CONCEPT_THRES (what the toy world's audit had to measure by hand)."""
    made, label = [], pretrainer_module.pseudo_concept_labels

    def recording(*args):
        made.append(label(*args))
        return made[-1]

    monkeypatch.setattr(pretrainer_module, "pseudo_concept_labels", recording)
    pop_scalars()
    for threshold in (0.0, 0.3):
        _model(tmp_path, "MODEL.CLIP.CONCEPT_THRES", threshold)(_batch())
        kept = pop_scalars()["pretrain/pseudo_label_kept"]
        assert kept == pytest.approx(made[-1].keep.float().mean().item())
        assert kept == 1.0 or threshold > 0


def test_sgd_steps_change_only_the_trainable_student_parts(tmp_path):
    model = _from_clip(tmp_path)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    stages = {n.split(".")[1] for n in trainable}
    assert all(n.startswith("backbone.") for n in trainable)
    assert stages == {"layer2", "layer3", "layer4", "attnpool"}  # FREEZE_AT 2
    before = _snapshot(model)
    concepts = (model.concept_emb.clone(), model.teacher_concept_emb.clone())
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for step in range(3):
        optimizer.zero_grad()
        sum(model(_batch(seed=step)).values()).backward()
        optimizer.step()
    after = model.state_dict()
    frozen_prefixes = ("teacher_backbone.", "lang_encoder.", "offline_backbone.",
                       "offline_proposal_generator.", "backbone.conv", "backbone.bn",
                       "backbone.layer1.")
    frozen = [k for k in before if k.startswith(frozen_prefixes) or k not in trainable]
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert torch.equal(model.concept_emb, concepts[0])
    assert torch.equal(model.teacher_concept_emb, concepts[1])
    assert [k for k in trainable if torch.equal(before[k], after[k])] == []
    assert not model.teacher_backbone.training and not model.lang_encoder.training


def test_whole_image_box_covers_each_images_own_extent(tmp_path, monkeypatch):
    model = _model(tmp_path)
    calls = []

    def recording_pool(res4, boxes, resolution, stride=16):
        calls.append([b.clone() for b in boxes])
        return pool_regions(res4, boxes, resolution, stride)

    pool_regions = clip_resnet_module.pool_regions  # where every region embedding is pooled
    monkeypatch.setattr(clip_resnet_module, "pool_regions", recording_pool)
    sizes = ((64, 96), (80, 48))  # the padded canvas is 80 x 96
    model(_batch(sizes))
    whole = [[0.0, 0.0, float(w), float(h)] for h, w in sizes]
    assert [[b.tolist() for b in call] for call in calls].count([[box] for box in whole]) == 1
    for call in calls:  # no region, proposal or whole-image, reaches into the padding
        for boxes, (h, w) in zip(call, sizes):
            assert (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    # student and teacher pool the same sampled proposals, at most SAMPLE_REGIONS per image
    proposals = [c for c in calls if any(len(b) != 1 for b in c)]
    assert len(proposals) == 2 and all(torch.equal(a, b) for a, b in zip(*proposals))
    assert all(0 < len(b) <= SAMPLE_REGIONS for b in proposals[0])


def test_losses_can_be_switched_off(tmp_path):
    model = _model(tmp_path, "MODEL.CLIP.PRETRAIN_IMG_TXT_LEVEL", False)
    assert model.lang_encoder is None
    assert set(model(_batch())) == {"loss_region_distill", "loss_concept_contrastive"}
    cfg = _cfg(tmp_path)
    cfg.MODEL.CLIP.CONCEPT_POOL_EMB = ""
    assert set(build_model(cfg).train()(_batch())) == {"loss_img_txt_level"}
    full = _model(tmp_path)
    only_distill = PretrainFastRCNN(
        backbone=full.backbone, teacher_backbone=full.teacher_backbone,
        pixel_mean=full.pixel_mean.flatten().tolist(), pixel_std=full.pixel_std.flatten().tolist(),
        pooler_resolution=4, teacher_pooler_resolution=4, losses=("distill",),
        offline_backbone=full.offline_backbone,
        offline_proposal_generator=full.offline_proposal_generator,
        offline_input=full.offline_input, concept_emb=full.concept_emb,
        teacher_concept_emb=full.teacher_concept_emb)
    assert set(only_distill.train()(_batch())) == {"loss_region_distill"}


def test_misuse_gets_clear_errors(tmp_path):
    model = _model(tmp_path)
    with pytest.raises(RuntimeError, match="CLIPFastRCNN"):
        model.eval()(_batch())
    record = _batch()[0]
    record["image"] = (record["image"] * 255).to(torch.uint8)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.train()([record])
    with pytest.raises(ValueError, match="PRETRAIN_ONLY_EOT"):
        _model(tmp_path, "MODEL.CLIP.PRETRAIN_ONLY_EOT", False)
    wrong_width = tmp_path / "wide.pth"
    save_embeddings(torch.randn(NUM_CONCEPTS, 64), str(wrong_width))
    with pytest.raises(ValueError, match="64-dim"):
        _model(tmp_path, "MODEL.CLIP.TEACHER_CONCEPT_POOL_EMB", wrong_width)
