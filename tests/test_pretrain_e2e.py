"""Region-text pretraining end to end through tools/train_net.py (tiny CLIP, tiny offline RPN).

Every run starts as a real one does: teacher, student and text tower from one OpenAI-CLIP-style
file, the offline RPN from a detectron2-style file (``BB_RPN_WEIGHTS``), the concept pool from
an embedding file, the pretraining config with overrides. The concept pool holds teacher
embeddings of regions of the training images, so the teacher labels regions with several
different concepts and all three losses have something to compare (a random pool gives every
region the same concept and a zero contrastive loss).

The models are a few hundred thousand parameters: the runs use one thread, as more threads
only add synchronisation (and stall badly on a busy 2-core machine).
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _clip_utils import openclip_reference
from _data_utils import make_coco_dataset
from _e2e_utils import module_state_shapes, sane_state_dict, save_checkpoint_file
from _image_text_utils import write_jsonl_dataset, write_tsv_dataset, write_webdataset
from _rpn_utils import build_from_file
from _tool_utils import load_tool, run_train_net

from regionclip.checkpoint import read_checkpoint
from regionclip.config import load_config
from regionclip.data.image_text_loader import build_image_text_dataset, build_image_text_loader
from regionclip.distributed import launch
from regionclip.engine.weights import load_weights
from regionclip.modeling.build import build_model
from regionclip.modeling.pretrainer import LOSS_KEYS
from regionclip.modeling.text_encoder import save_embeddings
from regionclip.structures import ImageList

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CONFIG = REPO / "configs" / "pretrain" / "RegionCLIP_RN50.yaml"
TINY_CONFIG = REPO / "configs" / "tests" / "tiny.yaml"
TINY_RPN = REPO / "configs" / "tests" / "tiny_rpn_fpn.yaml"
TRAIN_NET = REPO / "tools" / "train_net.py"
FACTORIES = {"tsv": "CLIPImgTxtPairTSVDataset", "webdataset": "WebDataset",
             "jsonl": "ImageCaptionJsonl"}
NUM_IMAGES, IMAGE_SIZE = 8, (48, 64)
NUM_CONCEPTS = 12
ITERATIONS = 24
LOSSES = tuple(LOSS_KEYS.values())
# Trained with the webdataset form through 2 loader workers: its resume replays shards
# through the shuffle buffer and shifts the workers.
RESUMED_FORM, WORKERS = "webdataset", {"tsv": 0, "webdataset": 2, "jsonl": 0}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Data in the three forms (each with one unusable image), initial weights, concept pool,
    and a COCO-format detection set with class embeddings for the zero-shot check."""
    root = tmp_path_factory.mktemp("pretrain")
    data = {
        "tsv": write_tsv_dataset(root / "tsv", NUM_IMAGES, 3, IMAGE_SIZE, corrupt=(3,)),
        "webdataset": write_webdataset(root / "wds", NUM_IMAGES, IMAGE_SIZE, num_shards=2,
                                       corrupt=(5,)),
        "jsonl": write_jsonl_dataset(root / "jsonl", NUM_IMAGES, 2, IMAGE_SIZE, missing=(2,)),
    }
    clip = root / "tiny_openai_clip.pt"
    torch.save(openclip_reference("tiny").state_dict(), clip)
    backbone, generator, _ = build_from_file(TINY_RPN)
    shapes = module_state_shapes(backbone, "backbone.")
    shapes.update(module_state_shapes(generator, "proposal_generator."))
    rpn = save_checkpoint_file(root / "rpn.pth", sane_state_dict(shapes, seed=0))
    coco_json, coco_images = make_coco_dataset(root / "coco", num_images=4, image_size=(64, 80))
    class_emb = root / "coco_3_cls_emb.pth"
    save_embeddings(torch.randn(3, 32, generator=torch.Generator().manual_seed(2)), class_emb)
    paths = {"data": data, "clip": str(clip), "rpn": rpn, "root": root,
             "concepts": str(root / "concepts.pth"), "class_emb": str(class_emb),
             "coco": f"coco_json:{coco_json}:{coco_images}"}
    placeholder = torch.randn(NUM_CONCEPTS, 32, generator=torch.Generator().manual_seed(1))
    save_embeddings(placeholder, paths["concepts"])  # the model needs a pool to be built
    save_embeddings(teacher_region_concepts(paths), paths["concepts"])
    return paths


