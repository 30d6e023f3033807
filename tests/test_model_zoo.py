"""The checkpoint records (regionclip.model_zoo): official files are recognised by name and
layout and bring their configs, RPNs and text towers; toy-world checkpoints their toy configs."""
import pytest
from _api_utils import save_checkpoint_files, scene, tiny_detector
from _checkpoint_utils import finetuned_shapes, make_state_dict

from regionclip.checkpoint import save_checkpoint
from regionclip.engine.weights import resolve_spec
from regionclip.model_zoo import DETECTOR_WEIGHTS, RPN_WEIGHTS, config_path, inspect_checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return save_checkpoint_files(tmp_path_factory.mktemp("zoo"))


def test_records_name_existing_configs_and_derived_sizes():
    for record in DETECTOR_WEIGHTS.values():
        config_path(record.config)
        assert record.rpn in RPN_WEIGHTS
        assert record.has_text_tower == (record.kind == "pretrained")
    for rpn in RPN_WEIGHTS.values():
        config_path(rpn.config)
    rn50, rn50x4 = (DETECTOR_WEIGHTS[f"regionclip_finetuned-lvis_{v}.pth"]
                    for v in ("rn50", "rn50x4"))
    assert (rn50.embed_dim, rn50.pooler_resolution) == (1024, 14)
    assert (rn50x4.embed_dim, rn50x4.pooler_resolution) == (640, 18)
    assert RPN_WEIGHTS[rn50x4.rpn].lsj


@pytest.mark.parametrize("variant, rpn", [("RN50", True), ("RN50x4", False)])
def test_inspect_checkpoint_reads_the_official_layouts(tmp_path, variant, rpn):
    path = str(tmp_path / "weights.pth")
    save_checkpoint(path, make_state_dict(finetuned_shapes(variant, rpn)))
    contents = inspect_checkpoint(path)
    assert (contents.variant, contents.has_text_tower) == (variant, False)
    assert contents.rpn_layout == ("FPN" if rpn else "")


def test_official_file_names_bring_their_settings(files, tmp_path):
    path = tmp_path / "regionclip_finetuned-coco_rn50.pth"
    path.write_bytes(open(files["finetuned"], "rb").read())
    detector = tiny_detector(str(path), tmp_path, score_threshold=0.2, max_detections=7,
                             precision="fp32-fast")
    assert detector.model.precision == "fp32-fast"
    settings = detector.model.roi_heads.inference_settings
    assert not settings.soft_nms  # with a config of one's own, the official additions go
    assert (settings.score_thresh, settings.detections_per_image) == (0.2, 7)
    assert detector.model.proposal_source == "RPN"
    spec = resolve_spec(str(path), variant="tiny")
    assert spec.overrides == ("MODEL.ROI_HEADS.SOFT_NMS_ENABLED", True)  # as the eval script
    assert spec.config == config_path(DETECTOR_WEIGHTS[path.name].config)
    assert spec.text_weights == ""  # no pretrained file beside it


def test_integer_thresholds_are_taken_as_numbers(files, tmp_path):
    """``score_threshold=0`` is a float setting given as an int (yacs refused the text "0")."""
    detector = tiny_detector(files["finetuned"], tmp_path, score_threshold=0, nms_threshold=1)
    settings = detector.model.roi_heads.inference_settings
    assert (settings.score_thresh, settings.nms_thresh) == (0.0, 1.0)


def test_companion_files_are_found_in_the_pretrained_ckpt_layout(files, tmp_path):
    (tmp_path / "regionclip").mkdir()
    (tmp_path / "rpn").mkdir()
    weights = tmp_path / "regionclip" / "regionclip_finetuned-coco_rn50.pth"
    weights.write_bytes(open(files["gt_only"], "rb").read())  # no offline RPN inside
    text = tmp_path / "regionclip" / "regionclip_pretrained-cc_rn50.pth"
    text.write_bytes(open(files["pretrained"], "rb").read())
    (tmp_path / "rpn" / "rpn_coco_48.pth").write_bytes(b"")
    spec = resolve_spec(str(weights), variant="tiny")
    assert (spec.text_weights, spec.rpn_weights) == (str(text), str(tmp_path / "rpn" /
                                                                    "rpn_coco_48.pth"))
    assert spec.rpn == RPN_WEIGHTS["rpn_coco_48.pth"]


def test_toy_world_checkpoints_bring_the_toy_world_configs(tmp_path):
    # A toy-world detector (random weights, the toy RPN inside) and a toy CLIP teacher as its
    # text tower: Detector finds the toy configs from the variant alone and detects.
    from regionclip.api import Detector
    from regionclip.config import load_config
    from regionclip.modeling.build import build_model

    def save(config, name, overrides=()):
        model = build_model(load_config(config_path(config), ["MODEL.DEVICE", "cpu",
                                                                *overrides]))
        save_checkpoint(str(tmp_path / name), model.state_dict())
        return str(tmp_path / name)

    weights = save("toyworld/zero_shot.yaml", "student.pth")
    teacher = save("toyworld/clip_teacher.yaml", "teacher.pth")
    spec = resolve_spec(weights)
    assert spec.variant == "toy"
    assert spec.config == config_path("toyworld/zero_shot.yaml")
    assert spec.rpn.config == "toyworld/rpn.yaml" and spec.rpn_weights == ""
    detector = Detector.from_pretrained(weights, text_weights=teacher, device="cpu",
                                        score_threshold=0.0, progress=False)
    detector.set_vocabulary(["heart", "star"])
    result = detector(scene(seed=3))
    assert len(result) > 0 and set(result.labels) <= {"heart", "star"}
