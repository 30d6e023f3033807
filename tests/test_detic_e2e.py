"""Detic's OV-COCO configs end to end through tools/train_net.py: evaluation of generated
checkpoints with the released names (tiny and released sizes), the per-dataset classifier
switch, and the three training modes with an exact resume."""
import json
import math
from pathlib import Path

import pytest
import torch
from _checkpoint_utils import make_state_dict
from _detic_utils import (
    DETIC_CONFIGS,
    OVCOCO_CONFIGS,
    TINY_OVERRIDES,
    detic_shapes,
    detic_state_dict,
    recorded_training,
    save_npy_embeddings,
    tiny_detic_data,
    write_json,
)
from _tool_utils import run_train_net

from regionclip.checkpoint import read_checkpoint
from regionclip.distributed import launch
from regionclip.modeling.detic.meta_arch import CustomRCNN

NOVEL_ID = 18  # "dog" of the test data's person / car / dog
VAL = "coco/zero-shot/instances_val2017_all_2_oriorder.json"
TRAIN = "coco/zero-shot/instances_train2017_seen_2_oriorder.json"
CAT_INFO = "coco/zero-shot/instances_train2017_seen_2_oriorder_cat_info.json"
LABELS = "coco/annotations/captions_train2017_tags_allcaps.json"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Detic's dataset layout under a dataset root: val with all classes, train without the
    novel class's boxes, its class counts, image labels; and a class-embedding file."""
    root = tmp_path_factory.mktemp("detic_world")
    detection, labels, images = tiny_detic_data(root / "source")
    datasets = root / "datasets"
    with open(detection) as f:
        coco = json.load(f)
    write_json(datasets / VAL, coco)
    base = [a for a in coco["annotations"] if a["category_id"] != NOVEL_ID]
    write_json(datasets / TRAIN, {**coco, "annotations": base})
    counts = {c["id"]: len({a["image_id"] for a in base if a["category_id"] == c["id"]})
              for c in coco["categories"]}
    write_json(datasets / CAT_INFO, [{**c, "image_count": counts[c["id"]]}
                                     for c in coco["categories"]])
    write_json(datasets / LABELS, json.loads(Path(labels).read_text()))
    for split in ("train2017", "val2017"):
        (datasets / "coco" / split).symlink_to(images)
    npy = save_npy_embeddings(root / "metadata" / "coco_clip_a+cname.npy", 3, dim=32)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DETECTRON2_DATASETS", str(datasets))
        yield {"root": root, "datasets": datasets, "npy": npy}


def _tiny_checkpoint(world, name: str) -> str:
    shapes = detic_shapes(3, text="caption" in name, tiny=True, anchors=9)
    path = world["root"] / "models" / f"{name}.pth"
    path.parent.mkdir(exist_ok=True)
    torch.save({"model": detic_state_dict(shapes, seed=len(name))}, path)
    return str(path)


