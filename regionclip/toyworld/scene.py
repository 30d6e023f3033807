"""One toy-world scene: a textured background, unlabelled clutter and 1-6 placed objects.

Objects are pasted in order with soft (anti-aliased) edges; a later object may hide part of an
earlier one, but a placement is rejected when it would leave any object (itself included,
since it may reach past the image border) less than ``MIN_VISIBLE`` of its area. An object's
box is the tight box of its *visible* pixels (where its alpha is at least one half), as COCO
boxes bound the visible extent.
"""
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import cv2
import numpy as np

from .categories import CANVAS, CATEGORY_NAMES, COLOR_NAMES, PALETTE, canonical_mask

MIN_VISIBLE = 0.55
MIN_PIXELS = 40
MAX_ROTATION = 30.0  # degrees: larger turns would make a square a diamond
PLACEMENT_TRIES = 30
BACKGROUNDS = ("plain", "gradient", "stripes", "checks", "blotches")


@dataclass(frozen=True)
class SceneSpec:
    """Sizes of scenes: image sides in [min_side, max_side], objects per image in
    [min_objects, max_objects], object sides as fractions of the shorter image side."""

    min_side: int = 128
    max_side: int = 256
    min_objects: int = 1
    max_objects: int = 6
    min_scale: float = 0.14
    max_scale: float = 0.42
    clutter: Tuple[int, int] = (2, 10)  # unlabelled strokes and dots per image


@dataclass
class SceneObject:
    category: str
    color: str
    size: float  # object side / shorter image side
    mask: np.ndarray = field(repr=False)  # bool [H, W]: visible pixels

    @property
    def bbox(self) -> Tuple[int, int, int, int]:
        """XYWH integer box of the visible pixels (pixel-edge coordinates)."""
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), \
            int(ys.max() - ys.min() + 1)

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class Scene:
    image: np.ndarray  # uint8 [H, W, 3] RGB
    objects: List[SceneObject]
    background: str


def _jitter(rgb, rng, amount=22) -> np.ndarray:
    return np.clip(np.asarray(rgb, np.float32) + rng.uniform(-amount, amount, 3), 0, 255)


