"""The toy world's object categories, their open-vocabulary split and colour palette.

Every category is drawn as a binary mask on a square canonical canvas (``CANVAS`` pixels, the
object centred and filling it); the scene places it with a random scale, aspect, rotation and
colour. Shapes vary a little per instance (e.g. a star's inner radius) so that a category is a
family of shapes, not one template. Colour is drawn independently of the category, so only
shape tells categories apart.
"""
from typing import Callable, Dict, Tuple

import cv2
import numpy as np

CANVAS = 96
_C = CANVAS / 2.0  # canvas centre
_R = CANVAS * 0.46  # radius the shapes fill


def _poly(mask: np.ndarray, points) -> None:
    cv2.fillPoly(mask, [np.round(np.asarray(points)).astype(np.int32)], 255)


def _regular(sides: int, radius: float, phase: float = -np.pi / 2, center=(_C, _C)):
    angles = phase + 2 * np.pi * np.arange(sides) / sides
    return np.stack([center[0] + radius * np.cos(angles), center[1] + radius * np.sin(angles)], 1)


def _disk(mask, x, y, r, value=255) -> None:
    cv2.circle(mask, (int(round(x)), int(round(y))), int(round(r)), value, -1)


def _rect(mask, x0, y0, x1, y1) -> None:
    cv2.rectangle(mask, (int(round(x0)), int(round(y0))), (int(round(x1)), int(round(y1))), 255, -1)


def circle(mask, rng):
    _disk(mask, _C, _C, _R)


def square(mask, rng):
    half = _R * 0.8
    _rect(mask, _C - half, _C - half, _C + half, _C + half)


def triangle(mask, rng):
    _poly(mask, _regular(3, _R, center=(_C, _C + _R * 0.2)))


def star(mask, rng):
    outer, inner = _regular(5, _R), _regular(5, _R * rng.uniform(0.36, 0.5), -np.pi / 2 + np.pi / 5)
    _poly(mask, np.stack([outer, inner], 1).reshape(-1, 2))


def heart(mask, rng):
    t = np.linspace(0, 2 * np.pi, 60)
    x = 16 * np.sin(t) ** 3
    y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    _poly(mask, np.stack([_C + x * _R / 17, _C - y * _R / 17 - _R * 0.05], 1))


def cross(mask, rng):
    arm = _R * rng.uniform(0.28, 0.4)
    _rect(mask, _C - _R, _C - arm, _C + _R, _C + arm)
    _rect(mask, _C - arm, _C - _R, _C + arm, _C + _R)


def arrow(mask, rng):
    shaft, head = _R * rng.uniform(0.18, 0.28), _R * rng.uniform(0.55, 0.75)
    tip_x = _C + _R
    _rect(mask, _C - _R, _C - shaft, tip_x - head * 0.9, _C + shaft)
    _poly(mask, [(tip_x - head, _C - head), (tip_x, _C), (tip_x - head, _C + head)])


def moon(mask, rng):
    _disk(mask, _C, _C, _R)
    _disk(mask, _C + _R * rng.uniform(0.4, 0.6), _C - _R * 0.2, _R * 0.85, 0)


def ring(mask, rng):
    _disk(mask, _C, _C, _R)
    _disk(mask, _C, _C, _R * rng.uniform(0.45, 0.62), 0)


def diamond(mask, rng):
    width = _R * rng.uniform(0.55, 0.7)
    _poly(mask, [(_C, _C - _R), (_C + width, _C), (_C, _C + _R), (_C - width, _C)])


def hexagon(mask, rng):
    _poly(mask, _regular(6, _R, 0.0))


def house(mask, rng):
    half = _R * 0.62
    _rect(mask, _C - half, _C, _C + half, _C + _R)
    _poly(mask, [(_C - _R * 0.85, _C + 1), (_C, _C - _R), (_C + _R * 0.85, _C + 1)])


def tree(mask, rng):
    trunk = _R * 0.16
    _rect(mask, _C - trunk, _C + _R * 0.45, _C + trunk, _C + _R)
    _poly(mask, [(_C - _R * 0.75, _C + _R * 0.5), (_C, _C - _R), (_C + _R * 0.75, _C + _R * 0.5)])


