"""Configuration: the default tree, YAML loading with ``_BASE_``, overrides, CLIP checks, dump.

Loading follows fvcore's rules (safe YAML; ``_BASE_`` paths are relative to the file that
names them; a child's keys replace its base's) but walks the ``_BASE_`` chain itself so that an
unknown key or a bad value is reported with the file that holds it, and a key repeated inside
one YAML mapping (the original's configs repeat ``INPUT:``) is reported as a warning while the
last occurrence wins, as PyYAML does.
"""
import difflib
import logging
import os
from typing import Any, Dict, Iterable, List, Sequence, Tuple

import yaml
from fvcore.common.config import CfgNode

from ..atomic import atomic_open
from .defaults import _C
from .variants import CLIPVariant, get_variant, variant_from_depth

__all__ = [
    "CLIP_BACKBONE_NAME", "ConfigError", "get_cfg", "merge_config_file", "merge_overrides",
    "load_config", "uses_clip_backbone", "resolve_clip_variant", "check_clip_settings",
    "finalize_clip_settings", "dump_config", "base_files",
]

logger = logging.getLogger(__name__)

BASE_KEY = "_BASE_"
CLIP_BACKBONE_NAME = "build_clip_resnet_backbone"
# Architectures whose builders make a CLIP trunk: their configs must name it as the backbone,
# so that the variant checks below apply (the original's configs all do).
CLIP_ARCHITECTURES = ("CLIP", "CLIPFastRCNN", "PretrainFastRCNN")
OVERRIDES_SOURCE = "command-line overrides"
DUMP_FILE_NAME = "config.yaml"
# RES2_OUT_CHANNELS default; accepted for every variant because configs copied it everywhere.
_DEFAULT_RES2_CHANNELS = 256


class ConfigError(KeyError, ValueError):
    """A config file or override that does not fit the default tree.

    Subclasses both ``KeyError`` (unknown key, as fvcore raises) and ``ValueError`` (bad value,
    as yacs raises), so callers catching either keep working.
    """

    def __str__(self) -> str:
        # KeyError.__str__ would print the message in quotes.
        return str(self.args[0]) if self.args else ""


def get_cfg() -> CfgNode:
    """A fresh, mutable copy of the default configuration."""
    return _C.clone()


