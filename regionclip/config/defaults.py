"""The default configuration tree: detectron2 key names, RegionCLIP's ``MODEL.CLIP`` node.

Only keys that a shipped config, a README/script command line or a builder uses are here.
Values are detectron2's stock defaults and the original RegionCLIP defaults, except that
``None`` defaults became typed sentinels (``""``, ``0``, ``0.0``): yacs skips its type check
whenever either side is ``None``, so a typed default is what makes ``KEY VALUE`` overrides
type-safe. Each sentinel's meaning is stated next to its key.
"""
from fvcore.common.config import CfgNode

_C = CfgNode()

# Config format version; detectron2 yaml files carry ``VERSION: 2``.
_C.VERSION = 2

# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
_C.MODEL = CfgNode()
# CLIPFastRCNN, PretrainFastRCNN, GeneralizedRCNN, CustomRCNN (Detic)
_C.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
_C.MODEL.WEIGHTS = ""  # checkpoint to initialise from ("" = none)
_C.MODEL.DEVICE = "cuda"  # torch device string
# Sum < 3 selects 0-1 scaled input (CLIP); otherwise 0-255 (detectron2 BGR models).
_C.MODEL.PIXEL_MEAN = [103.530, 116.280, 123.675]
_C.MODEL.PIXEL_STD = [1.0, 1.0, 1.0]  # MSRA ResNets fold the std into conv1
_C.MODEL.MASK_ON = False  # build the mask head
_C.MODEL.LOAD_PROPOSALS = False  # read precomputed proposals instead of running an RPN
# Inference precision of CLIPFastRCNN (training is always fp32 / SOLVER.AMP). "fp32": exact, TF32
# off. Opt-in fast paths, same detections up to rounding: "fp32-fast" (BN folded into convs,
# channels-last, folded attention pool), "tf32" (+ TF32 on GPUs), "bf16" (+ bfloat16 trunk).
_C.MODEL.PRECISION = "fp32"
# Channels-last convolutions for the whole model, in training and inference (the layout tensor
# cores want). Measured on 2 CPU cores: toy-world training steps 1.1-1.3x faster, the RN50 COCO
# fine-tuning step not (benchmarks/README.md). Float rounding differs from the default layout.
_C.MODEL.CHANNELS_LAST = False

_C.MODEL.BACKBONE = CfgNode()
# build_resnet_backbone (C4), build_resnet_fpn_backbone or build_clip_resnet_backbone (CLIP trunk).
_C.MODEL.BACKBONE.NAME = "build_resnet_backbone"
_C.MODEL.BACKBONE.FREEZE_AT = 2  # 1 freezes the stem, k >= 2 also freezes res2..res<k>

_C.MODEL.RESNETS = CfgNode()
_C.MODEL.RESNETS.DEPTH = 50  # CLIP backbone: legacy variant flag (50 RN50, 101 RN101, 200 RN50x4)
_C.MODEL.RESNETS.OUT_FEATURES = ["res4"]  # res4 for C4, res2..res5 for FPN
_C.MODEL.RESNETS.NUM_GROUPS = 1  # > 1 gives ResNeXt
_C.MODEL.RESNETS.NORM = "FrozenBN"  # FrozenBN, BN, SyncBN, GN
_C.MODEL.RESNETS.WIDTH_PER_GROUP = 64  # bottleneck width of res2 per group
_C.MODEL.RESNETS.STRIDE_IN_1X1 = True  # MSRA weights stride in the 1x1 conv, torchvision in the 3x3
_C.MODEL.RESNETS.RES5_DILATION = 1  # 2 keeps res5 at stride 16
# CLIP C4 mask head input is 8x this; 256 (default) or the variant's res2 width (320 for RN50x4).
_C.MODEL.RESNETS.RES2_OUT_CHANNELS = 256
_C.MODEL.RESNETS.STEM_OUT_CHANNELS = 64  # detectron2 ResNet stem width (ignored by the CLIP trunk)
_C.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, False, False, False]  # deformable convs per stage
_C.MODEL.RESNETS.DEFORM_MODULATED = False  # DCNv2 instead of DCNv1
_C.MODEL.RESNETS.DEFORM_NUM_GROUPS = 1  # offset groups of deformable convs