def flower(mask, rng):
    petals = int(rng.integers(5, 7))
    for x, y in _regular(petals, _R * 0.64, rng.uniform(0, np.pi)):
        _disk(mask, x, y, _R * 0.33)
    _disk(mask, _C, _C, _R * 0.36)


def sun(mask, rng):
    rays = int(rng.integers(8, 12))
    _disk(mask, _C, _C, _R * 0.5)
    for x, y in _regular(rays, _R, rng.uniform(0, np.pi)):
        cv2.line(mask, (int(_C), int(_C)), (int(round(x)), int(round(y))), 255,
                 max(2, int(_R * 0.13)))


def cloud(mask, rng):
    base = _C + _R * 0.35
    _rect(mask, _C - _R * 0.8, base - _R * 0.35, _C + _R * 0.8, base)
    for dx, r in ((-0.55, 0.4), (-0.1, 0.55), (0.45, 0.45)):
        _disk(mask, _C + dx * _R, base - _R * 0.35, _R * r * rng.uniform(0.9, 1.1))


def drop(mask, rng):
    r = _R * 0.58
    cy = _C + _R - r
    _disk(mask, _C, cy, r)
    _poly(mask, [(_C - r * 0.97, cy - r * 0.25), (_C, _C - _R), (_C + r * 0.97, cy - r * 0.25)])


def lightning(mask, rng):
    points = [(0.15, -1.0), (-0.55, 0.1), (-0.05, 0.1), (-0.3, 1.0), (0.6, -0.25),
              (0.1, -0.25), (0.45, -1.0)]
    _poly(mask, [(_C + x * _R, _C + y * _R) for x, y in points])


def key(mask, rng):
    head_x = _C - _R * 0.55
    _disk(mask, head_x, _C, _R * 0.42)
    _disk(mask, head_x, _C, _R * 0.18, 0)
    bar = _R * 0.12
    _rect(mask, head_x + _R * 0.35, _C - bar, _C + _R, _C + bar)
    for x in (0.55, 0.85):
        _rect(mask, _C + (x - 0.1) * _R, _C, _C + (x + 0.05) * _R, _C + _R * 0.4)


def fish(mask, rng):
    cv2.ellipse(mask, (int(_C - _R * 0.15), int(_C)), (int(_R * 0.7), int(_R * 0.42)), 0, 0, 360,
                255, -1)
    _poly(mask, [(_C + _R * 0.45, _C), (_C + _R, _C - _R * 0.45), (_C + _R, _C + _R * 0.45)])
    _disk(mask, _C - _R * 0.55, _C - _R * 0.1, max(1.0, _R * 0.07), 0)


# Category id (1-based, the COCO json id) order. Names are plain English nouns, so captions
# and prompts ("a photo of a star.") read naturally.
DRAWERS: Dict[str, Callable] = {
    fn.__name__: fn for fn in (
        circle, square, triangle, star, heart, cross, arrow, moon, ring, diamond, hexagon,
        house, tree, flower, sun, cloud, drop, lightning, key, fish,
    )
}
CATEGORY_NAMES: Tuple[str, ...] = tuple(DRAWERS)
# One in four categories is novel: annotated only in val/test, as OV-COCO's 17 of 65.
NOVEL_NAMES = ("heart", "moon", "diamond", "tree", "key")
BASE_NAMES = tuple(name for name in CATEGORY_NAMES if name not in NOVEL_NAMES)

# Named colours (RGB). Object colours are drawn from these, independently of the category.
PALETTE: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 40, 40), "green": (40, 165, 60), "blue": (40, 80, 215),
    "yellow": (240, 210, 40), "orange": (245, 135, 30), "purple": (135, 60, 185),
    "pink": (240, 125, 180), "white": (245, 245, 245), "black": (25, 25, 25),
    "brown": (125, 78, 40), "gray": (128, 128, 128), "cyan": (40, 200, 210),
}
COLOR_NAMES = tuple(PALETTE)


def category_id(name: str) -> int:
    """The COCO json id of a category (1-based position in ``CATEGORY_NAMES``)."""
    return CATEGORY_NAMES.index(name) + 1


def canonical_mask(name: str, rng: np.random.Generator) -> np.ndarray:
    """uint8 [CANVAS, CANVAS] mask (0 / 255) of one instance of category ``name``."""
    mask = np.zeros((CANVAS, CANVAS), np.uint8)
    DRAWERS[name](mask, rng)
    return mask