class _WarnDuplicatesLoader(yaml.SafeLoader):
    """Safe loader that warns when a mapping repeats a key (the last value still wins)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                logger.warning("%s:%d: duplicate key %r in one mapping; the last one wins",
                               self.name, key_node.start_mark.line + 1, key)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str) -> Dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.load(f, Loader=_WarnDuplicatesLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def _resolve_base(base: Any, path: str) -> str:
    if not isinstance(base, str):
        raise ConfigError(f"{path}: {BASE_KEY} must be a file path, got {base!r}")
    base = os.path.expanduser(base)
    if os.path.isabs(base):
        return base
    return os.path.normpath(os.path.join(os.path.dirname(path), base))


def base_files(path: str) -> List[str]:
    """The ``_BASE_`` files that config ``path`` builds on, nearest first, up to the first
    that does not exist (included, so that a check can name it); [] if ``path`` is missing."""
    files: List[str] = []
    while os.path.isfile(path) and len(files) < 32:  # (a cycle is load_config's error)
        base = _read_yaml(path).get(BASE_KEY)
        if base is None:
            break
        path = _resolve_base(base, path)
        files.append(path)
    return files


def _file_chain(path: str, visiting: Tuple[str, ...] = ()) -> List[Tuple[str, Dict[str, Any]]]:
    """``(path, keys)`` for ``path`` and its ``_BASE_`` ancestors, most basic first."""
    real = os.path.realpath(path)
    if real in visiting:
        raise ConfigError(f"{path}: {BASE_KEY} cycle through {' -> '.join(visiting + (real,))}")
    if not os.path.isfile(path):
        raise ConfigError(f"Config file not found: {path}")
    data = _read_yaml(path)
    chain = []
    if BASE_KEY in data:
        base = _resolve_base(data.pop(BASE_KEY), path)
        chain = _file_chain(base, visiting + (real,))
    return chain + [(path, data)]


def _flatten(data: Dict[str, Any], node: CfgNode, prefix: str = "") -> List[Tuple[str, Any]]:
    """``(FULL.KEY, value)`` pairs, descending into ``data`` wherever the tree has a node."""
    pairs = []
    for key, value in data.items():
        full_key = f"{prefix}{key}"
        child = node.get(key) if isinstance(key, str) else None
        if isinstance(value, dict) and isinstance(child, CfgNode):
            pairs.extend(_flatten(value, child, full_key + "."))
        else:
            pairs.append((full_key, value))
    return pairs


def _read(cfg: CfgNode, full_key: str) -> Any:
    node: Any = cfg
    for part in full_key.split("."):
        node = node[part]
    return node


def _all_keys(node: CfgNode, prefix: str = "") -> List[str]:
    """Every full key of the tree, nodes and leaves ("MODEL", "MODEL.WEIGHTS", ...)."""
    keys = []
    for key, value in node.items():
        keys.append(prefix + key)
        if isinstance(value, CfgNode):
            keys.extend(_all_keys(value, f"{prefix}{key}."))
    return keys


# argparse hands every argument after the first override to the overrides, options included.
OPTION_HINT = "command-line options go before the KEY VALUE overrides"


def _unknown_key_message(known: List[str], unknown: Sequence[str], source: str) -> str:
    lines = [f"Unknown config key(s) in {source}:"]
    for key in unknown:
        close = difflib.get_close_matches(key, known, n=1)
        hint = OPTION_HINT if key.startswith("-") else close and f"did you mean {close[0]}?"
        lines.append(f"  {key}" + (f" ({hint})" if hint else ""))
    return "\n".join(lines)


def _merge_pairs(cfg: CfgNode, pairs: Sequence[Tuple[str, Any]], source: str) -> None:
    """Set each key to its value with yacs' literal decoding and type checks."""
    known = _all_keys(cfg)
    unknown = [key for key, _ in pairs if key not in known]
    if unknown:
        raise ConfigError(_unknown_key_message(known, unknown, source))
    for key, value in pairs:
        try:
            cfg.merge_from_list([key, value])
        except (ValueError, AssertionError) as e:
            raise ConfigError(f"Bad value {value!r} for config key {key} in {source}: {e}") from e


def merge_config_file(cfg: CfgNode, path: str) -> CfgNode:
    """Merge ``path`` and its ``_BASE_`` ancestors into ``cfg`` (in place); return ``cfg``."""
    for file_path, data in _file_chain(str(path)):
        _merge_pairs(cfg, _flatten(data, cfg), file_path)
    return cfg


def _keys_without_value(cfg: CfgNode, overrides: Sequence[Any]) -> List[str]:
    """The items followed by a known key or by nothing: where an odd count lost a value."""
    known, lone, i = set(_all_keys(cfg)), [], 0
    while i < len(overrides):
        if i + 1 == len(overrides) or str(overrides[i + 1]) in known:
            lone.append(str(overrides[i]))
            i += 1
        else:
            i += 2
    return lone


def merge_overrides(
    cfg: CfgNode, overrides: Sequence[Any], source: str = OVERRIDES_SOURCE
) -> CfgNode:
    """Merge ``["KEY", "VALUE", ...]`` into ``cfg`` (in place); return ``cfg``."""
    overrides = list(overrides)
    if len(overrides) % 2:
        hint = f" ({OPTION_HINT})" if any(str(o).startswith("--") for o in overrides) else ""
        lone = ", ".join(_keys_without_value(cfg, overrides))
        raise ConfigError(f"{source}: expected KEY VALUE pairs, got an odd count ({lone} without "
                          f"a value): {overrides}{hint}")
    pairs = [(str(key), value) for key, value in zip(overrides[0::2], overrides[1::2])]
    _merge_pairs(cfg, pairs, source)
    return cfg


