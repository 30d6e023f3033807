"""Captions of toy-world scenes: weak, noisy text supervision in the manner of CC3M.

A caption names some of the objects (each kind is left out with probability ``P_OMIT``, at least
one is named), sometimes with a colour or size word, inside varied phrasing (a template, joiners,
an optional background description). Noise: a colour word may be wrong, an unrelated phrase
("stock photo") may be added and, rarely, an absent object is named. Base and novel categories
are described alike: captions are not told the open-vocabulary split.
"""
from collections import OrderedDict
from typing import List, Sequence

import numpy as np

from .categories import CATEGORY_NAMES, COLOR_NAMES
from .scene import Scene

P_OMIT = 0.25
P_COLOR = 0.55
P_SIZE = 0.3
P_WRONG_COLOR = 0.1
P_FILLER = 0.25
P_ABSENT = 0.05
P_BACKGROUND = 0.3
SMALL, LARGE = 0.2, 0.34  # object side / shorter image side

PLURALS = {"cross": "crosses", "fish": "fish", "lightning": "lightning bolts"}
NUMBERS = ("one", "two", "three", "four", "five", "six")
TEMPLATES = (
    "{}", "{}", "a picture of {}", "an illustration of {}", "a drawing of {}", "there is {}",
    "clip art of {}", "simple icons: {}", "{}, vector art", "a photo of {}", "cartoon of {}",
    "an image showing {}", "{} in a children's book",
)
JOINERS = (" and ", " and ", ", ", " with ", " next to ", " near ")
BACKGROUND_WORDS = {
    "plain": ("plain", "simple"), "gradient": ("soft", "smooth"),
    "stripes": ("striped",), "checks": ("checkered", "checked"),
    "blotches": ("colorful", "blurry"),
}
FILLERS = ("stock photo", "free download", "high quality", "for kids", "wallpaper",
           "design element", "isolated", "royalty free", "new", "cute")
SIZE_WORDS = {"small": ("small", "tiny", "little"), "large": ("large", "big")}


def _choice(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _noun(name: str, count: int) -> str:
    return name if count == 1 else PLURALS.get(name, name + "s")


def _phrase(name: str, objects, rng) -> str:
    """``a small red star`` / ``two stars`` / ``three blue crosses``."""
    count = len(objects)
    words = []
    if count == 1 and rng.random() < P_SIZE:
        scale = objects[0].size
        if scale < SMALL or scale > LARGE:
            words.append(_choice(rng, SIZE_WORDS["small" if scale < SMALL else "large"]))
    colors = {obj.color for obj in objects}
    if len(colors) == 1 and rng.random() < P_COLOR:
        color = colors.pop()
        if rng.random() < P_WRONG_COLOR:
            color = _choice(rng, [c for c in COLOR_NAMES if c != color])
        words.append(color)
    words.append(_noun(name, count))
    if count > 1:
        return " ".join([NUMBERS[min(count, len(NUMBERS)) - 1]] + words)
    article = "an" if words[0][0] in "aeiou" else "a"
    return " ".join([article] + words)


def _absent_phrase(absent: Sequence[str], rng) -> str:
    """Caption noise: an object that is not in the image."""
    words = [_choice(rng, COLOR_NAMES)] if rng.random() < P_COLOR else []
    words.append(_choice(rng, absent))
    return " ".join(["an" if words[0][0] in "aeiou" else "a"] + words)


def _mentions(scene: Scene, rng) -> List[str]:
    groups = OrderedDict()
    for obj in scene.objects:
        groups.setdefault(obj.category, []).append(obj)
    names = [name for name in groups if rng.random() >= P_OMIT]
    if not names and groups:
        names = [_choice(rng, list(groups))]
    phrases = [_phrase(name, groups[name], rng) for name in names]
    if rng.random() < P_ABSENT:
        phrases.append(_absent_phrase([n for n in CATEGORY_NAMES if n not in groups], rng))
    return [phrases[i] for i in rng.permutation(len(phrases))]


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """One caption of ``scene``."""
    phrases = _mentions(scene, rng)
    text = phrases[0]
    for phrase in phrases[1:]:
        text += _choice(rng, JOINERS) + phrase
    text = _choice(rng, TEMPLATES).format(text)
    if rng.random() < P_BACKGROUND:
        text += f" on a {_choice(rng, BACKGROUND_WORDS[scene.background])} background"
    if rng.random() < P_FILLER:
        text += f", {_choice(rng, FILLERS)}"
    return text


def captions(scene: Scene, rng: np.random.Generator, count: int = 3) -> List[str]:
    """``count`` captions of ``scene``, drawn independently (duplicates possible)."""
    return [caption(scene, rng) for _ in range(count)]
