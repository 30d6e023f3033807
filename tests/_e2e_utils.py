"""Generated checkpoints, vocabularies, datasets and images for the end-to-end tool tests.

Checkpoints use the official key names (``tests/_checkpoint_utils.py`` shapes) but values chosen
so that a forward pass stays finite and varied: norm layers get positive variances, weights are
scaled by 1/sqrt(fan-in). Big tensors are stride-0 views of one random slice (as in
``make_state_dict``), which keeps a pretrained RN50x4 file (with teacher, text tower and RPN)
under 30 MB.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterable, Sequence, Tuple

import numpy as np
import torch
from _rpn_utils import build_from_file
from PIL import Image

from regionclip.config.variants import get_variant
from regionclip.data import coco_ovd
from regionclip.modeling.clip_resnet import CLIPResNet
from regionclip.modeling.text_encoder import TextEncoder

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TOOLS = REPO / "tools"
TINY_CONFIG = CONFIGS / "tests" / "tiny.yaml"
TINY_RPN_FPN = CONFIGS / "tests" / "tiny_rpn_fpn.yaml"

# Tensors up to this many elements are stored in full; larger ones as broadcast views.
_MAX_FULL = 1 << 16
# Large tensors stored in full anyway: they set the direction of every embedding.
_ALWAYS_FULL = ("attnpool.c_proj.weight", "text_projection", "positional_embedding")
# LVIS v1 frequency group sizes: rare, common, frequent.
LVIS_FREQUENCIES = (("r", 337), ("c", 461), ("f", 405))
EXIF_ORIENTATION = 0x0112


def _full(shape, gen, scale):
    return torch.randn(shape, generator=gen) * scale


def _tensor(key: str, shape: Tuple[int, ...], gen: torch.Generator,
            full: bool = False) -> torch.Tensor:
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "running_var":
        return torch.rand(shape, generator=gen) + 0.5
    if leaf == "running_mean":
        return _full(shape, gen, 0.1)
    if len(shape) <= 1:  # 1-D weights are norm scales; biases stay small
        if leaf == "weight":
            return torch.rand(shape, generator=gen) + 0.5
        return _full(shape, gen, 0.1)
    fan_in = math.prod(shape[1:])
    if full or math.prod(shape) <= _MAX_FULL or key.endswith(_ALWAYS_FULL):
        return _full(shape, gen, fan_in ** -0.5)
    if shape[0] > 8 * fan_in:  # token embeddings: one distinct scalar per token
        return _full((shape[0],) + (1,) * (len(shape) - 1), gen, 1.0).expand(shape)
    # One row for every output channel: identical channels, each still a unit-gain random
    # projection, so activations stay of order one through deep stacks.
    return _full((1,) + tuple(shape[1:]), gen, fan_in ** -0.5).expand(shape)


def sane_state_dict(shapes: Dict[str, Tuple[int, ...]], seed: int = 0,
                    full: bool = False) -> Dict[str, torch.Tensor]:
    """Random tensors of ``shapes`` that keep a CLIP/R50 forward pass finite (see module doc).

    ``full``: every tensor drawn in full, so channels differ and features vary from region to
    region (for benchmarks; the files get as large as the real ones).
    """
    gen = torch.Generator().manual_seed(seed)
    return {key: _tensor(key, tuple(shape), gen, full) for key, shape in shapes.items()}


def module_state_shapes(module: torch.nn.Module, prefix: str) -> Dict[str, Tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def save_checkpoint_file(path, state: Dict[str, torch.Tensor]) -> str:
    """A detectron2-checkpointer-style file: ``{"model": state_dict}``."""
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    torch.save({"model": state}, path)
    return os.fspath(path)


def tiny_checkpoint(path, rpn: bool = False, text: bool = False, seed: int = 0) -> str:
    """A checkpoint for the ``tiny`` CLIP variant: ``backbone.*``, plus the tiny R50-FPN
    offline RPN of ``configs/tests/tiny_rpn_fpn.yaml`` and/or the text tower on request."""
    variant = get_variant("tiny")
    shapes = module_state_shapes(CLIPResNet(variant), "backbone.")
    if rpn:
        backbone, generator, _ = build_from_file(TINY_RPN_FPN)
        shapes.update(module_state_shapes(backbone, "offline_backbone."))
        shapes.update(module_state_shapes(generator, "offline_proposal_generator."))
    if text:
        shapes.update(module_state_shapes(TextEncoder(variant), "lang_encoder."))
    return save_checkpoint_file(path, sane_state_dict(shapes, seed))


def save_embedding_file(path, num_classes: int, dim: int, seed: int = 0) -> str:
    """A concept-embedding file as released: one [C, D] float tensor, rows unnormalised."""
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    torch.save(torch.randn(num_classes, dim, generator=gen), path)
    return os.fspath(path)


# ------------------------------------------------------------------------------------------
# Vocabularies and datasets
# ------------------------------------------------------------------------------------------
def lvis_categories(num: int = 1203, seed: int = 0) -> list:
    """Synthetic LVIS v1 categories: ids 1..num, LVIS-style names, r/c/f in LVIS proportions."""
    order = np.random.default_rng(seed).permutation(num)
    total = sum(n for _, n in LVIS_FREQUENCIES)
    frequency, start = [""] * num, 0
    for group, count in LVIS_FREQUENCIES:
        stop = start + round(count * num / total)
        for index in order[start:stop]:
            frequency[index] = group
        start = stop
    for index in order[start:]:
        frequency[index] = "f"
    return [{"id": i + 1, "name": f"thing_{i + 1:04d}", "synonyms": [f"thing_{i + 1:04d}"],
             "synset": f"thing_{i + 1:04d}.n.01", "frequency": frequency[i],
             "image_count": 1, "instance_count": 1} for i in range(num)]


def write_json(path, content) -> str:
    os.makedirs(os.path.dirname(os.fspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(content, f)
    return os.fspath(path)


def ovd_categories_novel_first() -> list:
    """The 65 COCO OVD categories (real ids and names), novel and base interleaved at the
    front so that ``make_coco_dataset``'s round-robin labelling uses both groups."""
    novel = [{"id": i, "name": n, "supercategory": "x"} for i, n in coco_ovd.NOVEL_CATEGORIES]
    base = [{"id": i, "name": n, "supercategory": "x"} for i, n in coco_ovd.BASE_CATEGORIES]
    mixed = [cat for pair in zip(novel, base) for cat in pair]
    return mixed + base[len(novel):]


