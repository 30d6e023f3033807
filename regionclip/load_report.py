"""What a checkpoint load did: the tensors loaded, and every one not loaded, with why.

Built by :func:`regionclip.checkpoint.load_checkpoint`. Gaps the caller expects (``by_design``:
e.g. the box predictor of a zero-shot detector, absent from a pretrained file) are logged with
their reason at INFO; everything else that was not loaded is a warning.
"""
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

__all__ = ["LoadReport"]

logger = logging.getLogger("regionclip.checkpoint")


@dataclass
class LoadReport:
    """Outcome of ``load_checkpoint``; keys are model (target) names unless noted."""

    path: str
    format: str
    loaded: List[str] = field(default_factory=list)
    missing: List[str] = field(default_factory=list)  # kept their initialisation
    missing_by_design: List[str] = field(default_factory=list)  # missing under by_design
    by_design: Dict[str, str] = field(default_factory=dict)  # key prefix -> why (the caller's)
    unexpected: List[str] = field(default_factory=list)  # under a part the model has
    unused: List[str] = field(default_factory=list)  # parts the model does not have, by design
    mismatched: List[Tuple[str, tuple, tuple]] = field(default_factory=list)  # key, file, model
    dropped: List[Tuple[str, str]] = field(default_factory=list)  # key, reason (on purpose)
    model_keys: Tuple[str, ...] = field(default=(), repr=False)  # the keys this load targeted

    def summary(self) -> str:
        return "\n".join(self._info_lines() + self._warning_lines())

    def log(self) -> None:
        logger.info("\n".join(self._info_lines()))
        problems = self._warning_lines()
        if problems:
            logger.warning("\n".join(problems))

    def _info_lines(self) -> List[str]:
        lines = [f"Loaded {len(self.loaded)} of {len(self.model_keys)} model tensors from "
                 f"{self.path} (format {self.format})"]
        if self.unused:
            groups = Counter(k.split(".")[0] for k in self.unused)
            lines.append("Unused by design (the model has no such part): "
                         + ", ".join(f"{p} ({n} tensors)" for p, n in groups.items()))
        groups = Counter((k.split(".")[0], reason) for k, reason in self.dropped)
        lines += [f"Dropped on purpose: {p} ({n} tensors): {r}" for (p, r), n in groups.items()]
        lines += [f"Missing by design (kept their initialisation): {p} ({n} tensors): {why}"
                  for p, why in self.by_design.items()
                  if (n := sum(p in _prefixes(k) for k in self.missing_by_design))]
        return lines

    def _warning_lines(self) -> List[str]:
        lines = [f"Skipped (shape mismatch, kept the model's value): {k}: checkpoint {f} vs "
                 f"model {m}" for k, f, m in self.mismatched]
        lines += [f"{p}: {n} tensors missing (kept their initialisation)"
                  for p, n in _group(self.missing, self.model_keys).items()]
        universe = self.loaded + self.unexpected + [k for k, _, _ in self.mismatched]
        lines += [f"{p}: {n} tensors unexpected (not in the model)"
                  for p, n in _group(self.unexpected, universe).items()]
        return lines


def _group(keys: Sequence[str], universe: Sequence[str]) -> Dict[str, int]:
    """Count ``keys`` under the shortest module prefix whose keys in ``universe`` are all in
    ``keys``: a wholly missing backbone is one line, a missing ``bbox_pred`` another."""
    total, hit = Counter(), Counter()
    for key in universe:
        total.update(_prefixes(key))
    for key in keys:
        hit.update(_prefixes(key))
    groups = Counter()
    for key in keys:
        groups[next(p for p in _prefixes(key) if hit[p] == total[p])] += 1
    return dict(groups)


def _prefixes(key: str) -> List[str]:
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
