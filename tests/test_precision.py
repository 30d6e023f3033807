"""MODEL.PRECISION: the fast paths against the exact fp32 path and open_clip's attention pool.

The fold identities are checked in float64, where the re-associated and the original math
agree to 1e-10; the fast paths themselves against fp32 detections with the agreement
criterion of issue 14 (same class, IoU >= 0.9, |score difference| <= 0.02 for >= 99%).
"""
import copy

import pytest
import torch
from _agreement import matched_fraction
from open_clip.modified_resnet import AttentionPool2d
from test_detector import TINY_CONFIG, _boxes, _image, _input, _rpn_model

from regionclip.config import load_config
from regionclip.modeling.build import build_model
from regionclip.modeling.precision import FoldedAttentionPool, fast_trunk, tf32_mode

FUSED = ("MODEL.CLIP.MULTIPLY_RPN_SCORE", "True")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def test_folded_attention_pool_equals_open_clip():
    reference = AttentionPool2d(3, 64, 4, 32).double()
    for param in reference.parameters():
        param.copy_(torch.randn(param.shape, generator=_gen(0), dtype=torch.float64))
    folded = FoldedAttentionPool(3, 64, 4, 32).double()
    folded.load_state_dict(reference.state_dict())
    x = torch.randn(5, 64, 3, 3, generator=_gen(1), dtype=torch.float64)
    torch.testing.assert_close(folded._pool(x), reference(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(folded.float()(x.float()), reference.float()(x.float()),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="3x3 input"):
        folded(x[:, :, :2, :2].float())


@torch.no_grad()
def test_the_fast_trunk_computes_the_same_function(tmp_path):
    model = _rpn_model(tmp_path).double()
    x = torch.randn(1, 3, 64, 96, generator=_gen(2), dtype=torch.float64)
    fast = fast_trunk(model.backbone)
    torch.testing.assert_close(fast(x)["res4"], model.backbone(x)["res4"], rtol=1e-10,
                               atol=1e-10)
    assert fast(x)["res4"].is_contiguous(memory_format=torch.channels_last)
    assert not any(hasattr(m, "running_var") for m in fast.modules())
    boxes = [torch.tensor([[0.0, 0.0, 60.0, 50.0], [20.0, 10.0, 90.0, 60.0]], dtype=x.dtype)]
    res4, size = model.backbone(x)["res4"], model.roi_heads.pooler_resolution
    torch.testing.assert_close(fast.embed_regions(res4, boxes, size),
                               model.backbone.embed_regions(res4, boxes, size),
                               rtol=1e-10, atol=1e-10)


@torch.no_grad()
@pytest.mark.parametrize("precision", ["fp32-fast", "tf32", "bf16"])
def test_fast_paths_match_the_exact_detections(tmp_path, precision):
    model = _rpn_model(tmp_path, *FUSED)
    inputs = [{"image": _image(64, 96, seed=s)} for s in range(3)]
    exact = [r["instances"] for r in model.inference(inputs)]
    model.precision = precision
    fast = [r["instances"] for r in model.inference(inputs)]
    as_tuples = [[(r.pred_boxes.tensor, r.scores, r.pred_classes) for r in results]
                 for results in (exact, fast)]
    matched, total = matched_fraction(*as_tuples)
    assert total > 20 and matched >= 0.99 * total


@torch.no_grad()
def test_the_fast_copy_follows_the_weights_and_stays_out_of_checkpoints(tmp_path):
    model = _rpn_model(tmp_path)
    keys = set(model.state_dict())
    model.precision = "fp32-fast"
    first = model.trunk()
    assert model.trunk() is first and first is not model.backbone
    model.backbone.layer4[0].conv1.weight.mul_(2)  # an optimizer step or a loaded checkpoint
    second = model.trunk()
    assert second is not first
    torch.testing.assert_close(second.layer4[0].conv1.weight, 2 * first.layer4[0].conv1.weight)
    assert set(model.state_dict()) == keys
    model.train()
    assert model.trunk() is model.backbone  # training always sees the original


@pytest.mark.skipif(not hasattr(torch.backends.cudnn.conv, "fp32_precision"),
                    reason="torch < 2.9 has only the allow_tf32 flags")
def test_tf32_mode_sets_and_restores_the_flags():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (matmul.fp32_precision, conv.fp32_precision)
    with tf32_mode(False):
        assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    with tf32_mode(True):
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    assert (matmul.fp32_precision, conv.fp32_precision) == before


def test_unknown_precision_is_rejected_naming_the_key():
    cfg = load_config(TINY_CONFIG, ["MODEL.PRECISION", "fp16"])
    with pytest.raises(ValueError, match="MODEL.PRECISION 'fp16'"):
        build_model(cfg)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@torch.no_grad()
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_gpu_detections_agree_with_cpu(tmp_path, precision):
    # fp32 turns TF32 off, so the GPU differs from the CPU by float rounding only.
    model = _rpn_model(tmp_path, *FUSED)
    inputs = [{"image": _image(64, 96, seed=s)} for s in range(3)]
    cpu = [r["instances"] for r in model.inference(inputs)]
    gpu_model = copy.deepcopy(model).cuda()
    gpu_model.precision = precision
    gpu = [r["instances"].to("cpu") for r in gpu_model.inference(inputs)]
    matched, total = matched_fraction(
        *[[(r.pred_boxes.tensor, r.scores, r.pred_classes) for r in results]
          for results in (cpu, gpu)],
        score_tol=1e-4 if precision == "fp32" else 0.02)
    assert total > 20 and matched >= 0.99 * total


@torch.no_grad()
def test_channels_last_gives_the_same_detections_up_to_rounding(tmp_path):
    default = _rpn_model(tmp_path, *FUSED)
    channels_last = _rpn_model(tmp_path, *FUSED, "MODEL.CHANNELS_LAST", "True")
    conv = channels_last.backbone.layer4[0].conv2.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not default.backbone.layer4[0].conv2.weight.is_contiguous(
        memory_format=torch.channels_last)
    channels_last.load_state_dict(default.state_dict())  # the layout survives loading
    assert conv.is_contiguous(memory_format=torch.channels_last)
    inputs = [{"image": _image(64, 96, seed=s)} for s in range(3)]
    results = [[(r.pred_boxes.tensor, r.scores, r.pred_classes) for r in
                (out["instances"] for out in model.inference(inputs))]
               for model in (default, channels_last)]
    # Rounding moves this random tiny RPN's boxes by up to 0.006 px and the fused scores (1 to
    # 5 here) by up to 1e-4, depending on the thread count (measured with 1 and 2 threads).
    matched, total = matched_fraction(*results, min_iou=0.999, score_tol=1e-3)
    assert total > 20 and matched == total


def test_channels_last_trains_the_same_model_up_to_rounding(tmp_path):
    """Two SGD steps of the same detector in both layouts: equal losses to float rounding, the
    layout kept by the optimizer, and a saved channels-last state dict loads into a default
    model unchanged."""
    models = [_rpn_model(tmp_path, "MODEL.CHANNELS_LAST", str(flag)).train()
              for flag in (False, True)]
    models[1].load_state_dict(models[0].state_dict())
    batch = [_input(_image(64, 96, seed=s), _boxes(3, 64, 96, seed=s)) for s in range(2)]
    for x in batch:
        x["instances"].gt_classes = torch.tensor([0, 1, 2])
    losses = []
    for model in models:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        torch.manual_seed(0)  # the same RoI samples
        for _ in range(2):
            loss = sum(model(batch).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    default, channels_last = models
    assert channels_last.backbone.layer4[0].conv2.weight.is_contiguous(
        memory_format=torch.channels_last)  # the optimizer steps kept the layout
    torch.save(channels_last.state_dict(), tmp_path / "model.pth")
    default.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True))
    for key, value in channels_last.state_dict().items():
        assert torch.equal(default.state_dict()[key], value), key
    assert not default.backbone.layer4[0].conv2.weight.is_contiguous(
        memory_format=torch.channels_last)