def load_config(path: str, overrides: Iterable[Any] = ()) -> CfgNode:
    """Defaults, then ``path`` (with ``_BASE_``), then ``KEY VALUE`` overrides; CLIP-checked.
    Raises ConfigError for an unknown key, a bad value or inconsistent CLIP settings, naming
    the key and the file (or "command-line overrides")."""
    cfg = merge_config_file(get_cfg(), path)
    merge_overrides(cfg, list(overrides))
    _check_carried(cfg)
    check_clip_settings(cfg)
    return cfg


# detectron2 keys that the original's configs may hold, for features not carried here: a value
# other than the default is refused, not silently ignored.
_NOT_CARRIED = {
    "MODEL.LOAD_PROPOSALS": "precomputed proposals",
    "DATASETS.PROPOSAL_FILES_TRAIN": "precomputed proposals",
    "DATASETS.PROPOSAL_FILES_TEST": "precomputed proposals",
    "INPUT.CROP.ENABLED": "random cropping",
    "INPUT.MASK_FORMAT": "bitmask annotations",
    "TEST.AUG.ENABLED": "test-time augmentation",
    "TEST.PRECISE_BN.ENABLED": "precise BN (every trunk here has frozen BN)",
    "TEST.EXPECTED_RESULTS": "the expected-results check",
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": "a pooler other than ROIAlignV2",
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": "a fixed RoIAlign sampling ratio",
    "MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES": "training the mask head on predicted boxes",
    "MODEL.ROI_MASK_HEAD.POOLER_TYPE": "a pooler other than ROIAlignV2",
    "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO": "a fixed RoIAlign sampling ratio",
    "MODEL.ANCHOR_GENERATOR.ANGLES": "rotated anchors",
    "VIS_PERIOD": "drawing proposals during training",
    "MODEL.ROI_BOX_HEAD.USE_FED_LOSS": "Detic's LVIS federated loss",
    "MODEL.ROI_BOX_HEAD.WITH_SOFTMAX_PROP": "Detic's softmax-proposal ablation",
}


def _check_carried(cfg: CfgNode) -> None:
    """Raise ConfigError if a key of ``_NOT_CARRIED`` asks for its feature."""
    for key, feature in _NOT_CARRIED.items():
        value, default = _read(cfg, key), _read(_C, key)
        if value != default:
            raise ConfigError(f"{key} {value!r} asks for {feature}, which regionclip does not "
                              f"carry; remove the key or set it to {default!r}")


def uses_clip_backbone(cfg: CfgNode) -> bool:
    """Whether the model's trunk is a CLIP ResNet (the variant checks apply only then)."""
    return cfg.MODEL.BACKBONE.NAME == CLIP_BACKBONE_NAME


def _variant_keys(teacher: bool) -> Tuple[str, str]:
    if teacher:
        return "MODEL.CLIP.TEACHER_VARIANT", "MODEL.CLIP.TEACHER_RESNETS_DEPTH"
    return "MODEL.CLIP.VARIANT", "MODEL.RESNETS.DEPTH"


def _variant_source(cfg: CfgNode, teacher: bool = False) -> str:
    """The key (and value) that chose the variant, for error messages."""
    name_key, depth_key = _variant_keys(teacher)
    name, depth = _read(cfg, name_key), _read(cfg, depth_key)
    return f"{name_key} {name}" if name else f"{depth_key} {depth}"


def resolve_clip_variant(cfg: CfgNode, teacher: bool = False) -> CLIPVariant:
    """The CLIP ResNet named by ``MODEL.CLIP.VARIANT`` or, when empty, the legacy depth
    (``teacher=True``: ``TEACHER_VARIANT`` / ``TEACHER_RESNETS_DEPTH``)."""
    name_key, depth_key = _variant_keys(teacher)
    name = _read(cfg, name_key)
    try:
        return get_variant(name) if name else variant_from_depth(_read(cfg, depth_key))
    except ValueError as e:
        raise ConfigError(f"{name_key if name else depth_key}: {e}") from e


