"""open_clip reference models for the CLIP trunk and text-tower tests."""
import functools

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from regionclip.config.variants import get_variant


@functools.lru_cache(maxsize=None)
def openclip_reference(name: str) -> open_clip.CLIP:
    """An eval-mode open_clip CLIP (QuickGELU) of variant ``name`` with every weight and BN
    statistic random, so a mismatch anywhere (even in zero-initialised bn3) changes outputs."""
    v = get_variant(name)
    torch.manual_seed(0)
    model = open_clip.CLIP(
        v.embed_dim,
        vision_cfg=CLIPVisionCfg(layers=v.layers, width=v.width, image_size=v.image_size),
        text_cfg=CLIPTextCfg(
            context_length=v.context_length, vocab_size=v.vocab_size, width=v.text_width,
            heads=v.text_heads, layers=v.text_layers,
        ),
        quick_gelu=True,
    )
    _randomize_batchnorm(model.visual)
    return model.eval()


def _randomize_batchnorm(module: torch.nn.Module) -> None:
    for bn in module.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            n = bn.num_features
            bn.weight.data = torch.rand(n) + 0.5
            bn.bias.data = torch.randn(n) * 0.1
            bn.running_mean.data = torch.randn(n) * 0.1
            bn.running_var.data = torch.rand(n) + 0.5


def visual_state_dict(model: open_clip.CLIP) -> dict:
    """open_clip ``visual.*`` weights, prefix removed (num_batches_tracked included)."""
    return {k: v.clone() for k, v in model.visual.state_dict().items()}


def text_state_dict(model: open_clip.CLIP) -> dict:
    """The text-tower tensors of an open_clip CLIP (everything but ``visual.*``/logit_scale)."""
    return {
        k: v.clone()
        for k, v in model.state_dict().items()
        if not k.startswith("visual.") and k != "logit_scale"
    }


def _bn(prefix: str, n: int) -> dict:
    return {f"{prefix}.{k}": (n,) for k in ("weight", "bias", "running_mean", "running_var")}


def _block(prefix: str, inplanes: int, planes: int) -> dict:
    out = planes * 4
    keys = {f"{prefix}.conv1.weight": (planes, inplanes, 1, 1), **_bn(f"{prefix}.bn1", planes)}
    keys.update({f"{prefix}.conv2.weight": (planes, planes, 3, 3), **_bn(f"{prefix}.bn2", planes)})
    keys.update({f"{prefix}.conv3.weight": (out, planes, 1, 1), **_bn(f"{prefix}.bn3", out)})
    if prefix.endswith(".0"):  # every stage's first block changes width or stride
        keys[f"{prefix}.downsample.0.weight"] = (out, inplanes, 1, 1)
        keys.update(_bn(f"{prefix}.downsample.1", out))
    return keys


def official_backbone_shapes(name: str) -> dict:
    """Ordered {key: shape} of the official ``backbone.*`` tensors (prefix removed), written
    from the reference's key table (section 10.1), independently of open_clip. Checked once
    against the official key lists (rn50.tsv, rn50x4.tsv): identical keys, shapes and order."""
    v = get_variant(name)
    w = v.width
    keys = {"conv1.weight": (w // 2, 3, 3, 3), **_bn("bn1", w // 2)}
    keys.update({"conv2.weight": (w // 2, w // 2, 3, 3), **_bn("bn2", w // 2)})
    keys.update({"conv3.weight": (w, w // 2, 3, 3), **_bn("bn3", w)})
    inplanes = w
    for stage, blocks in enumerate(v.layers):
        planes = w * 2**stage
        for b in range(blocks):
            keys.update(_block(f"layer{stage + 1}.{b}", inplanes, planes))
            inplanes = planes * 4
    e, grid = v.attnpool_dim, v.image_size // 32
    keys["attnpool.positional_embedding"] = (grid * grid + 1, e)
    for proj in ("k_proj", "q_proj", "v_proj"):
        keys.update({f"attnpool.{proj}.weight": (e, e), f"attnpool.{proj}.bias": (e,)})
    keys["attnpool.c_proj.weight"] = (v.embed_dim, e)
    keys["attnpool.c_proj.bias"] = (v.embed_dim,)
    return keys


def official_text_shapes(name: str) -> dict:
    """{key: shape} of the official ``lang_encoder.*`` tensors (prefix removed), section 10.1."""
    v = get_variant(name)
    w = v.text_width
    keys = {
        "token_embedding.weight": (v.vocab_size, w),
        "positional_embedding": (v.context_length, w),
        "ln_final.weight": (w,),
        "ln_final.bias": (w,),
        "text_projection": (w, v.embed_dim),
    }
    block = {
        "attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,),
        "attn.out_proj.weight": (w, w), "attn.out_proj.bias": (w,),
        "ln_1.weight": (w,), "ln_1.bias": (w,), "ln_2.weight": (w,), "ln_2.bias": (w,),
        "mlp.c_fc.weight": (4 * w, w), "mlp.c_fc.bias": (4 * w,),
        "mlp.c_proj.weight": (w, 4 * w), "mlp.c_proj.bias": (w,),
    }
    for i in range(v.text_layers):
        keys.update({f"transformer.resblocks.{i}.{k}": s for k, s in block.items()})
    return keys