_C.MODEL.FPN = CfgNode()
_C.MODEL.FPN.IN_FEATURES = []  # backbone outputs fed to the FPN, e.g. res2..res5
_C.MODEL.FPN.OUT_CHANNELS = 256  # channels of every pyramid level
_C.MODEL.FPN.NORM = ""  # "", GN or SyncBN for the lateral/output convs
_C.MODEL.FPN.FUSE_TYPE = "sum"  # top-down fusion: sum or avg

_C.MODEL.PROPOSAL_GENERATOR = CfgNode()
_C.MODEL.PROPOSAL_GENERATOR.NAME = "RPN"  # proposal generator of GeneralizedRCNN / the offline RPN
_C.MODEL.PROPOSAL_GENERATOR.MIN_SIZE = 0  # drop proposals with a side below this (pixels)

_C.MODEL.ANCHOR_GENERATOR = CfgNode()
_C.MODEL.ANCHOR_GENERATOR.NAME = "DefaultAnchorGenerator"
_C.MODEL.ANCHOR_GENERATOR.SIZES = [[32, 64, 128, 256, 512]]  # sqrt(area) per level (or one list)
_C.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.5, 1.0, 2.0]]  # height / width per level
_C.MODEL.ANCHOR_GENERATOR.ANGLES = [[-90, 0, 90]]  # rotated anchors only
_C.MODEL.ANCHOR_GENERATOR.OFFSET = 0.0  # anchor centre offset in units of the stride

_C.MODEL.RPN = CfgNode()
_C.MODEL.RPN.HEAD_NAME = "StandardRPNHead"
_C.MODEL.RPN.IN_FEATURES = ["res4"]  # p2..p6 for FPN
_C.MODEL.RPN.BOUNDARY_THRESH = -1  # drop anchors this far outside the image (-1 keeps all)
_C.MODEL.RPN.IOU_THRESHOLDS = [0.3, 0.7]  # background below the first, foreground from the second
_C.MODEL.RPN.IOU_LABELS = [0, -1, 1]  # labels of the three IoU intervals (-1 = ignored)
_C.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 256  # anchors sampled per image for the RPN loss
_C.MODEL.RPN.POSITIVE_FRACTION = 0.5  # foreground share of those anchors
_C.MODEL.RPN.BBOX_REG_LOSS_TYPE = "smooth_l1"
_C.MODEL.RPN.BBOX_REG_LOSS_WEIGHT = 1.0
_C.MODEL.RPN.BBOX_REG_WEIGHTS = (1.0, 1.0, 1.0, 1.0)  # (dx, dy, dw, dh) target scaling
_C.MODEL.RPN.SMOOTH_L1_BETA = 0.0  # 0 makes smooth-L1 plain L1
_C.MODEL.RPN.LOSS_WEIGHT = 1.0
_C.MODEL.RPN.PRE_NMS_TOPK_TRAIN = 12000  # per level with FPN
_C.MODEL.RPN.PRE_NMS_TOPK_TEST = 6000  # per level with FPN
_C.MODEL.RPN.POST_NMS_TOPK_TRAIN = 2000  # per image
_C.MODEL.RPN.POST_NMS_TOPK_TEST = 1000  # per image; the offline RPN always runs with TEST values
_C.MODEL.RPN.NMS_THRESH = 0.7
_C.MODEL.RPN.CONV_DIMS = [-1]  # head convs; -1 = input channels ([-1, -1] for the LSJ RPN)

