"""The CLIP ResNet variants and every size that follows from the variant.

The original selected RN50x4 with the magic value ``MODEL.RESNETS.DEPTH 200`` and asked users
to restate the embedding width and pooler resolution on every command line. Here one record
per variant holds all of it; :func:`variant_from_depth` is the single translation of the
legacy depth flag.
"""
from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class CLIPVariant:
    name: str
    layers: Tuple[int, int, int, int]  # bottleneck blocks per stage (layer1..layer4)
    width: int  # stem output channels; stage s has width * 2**(s-1) planes
    embed_dim: int  # joint image-text embedding width D (attention pool output)
    image_size: int  # CLIP input resolution; the attention pool grid is image_size / 32
    text_width: int
    text_heads: int
    text_layers: int = 12
    context_length: int = 77
    vocab_size: int = 49408

    @property
    def attnpool_dim(self) -> int:
        """Channels of res5, the attention pool's input."""
        return self.width * 32

    @property
    def attnpool_heads(self) -> int:
        return self.width * 32 // 64

    @property
    def stage_channels(self) -> Tuple[int, int, int, int]:
        """Output channels of res2..res5."""
        return tuple(self.width * 4 * 2**i for i in range(4))

    @property
    def pooler_resolution(self) -> int:
        """RoIAlign size on res4: res5 halves it to exactly the attention pool's grid."""
        return 2 * (self.image_size // 32)


VARIANTS = {
    v.name: v
    for v in (
        CLIPVariant("RN50", (3, 4, 6, 3), 64, 1024, 224, 512, 8),
        CLIPVariant("RN101", (3, 4, 23, 3), 64, 512, 224, 512, 8),
        CLIPVariant("RN50x4", (4, 6, 10, 6), 80, 640, 288, 640, 10),
        CLIPVariant("RN50x16", (6, 8, 18, 8), 96, 768, 384, 768, 12),
        CLIPVariant("RN50x64", (3, 15, 36, 10), 128, 1024, 448, 1024, 16),
        # The toy world's CLIP (regionclip/toyworld), trained from scratch on 2 CPU cores.
        CLIPVariant("toy", (1, 1, 1, 1), 16, 64, 128, 64, 2, text_layers=2, context_length=32),
        # A few-kilobyte model for tests: same structure, tiny sizes.
        CLIPVariant("tiny", (1, 1, 1, 1), 8, 32, 64, 32, 2, text_layers=2),
    )
}

# The original's `MODEL.RESNETS.DEPTH` values (200 was its flag for RN50x4).
LEGACY_DEPTHS = {50: "RN50", 101: "RN101", 200: "RN50x4"}


def get_variant(name: str) -> CLIPVariant:
    if name not in VARIANTS:
        raise ValueError(f"Unknown CLIP variant {name!r}; valid names: {sorted(VARIANTS)}")
    return VARIANTS[name]


def variant_from_depth(depth: int) -> CLIPVariant:
    if depth not in LEGACY_DEPTHS:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH {depth} does not name a CLIP ResNet; valid values: "
            f"{sorted(LEGACY_DEPTHS)} (200 = RN50x4), or set MODEL.CLIP.VARIANT to one of "
            f"{sorted(VARIANTS)}"
        )
    return VARIANTS[LEGACY_DEPTHS[depth]]