def pretrain_overrides(files, form="tsv", output_dir="", max_iter=ITERATIONS):
    return [
        "MODEL.CLIP.VARIANT", "tiny", "MODEL.CLIP.TEACHER_VARIANT", "tiny", "MODEL.DEVICE", "cpu",
        "MODEL.WEIGHTS", files["clip"], "MODEL.CLIP.BB_RPN_WEIGHTS", files["rpn"],
        "MODEL.CLIP.OFFLINE_RPN_CONFIG", str(TINY_RPN),
        "MODEL.CLIP.CONCEPT_POOL_EMB", files["concepts"],
        "MODEL.CLIP.PRETRAIN_RPN_REGIONS", "10", "MODEL.CLIP.PRETRAIN_SAMPLE_REGIONS", "4",
        "DATASETS.FACTORY_TRAIN", f"('{FACTORIES[form]}',)",
        "DATASETS.PATH_TRAIN", f"('{files['data'][form]}',)",
        "DATALOADER.NUM_WORKERS", str(WORKERS[form]),
        "AUG.TRAIN.IMAGE_SIZE", "[64]", "AUG.TRAIN.MAX_SIZE", "96",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.REFERENCE_IMS_PER_BATCH", "0",
        "SOLVER.MAX_ITER", str(max_iter), "SOLVER.STEPS", "()", "SOLVER.WARMUP_ITERS", "0",
        "SOLVER.BASE_LR", "0.02", "SOLVER.CHECKPOINT_PERIOD", "10", "SEED", "0",
        "OUTPUT_DIR", str(output_dir),
    ]


def initial_model(files):
    """The pretraining model as train_net builds and initialises it."""
    cfg = load_config(str(PRETRAIN_CONFIG), pretrain_overrides(files))
    model = build_model(cfg)
    load_weights(cfg, model)
    return cfg, model.train()


@torch.no_grad()
def teacher_region_concepts(files) -> torch.Tensor:
    """NUM_CONCEPTS teacher embeddings of offline-RPN regions of the training images."""
    cfg, model = initial_model(files)
    model.sample_regions = 0
    dataset = build_image_text_dataset(cfg, infinite=False, rank=0, world_size=1)
    images = [record["image"] for record in dataset]
    batch = ImageList.from_tensors([(x - model.pixel_mean) / model.pixel_std for x in images],
                                   model.backbone.size_divisibility)
    res4 = model.teacher_backbone(batch.tensor)["res4"]
    regions = model.teacher_backbone.embed_regions(res4, model.sample_proposals(images),
                                                   model.teacher_pooler_resolution)
    pick = torch.randperm(len(regions), generator=torch.Generator().manual_seed(0))
    return regions[pick[:NUM_CONCEPTS]]


def pretrain(files, output_dir, form, *extra, max_iter=ITERATIONS, resume=False):
    flags = ["--resume"] if resume else []
    return run_train_net([*flags, "--config-file", PRETRAIN_CONFIG,
                      *pretrain_overrides(files, form, output_dir, max_iter), *extra])


@pytest.fixture(scope="module")
def runs(files):
    """{form: output folder} of uninterrupted runs, trained on first use."""
    done = {}

    def run(form):
        if form not in done:
            done[form] = files["root"] / f"run_{form}"
            pretrain(files, done[form], form)
        return done[form]

    return run


def metric_lines(output_dir):
    with open(Path(output_dir) / "metrics.json") as f:
        return [json.loads(line) for line in f]


def final_state(output_dir):
    return read_checkpoint(str(Path(output_dir) / "model_final.pth"))


# ---------------------------------------------------------------------------------------------
# The image-text loader resumes exactly
# ---------------------------------------------------------------------------------------------
def _loader(files, form, workers=2):
    cfg = load_config(str(PRETRAIN_CONFIG), pretrain_overrides(files, form))
    cfg.defrost()
    cfg.DATALOADER.NUM_WORKERS = workers
    return build_image_text_loader(cfg)


def _summary(batches):
    return [[(r["key"], r["image"].sum().item(), r["stream_position"]) for r in batch]
            for batch in batches]


@pytest.mark.parametrize("form", ["tsv", "webdataset"])
def test_loader_resumes_from_its_state_and_by_replay(files, form):
    """Two workers, a corrupt image and more than one epoch (8 images, 12 batches of 2)."""
    straight = _loader(files, form)
    stream = straight.iter_from(0)
    head = _summary(next(stream) for _ in range(5))
    state = straight.state_dict()
    tail = _summary(next(stream) for _ in range(7))
    assert state["iteration"] == 5 and set(state["positions"]) == {0, 1}
    assert len({key for batch in head + tail for key, _, _ in batch}) == NUM_IMAGES - 1

    resumed = _loader(files, form)
    resumed.load_state_dict(state)
    stream = resumed.iter_from(5)
    assert _summary(next(stream) for _ in range(7)) == tail
    replayed = _loader(files, form).iter_from(5)  # no state: replays 5 batches
    assert _summary(next(replayed) for _ in range(7)) == tail


