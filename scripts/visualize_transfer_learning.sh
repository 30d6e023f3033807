#!/usr/bin/env bash
# Detect the 1203 LVIS classes on the images in datasets/custom_images with the detector
# fine-tuned on the 866 LVIS base classes, then draw the results into output/regions.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

# Fine-tuned from RegionCLIP (RN50x4)
python3 ./tools/train_net.py \
  --eval-only \
  --num-gpus 1 \
  --config-file ./configs/LVISv1-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_custom_img.yaml \
  MODEL.WEIGHTS ./pretrained_ckpt/regionclip/regionclip_finetuned-lvis_rn50x4.pth \
  MODEL.CLIP.TEXT_EMB_PATH ./pretrained_ckpt/concept_emb/lvis_1203_cls_emb_rn50x4.pth \
  MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH ./pretrained_ckpt/concept_emb/lvis_1203_cls_emb_rn50x4.pth \
  MODEL.CLIP.OFFLINE_RPN_CONFIG ./configs/LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml \
  MODEL.CLIP.BB_RPN_WEIGHTS ./pretrained_ckpt/rpn/rpn_lvis_866_lsj.pth \
  MODEL.CLIP.OFFLINE_RPN_LSJ_PRETRAINED True \
  MODEL.CLIP.TEXT_EMB_DIM 640 \
  MODEL.RESNETS.DEPTH 200 \
  MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION 18 \
  MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION 18 \
  MODEL.RESNETS.RES2_OUT_CHANNELS 320

# Draw the predictions of the results json
python3 ./tools/visualize_json_results.py \
  --input ./output/inference/lvis_instances_results.json \
  --output ./output/regions \
  --dataset lvis_v1_val_custom_img \
  --conf-threshold 0.05 \
  --show-unique-boxes \
  --max-boxes 25 \
  --small-region-px 8100

# # Fine-tuned from RegionCLIP (RN50)
# python3 ./tools/train_net.py \
#   --eval-only \
#   --num-gpus 1 \
#   --config-file ./configs/LVISv1-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_custom_img.yaml \
#   MODEL.WEIGHTS ./pretrained_ckpt/regionclip/regionclip_finetuned-lvis_rn50.pth \
#   MODEL.CLIP.TEXT_EMB_PATH ./pretrained_ckpt/concept_emb/lvis_1203_cls_emb.pth \
#   MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH ./pretrained_ckpt/concept_emb/lvis_1203_cls_emb.pth \
#   MODEL.CLIP.OFFLINE_RPN_CONFIG ./configs/LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml \
#   MODEL.CLIP.BB_RPN_WEIGHTS ./pretrained_ckpt/rpn/rpn_lvis_866_lsj.pth \
#   MODEL.CLIP.OFFLINE_RPN_LSJ_PRETRAINED True
#
# python3 ./tools/visualize_json_results.py \
#   --input ./output/inference/lvis_instances_results.json \
#   --output ./output/regions \
#   --dataset lvis_v1_val_custom_img \
#   --conf-threshold 0.05 \
#   --show-unique-boxes \
#   --max-boxes 25 \
#   --small-region-px 8100