def _check_derived(cfg: CfgNode, key: str, expected: int, variant_name: str, via: str) -> None:
    value = _read(cfg, key)
    if value and value != expected:
        raise ConfigError(
            f"{key} is {value} but CLIP variant {variant_name} (from {via}) requires "
            f"{expected}; set it to {expected} or to 0 to derive it"
        )


def check_clip_settings(cfg: CfgNode) -> None:
    """Reject explicit sizes that contradict the CLIP variant(s); no-op without a CLIP trunk.

    Checked: ``MODEL.CLIP.TEXT_EMB_DIM`` (embedding width), ``MODEL.ROI_BOX_HEAD.
    POOLER_RESOLUTION`` and ``MODEL.CLIP.TEACHER_POOLER_RESOLUTION`` (twice the attention-pool
    grid), each only when non-zero, and ``MODEL.RESNETS.RES2_OUT_CHANNELS`` (256 or the
    variant's res2 width).
    """
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch in CLIP_ARCHITECTURES and not uses_clip_backbone(cfg):
        raise ConfigError(f"MODEL.META_ARCHITECTURE {arch} builds a CLIP trunk but "
                          f"MODEL.BACKBONE.NAME is {cfg.MODEL.BACKBONE.NAME!r}; set it to "
                          f"{CLIP_BACKBONE_NAME!r}, as the original's configs do")
    if not uses_clip_backbone(cfg):
        return
    student, teacher = resolve_clip_variant(cfg), resolve_clip_variant(cfg, teacher=True)
    via, teacher_via = _variant_source(cfg), _variant_source(cfg, teacher=True)
    _check_derived(cfg, "MODEL.CLIP.TEXT_EMB_DIM", student.embed_dim, student.name, via)
    _check_derived(cfg, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", student.pooler_resolution,
                   student.name, via)
    _check_derived(cfg, "MODEL.CLIP.TEACHER_POOLER_RESOLUTION", teacher.pooler_resolution,
                   teacher.name, teacher_via)
    res2, expected = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS, student.stage_channels[0]
    if res2 not in (_DEFAULT_RES2_CHANNELS, expected):
        raise ConfigError(
            f"MODEL.RESNETS.RES2_OUT_CHANNELS is {res2} but CLIP variant {student.name} "
            f"(from {via}) requires {expected}; set it to {expected} or leave the default "
            f"{_DEFAULT_RES2_CHANNELS} to derive it"
        )


def finalize_clip_settings(cfg: CfgNode) -> CfgNode:
    """A checked copy of ``cfg`` with every variant-derived key filled in.

    Sets ``MODEL.CLIP.VARIANT`` / ``TEACHER_VARIANT`` to the resolved names and
    ``TEXT_EMB_DIM``, ``ROI_BOX_HEAD.POOLER_RESOLUTION``, ``TEACHER_POOLER_RESOLUTION`` and
    ``RESNETS.RES2_OUT_CHANNELS`` to the variants' values, so builders read them directly.
    Configs without a CLIP trunk are returned as an unchanged copy.
    """
    check_clip_settings(cfg)
    cfg = cfg.clone()
    if not uses_clip_backbone(cfg):
        return cfg
    student, teacher = resolve_clip_variant(cfg), resolve_clip_variant(cfg, teacher=True)
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    cfg.MODEL.CLIP.VARIANT = student.name
    cfg.MODEL.CLIP.TEACHER_VARIANT = teacher.name
    cfg.MODEL.CLIP.TEXT_EMB_DIM = student.embed_dim
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = student.pooler_resolution
    cfg.MODEL.CLIP.TEACHER_POOLER_RESOLUTION = teacher.pooler_resolution
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = student.stage_channels[0]
    if was_frozen:
        cfg.freeze()
    return cfg


def dump_config(cfg: CfgNode, output_dir: str) -> str:
    """Write ``cfg`` to ``output_dir/config.yaml`` atomically (a crash never leaves a truncated
    config behind); return the file path."""
    path = os.path.join(output_dir, DUMP_FILE_NAME)
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(cfg.dump())
    return path
