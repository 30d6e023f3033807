"""Checkpoint reading, conversion, architecture checks, reports and atomic saving.

Checkpoints are generated with the official key names and shapes (tests/_checkpoint_utils.py);
OpenAI CLIP files come from open_clip's CLIP model, an independent source of OpenAI naming.
"""
import logging
import os
import zipfile

import pytest
import torch
from _checkpoint_utils import (
    box_predictor_shapes,
    clip_resnet_shapes,
    finetuned_shapes,
    keys_under,
    make_state_dict,
    mask_rcnn_roi_heads_shapes,
    module_from_shapes,
    official_tsv_dir,
    offline_rpn_shapes,
    prefixed,
    pretrained_shapes,
    r50_fpn_rpn_shapes,
    read_tsv,
)
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch import nn

from regionclip.checkpoint import (
    VOCABULARY_KEYS,
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
    read_state_dict,
    save_checkpoint,
)
from regionclip.config.variants import get_variant
from regionclip.modeling.clip_resnet import CLIPResNet
from regionclip.modeling.text_encoder import TextEncoder

# Loading into a meta-device target checks names and shapes without allocating; torch warns
# that copying into meta tensors is a no-op.
META_WARNING = "ignore:for .*copying from a non-meta parameter:UserWarning"
LAYOUTS = [(v, rpn) for v in ("RN50", "RN50x4") for rpn in (False, True)]


def _save(tmp_path, state_dict, name="model.pth", wrap=True):
    path = tmp_path / name
    torch.save({"model": state_dict, "iteration": 7} if wrap else state_dict, path)
    return str(path)


def _assert_values(model, expected):
    state = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(state[key], value.to(state[key].dtype)), key


@pytest.mark.parametrize("variant, rpn", LAYOUTS)
def test_generated_layout_equals_official_key_list(variant, rpn):
    folder = official_tsv_dir()
    if folder is None:
        pytest.skip("official key lists not available (set REGIONCLIP_OFFICIAL_KEYS)")
    official = read_tsv(folder / f"{variant.lower()}{'_rpn' if rpn else ''}.tsv")
    generated = finetuned_shapes(variant, rpn)
    assert {k: s for k, (s, _) in official.items()} == generated
    assert {dtype for _, dtype in official.values()} == {"float32"}


@pytest.mark.filterwarnings(META_WARNING)
@pytest.mark.parametrize("variant, rpn", LAYOUTS)
@pytest.mark.parametrize("layout", [pretrained_shapes, finetuned_shapes])
def test_official_layouts_load_completely(tmp_path, variant, rpn, layout):
    shapes = layout(variant, rpn)
    path = _save(tmp_path, make_state_dict(shapes))
    report = load_checkpoint(module_from_shapes(shapes, "meta"), path)
    assert report.format == "regionclip"
    assert sorted(report.loaded) == sorted(shapes)
    assert not (report.missing or report.unexpected or report.unused or report.mismatched
                or report.dropped)


def test_finetuned_rn50_values_are_loaded(tmp_path):
    shapes = finetuned_shapes("RN50", rpn=False)
    expected = make_state_dict(shapes, seed=3)
    model = module_from_shapes(shapes)
    report = load_checkpoint(model, _save(tmp_path, expected))
    assert not report.missing
    _assert_values(model, expected)


@pytest.mark.filterwarnings(META_WARNING)
def test_pretrained_into_zero_shot_model_reports_unused_parts(tmp_path):
    shapes = pretrained_shapes("RN50", rpn=True)
    model_shapes = finetuned_shapes("RN50", rpn=True)
    report = load_checkpoint(module_from_shapes(model_shapes, "meta"),
                             _save(tmp_path, make_state_dict(shapes)))
    assert sorted(report.unused) == sorted(
        keys_under(shapes, "teacher_backbone.") + keys_under(shapes, "lang_encoder."))
    assert not report.unexpected
    assert sorted(report.missing) == keys_under(model_shapes, "roi_heads.")
    summary = report.summary()
    assert "teacher_backbone (284 tensors)" in summary and "lang_encoder (149 tensors)" in summary
    assert "roi_heads: 4 tensors missing (kept their initialisation)" in summary


def test_missing_keys_are_grouped_by_module(tmp_path, caplog):
    model_shapes = box_predictor_shapes(1024)
    shapes = {k: s for k, s in model_shapes.items() if ".bbox_pred." not in k}
    with caplog.at_level(logging.INFO, logger="regionclip.checkpoint"):
        report = load_checkpoint(module_from_shapes(model_shapes),
                                 _save(tmp_path, make_state_dict(shapes)))
    line = "roi_heads.box_predictor.bbox_pred: 2 tensors missing (kept their initialisation)"
    assert line in report.summary()
    assert any(r.levelno == logging.WARNING and line in r.getMessage() for r in caplog.records)


