"""Pretraining losses and pseudo labels against hand computations (reference sections 5.4, 5.5)."""
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from regionclip.modeling.pretrain_losses import (
    image_text_contrastive,
    pseudo_concept_labels,
    region_concept_contrastive,
    region_concept_distillation,
)

LN = math.log


# ------------------------------------------------------------------------------------------
# Region-concept distillation: KL(teacher || student)
# ------------------------------------------------------------------------------------------
def test_distillation_equals_hand_computed_kl():
    # row 0: p = (1/4, 3/4), q = (1/2, 1/2); row 1: p = (1/2, 1/2), q = (1, 0) (q log q = 0)
    logits = torch.tensor([[0.0, LN(3.0)], [1.0, 1.0]])
    q = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    expected = (0.5 * LN(0.5 / 0.25) + 0.5 * LN(0.5 / 0.75) + LN(1.0 / 0.5)) / 2
    assert region_concept_distillation(logits, q).item() == pytest.approx(expected, rel=1e-6)


def test_distillation_is_finite_where_log_of_softmax_underflows():
    # At temperature 0.01 logits differ by thousands: softmax gives exactly 0 for concept 0,
    # log(0) = -inf (the original); log_softmax gives -2000.
    logits = torch.tensor([[0.0, 2000.0]], requires_grad=True)
    q = torch.tensor([[0.5, 0.5]])
    assert torch.log(torch.softmax(logits, 1))[0, 0] == -math.inf
    loss = region_concept_distillation(logits, q)
    assert loss.item() == pytest.approx(0.5 * (LN(0.5) + 2000.0) + 0.5 * LN(0.5), rel=1e-6)
    loss.backward()
    assert torch.allclose(logits.grad, torch.tensor([[-0.5, 0.5]]))  # p - q, p = (0, 1)


def test_distillation_of_no_regions_is_zero_and_differentiable():
    logits = torch.zeros(0, 4, requires_grad=True)
    loss = region_concept_distillation(logits, torch.zeros(0, 4))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.shape == (0, 4)


# ------------------------------------------------------------------------------------------
# Region-concept contrastive (multi-positive MIL cross-entropy)
# ------------------------------------------------------------------------------------------
def test_contrastive_equals_hand_computed_mil_loss():
    # regions 0 and 2 share concept 0 (positives of each other), region 1 has concept 1
    regions = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    # T = 0.5: row 0 logits (2, 0, 2), positives 0 and 2; row 1 logits (0, 2, 0), positive 1
    e2 = math.exp(2.0)
    row0 = -LN(2 * e2 / (2 * e2 + 1))
    row1 = -LN(e2 / (e2 + 2))
    expected = (2 * row0 + row1) / 3
    loss = region_concept_contrastive(regions, targets, labels, temperature=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_is_stable_at_tiny_temperature():
    regions = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    targets = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    labels = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # T = 0.001: row 0 logits (600, 1000), its positive is 400 nats below the max; row 1
    # logits (1000, 600), its positive is the max (loss e^-400 ~ 0)
    loss = region_concept_contrastive(regions, targets, labels, temperature=0.001)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx((400.0 + 0.0) / 2, rel=1e-5)


def test_contrastive_with_all_positives_is_zero():
    regions = torch.nn.functional.normalize(torch.randn(4, 3), dim=1)
    loss = region_concept_contrastive(regions, regions, torch.ones(4, 4), temperature=0.01)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_contrastive_rejects_rows_without_positive():
    with pytest.raises(ValueError, match="positive"):
        region_concept_contrastive(torch.eye(2), torch.eye(2), torch.tensor([[1.0, 0], [0, 0]]))


# ------------------------------------------------------------------------------------------
# Image-text symmetric contrastive
# ------------------------------------------------------------------------------------------
def test_image_text_equals_hand_computed_symmetric_infonce():
    image = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised: e0, e1
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0]])  # normalised: e0, (e0 + e1) / sqrt 2
    r = 1 / math.sqrt(2)
    # T = 1: M = [[1, r], [0, r]]; rows of M (images) and of M^T (texts), positives on the diag
    images = -LN(math.e / (math.e + math.exp(r))) - LN(math.exp(r) / (1 + math.exp(r)))
    texts = -LN(math.e / (math.e + 1)) - LN(0.5)
    expected = 0.5 * (images / 2 + texts / 2)
    loss = image_text_contrastive(image, text, temperature=1.0)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_image_text_gather_is_a_no_op_without_process_group():
    image, text = torch.randn(3, 4), torch.randn(3, 4)
    assert torch.equal(image_text_contrastive(image, text, gather=True),
                       image_text_contrastive(image, text))


