#!/usr/bin/env bash
# Extract region boxes and embeddings for every image in INPUT_DIR into OUTPUT_DIR/<image>.pth.
# With TEXT_EMB_PATH the regions are also classified (classes, probs) and per-class NMS'd.
# The first command runs; the others are variants to swap in.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

# RN50, regions classified over the 1203 LVIS concepts
python3 ./tools/extract_region_features.py \
  --config-file ./configs/LVISv1-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml \
  MODEL.WEIGHTS ./pretrained_ckpt/regionclip/regionclip_pretrained-cc_rn50.pth \
  MODEL.CLIP.TEXT_EMB_PATH ./pretrained_ckpt/concept_emb/lvis_1203_cls_emb.pth \
  MODEL.CLIP.CROP_REGION_TYPE RPN \
  MODEL.CLIP.MULTIPLY_RPN_SCORE True \
  MODEL.CLIP.OFFLINE_RPN_CONFIG ./configs/LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml \
  MODEL.CLIP.BB_RPN_WEIGHTS ./pretrained_ckpt/rpn/rpn_lvis_866.pth \
  INPUT_DIR ./datasets/custom_images \
  OUTPUT_DIR ./output/region_feats \
  TEST.DETECTIONS_PER_IMAGE 100

# # RN50, features of the top 100 RPN proposals (no classification)
# python3 ./tools/extract_region_features.py \
#   --config-file ./configs/LVISv1-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml \
#   MODEL.WEIGHTS ./pretrained_ckpt/regionclip/regionclip_pretrained-cc_rn50.pth \
#   MODEL.CLIP.CROP_REGION_TYPE RPN \
#   MODEL.CLIP.MULTIPLY_RPN_SCORE True \
#   MODEL.CLIP.OFFLINE_RPN_CONFIG ./configs/LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml \
#   MODEL.CLIP.BB_RPN_WEIGHTS ./pretrained_ckpt/rpn/rpn_lvis_866.pth \
#   INPUT_DIR ./datasets/custom_images \
#   OUTPUT_DIR ./output/region_feats \
#   MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST 100

# # RN50x4, regions classified over the 1203 LVIS concepts
# python3 ./tools/extract_region_features.py \
#   --config-file ./configs/LVISv1-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml \
#   MODEL.WEIGHTS ./pretrained_ckpt/regionclip/regionclip_pretrained-cc_rn50x4.pth \
#   MODEL.CLIP.TEXT_EMB_PATH ./pretrained_ckpt/concept_emb/lvis_1203_cls_emb_rn50x4.pth \
#   MODEL.CLIP.CROP_REGION_TYPE RPN \
#   MODEL.CLIP.MULTIPLY_RPN_SCORE True \
#   MODEL.CLIP.OFFLINE_RPN_CONFIG ./configs/LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml \
#   MODEL.CLIP.BB_RPN_WEIGHTS ./pretrained_ckpt/rpn/rpn_lvis_866.pth \
#   MODEL.CLIP.TEXT_EMB_DIM 640 \
#   MODEL.RESNETS.DEPTH 200 \
#   MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION 18 \
#   INPUT_DIR ./datasets/custom_images \
#   OUTPUT_DIR ./output/region_feats \
#   TEST.DETECTIONS_PER_IMAGE 100