_C.MODEL.ROI_HEADS = CfgNode()
# CLIPRes5ROIHeads, PretrainRes5ROIHeads, StandardROIHeads, CustomRes5ROIHeads (Detic)
_C.MODEL.ROI_HEADS.NAME = "Res5ROIHeads"
_C.MODEL.ROI_HEADS.NUM_CLASSES = 80  # foreground classes; must equal the TEXT_EMB_PATH rows
_C.MODEL.ROI_HEADS.IN_FEATURES = ["res4"]  # exactly one entry for C4 heads
_C.MODEL.ROI_HEADS.IOU_THRESHOLDS = [0.5]  # proposal foreground IoU
_C.MODEL.ROI_HEADS.IOU_LABELS = [0, 1]
_C.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 512  # RoIs sampled per image for training
_C.MODEL.ROI_HEADS.POSITIVE_FRACTION = 0.25
_C.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.05  # applies to the fused score with MULTIPLY_RPN_SCORE
_C.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.5  # per-class NMS IoU (also soft-NMS "linear" threshold)
_C.MODEL.ROI_HEADS.PROPOSAL_APPEND_GT = True  # add GT boxes to the proposals when training
_C.MODEL.ROI_HEADS.SOFT_NMS_ENABLED = False  # soft-NMS instead of hard NMS at test time
_C.MODEL.ROI_HEADS.SOFT_NMS_METHOD = "gaussian"  # gaussian, linear or hard
_C.MODEL.ROI_HEADS.SOFT_NMS_SIGMA = 0.5  # gaussian decay: score * exp(-iou^2 / sigma)
_C.MODEL.ROI_HEADS.SOFT_NMS_PRUNE = 0.001  # drop boxes whose decayed score falls to this or below

_C.MODEL.ROI_BOX_HEAD = CfgNode()
_C.MODEL.ROI_BOX_HEAD.NAME = ""  # C4 heads have no separate box head; FPN: FastRCNNConvFCHead
_C.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = "smooth_l1"
_C.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT = 1.0
_C.MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # (dx, dy, dw, dh) target scaling
_C.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = 0.0  # 0 makes smooth-L1 plain L1
# RoIAlign output size; 0 = derived from the CLIP variant (14 RN50, 18 RN50x4), else must match.
_C.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 0
_C.MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO = 0  # 0 = adaptive sampling points per bin
_C.MODEL.ROI_BOX_HEAD.POOLER_TYPE = "ROIAlignV2"  # RoIAlign with aligned=True
_C.MODEL.ROI_BOX_HEAD.NUM_FC = 0  # fully connected layers of an FPN box head
_C.MODEL.ROI_BOX_HEAD.FC_DIM = 1024
_C.MODEL.ROI_BOX_HEAD.NUM_CONV = 0  # conv layers of an FPN box head
_C.MODEL.ROI_BOX_HEAD.CONV_DIM = 256
_C.MODEL.ROI_BOX_HEAD.NORM = ""  # norm of those conv layers
_C.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = False  # one set of deltas for all classes
_C.MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES = False  # train the mask head on predicted boxes

_C.MODEL.ROI_MASK_HEAD = CfgNode()
_C.MODEL.ROI_MASK_HEAD.NAME = "MaskRCNNConvUpsampleHead"
# Unused by the CLIP C4 head (its mask input is the box branch's res5 map); scripts still set 18.
_C.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 14
_C.MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO = 0
_C.MODEL.ROI_MASK_HEAD.POOLER_TYPE = "ROIAlignV2"
_C.MODEL.ROI_MASK_HEAD.NUM_CONV = 0  # convs before the 2x deconvolution
_C.MODEL.ROI_MASK_HEAD.CONV_DIM = 256
_C.MODEL.ROI_MASK_HEAD.NORM = ""
_C.MODEL.ROI_MASK_HEAD.CLS_AGNOSTIC_MASK = False  # one mask for all classes

