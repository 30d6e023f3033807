"""Text before the text tower: the original's prompt templates and CLIP's tokenizer.

Shared by the caption data (``regionclip.data``) and the text tower (``regionclip.modeling``).
RegionCLIP's ``get_prompt_templates`` returns OpenAI's 80 ImageNet templates in its own
shuffled order with a bare ``'{}.'`` in front: 81 templates. The order does not change the mean
embedding, but it is kept so that per-template tensors line up with the original's.
"""
from typing import Sequence, Union

import torch
from open_clip.tokenizer import tokenize as _open_clip_tokenize

CONTEXT_LENGTH = 77

PROMPT_TEMPLATES = (
    "{}.", "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.",
    "a sculpture of a {}.", "a photo of the hard to see {}.", "a low resolution photo of the {}.",
    "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.",
    "the plastic {}.", "a photo of the cool {}.", "a close-up photo of a {}.",
    "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.", "a photo of the {}.",
    "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.",
    "a photo of a nice {}.", "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.",
    "art of a {}.", "a sketch of the {}.", "a embroidered {}.", "a pixelated photo of a {}.",
    "itap of the {}.", "a jpeg corrupted photo of the {}.", "a good photo of a {}.",
    "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.",
    "a dark photo of a {}.", "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.",
    "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)


def prompt_engineering(name: str, template: str) -> str:
    """Fill ``template`` with ``name`` as the original did: commas dropped, ``+`` -> space."""
    return template.replace("{}", name.replace(",", "").replace("+", " "))


def build_prompts(name: str, templates=PROMPT_TEMPLATES) -> list:
    """All prompts for one class name, in template order."""
    return [prompt_engineering(name, t) for t in templates]


def tokenize(texts: Union[str, Sequence[str]],
             context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
    """CLIP BPE ids, [N, context_length] long, zero-padded.

    Over-long texts: open_clip truncates and puts EOT in the last position; the original
    truncated and dropped EOT, so EOT pooling then read an arbitrary word. We keep open_clip's
    behaviour. Prompts built from class names never come close to 77 tokens.
    """
    return _open_clip_tokenize(texts, context_length=context_length)  # a str is one text
