"""Sample-quality metrics: sliced Wasserstein-1 (2-D), improved precision/recall (k-NN manifolds,
Kynkäänniemi et al. 2019, as in the GMFlow paper's tables), the Fréchet distance (FID's formula, in
any feature space: a small digits classifier's here, Inception-v3's in model/imagenet.py), the
Inception score, that classifier's accuracy on class-conditional samples, and a saturation measure."""

from __future__ import annotations

import math

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


def _kth_nn_radius(feats: torch.Tensor, k: int, chunk: int, mode: str) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row (``chunk`` rows of the distance matrix at a time)."""
    return torch.cat(
        [torch.cdist(part, feats, compute_mode=mode).kthvalue(k + 1, dim=1).values for part in feats.split(chunk)]
    )  # k + 1: the row itself at distance 0


def _share_inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int, mode: str) -> float:
    """Share of ``points`` within ``radii[j]`` of some ``centres[j]`` (inside the k-NN manifold of ``centres``)."""
    inside = [(torch.cdist(part, centres, compute_mode=mode) <= radii).any(dim=1) for part in points.split(chunk)]
    return torch.cat(inside).double().mean().item()


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 2048, exact: bool = True
) -> tuple[float, float]:
    """Improved precision (share of ``fake`` inside the real k-NN manifold) and recall (share of
    ``real`` inside the fake k-NN manifold); ``real (N, F)``, ``fake (M, F)``. Float64 distances,
    ``chunk`` rows at a time: 50,000 x 2048 features need ``chunk * 50,000 * 8`` bytes at once, not
    the whole distance matrix. ``exact``: each distance summed term by term, so no rounding decides
    a k-NN tie (small sets); else through matrix products (``|a|^2 + |b|^2 - 2ab``, float64
    rounding), which is what makes 50,000 x 50,000 distances in 2048 dimensions take minutes, not hours."""
    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1] or min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(
            f"precision_recall: real and fake must be (N, F) and (M, F) with N, M > k={k}, "
            f"got {tuple(real.shape)} and {tuple(fake.shape)}"
        )
    real, fake = real.double(), fake.double()
    mode = "donot_use_mm_for_euclid_dist" if exact else "use_mm_for_euclid_dist"
    r_real, r_fake = _kth_nn_radius(real, k, chunk, mode), _kth_nn_radius(fake, k, chunk, mode)
    return _share_inside(fake, real, r_real, chunk, mode), _share_inside(real, fake, r_fake, chunk, mode)


def feature_stats(feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean (F,), covariance (F, F))`` of ``feats (N, F)`` in float64, the covariance unbiased
    (``N - 1``, as the ADM reference statistics and ``numpy.cov``)."""
    feats = feats.double()
    return feats.mean(0), torch.cov(feats.t())


def frechet_distance_from_stats(mu_a, s_a, mu_b, s_b) -> float:
    """FID's formula on Gaussian statistics (tensors or arrays): ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 C)``.

    ``C = (S_a^1/2 S_b S_a^1/2)^1/2`` has the trace of the usual ``sqrtm(S_a S_b)`` (the two matrices
    are similar) but comes from two symmetric eigendecompositions in float64 with eigenvalues
    clamped at 0, so a singular covariance (fewer samples than features) leaves no imaginary part to
    discard."""
    mu_a, mu_b, s_a, s_b = (torch.as_tensor(v).double() for v in (mu_a, mu_b, s_a, s_b))
    if mu_a.dim() != 1 or mu_a.shape != mu_b.shape or s_a.shape != (mu_a.shape[0],) * 2 or s_b.shape != s_a.shape:
        raise ValueError(
            f"frechet_distance_from_stats: need means (F,) and covariances (F, F) of one F, got "
            f"{tuple(mu_a.shape)}, {tuple(s_a.shape)}, {tuple(mu_b.shape)}, {tuple(s_b.shape)}"
        )
    ev, vec = torch.linalg.eigh(s_a)
    root_a = (vec * ev.clamp_min(0).sqrt()) @ vec.t()
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp_min(0).sqrt().sum()
    return ((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross).clamp_min(0).item()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``a (N, F)`` and ``b (M, F)``
    (:func:`frechet_distance_from_stats` of :func:`feature_stats`). Unlike precision alone it grows
    when samples lose diversity."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(
            f"frechet_distance: a and b must be (N, F) and (M, F) with N, M >= 2, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return frechet_distance_from_stats(*feature_stats(a), *feature_stats(b))


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception score ``exp(E_x KL(p(y|x) || p(y)))`` of classifier ``logits (N, L)``: mean and
    std over ``splits`` contiguous parts (ADM's evaluator: 50,000 samples in 10 parts of 5,000;
    ``p(y)`` is a part's mean prediction). Float64."""
    if logits.dim() != 2 or not 1 <= splits <= logits.shape[0]:
        raise ValueError(f"inception_score: logits must be (N, L) with N >= splits={splits}, got {tuple(logits.shape)}")
    logp = logits.double().log_softmax(dim=1)
    scores = []
    for part in logp.tensor_split(splits):
        # log p(y) by logsumexp: finite for a class no sample predicts, where log(mean(p)) = -inf gave 0 * inf = NaN
        log_marginal = part.logsumexp(0) - math.log(part.shape[0])
        scores.append((part.exp() * (part - log_marginal)).sum(1).mean().exp())
    scores = torch.stack(scores)
    return scores.mean().item(), scores.std(unbiased=False).item()


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
