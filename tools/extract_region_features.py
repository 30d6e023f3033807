#!/usr/bin/env python3
r"""Region proposals and their CLIP region embeddings for every image of a folder.

    python tools/extract_region_features.py \
        --config-file configs/LVISv1-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml \
        MODEL.WEIGHTS regionclip_pretrained-cc_rn50.pth \
        MODEL.CLIP.TEXT_EMB_PATH lvis_1203_cls_emb.pth MODEL.CLIP.CROP_REGION_TYPE RPN \
        MODEL.CLIP.OFFLINE_RPN_CONFIG \
        configs/LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml \
        MODEL.CLIP.BB_RPN_WEIGHTS rpn_lvis_866.pth \
        INPUT_DIR ./datasets/custom_images OUTPUT_DIR ./output/region_feats

Writes ``OUTPUT_DIR/<image name without extension>.pth`` per image (sorted by name): a dict of
CPU tensors whose rows all describe the same region.

- without a vocabulary (no ``MODEL.CLIP.TEXT_EMB_PATH``): ``boxes`` [N, 4] (the proposals, XYXY
  in original-image pixels) and ``feats`` [N, D] (unnormalised attention-pool embeddings);
- with one: the detections after score threshold and per-class NMS: ``boxes``, ``classes`` [N],
  ``probs`` [N, C+1] (softmax over the vocabulary and background, last; not fused with the RPN
  score) and ``feats`` of the proposal each detection came from.
"""
import os
import sys
from collections import Counter
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
import tqdm

from regionclip.atomic import atomic_open
from regionclip.config import load_config
from regionclip.data.coco import load_image_folder
from regionclip.data.mapper import build_inference_mapper
from regionclip.engine.defaults import default_argument_parser, run_tool, setup_logging
from regionclip.engine.preflight import FOLDER, Input, check_inputs, model_inputs
from regionclip.engine.weights import load_weights
from regionclip.modeling.build import build_model
from regionclip.modeling.detector import postprocess
from regionclip.structures import Instances


def check_config(cfg) -> None:
    if cfg.MODEL.META_ARCHITECTURE != "CLIPFastRCNN":
        raise ValueError(f"region features need MODEL.META_ARCHITECTURE CLIPFastRCNN, got "
                         f"{cfg.MODEL.META_ARCHITECTURE!r}")
    if cfg.MODEL.CLIP.CROP_REGION_TYPE != "RPN":
        raise ValueError("region features are extracted for RPN proposals: set "
                         "MODEL.CLIP.CROP_REGION_TYPE RPN and MODEL.CLIP.OFFLINE_RPN_CONFIG")


def output_paths(records: Sequence[Dict], output_dir: str) -> List[str]:
    """``output_dir/<stem>.pth`` per image; two images may not share a stem."""
    stems = [os.path.splitext(os.path.basename(r["file_name"]))[0] for r in records]
    clashes = sorted(stem for stem, count in Counter(stems).items() if count > 1)
    if clashes:
        raise ValueError(f"several images of the input folder share the name(s) {clashes[:5]} "
                         "(up to the extension); their feature files would overwrite each other")
    return [os.path.join(output_dir, f"{stem}.pth") for stem in stems]


@torch.no_grad()
def extract(model, batched_input: Dict, with_vocabulary: bool) -> Dict[str, torch.Tensor]:
    """The output dict (see the module docstring) of one mapped image."""
    if with_vocabulary:
        result = model.inference([batched_input], keep_embeddings=True)[0]["instances"]
        feats = result.region_embeddings
        probs = F.softmax(model.roi_heads.box_predictor(feats)[0], dim=-1)
        output = {"boxes": result.pred_boxes.tensor, "feats": feats,
                  "classes": result.pred_classes, "probs": probs}
    else:
        proposals = model.get_proposals([batched_input])[0]
        boxes = proposals.proposal_boxes.clone()
        feats = model.embed_regions([batched_input], [boxes.tensor])
        # postprocess may drop boxes that become empty at the original size; proposal_index
        # follows it, so the feature rows stay aligned with the boxes.
        index = torch.arange(len(boxes), device=feats.device)
        result = Instances(proposals.image_size, pred_boxes=boxes, proposal_index=index)
        result = postprocess(result, batched_input["height"], batched_input["width"])
        output = {"boxes": result.pred_boxes.tensor, "feats": feats[result.proposal_index]}
    return {key: value.detach().cpu() for key, value in output.items()}


def main(argv=None) -> List[str]:
    args = default_argument_parser(__doc__.splitlines()[0], training=False).parse_args(argv)
    cfg = load_config(args.config_file, args.opts)
    logger = setup_logging()
    check_config(cfg)
    check_inputs([Input(cfg.INPUT_DIR, "images (INPUT_DIR)", FOLDER), *model_inputs(cfg)])
    records = load_image_folder(cfg.INPUT_DIR)
    paths = output_paths(records, cfg.OUTPUT_DIR)
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    model = build_model(cfg)
    load_weights(cfg, model)
    model.eval()
    mapper = build_inference_mapper(cfg)
    clip = cfg.MODEL.CLIP
    with_vocabulary = bool(clip.TEXT_EMB_PATH or clip.OPENSET_TEST_TEXT_EMB_PATH)
    for record, path in zip(tqdm.tqdm(records, desc="Region features", unit="image"), paths):
        with atomic_open(path, "wb") as f:
            torch.save(extract(model, mapper(record), with_vocabulary), f)
    logger.info("Wrote region features of %d images to %s", len(records), cfg.OUTPUT_DIR)
    return paths


if __name__ == "__main__":
    sys.exit(run_tool(main, "extract_region_features"))
