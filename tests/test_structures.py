"""Boxes, BoxMode, pairwise_iou, Instances and ImageList against hand-computed cases."""
import numpy as np
import pytest
import torch

from regionclip.structures import Boxes, BoxMode, ImageList, Instances, pairwise_iou


def _boxes():
    return Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 15.0, 25.0], [1, 2, 3, 4]]))


# ---------------------------------------------------------------- Boxes / BoxMode


def test_boxes_empty_and_dtype():
    assert Boxes(torch.empty(0)).tensor.shape == (0, 4)
    assert Boxes([]).tensor.shape == (0, 4)
    assert Boxes(torch.tensor([[0, 0, 1, 1]])).tensor.dtype == torch.float32
    with pytest.raises(ValueError, match=r"\[N, 4\]"):
        Boxes(torch.zeros(3, 5))


def test_boxes_area_centers_nonempty():
    boxes = _boxes()
    torch.testing.assert_close(boxes.area(), torch.tensor([100.0, 200.0, 4.0]))
    torch.testing.assert_close(boxes.get_centers(), torch.tensor([[5.0, 5], [10, 15], [2, 3]]))
    thin = Boxes(torch.tensor([[0.0, 0, 10, 0], [0, 0, 2, 3], [5, 5, 4, 9]]))
    assert thin.nonempty().tolist() == [False, True, False]
    assert thin.nonempty(threshold=2.0).tolist() == [False, False, False]


def test_boxes_clip_scale_in_place():
    boxes = Boxes(torch.tensor([[-5.0, -1.0, 30.0, 8.0], [2.0, 3.0, 4.0, 50.0]]))
    boxes.clip((20, 25))  # (height, width)
    assert boxes.tensor.tolist() == [[0.0, 0.0, 25.0, 8.0], [2.0, 3.0, 4.0, 20.0]]
    boxes.scale(2.0, 0.5)
    assert boxes.tensor.tolist() == [[0.0, 0.0, 50.0, 4.0], [4.0, 1.5, 8.0, 10.0]]
    with pytest.raises(ValueError, match="infinite or NaN"):
        Boxes(torch.tensor([[0.0, 0.0, float("inf"), 1.0]])).clip((5, 5))


def test_boxes_indexing_cat_iter_clone():
    boxes = _boxes()
    assert boxes[1].tensor.tolist() == [[5.0, 5.0, 15.0, 25.0]]
    assert boxes[-1].tensor.shape == (1, 4)
    assert len(boxes[1:]) == 2
    assert boxes[torch.tensor([True, False, True])].tensor[:, 0].tolist() == [0.0, 1.0]
    assert boxes[torch.tensor([2, 0])].tensor[:, 0].tolist() == [1.0, 0.0]
    assert [b.tolist() for b in boxes][2] == [1.0, 2.0, 3.0, 4.0]
    cat = Boxes.cat([boxes, boxes[0]])
    assert len(cat) == 4 and cat.tensor.data_ptr() != boxes.tensor.data_ptr()
    assert len(Boxes.cat([])) == 0
    clone = boxes.clone()
    clone.tensor[0, 0] = 99
    assert boxes.tensor[0, 0] == 0
    assert boxes.to("cpu").device == torch.device("cpu")


def test_boxmode_convert_all_containers():
    xywh = [1.0, 2.0, 3.0, 4.0]
    xyxy = [1.0, 2.0, 4.0, 6.0]
    assert BoxMode.convert(xywh, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) == xyxy
    assert BoxMode.convert(tuple(xyxy), BoxMode.XYXY_ABS, BoxMode.XYWH_ABS) == tuple(xywh)
    arr = np.array([xywh, xywh])
    out = BoxMode.convert(arr, BoxMode.XYWH_ABS, BoxMode.XYXY_ABS)
    assert isinstance(out, np.ndarray) and out.tolist() == [xyxy, xyxy]
    assert arr.tolist() == [xywh, xywh]  # input untouched
    tensor = torch.tensor([xyxy])
    assert BoxMode.convert(tensor, 0, 1).tolist() == [xywh]  # int modes as stored in dicts
    assert BoxMode.convert(tensor, BoxMode.XYXY_ABS, BoxMode.XYXY_ABS) is tensor
    assert BoxMode.XYWH_ABS == 1


def test_pairwise_iou_hand_computed():
    a = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 4.0, 4.0]]))
    b = Boxes(torch.tensor([[5.0, 5.0, 15.0, 15.0], [0.0, 0.0, 10.0, 10.0], [20, 20, 30, 30]]))
    expected = torch.tensor([[25 / 175, 1.0, 0.0], [0.0, 16 / 100, 0.0]])
    torch.testing.assert_close(pairwise_iou(a, b), expected)


