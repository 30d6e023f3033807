"""Preflight (issue 13): every missing input of a run is named at once, with its purpose and
where to get it, before anything is loaded or written; inputs a run does not read are not."""
import logging
from pathlib import Path

import pytest
from _api_utils import TINY_CONFIG, TINY_RPN_CONFIG, save_pretrained, scene
from _data_utils import make_coco_dataset
from _e2e_utils import save_embedding_file, tiny_checkpoint
from _tool_utils import run_train_net
from PIL import Image

import regionclip
from regionclip.cli import main
from regionclip.config import load_config
from regionclip.download_pages import LVIS_PAGE, MODEL_ZOO_PAGE
from regionclip.engine import defaults
from regionclip.engine.preflight import config_inputs

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tests" / "tiny.yaml")
TINY_DETIC = str(REPO / "configs" / "tests" / "tiny_detic.yaml")


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    monkeypatch.delenv("REGIONCLIP_DEBUG", raising=False)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path / "datasets"))
    log = logging.getLogger("regionclip")
    saved = (list(log.handlers), log.level, log.propagate)
    yield
    log.handlers[:], log.level, log.propagate = saved


def _train_net(argv):
    return defaults.run(defaults.default_argument_parser().parse_args([str(a) for a in argv]))


def test_train_net_names_every_missing_input_at_once(tmp_path, capsys):
    ckpt = tmp_path / "pretrained_ckpt/regionclip/regionclip_pretrained-cc_rn50.pth"
    argv = ["--eval-only", "--config-file", TINY, "OUTPUT_DIR", tmp_path / "out",
            "MODEL.WEIGHTS", ckpt,
            "MODEL.CLIP.TEXT_EMB_PATH", tmp_path / "nothere_emb.pth",
            "MODEL.CLIP.CROP_REGION_TYPE", "RPN",
            "MODEL.CLIP.OFFLINE_RPN_CONFIG", tmp_path / "rpn.yaml",
            "MODEL.CLIP.BB_RPN_WEIGHTS", ckpt,  # one file under two keys: reported once
            "DATASETS.TEST", '("lvis_v1_val_custom_img", "coco_json:my.json:my_images")',
            "INPUT_DIR", tmp_path / "my_photos"]
    with pytest.raises(SystemExit) as status:
        _train_net(argv)
    assert status.value.code == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "train_net: error: 7 inputs are missing (nothing was loaded or written):"
    expected = [  # (start of the line, words it holds), in the order of the message
        (f"checkpoint (MODEL.WEIGHTS) and offline RPN checkpoint (MODEL.CLIP.BB_RPN_WEIGHTS) "
         f"not found: {ckpt}", [MODEL_ZOO_PAGE, "pretrained_ckpt/regionclip/"]),
        ("offline RPN config (MODEL.CLIP.OFFLINE_RPN_CONFIG)", ["rpn.yaml", "check the path"]),
        ("class embeddings (MODEL.CLIP.TEXT_EMB_PATH)", ["nothere_emb.pth"]),
        ("image folder (INPUT_DIR) of dataset 'lvis_v1_val_custom_img' not found: "
         f"{tmp_path / 'my_photos'}", []),
        ("class vocabulary json of dataset 'lvis_v1_val_custom_img' (under "
         f"'{tmp_path / 'datasets'}', set with $DETECTRON2_DATASETS)",
         ["lvis/lvis_v1_val.json", LVIS_PAGE, "datasets/lvis/"]),
        ("annotation file of dataset 'coco_json:my.json:my_images' not found: my.json", []),
        ("image folder of dataset 'coco_json:my.json:my_images' not found: my_images", []),
    ]
    assert len(lines) == 1 + len(expected)
    for line, (start, words) in zip(lines[1:], expected):
        assert line.startswith(f"  - {start}"), line
        assert all(word in line for word in words), (words, line)
    assert not (tmp_path / "out").exists()


def test_the_offline_rpn_configs_bases_are_checked_too(tmp_path):
    (tmp_path / "rpn.yaml").write_text("_BASE_: ./Base-RPN.yaml\n")
    cfg = load_config(TINY, ["MODEL.CLIP.CROP_REGION_TYPE", "RPN",
                             "MODEL.CLIP.OFFLINE_RPN_CONFIG", str(tmp_path / "rpn.yaml")])
    missing = [i for i in config_inputs(cfg, training=False) if "_BASE_" in i.purpose]
    assert [i.path for i in missing] == [str(tmp_path / "Base-RPN.yaml")]
    assert "MODEL.CLIP.OFFLINE_RPN_CONFIG" in missing[0].purpose


