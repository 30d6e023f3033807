"""Detic's zero-shot classifier: regions projected into CLIP's text space, scored by cosine.

logits = T * normalise(linear(x)) @ W, with W = [D, C + 1] the L2-normalised class embeddings
as columns plus an all-zero background column (its logit is always 0), T = ``NORM_TEMP`` (50)
and an optional learnable scalar bias. The state-dict names are Detic's:
``linear.{weight,bias}``, ``zs_weight`` (the [D, C + 1] matrix, a persistent buffer) and
``cls_bias``. A test vocabulary (``set_test_embeddings``, Detic's ``reset_cls_test``) replaces
``zs_weight`` in eval mode only and is never saved.
"""
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..text_encoder import load_embeddings

# The classifier matrix in a CustomRCNN state dict (Detic's checkpoints hold it).
ZS_WEIGHT_KEY = "roi_heads.box_predictor.cls_score.zs_weight"


def load_class_embeddings(path: str, dim: int) -> torch.Tensor:
    """[C, D] float32 class embeddings from a Detic ``.npy`` file (float16 [C, 512], rows
    unnormalised, as ``datasets/metadata/*_clip_a+cname.npy``) or a torch file of ours."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class-embedding file not found: {path} (Detic's .npy files "
                                "are in its repository under datasets/metadata/)")
    if not path.endswith(".npy"):
        return load_embeddings(path, expected_dim=dim)
    array = np.load(path, allow_pickle=False)
    if array.ndim != 2 or array.shape[1] != dim:
        raise ValueError(f"{path} holds an array of shape {array.shape}; expected [C, {dim}] "
                         f"(MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM {dim})")
    return torch.from_numpy(array.astype(np.float32))


def classifier_matrix(embeddings: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """[C, D] class embeddings -> [D, C + 1]: one column per class, then a zero background."""
    columns = torch.cat([embeddings.t().float(), embeddings.new_zeros(embeddings.shape[1], 1)],
                        dim=1)
    return F.normalize(columns, p=2, dim=0) if normalize else columns


class ZeroShotClassifier(nn.Module):
    """Scores [R, input_size] region features against class (or caption) embeddings.

    Args:
        input_size: region feature width (2048 for the R50 res5 head).
        num_classes: C; without ``embeddings`` the matrix is a zero placeholder for a
            checkpoint's ``zs_weight`` to fill.
        embeddings: [C, D] class embeddings, rows unnormalised.
        norm_weight, norm_temperature: cosine scoring with this logit scale (else raw dot
            products).
        use_bias: < 0 adds a learnable scalar logit bias initialised to it.
    """

    def __init__(self, input_size: int, num_classes: int, dim: int = 512,
                 embeddings: Optional[torch.Tensor] = None, norm_weight: bool = True,
                 norm_temperature: float = 50.0, use_bias: float = 0.0):
        super().__init__()
        if embeddings is not None and tuple(embeddings.shape) != (num_classes, dim):
            raise ValueError(f"class embeddings of shape {tuple(embeddings.shape)}; expected "
                             f"[{num_classes}, {dim}] (MODEL.ROI_HEADS.NUM_CLASSES, "
                             "MODEL.ROI_BOX_HEAD.ZEROSHOT_WEIGHT_DIM)")
        self.norm_weight = norm_weight
        self.norm_temperature = norm_temperature
        self.linear = nn.Linear(input_size, dim)
        weight = (classifier_matrix(embeddings, norm_weight) if embeddings is not None
                  else torch.zeros(dim, num_classes + 1))
        self.register_buffer("zs_weight", weight)
        self.register_buffer("test_weight", None, persistent=False)
        self.cls_bias = nn.Parameter(torch.full((1,), use_bias)) if use_bias < 0 else None

    def set_test_embeddings(self, embeddings: Optional[torch.Tensor]) -> None:
        """Classify with [C', D] ``embeddings`` in eval mode (None: back to ``zs_weight``)."""
        if embeddings is None:
            self.test_weight = None
            return
        dim = self.zs_weight.shape[0]
        if embeddings.dim() != 2 or embeddings.shape[1] != dim:
            raise ValueError(f"test class embeddings must be [C, {dim}], got "
                             f"{tuple(embeddings.shape)}")
        matrix = classifier_matrix(embeddings, self.norm_weight)
        self.test_weight = matrix.to(self.zs_weight.device)

    def weight(self) -> torch.Tensor:
        """The [D, C + 1] matrix in use: the test vocabulary in eval mode, when one is set."""
        if not self.training and self.test_weight is not None:
            return self.test_weight
        return self.zs_weight

    @property
    def num_classes(self) -> int:
        return self.weight().shape[1] - 1

    def forward(self, x: torch.Tensor, classifier: Optional[torch.Tensor] = None):
        """x: [R, input_size] -> logits [R, C + 1] (background last, always 0 before the bias);
        with ``classifier`` ([N, D] caption embeddings), [R, N] against those rows instead."""
        z = self.linear(x)
        if classifier is None:
            weight = self.weight()
        else:
            weight = classifier.t().to(z.dtype)
            weight = F.normalize(weight, p=2, dim=0) if self.norm_weight else weight
        if self.norm_weight:
            z = self.norm_temperature * F.normalize(z, p=2, dim=1)
        logits = z @ weight.to(z.dtype)
        return logits + self.cls_bias if self.cls_bias is not None else logits
