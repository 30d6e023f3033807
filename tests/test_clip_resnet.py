import pytest
import torch
import torchvision
from _clip_utils import official_backbone_shapes, openclip_reference, visual_state_dict

from regionclip.config.variants import get_variant
from regionclip.modeling.clip_resnet import CLIPResNet, convert_frozen_batchnorm
from regionclip.ops import FrozenBatchNorm2d

STEM = ("conv1", "conv2", "conv3")


def _trunk_like(name: str, **kwargs) -> CLIPResNet:
    reference = openclip_reference(name)
    trunk = CLIPResNet(get_variant(name), **kwargs)
    trunk.load_state_dict(visual_state_dict(reference), strict=True)
    return trunk.eval()


def _assert_close(actual, expected):
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("name, batch", [("tiny", 2), ("RN50", 1)])
def test_encode_image_equals_open_clip(name, batch):
    size = get_variant(name).image_size
    images = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    trunk = _trunk_like(name)
    with torch.no_grad():
        expected = openclip_reference(name).encode_image(images)
        actual = trunk.encode_image(images)
    assert actual.shape == (batch, get_variant(name).embed_dim)
    _assert_close(actual, expected)


def test_features_match_open_clip_stages():
    reference = openclip_reference("tiny").visual
    trunk = _trunk_like("tiny", out_features=("res4", "res5"))
    images = torch.randn(2, 3, 96, 64)
    with torch.no_grad():
        res4 = reference.layer3(reference.layer2(reference.layer1(reference.stem(images))))
        res5 = reference.layer4(res4)
        out = trunk(images)
    assert set(out) == {"res4", "res5"}
    _assert_close(out["res4"], res4)
    _assert_close(out["res5"], res5)


def test_res4_stride_and_channels():
    variant = get_variant("tiny")
    trunk = CLIPResNet(variant)
    out = trunk(torch.randn(1, 3, 80, 48))
    assert list(out) == ["res4"]
    assert out["res4"].shape == (1, variant.stage_channels[2], 80 // 16, 48 // 16)
    assert trunk.output_shape() == {"res4": (variant.width * 16, 16)}
    assert trunk.res5_shape() == (variant.width * 32, 32)


def test_region_path_through_layer4_and_attnpool():
    variant = get_variant("tiny")
    trunk = CLIPResNet(variant).eval()
    rois = torch.randn(3, variant.stage_channels[2], variant.pooler_resolution,
                       variant.pooler_resolution)
    assert trunk.attnpool(trunk.layer4(rois)).shape == (3, variant.embed_dim)
    with pytest.raises(ValueError, match="2x2 input"):
        trunk.attnpool(trunk.layer4(torch.randn(1, variant.stage_channels[2], 6, 6)))


@pytest.mark.parametrize("name", ["RN50", "RN50x4", "tiny"])
def test_state_dict_equals_official_backbone_keys(name):
    expected = official_backbone_shapes(name)
    with torch.device("meta"):
        trunk = CLIPResNet(get_variant(name))
    actual = {k: tuple(v.shape) for k, v in trunk.state_dict().items()}
    assert list(actual.items()) == list(expected.items())


def test_batchnorm_is_frozen_everywhere():
    trunk = CLIPResNet(get_variant("tiny"), freeze_at=0).train()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in trunk.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in trunk.modules()) == 3 + 4 * 3 + 4
    assert not any("num_batches_tracked" in k for k in trunk.state_dict())
    before = trunk.bn1.running_mean.clone()
    trunk(torch.randn(2, 3, 64, 64))
    assert torch.equal(trunk.bn1.running_mean, before)


def test_convert_frozen_batchnorm_keeps_eval_output():
    bn = torch.nn.BatchNorm2d(4).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 2)
    block = torch.nn.Sequential(bn)
    x = torch.randn(2, 4, 3, 3)
    expected = bn(x)
    frozen = convert_frozen_batchnorm(block)
    assert isinstance(frozen[0], FrozenBatchNorm2d)
    torch.testing.assert_close(frozen(x), expected)


def test_frozen_batchnorm_is_bit_identical_to_torchvision():
    """ops.FrozenBatchNorm2d saves a temporary; outputs and input gradients stay torchvision's."""
    reference = torchvision.ops.misc.FrozenBatchNorm2d(5)
    for buffer in reference.buffers():
        buffer.uniform_(0.3, 2.0)
    ours = FrozenBatchNorm2d(5)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(3, 5, 7, 9, requires_grad=True)
    expected, actual = reference(x), ours(x)
    assert torch.equal(actual, expected)
    assert torch.equal(torch.autograd.grad(actual.square().sum(), x)[0],
                       torch.autograd.grad(expected.square().sum(), x)[0])
    half = x.detach().bfloat16()
    assert actual.dtype == ours(half).dtype == reference(half).dtype == torch.float32
    assert torch.equal(ours(half), reference(half))


def _trainable_groups(trunk):
    groups = {"stem": [getattr(trunk, n) for n in STEM]}
    groups.update({f"layer{i}": [getattr(trunk, f"layer{i}")] for i in range(1, 5)})
    groups["attnpool"] = [trunk.attnpool]
    return {
        g: all(p.requires_grad for m in mods for p in m.parameters())
        for g, mods in groups.items()
    }


@pytest.mark.parametrize("freeze_at", range(6))
def test_freeze_at(freeze_at):
    trunk = CLIPResNet(get_variant("tiny"), freeze_at=freeze_at)
    trainable = _trainable_groups(trunk)
    frozen_groups = (["stem"] if freeze_at >= 1 else []) + [
        f"layer{i}" for i in range(1, freeze_at)
    ]
    for group, is_trainable in trainable.items():
        assert is_trainable == (group not in frozen_groups), group
    if freeze_at >= 1:
        assert not any(p.requires_grad for n in STEM for p in getattr(trunk, n).parameters())


@pytest.mark.parametrize("kwargs, message", [
    ({"freeze_at": 6}, "freeze_at must be in"), ({"freeze_at": -1}, "freeze_at must be in"),
    ({"out_features": ("res6",)}, "out_features must be a non-empty subset"),
    ({"out_features": ()}, "out_features must be a non-empty subset")])
def test_invalid_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CLIPResNet(get_variant("tiny"), **kwargs)