def _joined_batch(n: int):
    gen = torch.Generator().manual_seed(n)
    return torch.randn(n, 8, generator=gen), torch.randn(n, 8, generator=gen)


GATHER_CASES = ((3, 3), (3, 2))  # equal and unequal per-process batch sizes
GATHER_TEMPERATURE = 0.1


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        results = []
        for sizes in GATHER_CASES:
            image, text = _joined_batch(sum(sizes))
            start = sum(sizes[:rank])
            rows = slice(start, start + sizes[rank])
            image, text = image[rows].requires_grad_(), text[rows].requires_grad_()
            loss = image_text_contrastive(image, text, GATHER_TEMPERATURE, gather=True)
            loss.backward()
            results.append({"loss": loss.detach(), "image": image.grad, "text": text.grad})
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_loss_over_two_processes_equals_joined_batch_loss(tmp_path):
    world = 2
    mp.spawn(_gather_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case, sizes in enumerate(GATHER_CASES):
        image, text = _joined_batch(sum(sizes))
        image.requires_grad_(), text.requires_grad_()
        joined = image_text_contrastive(image, text, GATHER_TEMPERATURE)
        joined.backward()
        for rank in range(world):
            result = per_rank[rank][case]
            assert result["loss"].item() == pytest.approx(joined.item(), rel=1e-5)
            start = sum(sizes[:rank])
            rows = slice(start, start + sizes[rank])
            # Every process computes the same global loss and backward sums the gradients of
            # all processes onto each one's own rows: world x the joined-batch gradient, so
            # data-parallel averaging yields exactly the global gradient.
            for name, full in (("image", image.grad), ("text", text.grad)):
                assert result[name].abs().sum() > 0
                torch.testing.assert_close(result[name], world * full[rows], rtol=1e-4,
                                           atol=1e-6)


# ------------------------------------------------------------------------------------------
# Pseudo labels
# ------------------------------------------------------------------------------------------
def _crafted_regions():
    """Concepts e0, e1, e2 (unnormalised, x3); regions along e0, between e1 and e2 (closer to
    e1), along e1, and along e0 (x5): at temperature 1 the teacher probabilities are
    hand-computable."""
    concepts = 3.0 * torch.eye(3)
    c, s = math.cos(0.4), math.sin(0.4)
    regions = torch.tensor([[2.0, 0.0, 0.0], [0.0, c, s], [0.0, 1.0, 0.0], [5.0, 0.0, 0.0]])
    return regions, concepts, (c, s)


def _softmax(values):
    exps = [math.exp(v) for v in values]
    return [e / sum(exps) for e in exps]


def test_pseudo_labels_threshold_targets_and_label_matrix():
    regions, concepts, (c, s) = _crafted_regions()
    labels = pseudo_concept_labels(regions, concepts, threshold=0.55, temperature=1.0)
    one_hot = _softmax([1.0, 0.0, 0.0])  # max 0.576 > 0.55: kept
    mixed = _softmax([0.0, c, s])  # max 0.504 < 0.55: dropped
    assert max(one_hot) > 0.55 > max(mixed)
    assert labels.keep.tolist() == [True, False, True, True]
    assert labels.targets.tolist() == [0, 1, 0]
    expected = torch.tensor([one_hot, _softmax([0.0, 1.0, 0.0]), one_hot])
    torch.testing.assert_close(labels.probs, expected)
    # L_ij = [m_i == m_j] over the kept regions, diagonal included
    assert labels.label_matrix.tolist() == [[1, 0, 1], [0, 1, 0], [1, 0, 1]]


def test_pseudo_labels_keep_all_when_none_passes():
    regions, concepts, (c, s) = _crafted_regions()
    labels = pseudo_concept_labels(regions, concepts, threshold=0.9, temperature=1.0)
    assert labels.keep.all()
    assert labels.targets.tolist() == [0, 1, 1, 0]
    assert labels.probs[1].tolist() == pytest.approx(_softmax([0.0, c, s]), rel=1e-5)
    assert labels.label_matrix.tolist() == [[1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 1, 0],
                                            [1, 0, 0, 1]]


def test_pseudo_labels_threshold_zero_keeps_all_and_default_temperature_is_sharp():
    regions, concepts, _ = _crafted_regions()
    labels = pseudo_concept_labels(regions, concepts, threshold=0.0)
    assert labels.keep.all()
    # temperature 0.01: a region along a concept gets probability ~1 for it
    assert labels.probs[0, 0].item() == pytest.approx(1.0, abs=1e-6)
    assert labels.probs[1, 1].item() > 0.99