def test_loader_state_of_another_layout_starts_a_new_epoch(files):
    straight = _loader(files, "tsv", workers=2)
    stream = straight.iter_from(0)
    for _ in range(3):
        next(stream)
    other = _loader(files, "tsv", workers=0)
    other.load_state_dict(straight.state_dict())
    assert other.state_dict()["positions"] == {0: [1, 0]}
    assert next(other.iter_from(3))[0]["stream_position"][1] == 1


# ---------------------------------------------------------------------------------------------
# train_net: pretraining on the three forms, resume, frozen parts, zero-shot use
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("form", ["tsv", "webdataset", "jsonl"])
def test_pretrains_on_each_data_form_and_logs_the_three_losses(runs, form):
    output_dir = runs(form)
    lines = metric_lines(output_dir)
    assert [line["iteration"] for line in lines] == [19, ITERATIONS - 1]
    for line in lines:
        assert all(math.isfinite(line[key]) for key in LOSSES), line
        assert line["loss_concept_contrastive"] > 0 and line["loss_img_txt_level"] > 0
        assert line["loss_region_distill"] >= 0
    assert final_state(output_dir)["iteration"] == ITERATIONS
    assert sorted(p.name for p in Path(output_dir).glob("model_*.pth")) == [
        "model_0000009.pth", "model_0000019.pth", "model_final.pth"]
    with open(Path(output_dir) / "log.txt") as f:
        log = f.read()
    assert "Skipped image-text item" in log and "NaN" not in log


@pytest.mark.slow
def test_stopped_and_resumed_run_ends_with_the_uninterrupted_weights(files, runs):
    output_dir = files["root"] / "resumed"
    pretrain(files, output_dir, RESUMED_FORM, max_iter=13)  # stops: odd, mid-epoch, worker 1 next
    stopped = final_state(output_dir)
    assert stopped["iteration"] == 13 and stopped["data"]["iteration"] == 13
    pretrain(files, output_dir, RESUMED_FORM, resume=True)
    with open(output_dir / "log.txt") as f:
        assert "Resumed from" in f.read()
    resumed, straight = final_state(output_dir), final_state(runs(RESUMED_FORM))
    assert resumed["iteration"] == ITERATIONS
    assert resumed["data"] == straight["data"]
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    assert [line["iteration"] for line in metric_lines(output_dir)] == [12, 19, ITERATIONS - 1]


def _two_process_runs(files, root):
    """In each of two gloo processes: an uninterrupted run, and one stopped and resumed."""
    torch.set_num_threads(1)
    # 2 images per process; no loader workers (they would be spawned, which is slow)
    two = ("SOLVER.IMS_PER_BATCH", "4", "DATALOADER.NUM_WORKERS", "0")
    pretrain(files, root / "straight", RESUMED_FORM, *two)
    pretrain(files, root / "resumed", RESUMED_FORM, *two, max_iter=13)
    pretrain(files, root / "resumed", RESUMED_FORM, *two, resume=True)


@pytest.mark.slow
def test_two_processes_pretrain_and_resume_exactly(files, tmp_path):
    """Gathered image-text loss, DDP, and the data positions of both processes in the
    checkpoint (only the main process writes it)."""
    launch(_two_process_runs, num_gpus_per_machine=2, args=(files, tmp_path))
    straight, resumed = (final_state(tmp_path / name) for name in ("straight", "resumed"))
    assert len(straight["rng"]) == 2 and set(straight["data"]["positions"]) == {0, 1}
    assert resumed["data"] == straight["data"]
    for key, value in straight["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    lines = metric_lines(tmp_path / "straight")
    assert all(math.isfinite(line[key]) for line in lines for key in LOSSES)


@pytest.mark.slow
def test_frozen_parts_unchanged_and_trainable_parts_changed(files, runs):
    _, model = initial_model(files)
    before = model.state_dict()
    after = final_state(runs("tsv"))["model"]
    assert set(after) == set(before)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith(("backbone.layer2", "backbone.layer3",
                                              "backbone.layer4", "backbone.attnpool"))
                             for name in trainable)
    for key, value in before.items():
        if key in trainable:
            assert not torch.equal(after[key], value), key
        else:  # teacher, text tower, offline RPN, student stem / layer1, all frozen BN
            assert torch.equal(after[key], value), key
    assert {key.split(".")[0] for key in before} == {
        "backbone", "teacher_backbone", "lang_encoder", "offline_backbone",
        "offline_proposal_generator"}


