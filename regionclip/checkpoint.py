"""Reading, converting, loading and saving checkpoints.

One converter per source format, chosen by the file's key signature (never by its name):
``regionclip`` (RegionCLIP detectors, and ``*_OAI_CLIP.pth`` files stored in their names),
``detectron2`` (plain detectors: the ``rpn_*.pth`` files of ``MODEL.CLIP.BB_RPN_WEIGHTS``),
``detic`` (Detic's CustomRCNN, with ``zs_weight``) and ``openai_clip`` (``visual.*`` + text
tower, as a TorchScript archive or a state dict). Keys are renamed with explicit prefix tables
and loaded non-strictly by exact name; the CLIP variant of every CLIP part is derived from
tensor shapes and checked against the model first.
"""
import math
import os
import pickle
import re
import zipfile
from typing import Any, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn

from .atomic import atomic_open
from .config.variants import LEGACY_DEPTHS, VARIANTS
from .download_pages import missing_file_message
from .load_report import LoadReport
from .script_archive import read_script_archive

__all__ = ["CheckpointError", "CheckpointMismatchError", "LoadReport", "VOCABULARY_KEYS",
           "check_architecture", "detect_format", "load_checkpoint",
           "read_checkpoint", "read_state_dict", "save_checkpoint"]

REGIONCLIP, DETECTRON2, OPENAI_CLIP, DETIC = "regionclip", "detectron2", "openai_clip", "detic"
# The classifier's text embeddings: pass as `skip_prefixes` so a user's vocabulary file wins
# over the embeddings a fine-tuned checkpoint carries (the original let the checkpoint win).
VOCABULARY_KEYS = ("roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.test_cls_score")

_REGIONCLIP_PARTS = ("backbone", "teacher_backbone", "lang_encoder", "offline_backbone",
                     "offline_proposal_generator", "roi_heads")
_OPENAI_TEXT = ("transformer", "token_embedding", "positional_embedding", "ln_final",
                "text_projection")
_OPENAI_DROPPED = {"logit_scale": "CLIP's learnt temperature; RegionCLIP uses a fixed one",
                   **{k: "CLIP hyper-parameter scalar"
                      for k in ("input_resolution", "context_length", "vocab_size")}}
_TO_OFFLINE = {"backbone": ("offline_backbone",),
               "proposal_generator": ("offline_proposal_generator",)}
_OFFLINE_IDENTITY = {p: (p,) for p in ("offline_backbone", "offline_proposal_generator")}
_NOT_RPN = "not part of the offline RPN"
_BN_COUNTER = "num_batches_tracked"


class CheckpointError(RuntimeError):
    """A file that cannot be read or converted as a checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint holds a different architecture than the model."""


