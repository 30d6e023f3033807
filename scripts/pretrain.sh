#!/usr/bin/env bash
# RegionCLIP pretraining on image-text pairs, one torchrun per machine (the original: 2 machines
# x 16 GPUs, batch 96). Run it on every machine with the same MASTER_ADDR / MASTER_PORT and that
# machine's NODE_RANK (0 .. NNODES-1), e.g.  NODE_RANK=1 MASTER_ADDR=10.0.0.1 bash pretrain.sh
# The original marked its pretraining configs as untested, and its image-text data is unreleased.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

NNODES="${NNODES:-2}"
NPROC_PER_NODE="${NPROC_PER_NODE:-16}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-12345}"

# ResNet50
torchrun \
  --nnodes "$NNODES" \
  --nproc_per_node "$NPROC_PER_NODE" \
  --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" \
  --master_port "$MASTER_PORT" \
  ./tools/train_net.py \
  --num-gpus "$NPROC_PER_NODE" \
  --config-file ./configs/pretrain/RegionCLIP_RN50.yaml \
  MODEL.WEIGHTS ./pretrained_ckpt/clip/teacher_RN50_student_RN50_OAI_CLIP.pth \
  MODEL.CLIP.OFFLINE_RPN_CONFIG ./configs/LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml \
  MODEL.CLIP.BB_RPN_WEIGHTS ./pretrained_ckpt/rpn/rpn_lvis_866.pth \
  MODEL.CLIP.CONCEPT_POOL_EMB ./pretrained_ckpt/concept_emb/coco_nouns_4764_emb.pth \
  OUTPUT_DIR ./output/pretrain

# # ResNet50x4
# torchrun \
#   --nnodes "$NNODES" \
#   --nproc_per_node "$NPROC_PER_NODE" \
#   --node_rank "$NODE_RANK" \
#   --master_addr "$MASTER_ADDR" \
#   --master_port "$MASTER_PORT" \
#   ./tools/train_net.py \
#   --num-gpus "$NPROC_PER_NODE" \
#   --config-file ./configs/pretrain/RegionCLIP_RN50x4.yaml \
#   MODEL.WEIGHTS ./pretrained_ckpt/clip/teacher_RN50x4_student_RN50x4_OAI_CLIP.pth \
#   MODEL.CLIP.OFFLINE_RPN_CONFIG ./configs/LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml \
#   MODEL.CLIP.BB_RPN_WEIGHTS ./pretrained_ckpt/rpn/rpn_lvis_866.pth \
#   MODEL.CLIP.CONCEPT_POOL_EMB ./pretrained_ckpt/concept_emb/coco_nouns_4764_emb_rn50x4.pth \
#   OUTPUT_DIR ./output/pretrain