# RegionCLIP. Typed sentinels replace the original's None defaults; each is documented inline.
_C.MODEL.CLIP = CfgNode()
_C.MODEL.CLIP.VARIANT = ""  # CLIP ResNet name (RN50, RN50x4, tiny, ...); "" = from RESNETS.DEPTH
_C.MODEL.CLIP.CROP_REGION_TYPE = ""  # region source: "GT" boxes or offline "RPN" proposals
_C.MODEL.CLIP.BB_RPN_WEIGHTS = ""  # detectron2 checkpoint for the offline RPN ("" = from WEIGHTS)
_C.MODEL.CLIP.OFFLINE_RPN_CONFIG = ""  # detectron2 yaml of the offline backbone + RPN
_C.MODEL.CLIP.OFFLINE_RPN_LSJ_PRETRAINED = False  # RPN built as LSJ: SyncBN, 2-conv head
_C.MODEL.CLIP.OFFLINE_RPN_NMS_THRESH = 0.0  # overrides the RPN's NMS_THRESH; 0.0 = keep it
_C.MODEL.CLIP.OFFLINE_RPN_POST_NMS_TOPK_TEST = 0  # overrides POST_NMS_TOPK_TEST; 0 = keep it
_C.MODEL.CLIP.USE_TEXT_EMB_CLASSIFIER = False  # classify by text embeddings (attention-pool head)
_C.MODEL.CLIP.TEXT_EMB_PATH = ""  # [NUM_CLASSES, D] class embeddings ("" = random, features only)
_C.MODEL.CLIP.OPENSET_TEST_TEXT_EMB_PATH = ""  # test-time class embeddings ("" = TEXT_EMB_PATH)
# Embedding width D; 0 = derived from the variant (1024 RN50, 640 RN50x4), else must match.
_C.MODEL.CLIP.TEXT_EMB_DIM = 0
_C.MODEL.CLIP.CLSS_TEMP = 0.01  # logit temperature of the classifier and pretraining losses
# Temperature of the teacher's pseudo-label distributions (the original hard-codes 0.01, OpenAI
# CLIP's learnt temperature); a teacher trained elsewhere has its own: 1 / exp(logit_scale).
_C.MODEL.CLIP.TEACHER_TEMP = 0.01
_C.MODEL.CLIP.NO_BOX_DELTA = False  # keep proposal boxes at test time (forced by GT regions)
# Background loss weight. 1.0 = the original's None: all-ones class weights reproduce plain CE.
_C.MODEL.CLIP.BG_CLS_LOSS_WEIGHT = 1.0
# Focal gamma on the CE; 0.0 = off: the bg-weighted CE of the original's None. (The original
# with an explicit 0.0 ran its focal branch, a plain mean of bg-weighted CE: not carried.)
_C.MODEL.CLIP.FOCAL_SCALED_LOSS = 0.0
_C.MODEL.CLIP.ONLY_SAMPLE_FG_PROPOSALS = False  # train on foreground RoIs only
_C.MODEL.CLIP.MULTIPLY_RPN_SCORE = False  # test score = sqrt(p * raw RPN logit); RPN regions only
_C.MODEL.CLIP.VIS = False  # report class probabilities before the RPN-score fusion
_C.MODEL.CLIP.GET_CONCEPT_EMB = False  # build the text encoder (concept feature extraction)
_C.MODEL.CLIP.CONCEPT_POOL_EMB = ""  # pretraining concept embeddings ("" = no region losses)
_C.MODEL.CLIP.TEACHER_CONCEPT_POOL_EMB = ""  # teacher's concept embeddings; "" = CONCEPT_POOL_EMB
_C.MODEL.CLIP.CONCEPT_THRES = 0.0  # keep regions whose best teacher prob exceeds it; 0.0 = all
_C.MODEL.CLIP.PRETRAIN_RPN_REGIONS = 0  # offline RPN post-NMS top-k in pretraining; 0 = keep
_C.MODEL.CLIP.PRETRAIN_SAMPLE_REGIONS = 0  # random regions kept per image; 0 = all
_C.MODEL.CLIP.PRETRAIN_IMG_TXT_LEVEL = True  # add the image-text contrastive loss
_C.MODEL.CLIP.PRETRAIN_ONLY_EOT = False  # caption embedding from the EOT token (configs: True)
_C.MODEL.CLIP.PRETRAIN_LOSSES = ("distill", "contrastive", "img_txt")  # losses on (ablations)
_C.MODEL.CLIP.GATHER_GPUS = False  # all-gather image/caption embeddings across GPUs
_C.MODEL.CLIP.TEACHER_VARIANT = ""  # teacher CLIP ResNet; "" = from TEACHER_RESNETS_DEPTH
_C.MODEL.CLIP.TEACHER_RESNETS_DEPTH = 50  # legacy teacher variant flag (200 = RN50x4)
_C.MODEL.CLIP.TEACHER_POOLER_RESOLUTION = 0  # teacher RoIAlign size; 0 = from the teacher variant
# > 0: the teacher encodes each region as a whole-image crop of this many times the box's longer
# side (not in the original); 0 = RoIAlign on the teacher's feature map, as the original.
_C.MODEL.CLIP.TEACHER_CROP_CONTEXT = 0.0

