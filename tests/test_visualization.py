"""select_predictions filters (the original --conf-threshold / --show-unique-boxes /
--max-boxes / --small-region-px semantics) and draw_predictions' footprint."""
import cv2
import numpy as np
import pytest
from PIL import Image

from regionclip.data.mapper import read_image
from regionclip.visualization import draw_predictions, place_labels, score_texts, select_predictions


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


# ------------------------------------------------------------------------------------------
# Label placement, contrast and transparency
# ------------------------------------------------------------------------------------------
def _intersect(a, b):
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _inside(rect, height, width):
    return 0 <= rect[0] < rect[2] <= width and 0 <= rect[1] < rect[3] <= height


SHARED_CORNER_BOXES = [  # x0, y0, x1, y1: nested and side-by-side boxes sharing corners
    [(40, 40, 140, 120), (40, 40, 90, 80), (40, 40, 200, 150)],
    [(60, 60, 120, 120), (0, 0, 60, 60), (60, 0, 120, 60), (0, 60, 60, 120)],
    [(0, 0, 80, 50), (0, 0, 80, 50), (0, 0, 40, 30)],  # at the image's corner
]


@pytest.mark.parametrize("boxes", SHARED_CORNER_BOXES)
def test_labels_of_boxes_sharing_a_corner_do_not_overlap(boxes):
    sizes = [(70, 14)] * len(boxes)
    rects = place_labels(boxes, sizes, (240, 320))
    for k, (rect, (w, h)) in enumerate(zip(rects, sizes)):
        assert (rect[2] - rect[0], rect[3] - rect[1]) == (w, h)
        assert _inside(rect, 240, 320), rect
        assert not any(_intersect(rect, other) for other in rects[:k]), (rect, rects[:k])


def test_labels_stay_inside_the_image_at_every_edge():
    height, width = 100, 150
    boxes = [(0, 0, 30, 20), (140, 0, 150, 10), (0, 90, 10, 100), (120, 80, 150, 100),
             (-20, -10, 200, 130)]  # corners and a box larger than the image
    for box in boxes:
        (rect,) = place_labels([box], [(60, 12)], (height, width))
        assert _inside(rect, height, width), (box, rect)
    first, second = place_labels([(10, 30, 50, 60)] * 2, [(40, 12)] * 2, (height, width))
    assert first == (10, 18, 50, 30)  # above the box, left-aligned: the first choice
    assert second == (10, 30, 50, 42)  # inside its top: the next free choice


def _fill(pixels):
    """The most frequent colour of an [..., 3] array: a label's fill under its text."""
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    return tuple(colours[counts.argmax()])


def test_drawn_labels_of_nested_boxes_are_both_whole():
    image = np.full((200, 300, 3), 90, dtype=np.uint8)
    names, index = ["thing_0049", "thing_0050"], {1: 0, 2: 1}
    preds = [_pred(0.9, (40, 50, 120, 50), category_id=1), _pred(0.8, (40, 50, 40, 10), 2)]
    both = draw_predictions(image, preds, names, index)
    first_alone = draw_predictions(image, preds[:1], names, index)
    second_alone = draw_predictions(image, preds[1:], names, index)
    # the first label (above the box, as when drawn alone) is untouched by the second one
    above = (slice(25, 50), slice(30, 170))
    np.testing.assert_array_equal(both[above], first_alone[above])
    # the second one is whole, just inside the shared corner: its fill colour and text
    (tw, th), base = cv2.getTextSize("thing_0050 80%", cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)
    second = both[50:50 + th + base + 4, 40:40 + tw + 4]
    fill = _fill(second_alone[50 - th - base - 4:50, 40:40 + tw + 4])
    assert _fill(second) == fill != _fill(first_alone[50 - th - base - 4:50, 40:40 + tw + 4])
    assert (second != fill).any(axis=2).sum() > 20, "the second label's text"


def test_label_text_contrasts_with_its_colour():
    image = np.zeros((120, 160, 3), dtype=np.uint8)
    for category in range(6):
        drawn = draw_predictions(image, [_pred(0.5, (20, 40, 100, 50), category)],
                                 [f"c{k}" for k in range(6)], {k: k for k in range(6)})
        band = drawn[26:40, 20:60].reshape(-1, 3).astype(int)  # the label above the box
        colours, counts = np.unique(band, axis=0, return_counts=True)
        fill = colours[counts.argmax()]
        luma = fill @ np.array([0.114, 0.587, 0.299])  # BGR
        text = np.array([0, 0, 0] if luma > 150 else [255, 255, 255])
        assert (band == text).all(axis=1).any(), (fill, text)


def test_bgra_images_are_composited_onto_white():
    bgra = np.zeros((60, 80, 4), dtype=np.uint8)
    bgra[..., :3] = (10, 20, 30)  # stored colour, invisible where alpha is 0
    bgra[:, 40:, 3] = 255
    bgra[:, 20:40, 3] = 128
    drawn = draw_predictions(bgra, [], [], {})
    assert drawn.shape == (60, 80, 3)
    assert (drawn[:, :20] == 255).all() and (drawn[:, 40:] == (10, 20, 30)).all()
    expected = np.rint(np.array([10, 20, 30]) * 128 / 255 + 255 * 127 / 255)
    assert (drawn[:, 20:40] == expected).all()


def test_read_image_composites_transparency_only_when_asked(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    palette = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8) % 2, "P")
    palette.putpalette([0, 0, 200, 0, 200, 0] + [0] * 762)
    palette.save(tmp_path / "p.png", transparency=0)
    dropped = read_image(tmp_path / "a.png", "RGB")
    assert (dropped == (200, 0, 0)).all()  # detectron2's behaviour, for the model
    drawn = read_image(tmp_path / "a.png", "BGR", background=(255, 255, 255))
    assert (drawn[:4] == (0, 0, 200)).all() and (drawn[4:] == 255).all()
    grid = read_image(tmp_path / "p.png", "RGB", background=(9, 9, 9))
    assert (grid[0, 0] == 9).all() and (grid[0, 1] == (0, 200, 0)).all()


def test_scores_are_percentages_unless_one_is_not_a_probability():
    assert score_texts([0.5, 0.064, 1.0]) == ["50%", "6%", "100%"]
    # RPN-fused scores (sqrt(p x objectness logit)) exceed 1: no "146%" labels.
    assert score_texts([1.46, 0.064]) == ["1.46", "0.06"]
    assert score_texts([]) == []
