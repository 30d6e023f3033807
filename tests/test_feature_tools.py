"""tools/extract_region_features.py and tools/extract_concept_features.py on the tiny CLIP
variant: features aligned with their boxes and equal to the model's, concept embeddings equal to
open_clip's prompt-template mean."""
import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
from _clip_utils import openclip_reference, text_state_dict
from _data_utils import coco_json_dataset
from _e2e_utils import (
    TINY_CONFIG,
    TINY_RPN_FPN,
    rectangles_image,
    save_checkpoint_file,
    save_embedding_file,
    tiny_checkpoint,
)
from _tool_utils import load_tool
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES
from PIL import Image

from regionclip.config import load_config
from regionclip.data.coco import load_image_folder
from regionclip.data.mapper import build_inference_mapper
from regionclip.engine.weights import load_weights
from regionclip.modeling.build import build_model
from regionclip.structures import Boxes, Instances

TINY_DIM = 32


# ------------------------------------------------------------------------------------------
# extract_region_features
# ------------------------------------------------------------------------------------------
def _region_feature_argv(tmp_path, with_vocabulary):
    weights = tiny_checkpoint(tmp_path / "tiny_rpn.pth", rpn=True)
    vocabulary = []
    if with_vocabulary:
        vocabulary = ["MODEL.CLIP.TEXT_EMB_PATH",
                      save_embedding_file(tmp_path / "emb.pth", 3, TINY_DIM, seed=3)]
    output = tmp_path / ("feats_vocab" if with_vocabulary else "feats")
    return ["--config-file", str(TINY_CONFIG), "MODEL.WEIGHTS", weights, *vocabulary,
            "MODEL.CLIP.CROP_REGION_TYPE", "RPN", "MODEL.CLIP.MULTIPLY_RPN_SCORE", "True",
            "MODEL.CLIP.NO_BOX_DELTA", "True",
            "MODEL.CLIP.OFFLINE_RPN_CONFIG", str(TINY_RPN_FPN),
            "INPUT_DIR", str(tmp_path / "images"), "OUTPUT_DIR", str(output)]


@pytest.fixture
def region_images(tmp_path):
    folder = tmp_path / "images"
    os.makedirs(folder)
    Image.fromarray(rectangles_image(48, 64, seed=1)).save(folder / "b.png")
    Image.fromarray(rectangles_image(60, 40, seed=2)).save(folder / "a.jpg", quality=95)
    return folder


def _embed_at_original_boxes(model, cfg, record, boxes):
    """Region embeddings recomputed for boxes given in original-image pixels."""
    inputs = build_inference_mapper(cfg)(record)
    height, width = inputs["image"].shape[-2:]
    scale = torch.tensor([width / record["width"], height / record["height"]] * 2)
    return model.embed_regions([inputs], [boxes * scale])


@torch.no_grad()
def test_region_features_are_aligned_in_both_modes(tmp_path, region_images):
    extract = load_tool("extract_region_features").main
    argv = _region_feature_argv(tmp_path, with_vocabulary=False)
    extract(argv)
    extract(_region_feature_argv(tmp_path, with_vocabulary=True))
    cfg = load_config(argv[1], argv[2:])
    model = build_model(cfg)
    load_weights(cfg, model)
    model.eval()
    vocabulary = torch.load(tmp_path / "emb.pth")
    for record in load_image_folder(str(region_images)):
        stem = os.path.splitext(os.path.basename(record["file_name"]))[0]
        plain = torch.load(tmp_path / "feats" / f"{stem}.pth")
        assert sorted(plain) == ["boxes", "feats"] and len(plain["boxes"]) > 0
        torch.testing.assert_close(
            plain["feats"], _embed_at_original_boxes(model, cfg, record, plain["boxes"]),
            rtol=1e-4, atol=1e-4)

        detected = torch.load(tmp_path / "feats_vocab" / f"{stem}.pth")
        assert sorted(detected) == ["boxes", "classes", "feats", "probs"]
        assert len(detected["boxes"]) > 0 and detected["probs"].shape[1] == 3 + 1
        # each detection is an unregressed proposal; its row must carry that proposal's feats
        match = torch.cdist(detected["boxes"], plain["boxes"]).argmin(dim=1)
        torch.testing.assert_close(detected["boxes"], plain["boxes"][match])
        torch.testing.assert_close(detected["feats"], plain["feats"][match])
        # probs: softmax over cosine / 0.01 with a zero background logit, from feats alone
        logits = F.normalize(detected["feats"], dim=1) @ F.normalize(vocabulary, dim=1).T
        logits = torch.cat([logits, torch.zeros(len(logits), 1)], dim=1) / 0.01
        torch.testing.assert_close(detected["probs"], logits.softmax(dim=1))
        torch.testing.assert_close(detected["probs"].sum(dim=1), torch.ones(len(logits)))