def test_inputs_a_run_does_not_read_are_not_required(tmp_path):
    """Ground-truth regions: the offline RPN's files are not read, so they may be absent."""
    json_path, image_dir = make_coco_dataset(tmp_path / "data")
    argv = ["--eval-only", "--config-file", TINY, "OUTPUT_DIR", tmp_path / "out",
            "MODEL.WEIGHTS", tiny_checkpoint(tmp_path / "tiny.pth"),
            "MODEL.CLIP.TEXT_EMB_PATH", save_embedding_file(tmp_path / "emb.pth", 3, 32),
            "MODEL.CLIP.OFFLINE_RPN_CONFIG", tmp_path / "nothere.yaml",
            "MODEL.CLIP.BB_RPN_WEIGHTS", tmp_path / "nothere.pth",
            "DATASETS.TEST", f'("coco_json:{json_path}:{image_dir}",)']
    results = run_train_net(argv)
    assert "bbox" in results[f"coco_json:{json_path}:{image_dir}"]


def _paths(cfg, training, weights=True):
    return [item.path for item in config_inputs(cfg, training, weights) if item.path]


def test_config_inputs_follow_what_each_run_reads(tmp_path):
    cfg = load_config(TINY, ["MODEL.WEIGHTS", "w.pth", "DATASETS.TRAIN", '("coco_json:t.json:t",)',
                             "DATASETS.TEST", '("coco_json:v.json:v",)'])
    assert _paths(cfg, training=False) == ["w.pth", "v.json", "v"]
    assert _paths(cfg, training=True) == ["w.pth", "t.json", "t", "v.json", "v"]
    assert _paths(cfg, training=True, weights=False) == ["t.json", "t", "v.json", "v"]

    pretrain = load_config(TINY, ["DATASETS.TRAIN", '("imgtxtpairs",)',
                                  "DATASETS.FACTORY_TRAIN", '("tsv",)',
                                  "DATASETS.PATH_TRAIN", '("cc3m+shards/{0..9}.tar",)',
                                  "MODEL.CLIP.CONCEPT_POOL_EMB", "concepts.pth"])
    inputs = config_inputs(pretrain, training=True)
    assert [i.path for i in inputs if i.path] == ["concepts.pth", "cc3m", "shards/{0..9}.tar"]

    detic = load_config(TINY_DETIC, ["MODEL.ROI_BOX_HEAD.CAT_FREQ_PATH", "freq.json",
                                     "MODEL.ROI_BOX_HEAD.IGNORE_ZERO_CATS", "True",
                                     "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_PATH", "zs.npy"])
    assert "freq.json" in _paths(detic, training=True)
    assert "freq.json" not in _paths(detic, training=False)  # evaluation never reads it
    assert "zs.npy" in _paths(detic, training=False)


def test_resumed_training_does_not_need_the_initial_weights(tmp_path):
    """With a checkpoint in OUTPUT_DIR, --resume loads it instead of MODEL.WEIGHTS."""
    json_path, image_dir = make_coco_dataset(tmp_path / "data")
    dataset = f'("coco_json:{json_path}:{image_dir}",)'
    argv = ["--config-file", TINY, "OUTPUT_DIR", tmp_path / "out", "MODEL.WEIGHTS",
            tiny_checkpoint(tmp_path / "tiny.pth"), "DATASETS.TRAIN", dataset,
            "SOLVER.MAX_ITER", "1"]
    run_train_net(argv)
    (tmp_path / "tiny.pth").unlink()
    with pytest.raises(FileNotFoundError, match="tiny.pth"):
        run_train_net(["--overwrite", *argv])
    run_train_net(["--resume", *argv])


def test_detect_names_every_missing_argument_before_loading(tmp_path, capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(regionclip.Detector, "from_pretrained", no_model)
    Image.fromarray(scene()).save(tmp_path / "here.png")
    argv = ["detect", str(tmp_path / "here.png"), str(tmp_path / "gone.png"),
            str(tmp_path / "gone_folder"), "--vocabulary", str(tmp_path / "names.txt"),
            "--weights", str(tmp_path / "regionclip_pretrained-cc_rn50x4.pth"),
            "--config", "tests/tiny.yaml",  # found under configs/, as the loader finds it
            "--out", str(tmp_path / "out" / "results.json"), "--quiet"]
    assert main(argv) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "regionclip detect: error: 4 inputs are missing (nothing was loaded " \
                       "or written):"
    assert [line.split(" not found: ")[0] for line in lines[1:]] == [
        "  - checkpoint (--weights)", "  - image or image folder",
        "  - image or image folder", "  - class-name file (--vocabulary)"]
    assert MODEL_ZOO_PAGE in lines[1] and "gone_folder" in lines[3]
    assert not (tmp_path / "out").exists()


def test_embed_names_a_single_missing_input_in_one_line(tmp_path, capsys):
    weights = save_pretrained(tmp_path / "regionclip_pretrained-cc_rn50.pth")
    argv = ["embed", str(tmp_path / "gone.jpg"), "--boxes", "0,0,5,5", "--weights", weights,
            "--variant", "tiny", "--config", TINY_CONFIG, "--rpn-config", TINY_RPN_CONFIG,
            "--out", str(tmp_path / "regions.pth"), "--quiet"]
    assert main(argv) == 1
    error = capsys.readouterr().err
    assert error.splitlines() == [f"regionclip embed: error: image not found: {tmp_path}/"
                                  "gone.jpg; check the path (the official files and where to "
                                  "get them: MODEL_ZOO.md, datasets/README.md)"]
