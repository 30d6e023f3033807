"""Class names -> text embeddings with a text tower from a checkpoint, cached on disk.

Encoding a vocabulary runs every name through 81 prompt templates, which takes minutes for
LVIS on a CPU; the result depends only on the text-tower weights, the templates and the name,
so it is cached under exactly that key: ``$REGIONCLIP_CACHE`` (default
``~/.cache/regionclip``)/``text/<tower digest>-<template digest>/<name digest>.pth``. The tower
digest is a hash of the tower's tensors; it is remembered per weights file (path, size, mtime)
so that a fully cached vocabulary never loads the tower. A damaged entry (unreadable, or not
finite) is recomputed with a warning; a cache folder that cannot be written costs a warning and
the names are encoded without caching.
"""
import contextlib
import hashlib
import logging
import os
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .atomic import atomic_open
from .config.variants import CLIPVariant
from .data.coco import check_class_names
from .engine.weights import load_text_encoder
from .modeling.text_encoder import concept_embeddings, load_embeddings, save_embeddings
from .prompts import PROMPT_TEMPLATES

__all__ = ["CACHE_ENV", "ClassNameEncoder", "TextEmbeddingCache", "default_cache_dir",
           "tower_digest"]

logger = logging.getLogger("regionclip")

CACHE_ENV = "REGIONCLIP_CACHE"
# Bump when the embedding recipe changes, so that old cache entries are not reused.
_RECIPE = "mean-of-unnormalised-prompt-embeddings-v1"
_DIGEST_CHARS = 24


def default_cache_dir() -> str:
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache",
                                                     "regionclip")


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:_DIGEST_CHARS]


def tower_digest(encoder: nn.Module) -> str:
    """Hash of every tensor (name, dtype, shape, values) of a text tower."""
    sha = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        sha.update(f"{name}|{value.dtype}|{tuple(value.shape)}".encode())
        sha.update(value.view(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()[:_DIGEST_CHARS]


class TextEmbeddingCache:
    """One [1, D] file per (tower, templates, name); missing or damaged entries are None."""

    def __init__(self, root: str, templates: Sequence[str] = PROMPT_TEMPLATES):
        self.root = root
        self.templates_digest = _sha(_RECIPE + "\n" + "\n".join(templates))
        self.writable = True  # until a write fails

    def _path(self, digest: str, name: str) -> str:
        folder = f"{digest}-{self.templates_digest}"
        return os.path.join(self.root, "text", folder, _sha(name) + ".pth")

    def get(self, digest: str, name: str, dim: int) -> Optional[torch.Tensor]:
        path = self._path(digest, name)
        if not os.path.isfile(path):
            return None
        try:
            return load_embeddings(path, expected_dim=dim)[0]
        except (ValueError, OSError) as err:
            logger.warning("Recomputing the damaged cache entry %s: %s", path, err)
            return None

    def put(self, digest: str, name: str, embedding: torch.Tensor) -> None:
        if self.writable:
            with self._read_only_warns():
                save_embeddings(embedding.reshape(1, -1), self._path(digest, name))

    def _memo_path(self, identity: str) -> str:
        return os.path.join(self.root, "text", "towers", _sha(identity))

    def remembered_digest(self, identity: str) -> str:
        try:
            with open(self._memo_path(identity), encoding="utf-8") as f:
                return f.read().strip()
        except OSError:
            return ""

    def remember_digest(self, identity: str, digest: str) -> None:
        if self.writable:
            with self._read_only_warns(), \
                    atomic_open(self._memo_path(identity), "w", encoding="utf-8") as f:
                f.write(digest)

    @contextlib.contextmanager
    def _read_only_warns(self):
        """A cache folder that cannot be written costs one warning (and no further writes):
        only the time of encoding the names again is lost."""
        try:
            yield
        except OSError as err:
            self.writable = False
            logger.warning("Cannot write the text-embedding cache in %s (%s); encoding class "
                           "names without caching", self.root, err)


def _file_identity(path: str, variant: CLIPVariant) -> str:
    stat = os.stat(path)
    return f"{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{variant.name}"


class ClassNameEncoder:
    """Class names -> [C, D] unnormalised embeddings (mean over the prompt templates, the
    recipe of the released embedding files) from the text tower in ``weights``.

    The tower is loaded on first need; ``cache_dir`` "" disables the disk cache (as
    ``tools/extract_concept_features.py`` does: one pass, nothing to reuse).
    """

    def __init__(self, weights: str, variant: CLIPVariant, device: str = "cpu",
                 cache_dir: Optional[str] = None,
                 loader: Callable[[str, CLIPVariant], nn.Module] = load_text_encoder):
        self.weights, self.variant, self.device = weights, variant, device
        root = default_cache_dir() if cache_dir is None else cache_dir
        self.cache = TextEmbeddingCache(root) if root else None
        self._loader = loader
        self._encoder: Optional[nn.Module] = None
        self._digest = ""

    @property
    def encoder(self) -> nn.Module:
        if self._encoder is None:
            self._encoder = self._loader(self.weights, self.variant).to(self.device)
        return self._encoder

    def digest(self) -> str:
        if self._digest:
            return self._digest
        identity = _file_identity(self.weights, self.variant)
        self._digest = self.cache.remembered_digest(identity) if self.cache else ""
        if not self._digest:
            self._digest = tower_digest(self.encoder)
            if self.cache:
                self.cache.remember_digest(identity, self._digest)
        return self._digest

    def __call__(self, names: Sequence[str]) -> torch.Tensor:
        names = check_class_names(names)
        if self.cache is None:
            return concept_embeddings(self.encoder, names).cpu()
        digest, dim = self.digest(), self.variant.embed_dim
        found = {n: self.cache.get(digest, n, dim) for n in dict.fromkeys(names)}
        missing = [n for n, e in found.items() if e is None]
        if missing:
            logger.info("Encoding %d class names with the text tower of %s", len(missing),
                        self.weights)
            for name, embedding in zip(missing, concept_embeddings(self.encoder, missing).cpu()):
                self.cache.put(digest, name, embedding)
                found[name] = embedding
        return torch.stack([found[n] for n in names])