# ------------------------------------------------------------------------------------------
# Images
# ------------------------------------------------------------------------------------------
def rectangles_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 RGB [h, w, 3]: a dark background with a few coloured rectangles."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 30, dtype=np.uint8)
    for _ in range(4):
        y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
        h, w = rng.integers(height // 4, height // 2), rng.integers(width // 4, width // 2)
        image[y0:y0 + h, x0:x0 + w] = rng.integers(40, 255, 3)
    return image


def save_exif_rotated_jpeg(path, upright: np.ndarray) -> None:
    """Store ``upright`` rotated 90 degrees with EXIF orientation 6, so that a viewer (and
    ``read_image``) shows ``upright`` again; the stored pixel grid is transposed."""
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, k=1)))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    stored.save(path, quality=95, exif=exif)


def save_image(path, array: np.ndarray, mode: str = "RGB") -> None:
    """Save an RGB array as ``mode``: "RGB", "L" (greyscale), "RGBA" or "I;16" (16-bit)."""
    image = Image.fromarray(array)
    if mode == "L":
        image = image.convert("L")
    elif mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(128)
    elif mode == "I;16":
        grey = np.asarray(image.convert("L"), dtype=np.uint16) * 257
        image = Image.fromarray(grey)
    image.save(path)


# ------------------------------------------------------------------------------------------
# Running the tools
# ------------------------------------------------------------------------------------------
def link_repo_dirs(cwd, names: Iterable[str] = ("configs", "tools")) -> None:
    """Make ``./configs`` and ``./tools`` of the README command lines resolve under ``cwd``."""
    for name in names:
        link = Path(cwd) / name
        if not link.exists():
            link.symlink_to(REPO / name, target_is_directory=True)


def run_tool(argv: Sequence[str], cwd, datasets_root=None, check: bool = True):
    """``python <argv>`` in ``cwd`` with ``DETECTRON2_DATASETS`` set; returns the result.

    With ``check`` a failure raises AssertionError holding the end of the tool's output.
    """
    env = dict(os.environ)
    env.pop("DETECTRON2_DATASETS", None)
    if datasets_root is not None:
        env["DETECTRON2_DATASETS"] = os.fspath(datasets_root)
    result = subprocess.run([sys.executable, *map(os.fspath, argv)], cwd=cwd, env=env,
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result
