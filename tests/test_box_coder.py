"""Box2BoxTransform: hand-computed deltas, round trip, clamp, and torchvision's coder."""
import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from regionclip.modeling.box_coder import DEFAULT_SCALE_CLAMP, Box2BoxTransform

WEIGHTS = (10.0, 10.0, 5.0, 5.0)


def _random_boxes(n, seed):
    gen = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=gen) * 100
    wh = 1 + torch.rand(n, 2, generator=gen) * 50
    return torch.cat([xy, xy + wh], dim=1)


def test_hand_computed_deltas():
    src = torch.tensor([[0.0, 0.0, 10.0, 20.0]])  # centre (5, 10), size 10 x 20
    tgt = torch.tensor([[2.0, 4.0, 22.0, 24.0]])  # centre (12, 14), size 20 x 20
    deltas = Box2BoxTransform(WEIGHTS).get_deltas(src, tgt)
    expected = [[10 * 7 / 10, 10 * 4 / 20, 5 * math.log(2.0), 5 * math.log(1.0)]]
    torch.testing.assert_close(deltas, torch.tensor(expected))
    torch.testing.assert_close(Box2BoxTransform(WEIGHTS).apply_deltas(deltas, src), tgt)


def test_round_trip_recovers_targets():
    coder = Box2BoxTransform(WEIGHTS)
    src, tgt = _random_boxes(64, 0), _random_boxes(64, 1)
    recovered = coder.apply_deltas(coder.get_deltas(src, tgt), src)
    torch.testing.assert_close(recovered, tgt, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_deltas_are_decoded_in_float32(dtype):
    """Under AMP the RPN's deltas are half precision; proposals keep float32 resolution."""
    anchor = torch.tensor([[600.3, 410.7, 690.1, 512.9]])
    decoded = Box2BoxTransform(WEIGHTS).apply_deltas(torch.zeros(1, 4, dtype=dtype), anchor)
    assert decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, anchor)


def test_class_specific_deltas_k4():
    coder = Box2BoxTransform(WEIGHTS)
    src = _random_boxes(8, 2)
    targets = [_random_boxes(8, 3 + k) for k in range(3)]
    deltas = torch.cat([coder.get_deltas(src, t) for t in targets], dim=1)  # [8, 12]
    decoded = coder.apply_deltas(deltas, src)
    assert decoded.shape == (8, 12)
    torch.testing.assert_close(decoded, torch.cat(targets, dim=1), rtol=0, atol=1e-4)


def test_scale_clamp_limits_growth():
    coder = Box2BoxTransform(WEIGHTS)
    assert coder.scale_clamp == pytest.approx(math.log(1000.0 / 16)) == DEFAULT_SCALE_CLAMP
    box = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    deltas = torch.tensor([[0.0, 0.0, 100.0, -25.0]])  # dw = 20, dh = -5 after the weights
    out = coder.apply_deltas(deltas, box)[0]
    assert out[2] - out[0] == pytest.approx(1000.0, rel=1e-5)  # clamped to 16 * 1000 / 16
    assert out[3] - out[1] == pytest.approx(16 * math.exp(-5.0), rel=1e-4)  # no lower clamp
    shrunk = coder.apply_deltas(torch.tensor([[0.0, 0.0, -25.0, 100.0]]), box)[0]
    assert shrunk[2] - shrunk[0] == pytest.approx(16 * math.exp(-5.0), rel=1e-4)  # nor for dw


def test_invalid_source_boxes_raise():
    with pytest.raises(ValueError, match="not valid"):
        Box2BoxTransform(WEIGHTS).get_deltas(torch.tensor([[5.0, 0, 5, 4]]), torch.ones(1, 4))


def test_matches_torchvision_box_coder():
    ours = Box2BoxTransform(WEIGHTS)
    theirs = BoxCoder(WEIGHTS, bbox_xform_clip=DEFAULT_SCALE_CLAMP)
    src, tgt = _random_boxes(32, 4), _random_boxes(32, 5)
    torch.testing.assert_close(ours.get_deltas(src, tgt), theirs.encode_single(tgt, src))
    deltas = torch.randn(32, 4, generator=torch.Generator().manual_seed(6)) * 3
    torch.testing.assert_close(ours.apply_deltas(deltas, src), theirs.decode_single(deltas, src))
