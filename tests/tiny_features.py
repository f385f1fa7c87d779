"""A small random stand-in for the Inception-v3 feature network of ``model.imagenet`` with its
interface: uint8 images ``(N, 3, H, W)`` in, ``(features (N, 32), logits (N, 10))`` out. Its
weights come from a fixed seed, so every process (each rank of a gloo run) builds the same one."""

from __future__ import annotations

import torch
from torch import nn


class TinyFeatures(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv = nn.Conv2d(3, 16, kernel_size=3, padding=1)
        self.head = nn.Linear(32, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
        self.eval()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"TinyFeatures: need uint8 (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        x = (images.float() - 128) / 128
        h = torch.tanh(self.conv(x))
        feats = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return feats, self.head(feats)
