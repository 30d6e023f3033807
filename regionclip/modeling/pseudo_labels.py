"""Region-concept pseudo labels from the frozen teacher (reference section 5.4)."""
from typing import NamedTuple

import torch
import torch.nn.functional as F

# The original hard-codes the teacher's labelling temperature, independent of CLSS_TEMP.
TEACHER_TEMPERATURE = 0.01


class PseudoLabels(NamedTuple):
    """keep: [N] bool, the regions that take part in the region losses.
    targets: [K] long, argmax concept m_i of each kept region (K = keep.sum()).
    probs: [K, C] teacher distributions q_i of the kept regions (distillation targets).
    label_matrix: [K, K] float, L_ij = 1 if m_i == m_j (so the diagonal is 1).
    """

    keep: torch.Tensor
    targets: torch.Tensor
    probs: torch.Tensor
    label_matrix: torch.Tensor


@torch.no_grad()
def pseudo_concept_labels(
    teacher_region_emb: torch.Tensor,
    teacher_concept_emb: torch.Tensor,
    threshold: float,
    temperature: float = TEACHER_TEMPERATURE,
) -> PseudoLabels:
    """Label each region with the teacher's best concept.

    teacher_region_emb: [N, D]; teacher_concept_emb: [C, D]; both unnormalised.
    q_i = softmax_c(t_i . e_c / temperature) on unit vectors; region i is kept iff
    max_c q_ic > threshold. When no region passes, all are kept (the original's fallback),
    so threshold 0.0 keeps every region.
    """
    region = F.normalize(teacher_region_emb.float(), dim=1)
    concept = F.normalize(teacher_concept_emb.float(), dim=1)
    probs = F.softmax(region @ concept.t() / temperature, dim=1)
    best, targets = probs.max(dim=1)
    keep = best > threshold
    if not bool(keep.any()):
        keep = torch.ones_like(keep)
    targets = targets[keep]
    label_matrix = (targets[:, None] == targets[None, :]).float()
    return PseudoLabels(keep, targets, probs[keep], label_matrix)