def read_checkpoint(path: str) -> Any:
    """The object stored in ``path``, read without running pickled code (CPU tensors)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(missing_file_message(path, "checkpoint"))
    if path.endswith(".pkl"):
        raise CheckpointError(
            f"{path}: detectron2 .pkl checkpoints (pickled numpy dicts) are not supported, "
            "because unpickling them can run arbitrary code. Convert the file once, in a "
            "trusted environment, to a .pth holding {'model': {name: torch.Tensor}}")
    try:
        kind = _archive_kind(path)
        if kind == "torchscript":
            try:
                return read_script_archive(path)
            except ValueError as err:  # what it refuses to read, said with the path
                raise CheckpointError(str(err)) from err
        # zip archives are memory-mapped: a tensor is read when it is copied into a model, so
        # inspecting a multi-GB file, or loading only its text tower, does not read all of it
        return torch.load(path, map_location="cpu", weights_only=True, mmap=kind == "zip")
    except CheckpointError:
        raise
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
        raise CheckpointError(
            f"{path} contains Python objects other than tensors (e.g. numpy arrays), which "
            "are not loaded because unpickling can run arbitrary code. Re-save it, in a "
            "trusted environment, as {'model': {name: torch.Tensor}}") from err
    except Exception as err:  # torch.load raises many types for damaged files
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {err}") from err


def _archive_kind(path: str) -> str:
    """"torchscript", "zip" (torch.save) or "pickle" (torch.save's legacy format); raises for
    files torch.save cannot have written."""
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive, or (legacy format) a pickle starting with PROTO 0x80
    if not (head == b"PK\x03\x04" or head[:1] == b"\x80"):
        raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither a torch.save zip "
                              "archive nor a pickle)")
    if head[:1] == b"\x80":
        return "pickle"
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    scripted = any(n.endswith("/constants.pkl") or "/code/" in n for n in names)
    return "torchscript" if scripted else "zip"


def read_state_dict(path: str) -> Tuple[Dict[str, Any], str]:
    """``(state_dict, format)`` of a checkpoint file, format one of regionclip / detectron2 /
    openai_clip. Accepts detectron2 checkpointer dicts ({"model": ...}) and bare state dicts."""
    obj = read_checkpoint(path)
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    is_state_dict = isinstance(obj, Mapping) and all(isinstance(k, str) for k in obj)
    if not (is_state_dict and any(isinstance(v, torch.Tensor) for v in obj.values())):
        found = sorted(map(str, obj))[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise CheckpointError(f"{path} is not a checkpoint: expected a state dict or a dict with "
                              f"a 'model' state dict, found {found}")
    return dict(obj), detect_format(obj, path)


def detect_format(state_dict: Mapping[str, Any], path: str = "checkpoint") -> str:
    """The source format named by the top-level prefixes of the keys."""
    tops = _tops(state_dict)
    if "visual" in tops or "token_embedding" in tops:
        return OPENAI_CLIP
    if {"backbone", "proposal_generator"} <= tops:  # Detic's have a zero-shot classifier
        return DETIC if any(k.endswith(".zs_weight") for k in state_dict) else DETECTRON2
    if tops & set(_REGIONCLIP_PARTS):
        return REGIONCLIP
    raise CheckpointError(
        f"{path}: unknown checkpoint layout, top-level prefixes {sorted(tops)}; expected "
        f"RegionCLIP ({', '.join(_REGIONCLIP_PARTS)}), detectron2 or Detic (backbone, "
        "proposal_generator, roi_heads) or OpenAI CLIP (visual, transformer, token_embedding)")


def _remap(state_dict: Mapping[str, Any], prefix_map: Mapping[str, Sequence[str]],
           drop_reason: Optional[str]):
    """Rename ``src[.rest]`` to every ``dst[.rest]`` of ``prefix_map[src]``. Other keys are
    dropped with ``drop_reason`` or, if it is None, kept unchanged."""
    mapped, dropped = {}, []
    for key, value in state_dict.items():
        src = next((p for p in prefix_map if key == p or key.startswith(p + ".")), None)
        if src is None and drop_reason:
            dropped.append((key, drop_reason))
        elif src is None:
            mapped[key] = value
        else:
            mapped.update({dst + key[len(src):]: value for dst in prefix_map[src]})
    return mapped, dropped


def _convert_detector(state_dict, model_tops, offline_rpn: bool):
    """regionclip / detectron2: identity, or only the RPN parts for the offline RPN."""
    if not offline_rpn:
        return dict(state_dict), []
    prefix_map = _TO_OFFLINE if "proposal_generator" in _tops(state_dict) else _OFFLINE_IDENTITY
    return _remap(state_dict, prefix_map, _NOT_RPN)


def _convert_openai(state_dict, model_tops, offline_rpn: bool):
    """visual -> backbone (and teacher_backbone); text -> lang_encoder (Detic: text_encoder)."""
    if offline_rpn:
        raise CheckpointError("OpenAI CLIP weights hold no RPN; use them as MODEL.WEIGHTS")
    visual = ("backbone",) + (("teacher_backbone",) if "teacher_backbone" in model_tops else ())
    text = "text_encoder" if "text_encoder" in model_tops else "lang_encoder"
    visual = ("visual",) if text == "text_encoder" else visual  # Detic: image tower unused
    prefix_map = {"visual": visual, **{t: (f"{text}.{t}",) for t in _OPENAI_TEXT}}
    dropped = [(k, _OPENAI_DROPPED[k]) for k in state_dict if k in _OPENAI_DROPPED]
    kept = {k: v for k, v in state_dict.items() if k not in _OPENAI_DROPPED}
    mapped, _ = _remap(kept, prefix_map, None)
    return mapped, dropped


_CONVERTERS = {REGIONCLIP: _convert_detector, DETECTRON2: _convert_detector,
               DETIC: _convert_detector, OPENAI_CLIP: _convert_openai}


def _tops(keys) -> set:
    return {k.split(".")[0] for k in keys}


class _Arch(NamedTuple):
    name: str  # variant name, or a description when no variant matches
    details: str  # the shapes that were compared


def visual_arch(shapes: Mapping[str, torch.Size], prefix: str) -> Optional[_Arch]:
    """The CLIP ResNet under ``prefix`` from its shapes, None if it is not one."""
    names = ("conv1.weight", "attnpool.c_proj.weight", "attnpool.positional_embedding")
    if any(prefix + n not in shapes for n in names):
        return None
    conv1, c_proj, pos = (shapes[prefix + n] for n in names)
    blocks = [0, 0, 0, 0]
    for key in (k[len(prefix):] for k in shapes if k.startswith(prefix)):
        found = re.fullmatch(r"layer([1-4])\.(\d+)\.conv1\.weight", key)
        if found:
            stage = int(found.group(1)) - 1
            blocks[stage] = max(blocks[stage], int(found.group(2)) + 1)
    width, grid = 2 * conv1[0], math.isqrt(pos[0] - 1)
    signature = (tuple(blocks), width, c_proj[0], 32 * grid)
    name = next((v.name for v in VARIANTS.values()
                 if (v.layers, v.width, v.embed_dim, v.image_size) == signature), "unknown")
    return _Arch(name, f"attnpool {c_proj[1]}->{c_proj[0]}, blocks {tuple(blocks)}, "
                       f"stem width {width}, grid {grid}x{grid}")


def text_arch(shapes: Mapping[str, torch.Size], prefix: str) -> Optional[_Arch]:
    """The CLIP text tower under ``prefix`` from its shapes, None if it is not one."""
    names = ("token_embedding.weight", "positional_embedding", "text_projection")
    if any(prefix + n not in shapes for n in names):
        return None
    (vocab, width), (context, _), (_, embed) = (shapes[prefix + n] for n in names)
    layers = sum(1 for k in shapes if re.fullmatch(
        re.escape(prefix) + r"transformer\.resblocks\.\d+\.ln_1\.weight", k))
    signature = (width, layers, embed, context, vocab)
    name = next((v.name for v in VARIANTS.values() if (v.text_width, v.text_layers, v.embed_dim,
                 v.context_length, v.vocab_size) == signature), "unknown")
    return _Arch(name, f"text width {width}, {layers} layers, embed {embed}, "
                       f"context {context}, vocab {vocab}")


# part -> (shape reader, config key naming its variant, legacy config key)
_CLIP_PARTS = {
    "backbone": (visual_arch, "MODEL.CLIP.VARIANT", "MODEL.RESNETS.DEPTH"),
    "teacher_backbone": (visual_arch, "MODEL.CLIP.TEACHER_VARIANT",
                         "MODEL.CLIP.TEACHER_RESNETS_DEPTH"),
    "lang_encoder": (text_arch, "MODEL.CLIP.VARIANT", "MODEL.RESNETS.DEPTH"),
}


def check_architecture(path: str, checkpoint: Mapping[str, Any], model_state: Mapping) -> None:
    """Raise :class:`CheckpointMismatchError` when a CLIP part of the (renamed) checkpoint has
    another architecture than the model's part of the same name."""
    file_shapes = {k: v.shape for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
    model_shapes = {k: v.shape for k, v in model_state.items()}
    for part, (arch_of, key, legacy_key) in _CLIP_PARTS.items():
        expected = arch_of(model_shapes, part + ".")
        if expected is None or part not in _tops(file_shapes):
            continue
        held = arch_of(file_shapes, part + ".")
        if held is None or held.details != expected.details:
            raise CheckpointMismatchError(
                _mismatch_message(path, part, held, expected, key, legacy_key))


def _mismatch_message(path, part, held, expected, key, legacy_key) -> str:
    what = f"{held.name} ({held.details})" if held else "tensors of another layout"
    message = (f"{path} holds {what} under '{part}.', but the model's {part} is "
               f"{expected.name} ({expected.details}). ")
    if held is None and part == "backbone":
        return message + "An RPN checkpoint belongs in MODEL.CLIP.BB_RPN_WEIGHTS."
    if held is None or held.name == "unknown":
        return message + "Use a checkpoint made for this model."
    depth = {v: d for d, v in LEGACY_DEPTHS.items()}.get(held.name)
    legacy = f" (legacy: {legacy_key} {depth})" if depth else ""
    return message + (f"To use this file, build the model for {held.name}: set {key} "
                      f"{held.name}{legacy}; or use a {expected.name} checkpoint.")


def _under(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _match(report: LoadReport, mapped: Mapping[str, Any], model_state: Mapping,
           skip_prefixes: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Sort every renamed checkpoint key into the report; return the tensors to copy."""
    model_tops, to_load = _tops(model_state), {}
    for key, value in mapped.items():
        if not isinstance(value, torch.Tensor):
            report.dropped.append((key, f"not a tensor ({type(value).__name__})"))
        elif _under(key, skip_prefixes):
            report.dropped.append((key, "kept the model's value (skip_prefixes)"))
        elif key in model_state and value.shape != model_state[key].shape:
            report.mismatched.append((key, tuple(value.shape), tuple(model_state[key].shape)))
        elif key in model_state:
            to_load[key] = value
        elif key.split(".")[0] not in model_tops:
            report.unused.append(key)
        elif key.endswith("." + _BN_COUNTER):
            report.dropped.append((key, "BN step counter; frozen BN has none"))
        else:
            report.unexpected.append(key)
    report.loaded = list(to_load)
    handled = set(to_load) | {k for k, _, _ in report.mismatched}
    missing = [k for k in report.model_keys if k not in handled and not _under(k, skip_prefixes)]
    explained = tuple(report.by_design)
    report.missing = [k for k in missing if not _under(k, explained)]
    report.missing_by_design = [k for k in missing if _under(k, explained)]
    return to_load


def load_checkpoint(model: nn.Module, path: str, *, offline_rpn: bool = False,
                    skip_prefixes: Sequence[str] = (),
                    by_design: Optional[Mapping[str, str]] = None) -> LoadReport:
    """Load ``path`` into ``model`` non-strictly by exact (renamed) key and log a report.

    Args:
        offline_rpn: the file is ``MODEL.CLIP.BB_RPN_WEIGHTS``: only its RPN parts are loaded,
            into ``offline_backbone.*`` / ``offline_proposal_generator.*``; the rest is dropped
            on purpose and the other model parts are left untouched.
        skip_prefixes: model key prefixes whose current values are kept (e.g.
            :data:`VOCABULARY_KEYS`, so a vocabulary file wins over stored embeddings).
        by_design: model key prefix -> why the model needs no value from the file there; its
            missing keys are logged with that reason at INFO, not as a warning.
    """
    state_dict, fmt = read_state_dict(path)
    model_state = model.state_dict()
    mapped, dropped = _CONVERTERS[fmt](state_dict, _tops(model_state), offline_rpn)
    check_architecture(path, mapped, model_state)
    targets = [k for k in model_state
               if not offline_rpn or _under(k, tuple(_OFFLINE_IDENTITY))]
    report = LoadReport(os.fspath(path), fmt, dropped=dropped, model_keys=tuple(targets),
                        by_design=dict(by_design or {}))
    to_load = _match(report, mapped, model_state, skip_prefixes)
    model.load_state_dict(to_load, strict=False)
    report.log()
    return report


def save_checkpoint(path: str, model_state: Mapping[str, torch.Tensor], **extra: Any) -> None:
    """Write ``{"model": model_state, **extra}`` atomically: a temporary file in the same
    folder replaces ``path`` only once complete, so a crash never leaves a partial file."""
    if "model" in extra:
        raise ValueError("'model' is reserved for the state dict")
    with atomic_open(path, "wb") as f:
        torch.save({"model": dict(model_state), **extra}, f)
