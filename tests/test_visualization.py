"""select_predictions filters (the original --conf-threshold / --show-unique-boxes /
--max-boxes / --small-region-px semantics) and draw_predictions' footprint."""
import numpy as np

from regionclip.visualization import draw_predictions, select_predictions


def _pred(score, bbox, category_id=1):
    return {"image_id": 1, "category_id": category_id, "bbox": list(bbox), "score": score}


def _scores(predictions):
    return [p["score"] for p in predictions]


def test_threshold_is_strict_and_output_is_score_sorted():
    preds = [_pred(0.5, (0, 0, 5, 5)), _pred(0.3, (1, 1, 5, 5)), _pred(0.51, (2, 2, 5, 5)),
             _pred(0.9, (3, 3, 5, 5))]
    assert _scores(select_predictions(preds, conf_threshold=0.5)) == [0.9, 0.51]


def test_without_unique_boxes_there_is_no_cap_and_no_size_filter():
    preds = [_pred(0.9 - i * 0.01, (i, 0, 2, 2)) for i in range(40)]
    kept = select_predictions(preds, 0.0, unique_boxes=False, max_boxes=30, small_region_px=100)
    assert len(kept) == 40


def test_unique_boxes_keep_the_best_class_of_each_exact_box():
    box_a, box_b = (10, 10, 20, 20), (10, 10, 20, 21)
    preds = [_pred(0.6, box_a, 2), _pred(0.8, box_a, 1), _pred(0.7, box_b, 3),
             _pred(0.65, box_b, 4)]
    kept = select_predictions(preds, 0.0, unique_boxes=True)
    assert [(p["category_id"], tuple(p["bbox"])) for p in kept] == [(1, box_a), (3, box_b)]


def test_max_boxes_counts_predictions_before_deduplication():
    box_a, box_b = (0, 0, 10, 10), (5, 5, 10, 10)
    preds = [_pred(0.9, box_a, 1), _pred(0.8, box_a, 2), _pred(0.7, box_b, 1)]
    assert len(select_predictions(preds, 0.0, unique_boxes=True, max_boxes=2)) == 1
    assert len(select_predictions(preds, 0.0, unique_boxes=True, max_boxes=3)) == 2


def test_small_region_filter_is_in_square_pixels():
    preds = [_pred(0.9, (0, 0, 10, 9)), _pred(0.8, (50, 50, 30, 30))]  # 90 and 900 px^2
    assert len(select_predictions(preds, 0.0, True, small_region_px=90)) == 2
    kept = select_predictions(preds, 0.0, True, small_region_px=91)
    assert [tuple(p["bbox"]) for p in kept] == [(50, 50, 30, 30)]


def test_small_regions_do_not_use_up_max_boxes_budget_beyond_the_first_n():
    small, big = (0, 0, 2, 2), (20, 20, 40, 40)
    preds = [_pred(0.9, small), _pred(0.8, big)]
    kept = select_predictions(preds, 0.0, True, max_boxes=1, small_region_px=10)
    assert kept == []  # the only examined prediction is too small


def _changed(a, b):
    return np.any(a != b, axis=2)


def test_drawing_changes_only_box_edges_and_the_label_band():
    image = np.full((120, 160, 3), 40, dtype=np.uint8)
    x, y, w, h = 30, 50, 60, 40
    pred = _pred(0.9, (x, y, w, h), category_id=7)
    drawn = draw_predictions(image, [pred], ["thing"], {7: 0})
    assert drawn.shape == image.shape and drawn.dtype == image.dtype
    assert np.all(image == 40), "the input image must not be modified"
    changed = _changed(drawn, image)
    t = 2  # generous bound on the line thickness for a 160 px image
    assert changed[y, x + w // 2] and changed[y + h, x + w // 2]  # top and bottom edges
    assert changed[y + h // 2, x] and changed[y + h // 2, x + w]  # left and right edges
    assert not changed[y + t + 1:y + h - t, x + t + 1:x + w - t].any(), "box interior"
    rows, cols = np.nonzero(changed)
    inside = (rows >= y - t) & (rows <= y + h + t) & (cols >= x - t) & (cols <= x + w + t)
    label = (rows < y) & (rows >= y - 25) & (cols >= x - t)
    assert np.all(inside | label), "pixels changed away from the box and its label"
    assert changed[:y].any(), "a label is drawn above the box"


def test_drawing_nothing_returns_an_equal_copy():
    image = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    drawn = draw_predictions(image, [], [], {})
    assert drawn is not image and np.array_equal(drawn, image)
