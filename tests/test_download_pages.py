"""Where each official file comes from: every file the documented commands name is known, in
the folder those commands expect, and the missing-file errors say where to get it."""
import re
from pathlib import Path

import pytest

from regionclip.checkpoint import read_state_dict
from regionclip.data import catalog
from regionclip.data.coco import class_names_from_file, load_image_folder
from regionclip.data.coco_ovd import iter_ovd_jsons
from regionclip.download_pages import (
    COCO_PAGE,
    LVIS_PAGE,
    MODEL_ZOO_PAGE,
    file_source,
    missing_file_message,
)
from regionclip.engine.weights import existing_file
from regionclip.model_zoo import DETECTOR_WEIGHTS, RPN_WEIGHTS
from regionclip.modeling.text_encoder import load_embeddings

REPO = Path(__file__).resolve().parents[1]
# pretrained_ckpt/<folder>/<file> as the README and the scripts write it
CKPT_PATH = re.compile(r"pretrained_ckpt/([a-z_]+)/([A-Za-z0-9_.-]+\.pth?)\b")


def _documented_files():
    texts = [REPO / "README.md", *sorted((REPO / "scripts").glob("*.sh"))]
    found = {m.groups() for path in texts for m in CKPT_PATH.finditer(path.read_text())}
    assert len(found) >= 15, found  # the README and scripts name the official files
    return sorted(found)


@pytest.mark.parametrize("folder, name", _documented_files())
def test_every_documented_file_has_a_source_in_its_folder(folder, name):
    source = file_source(f"./some/where/{name}")
    assert source is not None, name
    assert source.folder == f"pretrained_ckpt/{folder}"
    assert MODEL_ZOO_PAGE in source.how or "openai/CLIP" in source.how


def test_every_official_record_and_the_clip_backbone_rpn_have_a_source():
    names = [*DETECTOR_WEIGHTS, *RPN_WEIGHTS, "rpn_lvis_1203_clipbackbone.pth"]
    for name in names:
        assert file_source(name).folder in ("pretrained_ckpt/regionclip", "pretrained_ckpt/rpn")
    for record in DETECTOR_WEIGHTS.values():
        for name in (record.rpn, *record.embeddings):
            assert file_source(name) is not None, name


@pytest.mark.parametrize("name", [n for n in catalog.list_datasets() if "custom_img" not in n])
def test_every_builtin_dataset_json_has_a_source(name):
    json_file = catalog.get_spec(name).json_file
    source = file_source(json_file)
    assert source is not None, json_file
    # under $DETECTRON2_DATASETS, the folder the source names below datasets/
    assert Path(json_file).parent.as_posix().endswith(source.folder.removeprefix("datasets/"))
    page = LVIS_PAGE if name.startswith("lvis") else COCO_PAGE
    assert page in source.how or "tools/prepare_coco_ovd.py" in source.how


def test_user_files_are_not_mistaken_for_official_ones():
    for name in ("cc3m_nouns_emb.pth", "my_classes_emb.pth", "model_final.pth",
                 "regionclip_pretrained-cc_rn50.pth.tmp", "rpn_mine.pth"):
        assert file_source(name) is None, name
    assert "check the path" in missing_file_message("my.pth", "checkpoint")


def test_missing_checkpoint_names_file_purpose_and_page(tmp_path):
    path = tmp_path / "regionclip_pretrained-cc_rn50x4.pth"
    with pytest.raises(FileNotFoundError) as info:
        read_state_dict(str(path))
    message = str(info.value)
    assert message.startswith(f"checkpoint not found: {path};")
    assert MODEL_ZOO_PAGE in message and "pretrained_ckpt/regionclip/" in message
    assert "\n" not in message


def test_missing_embedding_and_api_files_say_where_to_get_them(tmp_path):
    emb = tmp_path / "pretrained_ckpt/concept_emb/lvis_1203_cls_emb_rn50x4.pth"
    with pytest.raises(FileNotFoundError) as info:
        load_embeddings(str(emb))
    assert str(info.value).startswith(f"class embedding file not found: {emb};")
    assert MODEL_ZOO_PAGE in str(info.value) and "(Google Drive folder concept_emb/)" in \
        str(info.value)
    with pytest.raises(FileNotFoundError, match=re.escape(MODEL_ZOO_PAGE) + ".*folder rpn/"):
        existing_file(tmp_path / "rpn_lvis_866_lsj.pth", "RPN checkpoint")


def test_missing_ovd_json_names_the_tool_that_builds_it(tmp_path, monkeypatch):
    monkeypatch.setenv(catalog.DATASETS_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        catalog.get_dataset_dicts("coco_2017_ovd_b_train")
    message = str(info.value)
    assert "ovd_ins_train2017_b.json" in message and str(tmp_path) in message
    assert "python tools/prepare_coco_ovd.py --coco-root" in message


def test_missing_lvis_and_coco_files_name_their_pages(tmp_path, monkeypatch):
    monkeypatch.setenv(catalog.DATASETS_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(LVIS_PAGE)):
        catalog.get_metadata("lvis_v1_val_custom_img")
    with pytest.raises(FileNotFoundError, match=re.escape(COCO_PAGE)):
        catalog.get_dataset_dicts("coco_2017_val")
    with pytest.raises(FileNotFoundError, match=re.escape(COCO_PAGE)):
        next(iter_ovd_jsons(str(tmp_path / "coco")))


def test_missing_user_inputs_of_the_scripts_say_what_to_put_there(tmp_path):
    with pytest.raises(FileNotFoundError, match="put your own images in it.*datasets/README.md"):
        load_image_folder(str(tmp_path / "datasets/custom_images"))
    with pytest.raises(FileNotFoundError, match="one class name per line.*custom_concepts/"):
        class_names_from_file(str(tmp_path / "datasets/custom_concepts/concepts.txt"))