def _tiny_argv(world, name, output, *extra):
    return ["--config-file", DETIC_CONFIGS / f"{name}.yaml", *TINY_OVERRIDES,
            "MODEL.ROI_HEADS.NUM_CLASSES", "3", "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH",
            world["npy"], "MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH",
            str(world["datasets"] / CAT_INFO), "OUTPUT_DIR", output, "SEED", "0", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("name", OVCOCO_CONFIGS)
def test_each_ovcoco_config_evaluates_its_checkpoint(world, name, tmp_path):
    argv = ["--eval-only", *_tiny_argv(world, name, tmp_path, "MODEL.WEIGHTS",
                                       _tiny_checkpoint(world, name))]
    metrics = run_train_net(argv)["coco_generalized_zeroshot_val"]["bbox"]
    assert {"AP50_novel", "AP50_base", "AP50_all"} <= set(metrics)
    log = (tmp_path / "log.txt").read_text()
    # the released names (279, + the text tower's); zs_weight comes from the .npy file
    tensors = len(detic_shapes(3, text="caption" in name, tiny=True, anchors=9))
    assert f"Loaded {tensors - 1} of {tensors} model tensors" in log and "format detic" in log
    assert "Dropped on purpose: roi_heads (1 tensors): kept the model's value" in log
    results = json.loads((tmp_path / "inference" / "coco_instances_results.json").read_text())
    assert results and {r["category_id"] for r in results} <= {1, 3, NOVEL_ID}


@pytest.mark.slow
def test_the_released_boxsup_layout_evaluates_at_full_size(world, tmp_path):
    path = world["root"] / "BoxSup_full.pth"
    torch.save({"model": make_state_dict(detic_shapes(), seed=0)}, path)
    npy = save_npy_embeddings(world["root"] / "coco80.npy", 80)
    three = save_npy_embeddings(world["root"] / "three512.npy", 3)
    run_train_net(["--eval-only", "--config-file", DETIC_CONFIGS / "BoxSup_OVCOCO_CLIP_R50_1x.yaml",
                   "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", path, "OUTPUT_DIR", tmp_path,
                   "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH", npy, "MODEL.RESET_CLS_TESTS", "True",
                   "MODEL.TEST_CLASSIFIERS", f"('{three}',)", "MODEL.TEST_NUM_CLASSES",
                   "(3,)", "MODEL.RPN.POST_NMS_TOPK_TEST", "10", "INPUT.MIN_SIZE_TEST", "64",
                   "INPUT.MAX_SIZE_TEST", "128", "DATALOADER.NUM_WORKERS", "0",
                   "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM", "512"])
    log = (tmp_path / "log.txt").read_text()
    assert "Loaded 278 of 279 model tensors" in log
    assert (tmp_path / "inference" / "metrics.json").is_file()


def _final_losses(output):
    with open(Path(output) / "metrics.json") as f:
        return [json.loads(line) for line in f if "total_loss" in line][-1]


@pytest.fixture(scope="module")
def trained(world):
    """``trained()``: a tiny BoxSup model trained on the base boxes for 4 iterations from a
    backbone-only initialisation (as Detic's from ImageNet: stem..res4 and res5), trained on
    first use inside a test (whose logging set-up is then undone as for any test)."""
    output = world["root"] / "boxsup"

    def run():
        if not (output / "model_final.pth").is_file():
            state = detic_state_dict(detic_shapes(3, tiny=True, anchors=9), seed=7)
            init = world["root"] / "models" / "imagenet_like.pth"
            init.parent.mkdir(exist_ok=True)
            torch.save({"model": {k: v for k, v in state.items()
                                  if k.startswith(("backbone.", "roi_heads.res5."))}}, init)
            run_train_net(_tiny_argv(
                world, "BoxSup_OVCOCO_CLIP_R50_1x", output, "MODEL.WEIGHTS", init,
                "SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "100", "INPUT.MIN_SIZE_TRAIN",
                "(64,)", "INPUT.MAX_SIZE_TRAIN", "128", "SOLVER.IMS_PER_BATCH", "2",
                "SOLVER.BASE_LR", "0.01"))
        return output

    return run


@pytest.mark.slow
def test_boxsup_trains_on_base_boxes_and_masks_the_novel_class(trained):
    boxsup = trained()
    losses = _final_losses(boxsup)
    assert losses["iteration"] == 3 and losses["loss_cls"] > 0
    assert all(math.isfinite(losses[k]) and losses[k] >= 0 for k in
               ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"))
    state = read_checkpoint(str(boxsup / "model_final.pth"))["model"]
    assert state["roi_heads.box_predictor.freq_weight"].tolist()[2] == 0  # dog: no image
    results = json.loads((boxsup / "inference" / "metrics.json").read_text())
    assert "AP50_novel" in results["coco_generalized_zeroshot_val"]["bbox"]


def _detic_argv(world, boxsup, name, output, max_iter, *extra):
    """Detic's fine-tuning config from the BoxSup model, at tiny sizes. No warm-up: a run
    stopped by a smaller MAX_ITER then has the same LR schedule as the full one."""
    return _tiny_argv(world, name, output, "MODEL.WEIGHTS", boxsup / "model_final.pth",
                      "SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", "3",
                      "DATALOADER.DATASET_BS", "[1, 2]", "DATALOADER.DATASET_MIN_SIZES",
                      "[[64, 64], [48, 48]]", "DATALOADER.DATASET_MAX_SIZES", "[128, 96]",
                      "SOLVER.BASE_LR", "0.01", "MODEL.ROI_BOX_HEAD.WS_NUM_PROPS", "4",
                      "TEST.EVAL_PERIOD", "0", "SOLVER.WARMUP_ITERS", "0", *extra)


@pytest.mark.slow
@pytest.mark.parametrize("name", OVCOCO_CONFIGS[1:])
def test_detic_modes_train_from_boxsup_and_resume_exactly(world, trained, name, monkeypatch):
    boxsup = trained()
    seen = []
    losses = CustomRCNN.losses

    def recording(model, batch):
        result = losses(model, batch)
        seen.append((batch[0]["ann_type"], float(result["image_loss"].detach()),
                     float(result["loss_cls"].detach())))
        return result

    monkeypatch.setattr(CustomRCNN, "losses", recording)
    straight = world["root"] / f"{name}_straight"
    run_train_net(_detic_argv(world, boxsup, name, straight, 6))
    expected = {"max-size": "image", "caption": "caption", "max-size_caption": "captiontag"}
    weak = expected[name.split("1x_")[1]]
    assert {ann for ann, _, _ in seen} == {"box", weak}
    assert all(image > 0 and cls == 0 for ann, image, cls in seen if ann == weak)
    assert all(image == 0 and cls > 0 for ann, image, cls in seen if ann == "box")
    resumed = world["root"] / f"{name}_resumed"
    run_train_net(_detic_argv(world, boxsup, name, resumed, 3))
    run_train_net(["--resume", *_detic_argv(world, boxsup, name, resumed, 6)])
    assert "Resumed from" in (resumed / "log.txt").read_text()
    ours, theirs = (read_checkpoint(str(d / "model_final.pth")) for d in (resumed, straight))
    assert ours["iteration"] == theirs["iteration"] == 6
    for key, value in theirs["model"].items():
        assert torch.equal(ours["model"][key], value), key


@pytest.mark.slow
def test_two_processes_sync_captions_while_one_holds_a_box_batch(world, trained):
    """SYNC_CAPTION_BATCH gathers captions every step, also from a process on a box batch (it
    sends zero rows); DDP needs no unused-parameter search since weak batches return
    connected zeros."""
    name, output = "Detic_OVCOCO_CLIP_R50_1x_caption", world["root"] / "two_processes"
    argv = _detic_argv(world, trained(), name, output, 6, "DATALOADER.DATASET_BS", "[1, 1]")
    launch(recorded_training, num_gpus_per_machine=2, args=(argv, str(output / "kinds")))
    kinds = [json.loads(Path(f"{output / 'kinds'}.{rank}").read_text()) for rank in (0, 1)]
    assert len(kinds[0]) == len(kinds[1]) == 6
    assert any(a != b for a, b in zip(*kinds))  # a box and a caption batch in the same step
    assert read_checkpoint(str(output / "model_final.pth"))["iteration"] == 6