@pytest.mark.filterwarnings(META_WARNING)
def test_rn50x4_file_into_rn50_model_names_both(tmp_path):
    path = _save(tmp_path, make_state_dict(finetuned_shapes("RN50x4", False)), "x4.pth")
    model = module_from_shapes(finetuned_shapes("RN50", False), "meta")
    with pytest.raises(CheckpointMismatchError) as err:
        load_checkpoint(model, path)
    message = str(err.value)
    for part in (path, "RN50x4 (attnpool 2560->640", "model's backbone is RN50 (attnpool "
                 "2048->1024", "MODEL.CLIP.VARIANT RN50x4", "MODEL.RESNETS.DEPTH 200"):
        assert part in message


@pytest.mark.filterwarnings(META_WARNING)
def test_teacher_variant_is_checked(tmp_path):
    path = _save(tmp_path, make_state_dict(pretrained_shapes("RN50", False, teacher="RN50x4")))
    model = module_from_shapes(pretrained_shapes("RN50", False), "meta")
    with pytest.raises(CheckpointMismatchError, match="MODEL.CLIP.TEACHER_VARIANT RN50x4"):
        load_checkpoint(model, path)


@pytest.mark.filterwarnings(META_WARNING)
def test_rpn_file_as_main_weights_is_refused(tmp_path):
    path = _save(tmp_path, make_state_dict(r50_fpn_rpn_shapes()))
    model = module_from_shapes(finetuned_shapes("RN50", True), "meta")
    with pytest.raises(CheckpointMismatchError, match="BB_RPN_WEIGHTS"):
        load_checkpoint(model, path)


def test_rpn_second_checkpoint_fills_offline_modules_only(tmp_path):
    clip_shapes = prefixed("backbone.", clip_resnet_shapes(get_variant("tiny")))
    model = module_from_shapes({**clip_shapes, **offline_rpn_shapes()})
    clip_values = make_state_dict(clip_shapes, seed=1)
    model.load_state_dict(clip_values, strict=False)
    rpn_file = make_state_dict({**r50_fpn_rpn_shapes(), **mask_rcnn_roi_heads_shapes()}, seed=2)
    report = load_checkpoint(model, _save(tmp_path, rpn_file), offline_rpn=True)
    assert report.format == "detectron2"
    assert not (report.missing or report.unexpected or report.mismatched)
    assert sorted(report.loaded) == sorted(offline_rpn_shapes())
    assert sorted(k for k, _ in report.dropped) == sorted(mask_rcnn_roi_heads_shapes())
    assert "roi_heads (5 tensors): not part of the offline RPN" in report.summary()
    _assert_values(model, clip_values)
    _assert_values(model, {"offline_" + k: v for k, v in rpn_file.items()
                           if not k.startswith("roi_heads.")})


def _open_clip_tiny():
    """open_clip's CLIP (OpenAI naming, nn.BatchNorm2d) in the tiny variant, every float
    tensor random (BN statistics too), so no value can match a fresh target by chance."""
    v = get_variant("tiny")
    vision = CLIPVisionCfg(layers=v.layers, width=v.width, image_size=v.image_size)
    text = CLIPTextCfg(context_length=v.context_length, vocab_size=v.vocab_size,
                       width=v.text_width, heads=v.text_heads, layers=v.text_layers)
    torch.manual_seed(0)
    model = CLIP(v.embed_dim, vision, text, quick_gelu=True).eval()
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor))
    return model


def _clip_target(teacher=False, text=True):
    model = nn.Module()
    model.backbone = CLIPResNet(get_variant("tiny"))
    if teacher:
        model.teacher_backbone = CLIPResNet(get_variant("tiny"))
    if text:
        model.lang_encoder = TextEncoder(get_variant("tiny"))
    return model


def _assert_openai_mapping(model, reference, report, teacher):
    ref = reference.state_dict()
    assert report.format == "openai_clip"
    assert not (report.missing or report.unexpected or report.mismatched)
    state = model.state_dict()
    for key, value in state.items():
        part, rest = key.split(".", 1)
        source = rest if part == "lang_encoder" else "visual." + rest
        assert torch.equal(value, ref[source]), key
    dropped = {k for k, _ in report.dropped}
    counters = [k for k in ref if k.endswith("num_batches_tracked")]
    assert "logit_scale" in dropped
    assert len([k for k in dropped if k.endswith("num_batches_tracked")]) == len(counters) * (
        2 if teacher else 1)