# ---------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------
_C.INPUT = CfgNode()
_C.INPUT.MIN_SIZE_TRAIN = (800,)  # shortest-edge sizes for training
_C.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"  # pick one of MIN_SIZE_TRAIN, or "range"
_C.INPUT.MAX_SIZE_TRAIN = 1333  # cap on the longest edge when training
_C.INPUT.MIN_SIZE_TEST = 800  # shortest edge at test time (0 = no resize)
_C.INPUT.MAX_SIZE_TEST = 1333
_C.INPUT.RANDOM_FLIP = "horizontal"  # horizontal or none (detectron2's "vertical" is not carried)
_C.INPUT.FORMAT = "BGR"  # image channel order fed to the model; CLIP configs use RGB
_C.INPUT.MASK_FORMAT = "polygon"  # polygon or bitmask
_C.INPUT.CROP = CfgNode()
_C.INPUT.CROP.ENABLED = False  # random crop when training
_C.INPUT.CROP.TYPE = "relative_range"  # relative_range, relative, absolute, absolute_range
_C.INPUT.CROP.SIZE = [0.9, 0.9]  # fractions or pixels, per TYPE

# Image-text pretraining transforms (the original's MSR-CLIP AUG node, used keys only).
_C.AUG = CfgNode()
_C.AUG.INTERPOLATION = 3  # PIL resampling filter (3 = bicubic)
_C.AUG.TRAIN = CfgNode()
_C.AUG.TRAIN.IMAGE_SIZE = [224, 224]  # one value: shortest edge; two: exact size
_C.AUG.TRAIN.MAX_SIZE = 0  # cap on the longest edge; 0 = no cap (the original's None)
_C.AUG.TEST = CfgNode()
_C.AUG.TEST.IMAGE_SIZE = [224, 224]
_C.AUG.TEST.MAX_SIZE = 0

# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------
_C.DATASETS = CfgNode()
_C.DATASETS.TRAIN = ()  # registered dataset names; ("imgtxtpairs",) selects image-text pairs
_C.DATASETS.TEST = ()
_C.DATASETS.PROPOSAL_FILES_TRAIN = ()  # precomputed proposals, one file per TRAIN dataset
_C.DATASETS.PROPOSAL_FILES_TEST = ()
_C.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN = 2000
_C.DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST = 1000
_C.DATASETS.FACTORY_TRAIN = ()  # image-text dataset classes, one per TRAIN entry
_C.DATASETS.PATH_TRAIN = ()  # image-text dataset folders, one per TRAIN entry

_C.DATALOADER = CfgNode()
_C.DATALOADER.NUM_WORKERS = 4
_C.DATALOADER.ASPECT_RATIO_GROUPING = True  # batch portrait and landscape images separately
_C.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"  # or RepeatFactorTrainingSampler (LVIS)
_C.DATALOADER.REPEAT_THRESHOLD = 0.0  # repeat-factor sampling threshold
_C.DATALOADER.FILTER_EMPTY_ANNOTATIONS = True  # skip training images without annotations