@torch.no_grad()
def test_region_features_stay_aligned_when_empty_boxes_are_dropped(tmp_path):
    """An empty proposal is dropped by postprocess together with its feature row (the
    original kept the row, misaligning every following one)."""
    module = load_tool("extract_region_features")
    cfg = load_config(str(TINY_CONFIG), ["MODEL.CLIP.CROP_REGION_TYPE", "RPN",
                                         "MODEL.CLIP.OFFLINE_RPN_CONFIG", str(TINY_RPN_FPN)])
    model = build_model(cfg).eval()
    image = torch.rand(3, 64, 96) * 255
    boxes = torch.tensor([[4.0, 4.0, 40.0, 30.0], [20.0, 10.0, 20.0, 50.0],  # the second is empty
                          [50.0, 5.0, 90.0, 60.0]])
    proposals = [Instances((64, 96), proposal_boxes=Boxes(boxes), objectness_logits=torch.ones(3))]
    model.get_proposals = lambda batched_inputs: proposals
    output = module.extract(model, {"image": image, "height": 32, "width": 48}, False)
    expected = model.embed_regions([{"image": image}], [boxes[[0, 2]]])
    torch.testing.assert_close(output["boxes"], boxes[[0, 2]] / 2)
    torch.testing.assert_close(output["feats"], expected)


def test_region_features_reject_ground_truth_regions(tmp_path, region_images):
    argv = _region_feature_argv(tmp_path, with_vocabulary=False)
    argv[argv.index("RPN")] = "GT"
    with pytest.raises(ValueError, match="CROP_REGION_TYPE RPN"):
        load_tool("extract_region_features").main(argv)


def test_region_features_refuse_images_sharing_a_name(tmp_path, region_images):
    Image.fromarray(rectangles_image(30, 30)).save(region_images / "a.png")
    with pytest.raises(ValueError, match=r"share the name\(s\) \['a'\]"):
        load_tool("extract_region_features").main(_region_feature_argv(tmp_path, False))


# ------------------------------------------------------------------------------------------
# extract_concept_features
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def _reference_concept_embeddings(reference_model, names):
    """Mean of the unnormalised open_clip text embeddings over RegionCLIP's 81 prompts: a bare
    "<name>." and OpenAI's 80 ImageNet templates."""
    prompts = [p for name in names
               for p in [f"{name}."] + [template(name) for template in OPENAI_IMAGENET_TEMPLATES]]
    embeddings = reference_model.encode_text(open_clip.tokenize(prompts))
    return embeddings.view(len(names), 81, -1).mean(dim=1)


def test_concept_features_equal_open_clip_template_mean(tmp_path):
    reference = openclip_reference("tiny")
    weights = save_checkpoint_file(
        tmp_path / "tiny_text.pth",
        {f"lang_encoder.{k}": v for k, v in text_state_dict(reference).items()})
    concepts = tmp_path / "concepts"
    os.makedirs(concepts)
    names = ["dog", "traffic light", "teddy bear"]
    (concepts / "concepts.txt").write_text("\n".join(names) + "\n")
    argv = ["--config-file", str(TINY_CONFIG), "MODEL.WEIGHTS", weights,
            "INPUT_DIR", str(concepts), "OUTPUT_DIR", str(tmp_path / "out"),
            "MODEL.CLIP.GET_CONCEPT_EMB", "True"]
    load_tool("extract_concept_features").main(argv)
    embeddings = torch.load(tmp_path / "out/concept_embeds.pth")
    assert embeddings.dtype == torch.float32 and embeddings.shape == (3, TINY_DIM)
    torch.testing.assert_close(embeddings, _reference_concept_embeddings(reference, names),
                               rtol=1e-4, atol=1e-5)

    json_path, _, _ = coco_json_dataset(tmp_path / "data", num_images=1)
    output = load_tool("extract_concept_features").main(
        ["--names", json_path, "--output", str(tmp_path / "coco.pth")] + argv)
    coco_names = ["person", "car", "dog"]  # the json's categories in id order
    torch.testing.assert_close(torch.load(output),
                               _reference_concept_embeddings(reference, coco_names),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tool", ["extract_concept_features", "extract_region_features"])
def test_feature_tools_say_the_training_flags_change_nothing(tool, capsys):
    """They accept detectron2's training and launch flags, as the original's did, but run in
    one process and train nothing; their help says so."""
    with pytest.raises(SystemExit):
        load_tool(tool).main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    for flag in ("--resume", "--eval-only", "--num-gpus"):
        assert any(flag in line and "no effect here" in line for line in lines), flag
