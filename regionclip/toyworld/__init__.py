"""A synthetic open-vocabulary world in which every stage of RegionCLIP trains on a CPU.

Scenes of drawn objects (``categories``: 20 named shapes, 15 base and 5 novel) on textured
backgrounds with unlabelled clutter (``scene``), weak noisy captions (``captions``), written as
COCO detection splits and an image-caption folder that the ordinary loaders read (``writer``).
``tools/make_toy_world.py`` is the command line.
"""
from .categories import BASE_NAMES, CATEGORY_NAMES, NOVEL_NAMES
from .scene import Scene, SceneObject, SceneSpec, draw_scene
from .writer import WorldSizes, write_world

__all__ = ["BASE_NAMES", "CATEGORY_NAMES", "NOVEL_NAMES", "Scene", "SceneObject", "SceneSpec",
           "WorldSizes", "draw_scene", "write_world"]
