"""Sample-quality metrics: sliced Wasserstein-1 (2-D), improved precision/recall (k-NN manifolds,
Kynkäänniemi et al. 2019, as in the GMFlow paper's tables) and the Fréchet distance in the feature
space of a small digits classifier, that classifier's accuracy on class-conditional samples, and a saturation measure."""

from __future__ import annotations

import torch
from torch import nn

from .data import load_digits_split


def sliced_w1(
    a: torch.Tensor, b: torch.Tensor, projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """Sliced Wasserstein-1 between point sets ``a (N, D)`` and ``b (N, D)`` (equal N): the mean
    over random unit directions of the 1-D W1 of the projections (sorted differences)."""
    if a.dim() != 2 or a.shape != b.shape:
        raise ValueError(
            f"sliced_w1: a and b must both be (N, D) of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    d = torch.randn(a.shape[1], projections, generator=generator, dtype=torch.float64)
    d = d / d.norm(dim=0, keepdim=True)
    pa = (a.double() @ d).sort(dim=0).values
    pb = (b.double() @ d).sort(dim=0).values
    return (pa - pb).abs().mean().item()


def _kth_nn_radius(feats: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row."""
    dist = torch.cdist(feats, feats, compute_mode="donot_use_mm_for_euclid_dist")
    return dist.kthvalue(k + 1, dim=1).values  # +1: the row itself at distance 0


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision (share of ``fake`` inside the real k-NN manifold) and recall (share of
    ``real`` inside the fake k-NN manifold); ``real (N, F)``, ``fake (M, F)``."""
    real, fake = real.double(), fake.double()  # exact distances: no rounding decides a k-NN tie
    r_real, r_fake = _kth_nn_radius(real, k), _kth_nn_radius(fake, k)
    d = torch.cdist(fake, real, compute_mode="donot_use_mm_for_euclid_dist")  # (M, N)
    precision = (d <= r_real.unsqueeze(0)).any(dim=1).float().mean().item()
    recall = (d.t() <= r_fake.unsqueeze(0)).any(dim=1).float().mean().item()
    return precision, recall


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``a (N, F)`` and ``b (M, F)`` (FID's formula in
    any feature space): ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)``, float64,
    eigenvalues clamped at 0. Unlike precision alone it grows when samples lose diversity."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(
            f"frechet_distance: a and b must be (N, F) and (M, F) with N, M >= 2, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.t()), torch.cov(b.t())
    ev, vec = torch.linalg.eigh(s_a)
    root_a = (vec * ev.clamp_min(0).sqrt()) @ vec.t()
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross).clamp_min(0).item()


class DigitsClassifier(nn.Module):
    """MLP on flattened 8x8 digits in [-1, 1]; ``features`` is the 128-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def train_digits_classifier(seed: int = 0, steps: int = 600) -> tuple[DigitsClassifier, float]:
    """Train the feature/label network on the digits train split (full-batch AdamW, small input
    noise for smoothness); returns it in eval mode and its test-split accuracy."""
    x, y = load_digits_split("train")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    clf = DigitsClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-3)
    with torch.enable_grad():
        for _ in range(steps):
            loss = nn.functional.cross_entropy(clf(x + 0.1 * torch.randn(x.shape, generator=g)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    clf.eval()
    xt, yt = load_digits_split("test")
    with torch.no_grad():
        acc = (clf(xt).argmax(1) == yt).float().mean().item()
    return clf, acc


def saturation(
    samples: torch.Tensor, data: torch.Tensor, lo: float = -1.0, hi: float = 1.0, tol: float = 0.125
) -> tuple[float, float]:
    """``(share of pixels at or beyond the data range by more than tol (one grey level of the
    17-level digits), mean per-image contrast of samples / that of data)``; contrast is the
    per-image pixel std. CFG's over-saturation shows as both going up."""
    sat = ((samples <= lo - tol) | (samples >= hi + tol)).float().mean().item()
    contrast = samples.flatten(1).std(1).mean() / data.flatten(1).std(1).mean()
    return sat, contrast.item()
