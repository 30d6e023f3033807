"""The three RegionCLIP pretraining losses (reference section 5.5), as pure functions.

Every loss is computed in float32 (embeddings may arrive in half precision under AMP) and
stays connected to its inputs' graph even when there is nothing to compare (an empty batch
gives a zero loss), so distributed data-parallel training never sees an unused parameter.
"""
from typing import List, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.nn.functional import all_gather as differentiable_all_gather

from ..distributed import get_world_size

DEFAULT_TEMPERATURE = 0.01


def _zero_loss(*tensors: torch.Tensor) -> torch.Tensor:
    return sum(t.float().sum() for t in tensors) * 0.0


def region_concept_distillation(
    student_logits: torch.Tensor, teacher_probs: torch.Tensor
) -> torch.Tensor:
    """KL(teacher || student) averaged over regions.

    student_logits: [K, C] student region-concept similarities divided by the temperature.
    teacher_probs: [K, C] teacher distributions q (rows sum to 1; no gradient needed).
    Returns (1/K) sum_i sum_c q_ic (log q_ic - log p_ic), p = softmax(student_logits), with
    q log q = 0 where q = 0. log p comes from log_softmax: the original's log(softmax(.))
    underflows to -inf at temperature 0.01 (reference section 11.4).
    """
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher probs "
                         f"{tuple(teacher_probs.shape)} must have the same shape [K, C]")
    if student_logits.shape[0] == 0:
        return _zero_loss(student_logits)
    log_p = F.log_softmax(student_logits.float(), dim=1)
    return F.kl_div(log_p, teacher_probs.float(), reduction="batchmean")


def region_concept_contrastive(
    student_region_emb_normalised: torch.Tensor,
    target_concept_emb_normalised: torch.Tensor,
    label_matrix: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
) -> torch.Tensor:
    """Multi-positive (MIL) region-to-concept cross-entropy.

    student_region_emb_normalised: [K, D] unit-norm region embeddings v_i.
    target_concept_emb_normalised: [K, D] unit-norm concept embedding of each region's
        pseudo label, e_{m_j} (duplicates allowed).
    label_matrix: [K, K], L_ij = 1 when region j's concept is a positive for region i
        (same pseudo label; the diagonal included). Every row needs a positive.
    Returns mean_i -log sum_j L_ij softmax_j(S_i.), S_ij = v_i . e_{m_j} / temperature,
    evaluated as -logsumexp_j(log_softmax(S_i.)_j + log L_ij), which is stable for any
    temperature.
    """
    k = student_region_emb_normalised.shape[0]
    if label_matrix.shape != (k, k) or target_concept_emb_normalised.shape[0] != k:
        raise ValueError(f"need K regions, K targets and a [K, K] label matrix; got "
                         f"{k}, {target_concept_emb_normalised.shape[0]} and "
                         f"{tuple(label_matrix.shape)}")
    if k == 0:
        return _zero_loss(student_region_emb_normalised)
    if not bool((label_matrix > 0).any(dim=1).all()):
        raise ValueError("every row of the label matrix needs at least one positive")
    logits = student_region_emb_normalised.float() @ target_concept_emb_normalised.float().t()
    log_probs = F.log_softmax(logits / temperature, dim=1)
    return -torch.logsumexp(log_probs + label_matrix.float().log(), dim=1).mean()


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """All processes' rows of ``x`` concatenated in rank order, with gradients.

    Per-process row counts may differ: they are exchanged first, every process pads to the
    largest, and the padding is cut off after the gather. In backward, the gradients of all
    processes are summed onto each process's own rows (a reduce-scatter), so data-parallel
    averaging of parameter gradients yields the gradient of the global loss.
    """
    world = dist.get_world_size()
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = F.pad(x, (0, 0, 0, max(counts) - x.shape[0]))
    parts: List[torch.Tensor] = differentiable_all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def image_text_contrastive(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    gather: bool = False,
) -> torch.Tensor:
    """Symmetric InfoNCE between images and their captions.

    image_emb, text_emb: [B, D] (unnormalised); row b of both belongs to the same image.
    gather: with several processes, all-gather both (differentiably) so that every process
        scores its pairs against the whole global batch. Each process then computes the same
        global B x B matrix, as the original did, so its loss equals the one-process loss on
        the joined batch; its own pairs sit on the diagonal at the offset of its first row.
        Unlike the original (section 11.7) no process's batch is truncated.
    Returns 0.5 * [CE(M, diag) + CE(M^T, diag)], M = normalise(image) normalise(text)^T / T.
    """
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(f"image and text embeddings must both be [B, D]; got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    image = F.normalize(image_emb.float(), dim=1)
    text = F.normalize(text_emb.float(), dim=1)
    if gather and get_world_size() > 1:
        image, text = gather_rows(image), gather_rows(text)
    if image.shape[0] == 0:
        return _zero_loss(image_emb, text_emb)
    logits = image @ text.t() / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


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