@pytest.mark.slow
def test_zero_shot_evaluation_during_pretraining(files, tmp_path):
    """DATASETS.TEST set: the student is evaluated as a zero-shot detector at the end."""
    results = pretrain(
        files, tmp_path, "jsonl", "DATASETS.TEST", f"('{files['coco']}',)",
        "MODEL.CLIP.TEXT_EMB_PATH", files["class_emb"], "MODEL.ROI_HEADS.NUM_CLASSES", "3",
        "MODEL.CLIP.NO_BOX_DELTA", "True", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "96", max_iter=4)
    assert set(results) == {files["coco"]} and "AP" in results[files["coco"]]["bbox"]
    assert (tmp_path / "inference" / "coco_instances_results.json").is_file()


@pytest.mark.slow
def test_pretrained_checkpoint_runs_zero_shot_detection_through_the_command_line(
        files, runs, tmp_path):
    checkpoint = runs("tsv") / "model_final.pth"
    command = [
        sys.executable, TRAIN_NET, "--eval-only", "--config-file", TINY_CONFIG,
        "MODEL.WEIGHTS", checkpoint, "MODEL.CLIP.TEXT_EMB_PATH", files["class_emb"],
        "MODEL.CLIP.CROP_REGION_TYPE", "RPN", "MODEL.CLIP.OFFLINE_RPN_CONFIG", TINY_RPN,
        "MODEL.CLIP.NO_BOX_DELTA", "True", "DATASETS.TEST", f"('{files['coco']}',)",
        "OUTPUT_DIR", tmp_path,
    ]
    result = subprocess.run(list(map(str, command)), cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # trunk and offline RPN come from the pretrained checkpoint (no BB_RPN_WEIGHTS given);
    # only the box predictor is not in it (the class embeddings come from TEXT_EMB_PATH), which
    # the load report says is by design
    log = result.stdout + result.stderr
    by_design = re.findall(r"Missing by design \(kept their initialisation\): (\S+) \(", log)
    assert sorted(by_design) == ["roi_heads.box_predictor.bbox_pred",
                                 "roi_heads.box_predictor.cls_bg_score"], by_design
    assert "tensors missing" not in log
    detections = json.loads((tmp_path / "inference" / "coco_instances_results.json").read_text())
    assert detections and {d["category_id"] for d in detections} <= {1, 3, 18}
    metrics = json.loads((tmp_path / "inference" / "metrics.json").read_text())
    assert "AP50" in metrics[files["coco"]]["bbox"]


def test_pretrain_script_starts_train_net_under_torchrun(tmp_path):
    """scripts/pretrain.sh with a stand-in torchrun: its arguments make a valid train_net
    command line (flags, config, overrides) and the torchrun options follow the variables."""
    (tmp_path / "torchrun").write_text(
        f"#!/bin/sh\n{sys.executable} -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "
        "\"$@\"\n")
    (tmp_path / "torchrun").chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "NNODES": "2",
           "NODE_RANK": "1", "NPROC_PER_NODE": "8", "ARCH": "RN50x4"}
    result = subprocess.run(["bash", str(REPO / "pretrain.sh"), "--resume"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, check=True)
    argv = json.loads(result.stdout)
    script = argv.index("./tools/train_net.py")
    torchrun = dict(zip(argv[:script:2], argv[1:script:2]))
    assert torchrun["--nnodes"] == "2" and torchrun["--node_rank"] == "1"
    assert torchrun["--nproc_per_node"] == "8"
    args = load_tool("train_net").default_argument_parser().parse_args(argv[script + 1:])
    assert args.resume and not args.eval_only
    cfg = load_config(str(REPO / args.config_file), args.opts)
    assert cfg.MODEL.META_ARCHITECTURE == "PretrainFastRCNN"
    assert cfg.MODEL.RESNETS.DEPTH == cfg.MODEL.CLIP.TEACHER_RESNETS_DEPTH == 200
    assert cfg.MODEL.CLIP.CONCEPT_POOL_EMB.endswith("coco_nouns_4764_emb_rn50x4.pth")
    assert cfg.MODEL.CLIP.BB_RPN_WEIGHTS.endswith("rpn_lvis_866.pth")
    assert cfg.SOLVER.IMS_PER_BATCH % (2 * 8) == 0