def test_pairwise_iou_empty_and_degenerate():
    assert pairwise_iou(Boxes(torch.empty(0, 4)), _boxes()).shape == (0, 3)
    assert pairwise_iou(_boxes(), Boxes([])).shape == (3, 0)
    point = Boxes(torch.tensor([[3.0, 3.0, 3.0, 3.0]]))
    assert pairwise_iou(point, point).tolist() == [[0.0]]  # detectron2: 0, not NaN


# ---------------------------------------------------------------- Instances


def _instances():
    return Instances(
        (20, 30),
        pred_boxes=_boxes(),
        scores=torch.tensor([0.9, 0.5, 0.1]),
        names=["a", "b", "c"],
    )


def test_instances_fields_and_attributes():
    inst = _instances()
    assert len(inst) == 3 and inst.image_size == (20, 30)
    inst.pred_classes = torch.tensor([1, 2, 3])
    assert inst.has("pred_classes") and inst.get("pred_classes").tolist() == [1, 2, 3]
    assert list(inst.get_fields()) == ["pred_boxes", "scores", "names", "pred_classes"]
    inst.remove("pred_classes")
    assert not inst.has("pred_classes")
    with pytest.raises(AttributeError, match="gt_masks"):
        inst.gt_masks


def test_instances_length_mismatch_names_fields():
    inst = _instances()
    with pytest.raises(ValueError, match=r"'gt_classes' has length 2 .* 'pred_boxes'"):
        inst.gt_classes = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="'b'"):
        Instances((1, 1), a=torch.zeros(2), b=torch.zeros(3))


@pytest.mark.parametrize(
    "item, expected",
    [
        (1, [1]),
        (-1, [2]),
        (slice(0, 2), [0, 1]),
        (torch.tensor([True, False, True]), [0, 2]),
        (torch.tensor([2, 0]), [2, 0]),
    ],
)
def test_instances_indexing_every_field(item, expected):
    inst = _instances()[item]
    assert inst.names == ["abc"[i] for i in expected]
    torch.testing.assert_close(inst.scores, torch.tensor([0.9, 0.5, 0.1])[expected])
    assert inst.pred_boxes.tensor.tolist() == _boxes().tensor[expected].tolist()
    assert inst.image_size == (20, 30)


def test_instances_index_errors():
    with pytest.raises(IndexError):
        _instances()[3]
    with pytest.raises(IndexError):
        _instances()[torch.tensor([True, False])]


def test_instances_cat_and_to():
    a, b = _instances(), _instances()[1:]
    cat = Instances.cat([a, b])
    assert len(cat) == 5 and cat.names == ["a", "b", "c", "b", "c"]
    assert cat.scores.tolist() == pytest.approx([0.9, 0.5, 0.1, 0.5, 0.1])
    assert len(cat.pred_boxes) == 5
    assert Instances.cat([a]) is a
    with pytest.raises(ValueError, match="Image sizes differ"):
        Instances.cat([a, Instances((1, 1), **a.get_fields())])
    with pytest.raises(ValueError, match="Fields differ"):
        Instances.cat([a, Instances((20, 30), scores=torch.zeros(1))])
    moved = a.to(torch.float64)
    assert moved.scores.dtype == torch.float64 and moved.names == a.names
    assert moved.pred_boxes.tensor.dtype == torch.float32


def test_instances_repr_and_empty():
    text = repr(_instances())
    assert text.startswith("Instances(num_instances=3, image_height=20, image_width=30")
    assert "scores: tensor" in text
    empty = Instances((4, 5))
    assert "num_instances=0" in repr(empty)
    with pytest.raises(TypeError):
        len(empty)


# ---------------------------------------------------------------- ImageList


def test_image_list_pads_right_bottom():
    a = torch.ones(3, 5, 7)
    b = torch.full((3, 6, 4), 2.0)
    images = ImageList.from_tensors([a, b], pad_value=-1.0)
    assert images.tensor.shape == (2, 3, 6, 7) and images.image_sizes == [(5, 7), (6, 4)]
    assert len(images) == 2
    torch.testing.assert_close(images[0], a)
    torch.testing.assert_close(images[1], b)
    assert (images.tensor[0, :, 5:, :] == -1).all() and (images.tensor[1, :, :, 4:] == -1).all()


def test_image_list_size_divisibility():
    tensors = [torch.zeros(3, 33, 20), torch.zeros(3, 10, 64)]
    assert ImageList.from_tensors(tensors, size_divisibility=32).tensor.shape == (2, 3, 64, 64)
    single = ImageList.from_tensors([torch.zeros(1, 32, 32)], size_divisibility=32)
    assert single.tensor.shape == (1, 1, 32, 32)
    assert ImageList.from_tensors([torch.zeros(5, 9)], 4).tensor.shape == (1, 8, 12)


def test_image_list_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        ImageList.from_tensors([])
    with pytest.raises(ValueError, match="leading dims"):
        ImageList.from_tensors([torch.zeros(3, 4, 4), torch.zeros(1, 4, 4)])