@pytest.mark.parametrize("teacher", [False, True])
def test_openai_state_dict_maps_visual_and_text(tmp_path, teacher):
    reference = _open_clip_tiny()
    path = _save(tmp_path, reference.state_dict(), "RN50.pth", wrap=False)
    model = _clip_target(teacher)
    report = load_checkpoint(model, path)
    _assert_openai_mapping(model, reference, report, teacher)


class _OpenAIArchive(nn.Module):
    """The top-level layout of OpenAI's released TorchScript models: CLIP's tensors plus the
    scalar buffers ``input_resolution``, ``context_length``, ``vocab_size``."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        for name, child in clip.named_children():
            self.add_module(name, child)
        for name, param in clip.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, value in (("input_resolution", 64), ("context_length", 77),
                            ("vocab_size", 49408)):
            self.register_buffer(name, torch.tensor(value))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")
def test_openai_torchscript_archive(tmp_path):
    reference = _OpenAIArchive(_open_clip_tiny())
    path = str(tmp_path / "RN50.pt")
    torch.jit.script(reference).save(path)
    assert any("/code/" in n for n in zipfile.ZipFile(path).namelist())
    model = _clip_target()
    report = load_checkpoint(model, path)
    _assert_openai_mapping(model, reference, report, teacher=False)
    assert {"input_resolution", "context_length", "vocab_size"} <= {k for k, _ in report.dropped}


def test_openai_text_unused_without_language_encoder(tmp_path):
    reference = _open_clip_tiny()
    path = _save(tmp_path, reference.state_dict(), wrap=False)
    report = load_checkpoint(_clip_target(text=False), path)
    assert report.unused and all(k.startswith("lang_encoder.") for k in report.unused)
    assert not (report.missing or report.unexpected)


def test_oai_clip_teacher_student_file_is_classified_by_keys(tmp_path):
    name = "teacher_RN50_student_RN50_OAI_CLIP.pth"
    raw = _save(tmp_path, _open_clip_tiny().state_dict(), name, wrap=False)
    assert read_state_dict(raw)[1] == "openai_clip"
    (tmp_path / "rc").mkdir()
    shapes = pretrained_shapes("RN50", rpn=False)
    renamed = _save(tmp_path / "rc", make_state_dict(keys_only(shapes, "lang_encoder.")), name)
    assert read_state_dict(renamed)[1] == "regionclip"


def keys_only(shapes, prefix):
    return {k: s for k, s in shapes.items() if k.startswith(prefix)}


def test_vocabulary_keys_keep_the_users_embeddings(tmp_path):
    shapes = box_predictor_shapes(32)
    stored = make_state_dict(shapes, seed=5)
    path = _save(tmp_path, stored)
    model = module_from_shapes(shapes)
    user = torch.randn(shapes["roi_heads.box_predictor.cls_score.weight"])
    model.roi_heads.box_predictor.cls_score.weight.copy_(user)
    report = load_checkpoint(model, path, skip_prefixes=VOCABULARY_KEYS)
    assert torch.equal(model.roi_heads.box_predictor.cls_score.weight, user)
    assert [k for k, _ in report.dropped] == ["roi_heads.box_predictor.cls_score.weight"]
    assert "skip_prefixes" in report.summary() and not report.missing
    _assert_values(model, {k: v for k, v in stored.items() if "cls_score" not in k})
    load_checkpoint(model, path)
    assert torch.equal(model.roi_heads.box_predictor.cls_score.weight, stored[
        "roi_heads.box_predictor.cls_score.weight"])


def test_shape_mismatch_is_skipped_and_reported(tmp_path):
    path = _save(tmp_path, make_state_dict(box_predictor_shapes(32, num_classes=65)))
    model = module_from_shapes(box_predictor_shapes(32, num_classes=48))
    report = load_checkpoint(model, path)
    key = "roi_heads.box_predictor.cls_score.weight"
    assert report.mismatched == [(key, (65, 32), (48, 32))]
    assert key not in report.missing and len(report.loaded) == 3
    assert not model.state_dict()[key].any()
    assert "checkpoint (65, 32) vs model (48, 32)" in report.summary()


def test_unknown_layout_lists_prefixes(tmp_path):
    path = _save(tmp_path, {"encoder.weight": torch.ones(2), "head.bias": torch.ones(1)})
    with pytest.raises(CheckpointError, match=r"\['encoder', 'head'\].*expected RegionCLIP"):
        read_state_dict(path)


def test_missing_file_points_to_model_zoo(tmp_path):
    path = str(tmp_path / "regionclip_pretrained-cc_rn50.pth")
    with pytest.raises(FileNotFoundError, match="MODEL_ZOO.md") as err:
        read_state_dict(path)
    assert path in str(err.value)


@pytest.mark.parametrize("content, match", [
    (b"hello, not weights", "not a PyTorch checkpoint"),
    (b"", "not a PyTorch checkpoint"),
    (b"PK\x03\x04truncated", "not a readable PyTorch checkpoint"),
])
def test_garbage_files_are_refused(tmp_path, content, match):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as err:
        read_state_dict(str(path))
    assert str(path) in str(err.value)


def test_non_checkpoint_objects_are_refused(tmp_path):
    tensor_file = _save(tmp_path, torch.ones(3), "tensor.pth", wrap=False)
    with pytest.raises(CheckpointError, match="not a checkpoint.*Tensor"):
        read_state_dict(tensor_file)
    np = pytest.importorskip("numpy")
    numpy_file = _save(tmp_path, {"model": {"w": np.zeros(3)}, "__author__": "x"}, "np.pth",
                       wrap=False)
    with pytest.raises(CheckpointError, match="other than tensors"):
        read_state_dict(numpy_file)


def test_pkl_is_not_supported(tmp_path):
    path = tmp_path / "R-50.pkl"
    path.write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match=r"\.pkl checkpoints .* not supported"):
        read_state_dict(str(path))


def test_save_checkpoint_roundtrip(tmp_path):
    state = {"w": torch.arange(4.0)}
    path = tmp_path / "out" / "model_final.pth"
    save_checkpoint(path, state, iteration=12)
    assert os.listdir(tmp_path / "out") == ["model_final.pth"]
    saved = torch.load(path, weights_only=True)
    assert saved["iteration"] == 12 and torch.equal(saved["model"]["w"], state["w"])
    with pytest.raises(ValueError, match="'model' is reserved"):
        save_checkpoint(path, state, model={})


def test_failed_save_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "model_final.pth"
    save_checkpoint(path, {"w": torch.zeros(2)})
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"w": torch.ones(2)})
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "new.pth", {"w": torch.ones(2)})
    assert sorted(os.listdir(tmp_path)) == ["model_final.pth"]
    assert path.read_bytes() == before


def test_rn50_pretrained_into_real_clip_modules(tmp_path):
    shapes = pretrained_shapes("RN50", rpn=False)
    stored = make_state_dict(shapes, seed=11)
    model = nn.Module()
    model.backbone = CLIPResNet(get_variant("RN50"))
    model.lang_encoder = TextEncoder(get_variant("RN50"))
    report = load_checkpoint(model, _save(tmp_path, stored))
    assert not (report.missing or report.unexpected or report.mismatched)
    assert sorted(report.unused) == keys_under(shapes, "teacher_backbone.")
    _assert_values(model, {k: v for k, v in stored.items() if not k.startswith("teacher_")})


BG, BBOX = "roi_heads.box_predictor.cls_bg_score", "roi_heads.box_predictor.bbox_pred"


def test_keys_missing_by_design_are_reported_at_info_with_their_reason(tmp_path, caplog):
    model_shapes = box_predictor_shapes(1024)
    kept = "roi_heads.box_predictor.cls_score.weight"
    path = _save(tmp_path, make_state_dict({kept: model_shapes[kept]}))
    by_design = {BG: "fixed at zero", BBOX: "deltas not applied"}
    with caplog.at_level(logging.INFO, logger="regionclip.checkpoint"):
        report = load_checkpoint(module_from_shapes(model_shapes), path, by_design=by_design)
    assert report.missing == []
    assert sorted(report.missing_by_design) == [f"{BBOX}.bias", f"{BBOX}.weight", f"{BG}.weight"]
    info = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert f"Missing by design (kept their initialisation): {BBOX} (2 tensors): deltas not " \
           "applied" in info
    assert f"Missing by design (kept their initialisation): {BG} (1 tensors): fixed at zero" in info
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_by_design_hides_no_other_gap_and_still_loads_what_the_file_has(tmp_path, caplog):
    model_shapes = box_predictor_shapes(1024)
    gap = "roi_heads.box_predictor.cls_score.weight"
    state = make_state_dict({k: s for k, s in model_shapes.items() if k != gap}, seed=3)
    model = module_from_shapes(model_shapes)
    by_design = {BG: "fixed at zero", BBOX: "deltas not applied",
                 "roi_heads.box_predictor.cls": "a prefix is a module path, not a string start"}
    with caplog.at_level(logging.INFO, logger="regionclip.checkpoint"):
        report = load_checkpoint(model, _save(tmp_path, state), by_design=by_design)
    assert report.missing == [gap] and report.missing_by_design == []
    _assert_values(model, state)
    assert "Missing by design" not in report.summary()
    line = "roi_heads.box_predictor.cls_score: 1 tensors missing (kept their initialisation)"
    assert any(r.levelno == logging.WARNING and line in r.getMessage() for r in caplog.records)
