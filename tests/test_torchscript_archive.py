"""TorchScript archives (OpenAI's CLIP files) are read as data: the same state dict as
``torch.jit.load(...).state_dict()``, without running any code of the archive."""
import zipfile

import pytest
import torch
from torch import nn

from regionclip.checkpoint import CheckpointError, read_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


class _Block(nn.Module):
    def __init__(self, channels: int, mask: torch.Tensor):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 1, bias=channels % 2 == 0)  # odd: no bias (None)
        self.bn = nn.BatchNorm2d(channels)
        self.attn_mask = mask  # a plain tensor attribute: not in the state dict
        self.register_buffer("scale", torch.full((2,), float(channels)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        # Conv2d of two shapes: TorchScript names the second class ___torch_mangle_N.Conv2d
        self.blocks = nn.ModuleList([_Block(4, torch.zeros(2, 2)), _Block(5, torch.ones(3))])
        self.norm = nn.LayerNorm(4).half()
        self.proj = nn.Parameter(torch.randn(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[0](x)


class _CustomState(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.ones(2))

    @torch.jit.export
    def __getstate__(self):
        return (self.w, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]):
        self.w = state[0] * 0  # code that torch.jit.load would run
        self.training = state[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def test_archive_gives_jit_loads_state_dict_without_running_it(tmp_path, monkeypatch):
    torch.manual_seed(0)
    path = str(tmp_path / "model.pt")
    torch.jit.script(_Model()).save(path)
    expected = torch.jit.load(path).state_dict()

    def no_jit(*args, **kwargs):
        raise AssertionError("torch.jit.load was called")
    monkeypatch.setattr(torch.jit, "load", no_jit)
    state = read_checkpoint(path)
    assert list(state) == list(expected)  # parameters and buffers only, in state_dict's order
    for name, tensor in expected.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    assert state["norm.weight"].dtype == torch.float16
    assert "blocks.1.conv.bias" not in state and "blocks.0.attn_mask" not in state


def test_archive_with_a_custom_state_is_refused_unrun(tmp_path):
    path = str(tmp_path / "custom.pt")
    torch.jit.script(_CustomState()).save(path)
    assert torch.equal(torch.jit.load(path).w, torch.zeros(2))  # what running its code gives
    with pytest.raises(CheckpointError, match="custom.pt: TorchScript class .* custom state"):
        read_checkpoint(path)


def test_archive_whose_code_lists_no_buffers_gives_every_tensor_attribute(tmp_path):
    """Archives of older torch versions may not list ``__buffers__``: no buffer is lost then
    (plain tensor attributes come too, and are reported as unused when loaded)."""
    torch.manual_seed(0)
    path, old = str(tmp_path / "model.pt"), str(tmp_path / "old.pt")
    torch.jit.script(_Model()).save(path)
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(old, "w") as target:
        for item in source.infolist():
            data = source.read(item)
            if item.filename.endswith(".py"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if "__buffers__" not in line).encode()
            target.writestr(item, data)
    state, expected = read_checkpoint(old), read_checkpoint(path)
    assert set(state) == set(expected) | {"blocks.0.attn_mask", "blocks.1.attn_mask"}
    assert all(torch.equal(state[name], tensor) for name, tensor in expected.items())
