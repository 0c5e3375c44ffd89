"""Small fully-convolutional models for tests and benchmarks, exported as real .pt2 archives."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

BATCH = torch.export.Dim("batch", min=1, max=4096)


class ConvNet(torch.nn.Module):
    """``layers`` 3x3 convolutions: receptive-field radius = ``layers`` pixels."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int = 8, layers: int = 3, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        chans = [in_channels] + [hidden] * (layers - 1) + [out_channels]
        self.convs = torch.nn.ModuleList(
            torch.nn.Conv2d(a, b, 3, padding=1) for a, b in itertools.pairwise(chans)
        )
        with torch.no_grad():
            for conv in self.convs:
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.3)
                conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1:
                x = torch.tanh(x)
        return x


def export_pt2(model: torch.nn.Module, path: Path, in_channels: int, patch: int | None) -> Path:
    """Export with a dynamic batch (and fixed C/H/W unless ``patch`` is None) and save."""
    model = model.eval()
    size = patch or 32
    example = (torch.randn(2, in_channels, size, size),)
    dims: dict[int, object] = {0: BATCH}
    if patch is None:
        dims.update({2: torch.export.Dim("h", min=8, max=4096), 3: torch.export.Dim("w", min=8, max=4096)})
    ep = torch.export.export(model, example, dynamic_shapes=({**dims},))
    torch.export.save(ep, str(path))
    return path


def conv_pt2(path: Path, in_channels: int, out_channels: int, patch: int | None = None, **kw: int) -> Path:
    return export_pt2(ConvNet(in_channels, out_channels, **kw), path, in_channels, patch)
