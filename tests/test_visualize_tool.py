"""tools/visualize_json_results.py on generated datasets and results: what it draws, and its
errors on bad input."""
import json
import os

import numpy as np
import pytest
from _data_utils import coco_json_dataset
from _e2e_utils import save_exif_rotated_jpeg, write_json
from _tool_utils import load_tool
from PIL import Image

from regionclip.data.catalog import get_metadata
from regionclip.data.mapper import read_image
from regionclip.visualization import draw_predictions


def test_visualize_draws_every_image_upright_with_its_predictions(tmp_path):
    json_path, image_dir, dataset = coco_json_dataset(tmp_path / "data", num_images=3,
                                                      image_size=(48, 64))
    content = json.loads(open(json_path).read())
    rotated = content["images"][2]
    upright = np.asarray(Image.open(os.path.join(image_dir, rotated["file_name"])))
    rotated["file_name"] = "rotated.jpg"
    save_exif_rotated_jpeg(os.path.join(image_dir, "rotated.jpg"), upright)
    write_json(json_path, content)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 0.9} for a in content["annotations"] if a["image_id"] != 1]
    write_json(tmp_path / "results.json", results)

    load_tool("visualize_json_results").main(["--input", str(tmp_path / "results.json"),
                                          "--output", str(tmp_path / "drawn"),
                                          "--dataset", dataset])
    assert sorted(os.listdir(tmp_path / "drawn")) == ["000000.png", "000001.png", "rotated.jpg"]
    meta = get_metadata(dataset)
    for img in content["images"][:2]:
        source = read_image(os.path.join(image_dir, img["file_name"]), "BGR")
        mine = [r for r in results if r["image_id"] == img["id"]]
        expected = draw_predictions(source, mine, meta.thing_classes,
                                    meta.thing_dataset_id_to_contiguous_id)
        drawn = read_image(tmp_path / "drawn" / img["file_name"], "BGR")
        np.testing.assert_array_equal(drawn, expected)
        assert np.array_equal(drawn, source) == (not mine)
    assert read_image(tmp_path / "drawn/rotated.jpg").shape == (48, 64, 3)  # upright


def test_visualize_max_images_draws_only_the_first_images(tmp_path):
    json_path, _, dataset = coco_json_dataset(tmp_path / "data", num_images=3, image_size=(48, 64))
    content = json.loads(open(json_path).read())
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
                "score": 0.9} for a in content["annotations"]]
    write_json(tmp_path / "results.json", results)
    load_tool("visualize_json_results").main(["--input", str(tmp_path / "results.json"),
                                          "--output", str(tmp_path / "drawn"),
                                          "--dataset", dataset, "--max-images", "2"])
    assert sorted(os.listdir(tmp_path / "drawn")) == sorted(
        img["file_name"] for img in content["images"][:2])


def test_visualize_draws_transparent_images_over_white(tmp_path):
    _, image_dir, dataset = coco_json_dataset(tmp_path / "data", num_images=1, image_size=(48, 64))
    rgba = np.zeros((48, 64, 4), dtype=np.uint8)
    rgba[..., 2] = 200
    rgba[:, 32:, 3] = 255  # the left half is transparent (and stores blue there)
    Image.fromarray(rgba, "RGBA").save(os.path.join(image_dir, "000000.png"))
    write_json(tmp_path / "results.json", [])
    load_tool("visualize_json_results").main(["--input", str(tmp_path / "results.json"),
                                          "--output", str(tmp_path / "drawn"),
                                          "--dataset", dataset])
    drawn = read_image(tmp_path / "drawn/000000.png", "RGB")
    assert (drawn[:, :32] == 255).all() and (drawn[:, 32:] == (0, 0, 200)).all()


@pytest.mark.parametrize("content, error, message", [
    (None, FileNotFoundError, r"results json \(--input\) not found"),
    ("[{", ValueError, "not valid json"),
    ({"image_id": 1}, ValueError, "list of COCO result dicts"),
    ([{"image_id": 1, "category_id": 1}], ValueError, "entry 0"),
    ([{"image_id": 1, "category_id": 2, "bbox": [0, 0, 5, 5], "score": 1.0}], ValueError,
     "category ids of the results are not classes"),
    ([{"image_id": 9, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 1.0}], ValueError,
     "image ids of the results are not images"),
])
def test_visualize_rejects_bad_results(tmp_path, content, error, message):
    _, _, dataset = coco_json_dataset(tmp_path / "data", num_images=1)
    results = tmp_path / "results.json"
    if isinstance(content, str):
        results.write_text(content)
    elif content is not None:
        write_json(results, content)
    argv = ["--input", str(results), "--output", str(tmp_path / "drawn"), "--dataset", dataset]
    with pytest.raises(error, match=message):
        load_tool("visualize_json_results").main(argv)
    assert not (tmp_path / "drawn").exists()


def test_visualize_reports_missing_dataset_images(tmp_path):
    json_path, image_dir, dataset = coco_json_dataset(tmp_path / "data", num_images=2)
    write_json(tmp_path / "results.json", [])
    os.remove(os.path.join(image_dir, "000001.png"))
    with pytest.raises(FileNotFoundError, match="000001.png"):
        load_tool("visualize_json_results").main(["--input", str(tmp_path / "results.json"),
                                              "--output", str(tmp_path / "drawn"),
                                              "--dataset", dataset])


def test_visualize_refuses_to_draw_over_the_dataset_images(tmp_path):
    json_path, image_dir, dataset = coco_json_dataset(tmp_path / "data", num_images=2)
    write_json(tmp_path / "results.json", [])
    before = {name: open(os.path.join(image_dir, name), "rb").read()
              for name in os.listdir(image_dir)}
    with pytest.raises(ValueError, match="holds the dataset's images"):
        load_tool("visualize_json_results").main(["--input", str(tmp_path / "results.json"),
                                              "--output", image_dir, "--dataset", dataset])
    assert {name: open(os.path.join(image_dir, name), "rb").read()
            for name in os.listdir(image_dir)} == before
