#!/usr/bin/env bash
# RegionCLIP pretraining on image-text pairs (docs/PRETRAINING.md), one torchrun per machine:
#   bash pretrain.sh                  RN50 on all GPUs of this machine
#   bash pretrain.sh --resume         continue from the last checkpoint in ./output/pretrain
#   ARCH=RN50x4 bash pretrain.sh      RN50x4
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 bash pretrain.sh   then NODE_RANK=1 on machine 1
# Arguments are train_net flags (--resume); for other settings run the torchrun line yourself
# with KEY VALUE overrides. The configs' batch is 96 images (the original: 2 machines x 16 GPUs,
# 3 images each); it must divide by the number of processes. Data: DATASETS.PATH_TRAIN of the
# config, ./datasets/cc3m (image/text TSV pairs).
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")/.."

ARCH="${ARCH:-RN50}"
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
MASTER_PORT="${MASTER_PORT:-12345}"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
fi
if (( NPROC_PER_NODE < 1 )); then
  echo "No GPU found: set NPROC_PER_NODE to the number of processes to start" >&2
  exit 1
fi
TORCHRUN=(torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" --node_rank "$NODE_RANK"
          --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")

case "$ARCH" in
  RN50)
    "${TORCHRUN[@]}" ./tools/train_net.py "$@" \
      --config-file ./configs/pretrain/RegionCLIP_RN50.yaml \
      MODEL.WEIGHTS ./pretrained_ckpt/clip/teacher_RN50_student_RN50_OAI_CLIP.pth \
      MODEL.CLIP.OFFLINE_RPN_CONFIG ./configs/LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml \
      MODEL.CLIP.BB_RPN_WEIGHTS ./pretrained_ckpt/rpn/rpn_lvis_866.pth \
      MODEL.CLIP.CONCEPT_POOL_EMB ./pretrained_ckpt/concept_emb/coco_nouns_4764_emb.pth \
      OUTPUT_DIR ./output/pretrain
    ;;
  RN50x4)
    "${TORCHRUN[@]}" ./tools/train_net.py "$@" \
      --config-file ./configs/pretrain/RegionCLIP_RN50x4.yaml \
      MODEL.WEIGHTS ./pretrained_ckpt/clip/teacher_RN50x4_student_RN50x4_OAI_CLIP.pth \
      MODEL.CLIP.OFFLINE_RPN_CONFIG ./configs/LVISv1-InstanceSegmentation/mask_rcnn_R_50_FPN_1x.yaml \
      MODEL.CLIP.BB_RPN_WEIGHTS ./pretrained_ckpt/rpn/rpn_lvis_866.pth \
      MODEL.CLIP.CONCEPT_POOL_EMB ./pretrained_ckpt/concept_emb/coco_nouns_4764_emb_rn50x4.pth \
      OUTPUT_DIR ./output/pretrain_rn50x4
    ;;
  *)
    echo "ARCH must be RN50 or RN50x4, got $ARCH" >&2
    exit 1
    ;;
esac