# ---------------------------------------------------------------------------------------------
# Solver
# ---------------------------------------------------------------------------------------------
_C.SOLVER = CfgNode()
_C.SOLVER.LR_SCHEDULER_NAME = "WarmupMultiStepLR"  # or WarmupCosineLR
_C.SOLVER.MAX_ITER = 40000
_C.SOLVER.BASE_LR = 0.001
_C.SOLVER.OPTIMIZER = "SGD"  # SGD (with MOMENTUM) or ADAMW (a CLIP trained from scratch)
_C.SOLVER.MOMENTUM = 0.9
_C.SOLVER.NESTEROV = False
_C.SOLVER.WEIGHT_DECAY = 0.0001
_C.SOLVER.WEIGHT_DECAY_NORM = 0.0  # norm-layer weights (their biases: WEIGHT_DECAY_BIAS)
_C.SOLVER.GAMMA = 0.1  # LR factor at each step
_C.SOLVER.STEPS = (30000,)  # iterations at which the LR drops by GAMMA
_C.SOLVER.WARMUP_FACTOR = 0.001  # starting LR fraction of the warm-up
_C.SOLVER.WARMUP_ITERS = 1000
_C.SOLVER.WARMUP_METHOD = "linear"  # linear or constant
_C.SOLVER.CHECKPOINT_PERIOD = 5000  # iterations between checkpoints
_C.SOLVER.IMS_PER_BATCH = 16  # images per step across all GPUs
_C.SOLVER.REFERENCE_WORLD_SIZE = 0  # GPU count the schedule was written for; 0 = no rescaling
_C.SOLVER.REFERENCE_IMS_PER_BATCH = 0  # total batch the LR/schedule were written for; 0 = off
_C.SOLVER.BIAS_LR_FACTOR = 1.0  # LR multiplier for biases
_C.SOLVER.WEIGHT_DECAY_BIAS = 0.0001  # weight decay of biases (detectron2 v0.4 copy of the default)
_C.SOLVER.CLIP_GRADIENTS = CfgNode()
_C.SOLVER.CLIP_GRADIENTS.ENABLED = False
_C.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"  # "value" clips elements, "norm" each tensor's norm
_C.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 1.0
_C.SOLVER.CLIP_GRADIENTS.NORM_TYPE = 2.0  # p of the L-p norm for "norm" clipping
_C.SOLVER.AMP = CfgNode()
_C.SOLVER.AMP.ENABLED = False  # mixed-precision training

# ---------------------------------------------------------------------------------------------
# Test
# ---------------------------------------------------------------------------------------------
_C.TEST = CfgNode()
_C.TEST.EXPECTED_RESULTS = []  # [[task, metric, value, tolerance], ...] checked after evaluation
_C.TEST.EVAL_PERIOD = 0  # iterations between evaluations during training; 0 = only at the end
_C.TEST.DETECTIONS_PER_IMAGE = 100  # 300 for LVIS
# Images per inference batch in each process (detectron2 has no such key and always uses 1).
# Above 1 images are padded to a common size, which changes features near padded borders.
_C.TEST.IMS_PER_BATCH = 1
_C.TEST.AUG = CfgNode()
_C.TEST.AUG.ENABLED = False  # test-time augmentation
_C.TEST.AUG.MIN_SIZES = (400, 500, 600, 700, 800, 900, 1000, 1100, 1200)
_C.TEST.AUG.MAX_SIZE = 4000
_C.TEST.AUG.FLIP = True
_C.TEST.PRECISE_BN = CfgNode()
_C.TEST.PRECISE_BN.ENABLED = False  # recompute BN statistics before evaluation
_C.TEST.PRECISE_BN.NUM_ITER = 200

# ---------------------------------------------------------------------------------------------
# Misc
# ---------------------------------------------------------------------------------------------
_C.OUTPUT_DIR = "./output"
_C.INPUT_DIR = "./datasets/custom_images"  # input folder of the feature-extraction tools
_C.SEED = -1  # negative = random seed
_C.CUDNN_BENCHMARK = False  # cuDNN autotuning while training (not bit-reproducible)
_C.VIS_PERIOD = 0  # iterations between training visualisations; 0 = off

