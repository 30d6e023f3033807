"""R-CNN box-delta coding with detectron2's exact formulas.

The released heads were trained against detectron2's `Box2BoxTransform`, so the formulas
(width ``x2 - x1`` without ``+1``, centre ``x1 + 0.5 * width``, weights, clamp) must match it.
"""
import math
from typing import Sequence

import torch

# Largest log-scale a predicted dw/dh may apply: it turns a 16 px anchor into a 1000 px box.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _centres_and_sizes(boxes: torch.Tensor):
    """[N, 4] xyxy -> (ctr_x, ctr_y, widths, heights), each [N]."""
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights, widths, heights


class Box2BoxTransform:
    """Encode a target box relative to a source box as (dx, dy, dw, dh) and back.

    dx = wx * (tx - sx) / sw, dy = wy * (ty - sy) / sh, dw = ww * log(tw / sw),
    dh = wh * log(th / sh), with (x, y) box centres and (w, h) sizes.
    """

    def __init__(
        self,
        weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        scale_clamp: float = DEFAULT_SCALE_CLAMP,
    ):
        """weights: (wx, wy, ww, wh) multipliers of the deltas; scale_clamp: upper bound on
        dw/dh (after dividing by the weights) when decoding."""
        if len(weights) != 4:
            raise ValueError(f"Box2BoxTransform needs 4 weights, got {weights}")
        self.weights = tuple(float(w) for w in weights)
        self.scale_clamp = scale_clamp

    def get_deltas(self, src_boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
        """[N, 4] deltas (dx, dy, dw, dh) that turn ``src_boxes`` into ``target_boxes`` (both
        [N, 4] xyxy; source boxes must have positive width)."""
        src_x, src_y, src_w, src_h = _centres_and_sizes(src_boxes)
        if not bool((src_w > 0).all()):
            raise ValueError("Input boxes to Box2BoxTransform are not valid (width <= 0)")
        tgt_x, tgt_y, tgt_w, tgt_h = _centres_and_sizes(target_boxes)
        wx, wy, ww, wh = self.weights
        dx = wx * (tgt_x - src_x) / src_w
        dy = wy * (tgt_y - src_y) / src_h
        dw = ww * torch.log(tgt_w / src_w)
        dh = wh * torch.log(tgt_h / src_h)
        return torch.stack((dx, dy, dw, dh), dim=1)

    def apply_deltas(self, deltas: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """[N, k*4] xyxy boxes from deltas [N, k*4] (k >= 1 transforms per box, e.g. one per
        class) on boxes [N, 4] xyxy (cast to ``deltas.dtype``; half-precision deltas, as AMP
        makes them, are decoded in float32, as detectron2 does: a bf16 box coordinate near 600
        px is rounded to 4 px); dw/dh are clamped at ``scale_clamp`` before exp."""
        if deltas.dtype in (torch.float16, torch.bfloat16):
            deltas = deltas.float()
        ctr_x, ctr_y, widths, heights = _centres_and_sizes(boxes.to(deltas.dtype))
        wx, wy, ww, wh = self.weights
        dx = deltas[:, 0::4] / wx
        dy = deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)

        pred_ctr_x = dx * widths[:, None] + ctr_x[:, None]
        pred_ctr_y = dy * heights[:, None] + ctr_y[:, None]
        pred_w = torch.exp(dw) * widths[:, None]
        pred_h = torch.exp(dh) * heights[:, None]
        pred = (pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h,
                pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h)
        return torch.stack(pred, dim=2).reshape(deltas.shape)
