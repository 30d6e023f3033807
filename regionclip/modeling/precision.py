"""Inference precision (``MODEL.PRECISION``): the exact fp32 path and the opt-in fast paths.

``fp32``       the default and the exact path: every op as written, TF32 off on GPUs (PyTorch
               lets cuDNN convolutions use TF32 by default, which moves scores by ~1e-3).
``fp32-fast``  the same float32 math, re-associated: frozen BN folded into the CLIP trunk's
               convolutions, channels-last activations and an attention pool
               with its key and value projections folded into the query (a 25th of its
               FLOPs). Results differ from ``fp32`` by float rounding only (region
               embeddings ~1e-6 relative).
``tf32``       ``fp32-fast`` with TF32 tensor-core matmuls and convolutions (CUDA; elsewhere it
               is ``fp32-fast``).
``bf16``       ``tf32`` with the CLIP trunk (res4, res5) under bfloat16 autocast; the
               attention pool, classifier and post-processing stay float32 (TF32 on CUDA).
               Pays on GPUs and CPUs with bf16 matrix units only.

The offline RPN stays exact on every path: its top-k and NMS turn rounding differences into
other proposals (measured: folding its BN changed 17 of 100 RN50 detections). The fast paths
run on an inference-only copy of the CLIP trunk (`FastCopies`), rebuilt whenever a parameter of
the original changes, so training and checkpoints only ever see the original.
"""
import contextlib
import copy
from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import FrozenBatchNorm2d
from .clip_resnet import CLIPResNet, GridAttentionPool2d

PRECISIONS = ("fp32", "fp32-fast", "tf32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"Unknown MODEL.PRECISION {precision!r}: choose one of {PRECISIONS}")
    return precision


@contextlib.contextmanager
def tf32_mode(enabled: bool):
    """TF32 matmuls and cuDNN convolutions on or off inside the block, restored after."""
    cudnn_conv = getattr(torch.backends.cudnn, "conv", None)
    if hasattr(cudnn_conv, "fp32_precision"):  # torch >= 2.9; mixing with the old flags fails
        switches = [(torch.backends.cuda.matmul, "fp32_precision", "tf32", "ieee"),
                    (cudnn_conv, "fp32_precision", "tf32", "ieee")]
    else:
        switches = [(torch.backends.cuda.matmul, "allow_tf32", True, False),
                    (torch.backends.cudnn, "allow_tf32", True, False)]
    saved = [getattr(owner, name) for owner, name, _, _ in switches]
    for owner, name, on, off in switches:
        setattr(owner, name, on if enabled else off)
    try:
        yield
    finally:
        for (owner, name, _, _), value in zip(switches, saved):
            setattr(owner, name, value)


def trunk_autocast(precision: str, device_type: str):
    """bfloat16 autocast for the trunk in ``bf16``; a no-op context otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class FoldedAttentionPool(GridAttentionPool2d):
    """CLIP's attention pool for the pooled token only, with fewer FLOPs and the same math.

    Token 0 queries every token: per head h, q_h . (W_k,h t + b_k,h) = (W_k,h^T q_h) . t + c,
    and c (the same for every token) cancels in the softmax; sum_t a_t (W_v,h t + b_v,h) =
    W_v,h (sum_t a_t t) + b_v,h since the weights sum to one. Projecting the query back and
    pooling the tokens first replaces two projections of all HW + 1 tokens by four of one.
    It runs in float32 even under autocast: the classifier divides cosines by 0.01.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, grid, grid] -> [N, output_dim], at least float32."""
        if tuple(x.shape[-2:]) != (self.grid, self.grid):
            return super().forward(x)  # raises the readable error
        with torch.autocast(x.device.type, enabled=False):
            return self._pool(x.to(torch.promote_types(x.dtype, torch.float32)))

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        n, channels = x.shape[:2]
        heads, width = self.num_heads, x.shape[1] // self.num_heads
        tokens = x.flatten(2).transpose(1, 2)  # [N, HW, C]
        tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1)
        tokens = tokens + self.positional_embedding.to(tokens.dtype)
        query = F.linear(tokens[:, 0], self.q_proj.weight, self.q_proj.bias) * width ** -0.5
        keys = self.k_proj.weight.view(heads, width, channels)
        query = torch.einsum("nhd,hdc->nhc", query.view(n, heads, width), keys)
        weights = torch.bmm(query, tokens.transpose(1, 2)).softmax(dim=-1)  # [N, heads, HW+1]
        pooled = torch.bmm(weights, tokens)  # [N, heads, C]
        values = self.v_proj.weight.view(heads, width, channels)
        out = torch.einsum("nhc,hdc->nhd", pooled, values).reshape(n, channels)
        return self.c_proj(out + self.v_proj.bias)


def fold_frozen_bn_(conv: nn.Conv2d, norm: FrozenBatchNorm2d) -> None:
    """Make ``conv`` (in place, gaining a bias) compute ``norm(conv(x))``."""
    scale = norm.weight * (norm.running_var + norm.eps).rsqrt()
    bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
    conv.weight = nn.Parameter(conv.weight * scale[:, None, None, None], requires_grad=False)
    conv.bias = nn.Parameter((bias - norm.running_mean) * scale + norm.bias, requires_grad=False)


def _fold_norms_(module: nn.Module) -> None:
    """Fold every frozen BN that directly follows a convolution below ``module``, in place:
    CLIP's conv{i} -> bn{i} pairs (stem, bottlenecks) and downsample ``"0"`` -> ``"1"``."""
    pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)] + [("0", "1")]
    for child in list(module.modules()):
        for conv_name, norm_name in pairs:
            conv, norm = getattr(child, conv_name, None), getattr(child, norm_name, None)
            if isinstance(conv, nn.Conv2d) and isinstance(norm, FrozenBatchNorm2d):
                fold_frozen_bn_(conv, norm)
                setattr(child, norm_name, nn.Identity())


def fast_trunk(trunk: CLIPResNet) -> CLIPResNet:
    """An inference-only copy of ``trunk``: BN folded, channels-last, folded attention pool."""
    fast = copy.deepcopy(trunk).eval().requires_grad_(False)
    with torch.no_grad():
        _fold_norms_(fast)
    fast = fast.to(memory_format=torch.channels_last)
    pool = fast.attnpool
    folded = FoldedAttentionPool(pool.grid, pool.k_proj.in_features, pool.num_heads,
                                 pool.c_proj.out_features)
    folded.load_state_dict(pool.state_dict())
    fast.attnpool = folded.to(pool.c_proj.weight).requires_grad_(False)
    return fast


class FastCopies:
    """Fast inference copies of modules, remade when a parameter or buffer of the original
    changes (optimizer steps, loaded weights and device moves all change a tensor's version
    or storage). A plain object, so no copy ever enters a state dict."""

    def __init__(self):
        self._cache: Dict[int, Tuple[tuple, nn.Module]] = {}

    def get(self, module: nn.Module, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
        key = tuple((t.data_ptr(), t._version) for t in (*module.parameters(), *module.buffers()))
        cached = self._cache.get(id(module))
        if cached is None or cached[0] != key:
            cached = (key, make(module))
            self._cache[id(module)] = cached
        return cached[1]