# ---------------------------------------------------------------------------------------------
# Detic (facebookresearch/Detic) open-vocabulary COCO models: META_ARCHITECTURE CustomRCNN, and
# the weak supervision (image labels, captions) also offered to CLIPFastRCNN. Detic's key names.
# ---------------------------------------------------------------------------------------------
_C.WITH_IMAGE_LABELS = False  # train on image-labelled / captioned data too (DATASET_ANN)
_C.FP16 = False  # CUDA only: float16 backbone at test, autocast + gradient scaler in training
_C.MODEL.WITH_CAPTION = False  # build the frozen CLIP text tower for the caption loss
_C.MODEL.SYNC_CAPTION_BATCH = False  # all-gather the captions of every process as classifier
_C.MODEL.CAP_BATCH_RATIO = 4  # zero caption rows a process on a box batch adds per image (sync)
# Text tower of the caption loss of CustomRCNN: "ViT-B/32" (Detic's) or a CLIP variant name.
_C.MODEL.CAPTION_TEXT_TOWER = "ViT-B/32"
# CLIP checkpoint holding that tower (OpenAI's ViT-B-32.pt, Detic's caption models); "" = none.
_C.MODEL.CAPTION_TEXT_WEIGHTS = ""
_C.MODEL.RESET_CLS_TESTS = False  # classify each DATASETS.TEST entry with its TEST_CLASSIFIERS
_C.MODEL.TEST_CLASSIFIERS = []  # class-embedding files (.npy [C, D]), one per test dataset
_C.MODEL.TEST_NUM_CLASSES = []  # their class counts, one per test dataset
_C.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE = False  # per-class sigmoid loss and scores (else softmax)
_C.MODEL.ROI_BOX_HEAD.USE_ZEROSHOT_CLS = False  # CLIP-embedding classifier (CustomRCNN needs it)
# [C, D] class embeddings (.npy as Detic ships them, or a torch file); "" = filled by a checkpoint.
_C.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH = ""
_C.MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM = 512  # D, the projection width
_C.MODEL.ROI_BOX_HEAD.NORM_WEIGHT = True  # L2-normalise region features and class embeddings
_C.MODEL.ROI_BOX_HEAD.NORM_TEMP = 50.0  # logit scale of the normalised features
_C.MODEL.ROI_BOX_HEAD.USE_BIAS = 0.0  # < 0: a learnable logit bias starting at this value
_C.MODEL.ROI_BOX_HEAD.IGNORE_ZERO_CATS = False  # no loss on classes without training images
_C.MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH = ""  # per-class image_count json (tools/prepare_detic_coco.py)
_C.MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT = 0.5  # exponent applied to those counts
_C.MODEL.ROI_BOX_HEAD.IMAGE_LABEL_LOSS = "max_size"  # max_size, max_score, first, image
_C.MODEL.ROI_BOX_HEAD.IMAGE_LOSS_WEIGHT = 0.1  # weight of the image-label + caption loss
_C.MODEL.ROI_BOX_HEAD.WS_NUM_PROPS = 128  # top proposals scored on image-labelled images
_C.MODEL.ROI_BOX_HEAD.ADD_IMAGE_BOX = False  # add a whole-image box after them
_C.MODEL.ROI_BOX_HEAD.IMAGE_BOX_SIZE = 1.0  # < 1: a centred box of this relative size instead
_C.MODEL.ROI_BOX_HEAD.CAPTION_WEIGHT = 1.0  # of the caption loss inside the image loss
_C.MODEL.ROI_BOX_HEAD.NEG_CAP_WEIGHT = 0.125  # of the other captions' (negative) terms
_C.MODEL.ROI_BOX_HEAD.SOFTMAX_WEAK_LOSS = False  # max_size: softmax CE instead of sigmoid BCE
_C.MODEL.ROI_BOX_HEAD.USE_FED_LOSS = False  # Detic's LVIS federated loss (not carried)
_C.MODEL.ROI_BOX_HEAD.WITH_SOFTMAX_PROP = False  # Detic's softmax-proposal ablation (not carried)
_C.INPUT.CUSTOM_AUG = ""  # "ResizeShortestEdge": per-dataset DATASET_MIN/MAX_SIZES (mixed data)
# MultiDatasetSampler (DATALOADER.SAMPLER_TRAIN): one entry per DATASETS.TRAIN dataset.
_C.DATALOADER.DATASET_RATIO = [1, 1]  # share of the draws from each dataset
_C.DATALOADER.USE_RFS = [False, False]  # repeat-factor sampling inside a dataset (not carried)
_C.DATALOADER.DATASET_ANN = ["box", "box"]  # box, image, caption or captiontag supervision
_C.DATALOADER.MULTI_DATASET_GROUPING = False  # each batch from one dataset (always, here)
_C.DATALOADER.USE_DIFF_BS_SIZE = False  # per-process batch DATASET_BS[d] (else IMS_PER_BATCH)
_C.DATALOADER.DATASET_BS = [8, 32]  # images per process and batch, per dataset
_C.DATALOADER.DATASET_MIN_SIZES = [[640, 800], [320, 400]]  # short-side range, per dataset
_C.DATALOADER.DATASET_MAX_SIZES = [1333, 667]  # long-side cap, per dataset