def _background(height, width, rng) -> Tuple[np.ndarray, str]:
    """float32 [H, W, 3] low-saturation texture and its kind."""
    hsv = np.uint8([[[rng.integers(0, 180), rng.integers(10, 90), rng.integers(90, 220)]]])
    base = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)
    kind = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    amplitude = rng.uniform(10, 35)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * np.pi)
        t = (xs * np.cos(angle) + ys * np.sin(angle)) / max(height, width)
        pattern = t - t.mean()
        amplitude *= 2
    elif kind == "stripes":
        angle, period = rng.uniform(0, np.pi), rng.uniform(6, 24)
        pattern = np.sign(np.sin((xs * np.cos(angle) + ys * np.sin(angle)) * 2 * np.pi / period))
    elif kind == "checks":
        period = rng.uniform(8, 28)
        pattern = ((xs // period + ys // period) % 2) * 2 - 1
    elif kind == "blotches":
        coarse = rng.standard_normal((int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3))
        pattern = cv2.resize(coarse.astype(np.float32), (width, height),
                             interpolation=cv2.INTER_CUBIC)
    else:
        pattern = np.zeros((height, width), np.float32)
    if pattern.ndim == 2:
        pattern = pattern[..., None] * rng.uniform(0.5, 1.0, 3)
    return base + amplitude * pattern.astype(np.float32), kind


def _draw_clutter(image, rng, count) -> None:
    """Unlabelled strokes, scribbles and dots in random colours (not objects of any class)."""
    height, width = image.shape[:2]
    for _ in range(count):
        color = tuple(float(v) for v in rng.uniform(0, 255, 3))
        thickness = int(rng.integers(1, 3))
        if rng.random() < 0.5:
            points = np.cumsum(rng.normal(0, 10, (int(rng.integers(2, 6)), 2)), 0)
            points += (rng.uniform(0, width), rng.uniform(0, height))
            cv2.polylines(image, [points.astype(np.int32)], False, color, thickness, cv2.LINE_AA)
        else:
            center = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            cv2.circle(image, center, int(rng.integers(1, 4)), color, -1, cv2.LINE_AA)


def _placement_matrix(rng, side, aspect, center) -> np.ndarray:
    """2x3 affine map from the canonical canvas to the image."""
    angle = np.deg2rad(rng.uniform(-MAX_ROTATION, MAX_ROTATION))
    sx, sy = side / CANVAS * aspect, side / CANVAS / aspect
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    linear = rotation @ np.diag([sx, sy])
    offset = np.asarray(center) - linear @ np.array([CANVAS / 2.0, CANVAS / 2.0])
    return np.concatenate([linear, offset[:, None]], 1).astype(np.float32)


def _object_alpha(category, rng, side, shape) -> Tuple[np.ndarray, float]:
    """float32 [H, W] alpha of a placed instance and its full (untruncated) pixel area."""
    height, width = shape
    canonical = canonical_mask(category, rng)
    aspect = float(np.sqrt(rng.uniform(0.8, 1.25)))
    margin = side * 0.3
    center = (rng.uniform(-margin, width + margin - side) + side / 2,
              rng.uniform(-margin, height + margin - side) + side / 2)
    matrix = _placement_matrix(rng, side, aspect, center)
    alpha = cv2.warpAffine(canonical, matrix, (width, height), flags=cv2.INTER_LINEAR) / 255.0
    full_area = float((canonical > 127).sum()) * (side / CANVAS) ** 2
    return alpha.astype(np.float32), full_area


def _appearance(rng, alpha, color) -> np.ndarray:
    """float32 [H, W, 3] colours of an object: fill, optional outline or inner stripes."""
    fill = _jitter(PALETTE[color], rng)
    layer = np.empty(alpha.shape + (3,), np.float32)
    layer[:] = fill
    choice = rng.random()
    if choice < 0.3:  # darker outline
        inner = cv2.erode((alpha > 0.5).astype(np.uint8), np.ones((3, 3), np.uint8),
                          iterations=int(rng.integers(1, 3)))
        layer[inner == 0] = fill * 0.45
    elif choice < 0.45:  # faint stripes of a second tone
        ys, xs = np.mgrid[0:alpha.shape[0], 0:alpha.shape[1]]
        stripes = (((xs + ys) // int(rng.integers(3, 7))) % 2).astype(bool)
        layer[stripes] = fill * 0.75 + 255 * 0.25 * (fill.mean() < 128)
    return layer


def _accept(alpha, full_area, visible_masks, areas) -> bool:
    new = alpha >= 0.5
    if new.sum() < max(MIN_PIXELS, MIN_VISIBLE * full_area):
        return False
    return all((visible & ~new).sum() >= max(MIN_PIXELS, MIN_VISIBLE * area)
               for visible, area in zip(visible_masks, areas))


def draw_scene(rng: np.random.Generator, spec: SceneSpec = SceneSpec(),
               categories=CATEGORY_NAMES) -> Scene:
    """A random scene of objects from ``categories``."""
    height, width = (int(rng.integers(spec.min_side, spec.max_side + 1)) for _ in range(2))
    image, kind = _background(height, width, rng)
    _draw_clutter(image, rng, int(rng.integers(spec.clutter[0], spec.clutter[1] + 1)))
    wanted = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    objects, masks, areas = [], [], []
    for _ in range(wanted):
        placed = _place(image, rng, spec, categories, masks, areas)
        if placed is not None:
            objects.append(placed)
    for obj, visible in zip(objects, masks):
        obj.mask = visible
    rgb = np.clip(image + rng.normal(0, 3, image.shape), 0, 255)
    return Scene(np.round(rgb).astype(np.uint8), objects, kind)


def _place(image, rng, spec, categories, masks, areas) -> Optional[SceneObject]:
    """Paste one object into ``image`` (in place) and update the visible masks."""
    category = categories[int(rng.integers(len(categories)))]
    color = COLOR_NAMES[int(rng.integers(len(COLOR_NAMES)))]
    short = min(image.shape[:2])
    for _ in range(PLACEMENT_TRIES):
        scale = rng.uniform(spec.min_scale, spec.max_scale)
        alpha, full_area = _object_alpha(category, rng, scale * short, image.shape[:2])
        if not _accept(alpha, full_area, masks, areas):
            continue
        layer = _appearance(rng, alpha, color)
        image *= 1 - alpha[..., None]
        image += alpha[..., None] * layer
        new = alpha >= 0.5
        for index, visible in enumerate(masks):
            masks[index] = visible & ~new
        masks.append(new)
        areas.append(full_area)
        return SceneObject(category, color, float(scale), new)
    return None
