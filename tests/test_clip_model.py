"""CLIPModel: OpenAI CLIP's layout and outputs, its training step and its train_net run."""
import json
import os

import pytest
import torch
from _clip_utils import openclip_reference
from _tool_utils import run_train_net
from PIL import Image
from torch import nn

from regionclip.checkpoint import load_checkpoint, read_state_dict
from regionclip.config import get_cfg
from regionclip.config.variants import get_variant
from regionclip.engine.solver import build_optimizer
from regionclip.modeling.clip_model import CLIPModel, letterbox
from regionclip.modeling.clip_resnet import CLIPResNet
from regionclip.modeling.text_encoder import TextEncoder
from regionclip.prompts import tokenize

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "toyworld", "clip_teacher.yaml")


def _model(name="tiny"):
    torch.manual_seed(0)
    return CLIPModel(get_variant(name), MEAN, STD)


def test_state_dict_is_open_clips_and_outputs_match():
    reference = openclip_reference("tiny")
    model = _model()
    model.load_state_dict(reference.state_dict())  # strict: same keys and shapes
    model.eval()
    images = torch.randn(2, 3, 64, 64)
    tokens = tokenize(["a red star", "two circles and a moon"])
    with torch.no_grad():
        torch.testing.assert_close(model.visual.encode_image(images),
                                   reference.encode_image(images))
        torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens))


def test_checkpoint_loads_as_teacher_student_and_text_tower(tmp_path):
    model = _model()
    path = tmp_path / "model_final.pth"
    torch.save({"model": model.state_dict()}, path)
    assert read_state_dict(str(path))[1] == "openai_clip"
    holder = nn.Module()
    variant = get_variant("tiny")
    holder.backbone, holder.teacher_backbone = CLIPResNet(variant), CLIPResNet(variant)
    holder.lang_encoder = TextEncoder(variant)
    report = load_checkpoint(holder, str(path))
    assert not report.missing and not report.unexpected and not report.mismatched
    assert "logit_scale" in dict(report.dropped)
    for trunk in (holder.backbone, holder.teacher_backbone):
        torch.testing.assert_close(trunk.layer3[0].bn2.running_var,
                                   model.visual.layer3[0].bn2.running_var)


def test_letterbox_keeps_aspect_and_pads_with_zeros():
    image = torch.ones(3, 40, 80)
    boxed = letterbox(image, 64)
    assert boxed.shape == (3, 64, 64)
    assert torch.allclose(boxed[:, :32], torch.ones(3, 32, 64))
    assert boxed[:, 32:].abs().max() == 0


def _batch(count=4):
    generator = torch.Generator().manual_seed(1)
    captions = ["a red star", "a blue circle", "a green moon", "a white cross"]
    return [{"image": torch.rand(3, 48 + 8 * i, 64, generator=generator),
             "tokens": tokenize([captions[i]])} for i in range(count)]


def test_training_lowers_the_contrastive_loss_and_trains_batch_norm():
    model = _model().train()
    cfg = get_cfg()
    cfg.SOLVER.OPTIMIZER, cfg.SOLVER.BASE_LR = "ADAMW", 0.003
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW)
    batch = _batch()
    before = model.visual.bn1.running_mean.clone()
    losses = []
    for _ in range(15):
        loss = model(batch)["loss_img_txt"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(model.visual.bn1.running_mean, before)
    assert model.logit_scale.grad is not None


def test_eval_mode_forward_is_refused():
    with pytest.raises(RuntimeError, match="encode_image"):
        _model().eval()(_batch())


def test_unknown_optimizer_is_named():
    cfg = get_cfg()
    cfg.SOLVER.OPTIMIZER = "LAMB"
    with pytest.raises(ValueError, match="LAMB"):
        build_optimizer(cfg, _model())


def test_train_net_trains_a_clip_on_a_jsonl_folder(tmp_path):
    folder = tmp_path / "pairs"
    (folder / "images").mkdir(parents=True)
    with open(folder / "captions.jsonl", "w") as f:
        for i, color in enumerate(("red", "green", "blue", "white")):
            Image.new("RGB", (40 + 8 * i, 32), color).save(folder / "images" / f"{i}.png")
            f.write(json.dumps({"file_name": f"images/{i}.png", "captions": [f"{color}"]}) + "\n")
    output = tmp_path / "out"
    run_train_net(["--config-file", CONFIG, "MODEL.CLIP.VARIANT", "tiny",
                   "DATASETS.PATH_TRAIN", f'("{folder}",)', "SOLVER.IMS_PER_BATCH", 4,
                   "SOLVER.MAX_ITER", 2, "SOLVER.WARMUP_ITERS", 0, "AUG.TRAIN.IMAGE_SIZE", "[32]",
                   "OUTPUT_DIR", output])
    state, fmt = read_state_dict(str(output / "model_final.pth"))
    assert fmt == "openai_clip"
    reference = openclip_reference("tiny").state_dict()
    assert set(state) == set(reference)
    lines = [json.loads(line) for line in open(output / "metrics.json")]
    assert lines and "loss_img_txt" in lines[-1]
